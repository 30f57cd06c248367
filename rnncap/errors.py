"""Errors a user can cause. The command line prints them as one line, no traceback."""


class RnncapError(Exception):
    """A problem with the user's input: a file, a field, or an argument.

    The message must name what is wrong (the file or field) and, where it helps,
    how to fix it.
    """


class DataError(RnncapError):
    """A dataset or image file that cannot be used."""


class CheckpointError(RnncapError):
    """A checkpoint that is missing, truncated, unsafe, or incompatible."""


class TrainingDiverged(RnncapError):
    """The loss became NaN or infinite."""


class DeviceUnavailable(RnncapError, RuntimeError):
    """A device (GPU) was asked for but is not usable here."""
