"""The ``rnncap`` command line.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``. Modules import heavy libraries (torch, h5py) inside ``run`` so
that ``rnncap --help`` stays fast. Errors a user can cause (``RnncapError``) print
as one line, never as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from .errors import RnncapError

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("rnncap.demo", "generate a synthetic dataset, train, caption and report (the main job)"),
    "download": ("rnncap.data.download", "download a dataset (e.g. coco-cs231n), resumably"),
    "features": ("rnncap.encoding.features", "encode images into an HDF5 feature cache (optional PCA)"),
    "train": ("rnncap.training.train", "train a captioner on cached features"),
    "caption": ("rnncap.inference.sample", "caption photos with a trained checkpoint"),
    "evaluate": ("rnncap.evaluation.evaluate", "COCO metrics, diversity and an HTML report on a split"),
    "bench": ("rnncap.bench.command", "time a training step and decoding against PyTorch"),
    "serve": ("rnncap.inference.serve", "a web page and a JSON API that caption photos"),
}


# ---- argparse types shared by every subcommand --------------------------------------

def _checked(convert, ok, what):
    """An argparse type: ``convert`` the text, then require ``ok(value)``."""
    def parse(text):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
# NaN fails every comparison, so these refuse it; inf is refused explicitly.
positive_float = _checked(float, lambda v: 0 < v < float("inf"), "a positive finite number")
nonneg_float = _checked(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")
unit_float = _checked(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


# ---- entry point --------------------------------------------------------------------

def build_parser():
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="rnncap",
        description="Recurrent image captioning from scratch in NumPy.")
    parser.add_argument("--version", action="version", version=f"rnncap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (modname, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:
            if e.name == modname:  # command not built into this version
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None):
    # torch's OpenMP threads otherwise spin while they wait, burning the CPU that
    # the NumPy side needs; only read when torch loads, and a user's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(args.command)
            return int(args._run(args) or 0)
    except RnncapError as e:
        print(f"rnncap {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = {"torch": "vision", "PIL": "vision", "h5py": "vision",
                 "pycocoevalcap": "eval", "matplotlib": "report", "cupy": "gpu",
                 "fastapi": "serve", "starlette": "serve", "uvicorn": "serve", "multipart": "serve",
                 "python_multipart": "serve"}.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"rnncap {args.command}: error: this needs the package {e.name!r}; "
              f"install it with: pip install 'rnncap[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rnncap {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line_warnings(command):
    """A ``warnings.showwarning`` that prints rnncap's own warnings (a UserWarning raised
    in the package: a skipped image, an ignored line) as one line, like errors, instead
    of Python's two lines with a source line from inside the package. Warnings from
    other libraries keep Python's form."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    python_form = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(package):
            print(f"rnncap {command}: warning: {message}", file=sys.stderr if file is None else file)
        else:
            python_form(message, category, filename, lineno, file, line)
    return show


if __name__ == "__main__":
    sys.exit(main())
