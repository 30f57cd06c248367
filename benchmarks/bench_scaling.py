"""The figures of docs/scaling.md: extraction on Ray Data and data-parallel training.

    python benchmarks/bench_scaling.py extract --data CAPTIONS.json [--actors 1 2] [--limit N]
    python benchmarks/bench_scaling.py compute [--rows 128 64 16 2]      # one thread, one process
    torchrun --standalone --nproc_per_node N benchmarks/bench_scaling.py train [--steps 20]
    torchrun --standalone --nproc_per_node 2 benchmarks/bench_scaling.py allreduce
    python benchmarks/bench_scaling.py plan --step-ms MS --update-ms MS --gradient-mb S \
        --images-per-s R --start-s S0                        # docs/scaling.md's tables

Each prints one JSON line per measurement. The model is the default captioner at COCO
scale (LSTM, W = H = 512, D = 1280 EfficientNet-Lite0 features, V = 10,000 words,
T = 16) on synthetic data: the step's cost depends on the shapes, not on the words.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(V=10_000, D=1280, W=512, H=512, T=16)


def emit(**row):
    print(json.dumps(row), flush=True)


# ---- extraction ------------------------------------------------------------------------

def extract(args):
    from rnncap.data.datasets import load_dataset
    from rnncap.encoding.encoders import get_encoder
    from rnncap.encoding.features import extract_features
    from rnncap.encoding.ray_features import EncoderRecipe, connect, extract_features_ray

    ds = load_dataset(args.data)
    items = {k: (s.image_ids[:args.limit], s.image_paths[:args.limit]) for k, s in ds.splits.items()}
    n = sum(len(v[0]) for v in items.values())
    tmp = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    t = time.perf_counter()
    enc = get_encoder()
    build = time.perf_counter() - t
    t = time.perf_counter()
    extract_features(items, enc, tmp / "one.h5", batch_size=32, progress=False)
    secs = time.perf_counter() - t
    emit(what="extract", path="single process (2 decode threads, torch default threads)", images=n,
         encoder_build_s=round(build, 2), seconds=round(secs, 2), images_per_s=round(n / secs, 1))
    for actors in args.actors:
        t = time.perf_counter()
        ray, started = connect(num_cpus=args.cpus)
        ready = time.perf_counter() - t
        stats = {}
        extract_features_ray(items, EncoderRecipe("efficientnet-lite0"), tmp / f"ray{actors}.h5",
                             batch_size=32, progress=False, actors=actors, stats=stats, encoder=enc)
        steady = ((stats["written"] - stats["first_batch_rows"])
                  / max(stats["pipeline_s"] - stats["first_batch_s"], 1e-9))
        emit(what="extract", path=f"ray, {actors} encoder actor(s)", images=n, cluster_start_s=round(ready, 2),
             first_batch_s=round(stats["first_batch_s"], 2), first_batch_images=stats["first_batch_rows"],
             pipeline_s=round(stats["pipeline_s"], 2),
             images_per_s=round(n / stats["pipeline_s"], 1), steady_images_per_s=round(steady, 1))
        if started:
            ray.shutdown()


# ---- training ----------------------------------------------------------------------------

def synthetic(n_caps, n_images, seed=0):
    V, D, T = SHAPE["V"], SHAPE["D"], SHAPE["T"]
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n_images, D)).astype(np.float32)
    caps = rng.integers(4, V, size=(n_caps, T + 1)).astype(np.int32)
    caps[:, 0] = 1
    lengths = rng.integers(8, T + 1, size=n_caps)  # words + <END>, then <NULL> padding
    for i, L in enumerate(lengths):
        caps[i, L] = 2
        caps[i, L + 1:] = 0
    return feats, caps, rng.integers(0, n_images, size=n_caps)


def make_model(seed=0):
    from rnncap.models.model import CaptioningModel

    return CaptioningModel(SHAPE["V"], SHAPE["D"], SHAPE["W"], SHAPE["H"], cell_type="lstm",
                           seed=seed, dropout=0.5, label_smoothing=0.1)


def compute(args):
    """Forward + backward time of the loss for a batch of b rows, and of the Adam update
    (which every rank does in full), in this process."""
    from rnncap.training import optim

    m = make_model()
    feats, caps, idx = synthetic(max(args.rows) * 4, 512)
    S = sum(v.size for v in m.params.values()) * 4
    for b in args.rows:
        times = []
        for r in range(args.repeats + 1):
            t = time.perf_counter()
            m.loss(feats[idx[:b]], caps[:b])
            times.append(time.perf_counter() - t)
        emit(what="loss", rows=b, ms=round(1e3 * float(np.median(times[1:])), 1),
             threads=os.environ.get("OMP_NUM_THREADS", "default"))
    _, grads = m.loss(feats[idx[:8]], caps[:8])
    state = {k: {} for k in m.params}
    times = []
    for r in range(args.repeats + 1):
        t = time.perf_counter()
        for k, w in m.params.items():
            m.params[k], state[k] = optim.adam(w, grads[k], state[k], lr=1e-3)
        times.append(time.perf_counter() - t)
    emit(what="adam_update", params=S // 4, gradient_MB=round(S / 2**20, 2),
         ms=round(1e3 * float(np.median(times[1:])), 1))


class TimedComm:
    """A Collective that times the calls of the one it wraps."""

    def __init__(self, comm):
        self.comm, self.rank, self.world_size = comm, comm.rank, comm.world_size
        self.seconds, self.calls = 0.0, 0

    def all_reduce_(self, buf, op="sum"):
        t = time.perf_counter()
        self.comm.all_reduce_(buf, op)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        return buf

    def broadcast_(self, buf, src=0):
        return self.comm.broadcast_(buf, src)


def train(args):
    """Steps of the Trainer at global batch 128, one process or one rank per torchrun
    worker; rank 0 reports."""
    from rnncap.config import TrainConfig
    from rnncap.training.train import Trainer

    t_start = time.perf_counter()
    distributed = "RANK" in os.environ
    model = make_model()
    data = synthetic(128 * (args.steps + 4), 2000)
    comm = None
    trained = model
    if distributed:
        from rnncap.training.distributed import DataParallel, init_from_env

        comm = TimedComm(init_from_env())
        trained = DataParallel(model, comm)
    ready = time.perf_counter() - t_start
    cfg = TrainConfig(batch_size=128, epochs=1, max_iters=3, lr=1e-3, seed=0)
    tr = Trainer(trained, data, cfg, progress=False, log=lambda m: None)
    tr.fit()  # warm-up: 3 steps
    if comm is not None:
        comm.seconds, comm.calls = 0.0, 0
    tr.cfg.max_iters = 3 + args.steps
    t = time.perf_counter()
    tr.fit()
    secs = time.perf_counter() - t
    rank = comm.rank if comm else 0
    if rank == 0:
        S = sum(v.size for v in model.params.values()) * 4
        emit(what="train", world_size=comm.world_size if comm else 1, wrapped=distributed,
             threads=os.environ.get("OMP_NUM_THREADS", "default"), steps=args.steps,
             ms_per_step=round(1e3 * secs / args.steps, 1), captions_per_s=round(128 * args.steps / secs, 1),
             allreduce_ms_per_step=round(1e3 * comm.seconds / max(comm.calls, 1), 1) if comm else None,
             gradient_MB=round(S / 2**20, 2), start_to_first_step_s=round(ready, 2))
    if comm is not None:
        comm.comm.close()


def allreduce(args):
    """Milliseconds of one all-reduce of a float32 buffer, by size (median of repeats)."""
    from rnncap.training.distributed import init_from_env

    comm = init_from_env()
    for mb in args.mb:
        buf = np.ones(int(mb * 2**20 / 4), np.float32)
        times = []
        for r in range(args.repeats + 2):
            t = time.perf_counter()
            comm.all_reduce_(buf)
            times.append(time.perf_counter() - t)
        ms = 1e3 * float(np.median(times[2:]))
        if comm.rank == 0:
            emit(what="allreduce", world_size=comm.world_size, MB=mb, ms=round(ms, 2),
                 ms_per_MB=round(ms / mb, 3), backend=comm.backend)
    comm.close()


def plan(args):
    """Time per epoch on paper from the measured inputs: training steps of
    T_compute / N + 2 (N - 1) / N * S / B (ring all-reduce at bandwidth B), and the
    refined form that keeps the update every rank does in full out of the division;
    extraction at N workers of R images/s each after a start-up of S0. With
    ``--local-ms N=MS``, also steps of (the loss measured at B/N rows) + update + comm."""
    nets = {"10GbE": 10e9 / 8, "100GbE": 100e9 / 8}
    S = args.gradient_mb * 2**20
    for name, captions, images in (("COCO", 600_000, 123_000), ("CC3M", 3_300_000, 3_300_000)):
        steps = captions / args.batch
        for n in args.workers:
            row = dict(what="plan", dataset=name, workers=n,
                       extract_h=round((args.start_s + images / (n * args.images_per_s)) / 3600, 2))
            for net, B in nets.items():
                comm = 2 * (n - 1) / n * S / B
                step = args.step_ms / 1e3 / n + comm
                refined = (args.step_ms - args.update_ms) / 1e3 / n + args.update_ms / 1e3 + comm
                row[f"train_h_{net}"] = round(steps * step / 3600, 2)
                row[f"train_h_{net}_update_not_split"] = round(steps * refined / 3600, 2)
                if n in args.local_ms:  # measured forward+backward at B/N rows, plus the update
                    local = (args.local_ms[n] + args.update_ms) / 1e3 + comm
                    row[f"train_h_{net}_measured_local"] = round(steps * local / 3600, 2)
                row[f"comm_ms_{net}"] = round(1e3 * comm, 1)
            emit(**row)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("extract")
    p.add_argument("--data", required=True)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cpus", type=int, default=None, help="local cluster CPUs (default: all)")
    p.add_argument("--limit", type=int, default=None, help="images per split")
    p = sub.add_parser("compute")
    p.add_argument("--rows", type=int, nargs="+", default=[128, 64, 32, 16, 8, 2])
    p.add_argument("--repeats", type=int, default=5)
    p = sub.add_parser("train")
    p.add_argument("--steps", type=int, default=20)
    p = sub.add_parser("allreduce")
    p.add_argument("--mb", type=float, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--repeats", type=int, default=10)
    p = sub.add_parser("plan")
    p.add_argument("--step-ms", type=float, required=True, help="one process's step at the global batch")
    p.add_argument("--update-ms", type=float, required=True, help="of which the optimizer update")
    p.add_argument("--gradient-mb", type=float, required=True)
    p.add_argument("--images-per-s", type=float, required=True, help="one extraction worker's rate")
    p.add_argument("--start-s", type=float, required=True, help="extraction start-up")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--local-ms", nargs="*", default=[], metavar="N=MS",
                   help="forward+backward ms of one rank at B/N rows (from `compute`)")
    args = ap.parse_args()
    if args.cmd == "plan":
        args.local_ms = {int(k): float(v) for k, v in (x.split("=") for x in args.local_ms)}
    {"extract": extract, "compute": compute, "train": train, "allreduce": allreduce,
     "plan": plan}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
