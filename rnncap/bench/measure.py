"""The measurements of ``rnncap bench``: the machine they ran on, alternating timing,
the GEMM peak, rnncap's training step and decoders against their PyTorch peers, and
peak memory in fresh processes.

Both sides run in this process, alternating call by call after a warm-up, so that
load from other processes hits every contender alike; medians and spreads are kept.
Peak memory is measured in a fresh subprocess per framework and batch size: how far
the peak resident set rises over two training steps above the memory in use just
before them (model, batch and imports in place); see ``memory_probe``.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from ..backend import xp_for
from . import transformer
from .peers import TorchStepModel, build_torch, torch_greedy, torch_trainer
from .workloads import SIZES, build_rnncap, make_batch, rnncap_trainer, step_flops, work_done


# ---- environment ---------------------------------------------------------------------

def blas_info():
    """NumPy's BLAS library, kernel and thread count (via threadpoolctl if present)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {"library": "unknown (threadpoolctl not installed)", "threads": os.cpu_count() or 1}
    for info in threadpool_info():
        if info.get("user_api") == "blas" and "numpy" in info.get("filepath", ""):
            return {"library": f"{info.get('internal_api')} {info.get('version')}",
                    "kernel": info.get("architecture"), "threads": int(info["num_threads"])}
    return {"library": "unknown", "threads": os.cpu_count() or 1}


def machine_info():
    """Date, CPU, load average, versions and BLAS: printed and saved beside every figure."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "GOTO"))}
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu,
            "cpu_count": os.cpu_count(), "loadavg": load, "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas_info(), "blas_env": env}


# ---- timing --------------------------------------------------------------------------

def sync_for(device, with_torch=True):
    """Wait for queued GPU work (CuPy's, and torch's when it is in use); a no-op on
    the CPU."""
    if device != "gpu":
        return lambda: None
    import cupy

    torch_sync = lambda: None  # noqa: E731
    if with_torch:
        import torch

        torch_sync = torch.cuda.synchronize

    def sync():
        cupy.cuda.Device().synchronize()
        torch_sync()

    return sync


def torch_device(device):
    """PyTorch's name for ``--device``: "cuda" for "gpu"."""
    return "cuda" if device == "gpu" else "cpu"


def time_alternating(fns, repeats, warmup, sync=lambda: None):
    """Call each function in turn, ``warmup`` untimed rounds then ``repeats`` timed
    ones, so that load from other processes hits every contender alike.
    Returns name -> list of seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(seconds):
    s = sorted(seconds)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return {"median_s": statistics.median(s), "min_s": s[0], "max_s": s[-1],
            "q1_s": q[0], "q3_s": q[2], "n": len(s)}


def paired_ratios(ref, ours):
    """Per-round ratios ref/ours of two alternating runs: median and range."""
    r = [a / b for a, b in zip(ref, ours)]
    s = sorted(r)
    return {"median": statistics.median(s), "min": s[0], "max": s[-1]}


def gemm_peak(xp, n=2048, repeats=5, sync=lambda: None):
    """Best float32 GEMM rate (FLOP/s) of ``xp`` on an n x n x n product."""
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((n, n)).astype(np.float32))
    b = xp.asarray(rng.standard_normal((n, n)).astype(np.float32))
    out = xp.empty((n, n), dtype=np.float32)
    return _gemm_rate(lambda: xp.matmul(a, b, out=out), n, repeats, sync)


def torch_gemm_peak(device, n=2048, repeats=5):
    """The same for PyTorch on ``device`` ("cpu" or "gpu")."""
    import torch

    dev = torch_device(device)
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    return _gemm_rate(lambda: a @ b, n, repeats, sync)


def _gemm_rate(matmul, n, repeats, sync):
    """FLOP/s of the fastest of ``repeats`` calls of an n x n x n ``matmul``, after one untimed."""
    matmul()
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul()
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


# ---- the measurements ----------------------------------------------------------------

def bench_train(N, dims, repeats, warmup, device="cpu", with_torch=True, seed=0,
                full_length=False):
    """One training step (forward, backward, Adam) of a batch of N, tokens/s; the
    first losses of both sides (same weights, same batch) and the FLOPs each computes."""
    xp = xp_for(device)
    features, captions = make_batch(N, dims, seed, full_length)
    model = build_rnncap(dims, seed, device)
    fns, first = {}, {}
    f_x, c_x = xp.asarray(features), xp.asarray(captions)
    step = rnncap_trainer(model)
    fns["rnncap"] = lambda: step(f_x, c_x)
    if with_torch:
        import torch

        tdev = torch_device(device)
        tm = build_torch(model, tdev)
        tstep = torch_trainer(tm)
        f_t = torch.from_numpy(features).to(tdev)
        c_t = torch.from_numpy(captions).to(tdev)
        fns["torch"] = lambda: tstep(f_t, c_t)
        # Same weights, same batch: the first losses must agree (float32 rounding).
        first = {"torch": fns["torch"]()}
    first["rnncap"] = fns["rnncap"]()
    times = time_alternating(fns, repeats, warmup, sync_for(device, with_torch))
    tokens = N * dims["T"]
    steps, scored = work_done(captions, dims)
    res = {"N": N, "tokens_per_step": tokens, "first_loss": first,
           "target_fraction": scored / tokens, "steps_fraction": steps / tokens,
           # dense: what the PyTorch step computes; rnncap: what rnncap computes
           "flops_per_step": {"dense": step_flops(N, dims),
                              "rnncap": step_flops(N, dims, steps, scored)}}
    for name, ts in times.items():
        s = summarize(ts)
        s["tokens_per_s"] = tokens / s["median_s"]
        res[name] = s
    if with_torch:
        res["ratio"] = res["torch"]["median_s"] / res["rnncap"]["median_s"]
        res["ratio_per_round"] = paired_ratios(times["torch"], times["rnncap"])
    return res


def bench_decode(N, dims, repeats, warmup, beam_size, device="cpu", with_torch=True,
                 seed=0):
    """Greedy and beam decoding of N images, ``max_length`` = T, captions/s.

    The PyTorch greedy decoder is a plain torch loop of the same algorithm; the
    PyTorch beam search is rnncap's own ``beam_search`` driving a PyTorch model step
    (``TorchStepModel``), so both sides run identical search code.
    """
    from ..inference import decoding

    xp = xp_for(device)
    features, _ = make_batch(N, dims, seed)
    model = build_rnncap(dims, seed, device)
    max_length = dims["T"]
    f_x = xp.asarray(features)
    beam = getattr(decoding, "beam_search", None)
    fns = {"rnncap greedy": lambda: decoding.greedy_decode(model, f_x, max_length=max_length)}
    with_torch = with_torch and "A" not in dims  # the attention twin is timed in training only
    if beam is not None:
        fns["rnncap beam"] = lambda: beam(model, f_x, beam_size=beam_size, max_length=max_length)
    res = {"N": N, "max_length": max_length, "beam_size": beam_size,
           "beam": "timed" if beam is not None else "rnncap.inference.decoding.beam_search not found"}
    if with_torch:
        import torch

        tdev = torch_device(device)
        tm = build_torch(model, tdev)
        f_t = torch.from_numpy(features).to(tdev)
        fns["torch greedy"] = lambda: torch_greedy(tm, f_t, max_length)
        ours, theirs = fns["rnncap greedy"](), fns["torch greedy"]()
        res["greedy_token_agreement"] = float((ours == theirs).mean())
        if beam is not None and not transformer.is_transformer(dims):  # the Transformer: greedy only
            tstep = TorchStepModel(tm, model)
            fns["torch beam"] = lambda: beam(tstep, f_x, beam_size=beam_size,
                                             max_length=max_length)
            ours, theirs = fns["rnncap beam"](), fns["torch beam"]()
            res["beam_caption_agreement"] = float(np.mean(
                [np.array_equal(a[0].ids, b[0].ids) for a, b in zip(ours, theirs)]))
    times = time_alternating(fns, repeats, warmup, sync_for(device, with_torch))
    for name, ts in times.items():
        s = summarize(ts)
        s["captions_per_s"] = N / s["median_s"]
        res[name] = s
    for kind in ("greedy", "beam"):
        if f"torch {kind}" in res:
            res[f"{kind}_ratio"] = (res[f"torch {kind}"]["median_s"]
                                    / res[f"rnncap {kind}"]["median_s"])
            res[f"{kind}_ratio_per_round"] = paired_ratios(times[f"torch {kind}"],
                                                           times[f"rnncap {kind}"])
    return res


# ---- peak memory ---------------------------------------------------------------------

def memory_probe(framework, N, size, seed=0, steps=2):
    """Run in a fresh process: build the model and the batch, then run ``steps``
    training steps and report how far the resident set's peak rose above its size
    before the steps (bytes): the activations, gradients and optimizer state.

    On Linux the peak is the kernel's VmHWM, reset just before the steps (so nothing
    earlier, such as an import, counts); elsewhere the growth of ``ru_maxrss``. For
    rnncap also the tracemalloc peak of one step (NumPy's allocations only).
    """
    import resource
    import tracemalloc

    dims = SIZES[size]
    features, captions = make_batch(N, dims, seed)
    model = build_rnncap(dims, seed)
    if framework == "torch":
        import torch

        step = torch_trainer(build_torch(model))
        features, captions = torch.from_numpy(features), torch.from_numpy(captions)
    else:
        step = rnncap_trainer(model)
    out = {}
    rss0 = _proc_status("VmRSS")
    if rss0 is not None and _reset_peak_rss():
        for _ in range(steps):
            step(features, captions)
        out["method"] = "VmHWM after clear_refs"
        out["peak_growth_bytes"] = _proc_status("VmHWM") - rss0
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(steps):
            step(features, captions)
        out["method"] = "ru_maxrss"
        out["peak_growth_bytes"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    if framework == "rnncap":
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        step(features, captions)
        out["tracemalloc_step_peak_bytes"] = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    return out


def _proc_status(field):
    """A size field of /proc/self/status in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss():
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_memory_probe(framework, N, size, seed):
    """``memory_probe`` in a fresh Python process: its figures, or {"error": the last
    line of its stderr}."""
    code = ("import json, sys; from rnncap.bench.measure import memory_probe; "
            f"print(json.dumps(memory_probe({framework!r}, {N}, {size!r}, {seed})))")
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])
