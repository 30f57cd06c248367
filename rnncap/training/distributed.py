"""Data-parallel training on torch.distributed: ``torchrun ... -m rnncap train --distributed``.

Every rank (one process each) holds the whole model and the whole training set, and
one step goes like this:

1. every rank forms the same global minibatch: the Trainer's shuffling is seeded by
   (seed, epoch), so no index is ever sent;
2. rank r runs only its rows of it, ``[B*r//N, B*(r+1)//N)``, through the model;
3. its gradients, scaled by (its rows / B), and its loss go into ONE flat buffer,
   which one all-reduce sums over the ranks;
4. every rank then takes the same optimizer step from the same gradients, so the
   parameters stay identical everywhere without ever being sent after the start.

``DataParallel`` does steps 2-3 behind the model contract (``params``, ``xp``, ``rng``,
``loss(X, y, train=True) -> (loss, grads)``), so the Trainer and the model know nothing
of it, and neither the core (layers, model) nor the Trainer imports torch.distributed.

Dropout is where a split batch could differ from a whole one: ``CaptioningModel.loss``
draws its masks from ``model.rng`` for the rows it is given. While a rank's rows run,
the wrapper swaps in a view of the generator that draws the *global* batch's numbers
and hands back the rank's rows, skipping the other rows' numbers with PCG64's
``advance`` rather than drawing them. So the masks, the generator state after every
step (saved in checkpoints) and hence the whole run are those of one process training
on the same batches, whatever the world size; only float rounding differs, as the sum
of the gradients is taken in another order. (A model that draws anything but
per-row ``rng.random`` arrays during ``loss`` is refused with a clear error rather than
trained with other masks.)

The collective is a small interface (``Collective``): ``TorchCollective`` over
torch.distributed with gloo on CPUs. On GPUs the same flat buffer would be a CuPy
array handed to NCCL without a copy through DLPack (``torch.from_dlpack``): that path
is written (``init_from_env(device="gpu")``) but has not been run, as no machine here
has a GPU and torch is the CPU wheel. torchrun is used rather than mpi4py because it
ships with torch, already a dependency of the encoders, and needs no MPI install.
"""
from __future__ import annotations

import json
import math
import os
import signal
import zlib
from contextlib import contextmanager

import numpy as np

from ..errors import RnncapError


class PeerLost(RnncapError):
    """A rank died or became unreachable; the job cannot go on."""


def shard_bounds(n, rank, world_size):
    """(lo, hi): the rows [lo, hi) of an n-row batch that ``rank`` runs. Contiguous,
    in rank order, sizes differing by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


# ---- the collective -------------------------------------------------------------------

class Collective:
    """What DataParallel needs from a communication library.

    ``rank``, ``world_size``; ``all_reduce_(buf, op)`` sums ("sum") or maximises ("max")
    a 1-d array in place across ranks, leaving the same bits on every rank;
    ``broadcast_(buf, src)``; ``close()``.
    """

    rank = 0
    world_size = 1

    def all_reduce_(self, buf, op="sum"):
        raise NotImplementedError

    def broadcast_(self, buf, src=0):
        raise NotImplementedError

    def close(self):
        pass


class TorchCollective(Collective):
    """torch.distributed's default process group (gloo on CPUs, NCCL on GPUs).

    NumPy buffers are shared with a torch tensor (``torch.from_numpy``), CuPy buffers
    through DLPack (``torch.from_dlpack``): the collective writes straight into them.
    """

    def __init__(self, dist):
        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.backend = dist.get_backend()

    def _tensor(self, buf):
        import torch

        if isinstance(buf, np.ndarray):
            return torch.from_numpy(buf)
        return torch.from_dlpack(buf)  # a CuPy array on this rank's GPU

    def all_reduce_(self, buf, op="sum"):
        ops = {"sum": self._dist.ReduceOp.SUM, "max": self._dist.ReduceOp.MAX}
        self._dist.all_reduce(self._tensor(buf), op=ops[op])
        return buf

    def broadcast_(self, buf, src=0):
        self._dist.broadcast(self._tensor(buf), src=src)
        return buf

    def close(self):
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def init_from_env(device="cpu", timeout_s=1800):
    """Join the process group that torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): gloo for "cpu", NCCL for "gpu" (one GPU per local
    rank). Returns a ``TorchCollective``.

    A collective that waits longer than ``timeout_s`` for a peer fails. SIGTERM (sent by
    torchrun to the other ranks when one fails) becomes a one-line ``PeerLost``.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RnncapError(f"--distributed: {', '.join(missing)} not set; launch with "
                          f"`torchrun --nproc_per_node N -m rnncap train --distributed ...`")
    from datetime import timedelta

    import torch.distributed as dist

    backend = "gloo"
    if device != "cpu":
        from ..backend import xp_for

        cp = xp_for(device)  # raises DeviceUnavailable without CuPy and a GPU
        cp.cuda.Device(int(os.environ.get("LOCAL_RANK", 0))).use()
        backend = "nccl"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        raise RnncapError(f"--distributed: could not join the process group at "
                          f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({_first_line(e)})") from None
    comm = TorchCollective(dist)

    def on_sigterm(signum, frame):
        raise PeerLost(f"rank {comm.rank} of {comm.world_size}: stopped by the launcher (SIGTERM), "
                       f"most likely because another rank failed; see its message")

    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, on_sigterm)
    return comm


def _first_line(e):
    """The gist of a backend error: its first sentence, without gloo's source location."""
    text = str(e).strip()
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    text = text.splitlines()[0] if text else type(e).__name__
    return text.split(". ")[0][:300]


# ---- the model wrapper ------------------------------------------------------------------

class DataParallel:
    """A model with the contract of the wrapped one, whose ``loss`` runs this rank's
    rows of the global batch and returns the global batch's loss and gradients.

    model: has ``params``, ``xp`` and ``loss(X, y, train=True)``; ``rng`` (a NumPy
        Generator) when it uses dropout.
    comm: a ``Collective``.
    resume_hint: the checkpoint to name in the message when a peer is lost.

    Anything else (``step``, ``init_state``, ``config``...) is the wrapped model's, so
    decoding for validation works on every rank, on the full data.
    """

    def __init__(self, model, comm, resume_hint=None):
        self.module, self.comm = model, comm
        self.rank, self.world_size = comm.rank, comm.world_size
        self.is_main = self.rank == 0
        self.resume_hint = resume_hint
        self.steps = 0            # training all-reduces done
        self._keys = sorted(model.params)  # one order on every rank
        self.broadcast_params()

    def __getattr__(self, name):  # only called for names not found on the wrapper
        if name == "module":
            raise AttributeError(name)
        return getattr(self.module, name)

    @property
    def params(self):
        return self.module.params

    @property
    def xp(self):
        return self.module.xp

    @property
    def rng(self):
        return self.module.rng

    # -- the step --------------------------------------------------------------------

    def loss(self, X, y, train=True):
        """(loss, grads) of the whole batch (X, y), every rank running its rows."""
        B = len(y)
        lo, hi = shard_bounds(B, self.rank, self.world_size)
        weight = (hi - lo) / B
        if hi == lo:
            # A short last batch can leave a rank without rows: it runs one row with
            # weight 0, so that its random stream advances like the other ranks'.
            lo, hi = 0, 1
        with _global_batch_draws(self.module, B, lo, hi):
            loss, grads = self.module.loss(X[lo:hi], y[lo:hi], train=train)
        xp = self.xp
        if not train:  # validation: no update follows, only the loss is summed
            buf = xp.asarray([float(loss) * weight], dtype=np.float64)
            self._reduce(buf, "validation")
            return float(buf[0]), None
        sizes = [grads[k].size for k in self._keys]
        buf = xp.empty(sum(sizes) + 1, dtype=grads[self._keys[0]].dtype)
        o = 0
        for k, n in zip(self._keys, sizes):
            xp.multiply(grads[k].reshape(-1), weight, out=buf[o:o + n])
            o += n
        buf[o] = loss * weight
        self._reduce(buf, f"step {self.steps + 1}")
        self.steps += 1
        out, o = {}, 0
        for k, n in zip(self._keys, sizes):
            out[k] = buf[o:o + n].reshape(grads[k].shape)
            o += n
        return float(buf[o]), out

    # -- agreement between ranks ---------------------------------------------------------

    def broadcast_params(self):
        """Give every rank rank 0's parameters (one flat buffer)."""
        if self.world_size == 1:
            return
        p = self.module.params
        xp = self.xp
        buf = xp.concatenate([xp.asarray(p[k]).reshape(-1) for k in self._keys])
        self._broadcast(buf)
        o = 0
        for k in self._keys:
            n = p[k].size
            p[k] = buf[o:o + n].reshape(p[k].shape).copy()
            o += n

    def check_same(self, **values):
        """Stop with one line unless every rank passes the same numbers (e.g. the size
        and a checksum of its training data: each node reads its own copy)."""
        names = list(values)
        v = np.array([float(values[k]) for k in names], dtype=np.float64)
        buf = np.concatenate([v, -v])
        self._reduce(buf, "the start-up check", op="max")
        hi, lo = buf[:len(v)], -buf[len(v):]
        differ = [k for k, a, b in zip(names, hi, lo) if a != b]
        if differ:
            raise RnncapError(f"--distributed: the ranks disagree on {', '.join(differ)} "
                              f"(this rank has {', '.join(f'{k}={values[k]}' for k in differ)}); "
                              f"every rank must read the same data and checkpoint")

    def close(self):
        self.comm.close()

    # -- failures -----------------------------------------------------------------------

    def _reduce(self, buf, what, op="sum"):
        try:
            self.comm.all_reduce_(buf, op)
        except RuntimeError as e:  # torch.distributed.DistBackendError and kin
            raise self._lost(what, e) from None

    def _broadcast(self, buf):
        try:
            self.comm.broadcast_(buf, 0)
        except RuntimeError as e:
            raise self._lost("the start-up broadcast", e) from None

    def _lost(self, what, e):
        hint = (f"; relaunch with --resume {self.resume_hint} to continue from the last checkpoint"
                if self.resume_hint else "")
        return PeerLost(f"rank {self.rank} of {self.world_size}: lost a peer during the all-reduce of "
                        f"{what} ({_first_line(e)}); the job stops{hint}")


def data_checksum(*arrays):
    """A CRC-32 of arrays' bytes, for ``check_same`` (exact in a float64)."""
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1), crc)
    return crc


# ---- dropout masks of the global batch ---------------------------------------------------

@contextmanager
def _global_batch_draws(model, B, lo, hi):
    """While the rows [lo, hi) of a B-row batch run, ``model.rng`` is a view that draws
    the global batch's random numbers and returns those of these rows."""
    real = getattr(model, "rng", None)
    if real is None or B == hi - lo:
        yield
        return
    model.rng = _RowsOfGlobalDraws(real, B, lo, hi)
    try:
        yield
    finally:
        model.rng = real


class _RowsOfGlobalDraws:
    """Stands in for a ``numpy.random.Generator`` during one rank's ``loss``: each
    ``random((hi - lo, ...))`` returns rows [lo, hi) of what ``random((B, ...))``
    would have returned, and leaves the generator where that draw would have."""

    def __init__(self, rng, B, lo, hi):
        self._rng, self._B, self._lo, self._hi = rng, B, lo, hi

    def random(self, size=None, dtype=np.float64, out=None):
        size = (size,) if isinstance(size, (int, np.integer)) else tuple(size or ())
        n = self._hi - self._lo
        if out is not None or not size or size[0] != n:
            raise RnncapError(f"--distributed: the model drew random numbers of shape {size} for a "
                              f"{n}-row slice; only per-row draws can be split across ranks")
        rest, per_row = size[1:], math.prod(size[1:])
        bg = self._rng.bit_generator
        if np.dtype(dtype) == np.float64 and hasattr(bg, "advance"):
            # A float64 uniform takes exactly one 64-bit output: skip the rows before
            # and after ours instead of drawing them. advance() clears the buffered
            # 32-bit half-output, which the full draw would have kept.
            state = bg.state
            bg.advance(self._lo * per_row)
            x = self._rng.random((n, *rest))
            bg.advance((self._B - self._hi) * per_row)
            if "has_uint32" in state:
                s = bg.state
                s["has_uint32"], s["uinteger"] = state["has_uint32"], state["uinteger"]
                bg.state = s
            return x
        return self._rng.random((self._B, *rest), dtype=dtype)[self._lo:self._hi]

    def __getattr__(self, name):
        raise RnncapError(f"--distributed: the model uses rng.{name} during loss; only rng.random "
                          f"draws can be split across ranks")


# ---- the command-line glue ---------------------------------------------------------------

def wrap_for_training(model, comm, train_data, iteration, resume_hint=None):
    """``DataParallel(model, comm)`` after checking that every rank has the same
    training data, starts at the same iteration and has the same dropout generator."""
    dp = DataParallel(model, comm, resume_hint=resume_hint)
    feats, caps, idx = train_data
    rng = getattr(model, "rng", None)
    rng_state = json.dumps(rng.bit_generator.state, sort_keys=True) if rng is not None else ""
    dp.check_same(training_rows=len(caps), iteration=iteration,
                  data_checksum=data_checksum(feats, caps, idx),
                  dropout_generator=zlib.crc32(rng_state.encode()))
    return dp

