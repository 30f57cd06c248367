"""Data-parallel training (rnncap.training.distributed): the same parameters as one process.

In-process tests run the ranks as threads over a collective that sums in rank order;
the torchrun tests run 2 processes with gloo on 127.0.0.1.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rnncap.config import TrainConfig
from rnncap.training.distributed import (Collective, DataParallel, _RowsOfGlobalDraws, shard_bounds)
from rnncap.errors import RnncapError
from rnncap.models.model import CaptioningModel
from rnncap.training.train import Trainer

REPO = Path(__file__).resolve().parents[1]


# ---- in one process ------------------------------------------------------------------

class ThreadComm(Collective):
    """Ranks as threads: every rank adds the buffers in rank order, so all get the
    same bits (as gloo's all-reduce gives)."""

    def __init__(self, rank, shared):
        self.rank, self.world_size, self.shared = rank, len(shared["bufs"]), shared
        self.calls = 0

    @staticmethod
    def shared_state(world_size):
        return {"bufs": [None] * world_size, "barrier": threading.Barrier(world_size, timeout=60)}

    def _exchange(self, buf, combine):
        s = self.shared
        s["bufs"][self.rank] = buf.copy()
        s["barrier"].wait()
        out = combine(s["bufs"])
        s["barrier"].wait()
        buf[...] = out
        self.calls += 1
        return buf

    def all_reduce_(self, buf, op="sum"):
        def combine(bufs):
            total = bufs[0].copy()
            for b in bufs[1:]:
                total = total + b if op == "sum" else np.maximum(total, b)
            return total
        return self._exchange(buf, combine)

    def broadcast_(self, buf, src=0):
        return self._exchange(buf, lambda bufs: bufs[src])


def toy(seed=0, n_images=12, n_caps=30, V=20, D=8, T=6):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n_images, D)).astype(np.float32)
    caps = rng.integers(4, V, size=(n_caps, T + 1)).astype(np.int32)
    caps[:, 0] = 1
    caps[::3, -2:] = 0
    caps[::3, -3] = 2
    return feats, caps, rng.integers(0, n_images, size=n_caps)


def model(dropout=0.3, seed=3, V=20, D=8):
    return CaptioningModel(V, D, 6, 10, cell_type="lstm", seed=seed, dropout=dropout)


def train_in_threads(world_size, cfg, dropout, data):
    """Train world_size DataParallel replicas side by side; returns their models."""
    shared = ThreadComm.shared_state(world_size)
    models = [model(dropout) for r in range(world_size)]
    for r, m in enumerate(models[1:], 1):  # other starting weights: rank 0's are broadcast
        m.params["Wx"] = m.params["Wx"] + r
    errors = []

    def rank_main(r):
        try:
            dp = DataParallel(models[r], ThreadComm(r, shared))
            Trainer(dp, data, cfg, val=data, progress=False, log=lambda m: None).fit()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return models


@pytest.mark.parametrize("world_size,batch_size", [(2, 8), (3, 8), (3, 2)])
def test_ranks_train_like_one_process_with_dropout(world_size, batch_size):
    """k steps (Adam, dropout on, a short last batch; with batch 2 on 3 ranks one rank
    has no rows) give one process's parameters to float rounding, the same bits on
    every rank, and one process's dropout generator state."""
    data = toy()
    cfg = TrainConfig(optimizer="adam", lr=1e-2, batch_size=batch_size, epochs=2, seed=7, clip_norm=1.0)
    ref = model()
    Trainer(ref, data, cfg, val=data, progress=False, log=lambda m: None).fit()
    models = train_in_threads(world_size, cfg, 0.3, data)
    for name, want in ref.params.items():
        for m in models[1:]:
            assert np.array_equal(m.params[name], models[0].params[name]), name
        np.testing.assert_allclose(models[0].params[name], want, rtol=1e-4, atol=2e-6, err_msg=name)
    for m in models:
        assert m.rng.bit_generator.state == ref.rng.bit_generator.state


def test_masks_from_each_ranks_own_rows_would_be_caught(monkeypatch):
    """Without the global-batch draws (each rank drawing masks for its own rows, as a
    plain split would), the parameters leave one process's: the test above can fail."""
    import contextlib

    import rnncap.training.distributed as D

    monkeypatch.setattr(D, "_global_batch_draws", lambda *a: contextlib.nullcontext())
    data = toy()
    cfg = TrainConfig(optimizer="adam", lr=1e-2, batch_size=8, epochs=2, seed=7, clip_norm=1.0)
    ref = model()
    Trainer(ref, data, cfg, progress=False, log=lambda m: None).fit()
    models = train_in_threads(2, cfg, 0.3, data)
    assert not np.allclose(models[0].params["Wx"], ref.params["Wx"], rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("B,world", [(7, 3), (8, 2), (2, 3), (5, 1)])
def test_row_slices_of_global_draws_are_the_global_draw(B, world):
    shapes = [(4, 3), (2,), (6, 5)]
    ref = np.random.default_rng(11)
    ref.integers(0, 10, dtype=np.int32)  # leave a buffered 32-bit half-output behind
    want = [ref.random((B, *s)) for s in shapes]
    pieces = [[] for _ in shapes]
    for r in range(world):
        g = np.random.default_rng(11)
        g.integers(0, 10, dtype=np.int32)
        lo, hi = shard_bounds(B, r, world)
        view = _RowsOfGlobalDraws(g, B, lo, hi)
        for k, s in enumerate(shapes):
            pieces[k].append(view.random((hi - lo, *s)))
        assert g.bit_generator.state == ref.bit_generator.state
    for k in range(len(shapes)):
        assert np.array_equal(np.concatenate(pieces[k]), want[k])
    # float32 draws take the generic path: draw all, keep the rows
    g, h = np.random.default_rng(5), np.random.default_rng(5)
    lo, hi = shard_bounds(B, 0, world)
    got = _RowsOfGlobalDraws(g, B, lo, hi).random((hi - lo, 3), dtype=np.float32)
    assert np.array_equal(got, h.random((B, 3), dtype=np.float32)[lo:hi])


def test_other_draws_are_refused_with_a_clear_message():
    view = _RowsOfGlobalDraws(np.random.default_rng(0), 8, 0, 4)
    with pytest.raises(RnncapError, match="rng.normal"):
        view.normal(size=(4, 2))
    with pytest.raises(RnncapError, match="per-row"):
        view.random((8, 2))


def test_ranks_with_other_data_are_stopped_at_the_start():
    shared = ThreadComm.shared_state(2)
    errors = [None, None]

    def rank_main(r):
        dp = DataParallel(model(), ThreadComm(r, shared))
        try:
            dp.check_same(training_rows=30 + r, iteration=0)
        except RnncapError as e:
            errors[r] = str(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(e and "disagree on training_rows" in e for e in errors), errors


def test_a_failing_collective_becomes_one_line_naming_the_checkpoint():
    class Broken(Collective):
        rank, world_size = 0, 2

        def broadcast_(self, buf, src=0):
            return buf

        def all_reduce_(self, buf, op="sum"):
            raise RuntimeError("Connection closed by peer [127.0.0.1]:29500\nmore detail")

    dp = DataParallel(model(), Broken(), resume_hint="out/last.npz")
    f, c, i = toy()
    with pytest.raises(RnncapError, match=r"rank 0 of 2: lost a peer during the all-reduce of step 1 "
                                          r"\(Connection closed by peer.*--resume out/last.npz"):
        dp.loss(f[i[:4]], c[:4])


def test_without_torchrun_the_command_says_how_to_launch(tmp_path, monkeypatch, capsys):
    from rnncap.cli import main

    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    data, feats = tiny_dataset(tmp_path)
    assert main(["train", "--distributed", "--data", str(data), "--features", str(feats),
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "torchrun --nproc_per_node" in capsys.readouterr().err


# ---- two processes under torchrun ------------------------------------------------------

def tiny_dataset(tmp_path, n_train=24, n_val=6, encoder=None, side=6):
    """A caption-list JSON of tiny PNGs (side x side) and an HDF5 feature cache of them
    (6-d, made by a stand-in encoder, or by ``encoder``, through the real
    ``extract_features``)."""
    pytest.importorskip("h5py")
    Image = pytest.importorskip("PIL.Image")
    from rnncap.encoding.features import extract_features

    rng = np.random.default_rng(0)
    img = tmp_path / "images"
    img.mkdir(exist_ok=True)
    words = ["red", "green", "blue", "dog", "ball", "runs", "on", "grass", "a", "the", "big", "small"]
    records = []
    for i in range(n_train + n_val):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(img / f"p{i}.png")
        caps = [" ".join(rng.choice(words, size=int(rng.integers(3, 8)))) for _ in range(3)]
        records.append({"file": f"p{i}.png", "split": "train" if i < n_train else "val", "captions": caps})
    data = tmp_path / "captions.json"
    data.write_text(json.dumps({"image_dir": "images", "images": records}))

    class Thumb:
        feature_dim, feature_shape = 6, (6,)

        def identity(self):
            return {"name": "thumb", "feature_dim": 6, "image_size": 6, "preprocessing": "none",
                    "weights_sha256": None}

        def preprocess(self, path):
            return np.asarray(Image.open(path).convert("RGB"), np.float32).transpose(2, 0, 1) / 255

        def encode(self, x, batch_size=32):
            x = np.asarray(x)
            return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], axis=1).astype(np.float32)

    from rnncap.data.datasets import load_dataset

    ds = load_dataset(data)
    feats = tmp_path / "features.h5"
    extract_features({k: (s.image_ids, s.image_paths) for k, s in ds.splits.items()}, encoder or Thumb(), feats,
                     progress=False)
    return data, feats


TRAIN_ARGS = ["--cell", "lstm", "--hidden", "12", "--wordvec", "8", "--dropout", "0.3",
              "--label-smoothing", "0", "--batch-size", "10", "--lr", "0.01", "--seed", "5",
              "--select", "loss", "--average", "1", "--quiet"]

# Patches the Trainer, inside the torchrun workers only: each rank dumps its final
# parameters, and rank 1 can die (os._exit) just before a given iteration.
WORKER = textwrap.dedent("""
    import os, sys
    import numpy as np
    from rnncap.training import train
    from rnncap.cli import main

    rank, die_at = int(os.environ["RANK"]), int(os.environ.get("DIE_AT", "0"))
    fit, step = train.Trainer.fit, train.Trainer.step

    def patched_step(self, rows, lr):
        if rank == 1 and self.iteration + 1 == die_at:
            os._exit(1)
        return step(self, rows, lr)

    def patched_fit(self):
        history = fit(self)
        np.savez(os.path.join(os.environ["DUMP"], f"rank{rank}.npz"),
                 **{k: np.asarray(v) for k, v in self.model.params.items()})
        return history

    train.Trainer.step, train.Trainer.fit = patched_step, patched_fit
    sys.exit(main(sys.argv[1:]))
""")


def torchrun(args, env_extra=None, timeout=120):
    """``torchrun --standalone --nproc_per_node 2 ARGS`` on 127.0.0.1, gloo over loopback."""
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("torchrun not found beside this Python (torch not installed)")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(REPO),
               **(env_extra or {}))
    cmd = [exe, "--standalone", "--nproc_per_node", "2", "--max-restarts", "0",
           "--monitor-interval", "0.2", *args]
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return p, time.monotonic() - t0


def params_of(path):
    from rnncap.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    return ck.model.params, ck.train_state


@pytest.fixture(scope="module")
def dist_setup(tmp_path_factory):
    pytest.importorskip("torch.distributed")
    tmp = tmp_path_factory.mktemp("dist")
    data, feats = tiny_dataset(tmp)
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    return tmp, data, feats, worker


def single_process(tmp, data, feats, name, iters):
    from rnncap.cli import main

    out = tmp / name
    assert main(["train", "--data", str(data), "--features", str(feats), "--out", str(out),
                 "--epochs", "2", "--max-iters", str(iters), *TRAIN_ARGS]) == 0
    return params_of(out / "last.npz")


@pytest.fixture(scope="module")
def one_process(dist_setup):
    """One process's parameters after 16 steps: 24 train images x 3 captions in
    batches of 10 is 8 steps an epoch, 2 epochs."""
    tmp, data, feats, _ = dist_setup
    params, state = single_process(tmp, data, feats, "one", iters=16)
    assert state["iteration"] == 16
    return params


@pytest.fixture(scope="module")
def two_processes(dist_setup):
    """2 epochs (16 steps) on 2 ranks under torchrun; each rank dumps its parameters."""
    tmp, data, feats, worker = dist_setup
    out = tmp / "two"
    p, _ = torchrun([str(worker), "train", "--distributed", "--data", str(data), "--features", str(feats),
                     "--out", str(out), "--epochs", "2", *TRAIN_ARGS], {"DUMP": str(tmp)})
    return p, out


def test_two_processes_equal_one_process_and_each_other(dist_setup, one_process, two_processes):
    tmp = dist_setup[0]
    p, out = two_processes
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = np.load(tmp / "rank0.npz"), np.load(tmp / "rank1.npz")
    got, state = params_of(out / "last.npz")
    assert state["iteration"] == 16
    for k, want in one_process.items():
        assert np.array_equal(r0[k], r1[k]), k           # identical on both ranks
        assert np.array_equal(got[k], r0[k]), k          # rank 0's checkpoint is what it holds
        np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=2e-6, err_msg=k)
    assert (out / "log.csv").exists()
    assert p.stderr.count("epoch 2/2") == 1              # rank 0 alone logs


def test_a_killed_rank_stops_the_job_and_a_relaunch_resumes(dist_setup, one_process, two_processes):
    """Rank 1 dies (os._exit) just before step 11; rank 0 has saved at step 9
    (--checkpoint-every 3): the job ends at once with a one-line reason, and the same
    command with --resume (through `python -m rnncap`) finishes the run with the bits
    of the uninterrupted 2-rank run, and one process's parameters to rounding."""
    tmp, data, feats, worker = dist_setup
    out = tmp / "killed"
    p, secs = torchrun([str(worker), "train", "--distributed", "--data", str(data), "--features", str(feats),
                        "--out", str(out), "--epochs", "2", "--checkpoint-every", "3", *TRAIN_ARGS],
                       {"DUMP": str(tmp), "DIE_AT": "11"})
    assert p.returncode != 0
    assert secs < 60
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("rnncap train: error: rank 0 of 2:")]
    assert len(lines) == 1, p.stderr[-3000:]
    assert "lost a peer" in lines[0] or "stopped by the launcher" in lines[0]
    _, state = params_of(out / "last.npz")
    assert state["iteration"] == 9

    p, _ = torchrun(["-m", "rnncap", "train", "--distributed", "--resume", str(out / "last.npz"), "--quiet"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stderr and "iteration 9" in p.stderr
    got, state = params_of(out / "last.npz")
    assert state["iteration"] == 16
    uninterrupted, _ = params_of(two_processes[1] / "last.npz")
    for k, want in one_process.items():
        assert np.array_equal(got[k], uninterrupted[k]), k
        np.testing.assert_allclose(got[k], want, rtol=1e-4, atol=2e-6, err_msg=k)
