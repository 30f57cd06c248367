"""Time the LSTM captioner's training step and decoding against PyTorch.

One training step is forward, backward and an Adam update of the homework's COCO
model (T=16, D=512, W=256, H=512, V=1004, float32). The PyTorch side is the same
model written the usual way (nn.Linear, nn.Embedding, nn.LSTM, nn.Linear, masked
cross-entropy, torch.optim.Adam) and starts from the same weights, so the two first
losses must agree. Both run in this process, alternating step by step after a
warm-up; medians and spreads are reported. Decoding compares rnncap's greedy (and,
when present, beam) decoder with a PyTorch loop of the same algorithm.

The command is thin: the sizes, batches and rnncap's side are in rnncap.bench.workloads,
the PyTorch peers in rnncap.bench.peers (the Transformer's in rnncap.bench.transformer),
the timing and the peak-memory probe (a fresh subprocess per framework and batch size)
in rnncap.bench.measure. Here: the arguments, the order of the parts, and the printing.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from ..backend import retain_freed_memory, xp_for
from ..errors import RnncapError
from . import measure, transformer
from .workloads import SIZES

PARTS = ("train", "decode", "memory", "gemm")


# ---- the arguments -------------------------------------------------------------------

def add_arguments(parser):
    from ..cli import positive_int

    def int_list(text):
        try:
            vals = [positive_int(v) for v in text.split(",") if v.strip()]
        except Exception:
            raise _arg_error(f"expected comma-separated positive integers, got {text!r}")
        if not vals:
            raise _arg_error("expected at least one batch size")
        return vals

    def part_list(text):
        vals = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in vals if v not in PARTS]
        if bad or not vals:
            raise _arg_error(f"unknown part(s) {bad or text!r}; choose from {','.join(PARTS)}")
        return vals

    parser.add_argument("--batch-sizes", type=int_list, default=[50, 128], metavar="N,N",
                        help="minibatch sizes to time (default: 50,128)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed repetitions per measurement; the median is reported "
                             "(default: 15, or 3 with --quick)")
    parser.add_argument("--warmup", type=positive_int, default=None,
                        help="untimed repetitions first (default: 3, or 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="few repeats and no memory subprocesses: a fast sanity run")
    parser.add_argument("--parts", type=part_list, default=list(PARTS), metavar="P,P",
                        help=f"what to measure, from {','.join(PARTS)} (default: all)")
    parser.add_argument("--size", choices=sorted(SIZES), default="coco",
                        help="model size: coco (T=16 D=512 W=256 H=512 V=1004, the default) "
                             "or tiny (smoke tests only)")
    parser.add_argument("--full-length", action="store_true",
                        help="captions fill all T steps (no padding), so rnncap's skipping "
                             "of padded positions saves nothing: same work on both sides")
    parser.add_argument("--beam-size", type=positive_int, default=3,
                        help="beam width for the beam-search timing (default: 3)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="cpu: NumPy vs PyTorch CPU; gpu: CuPy vs PyTorch CUDA")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="threads for both NumPy's BLAS (needs threadpoolctl) and torch "
                             "(default: torch gets as many as NumPy's BLAS uses)")
    parser.add_argument("--no-torch", action="store_true",
                        help="time rnncap alone (no PyTorch comparison)")
    parser.add_argument("--seed", type=int, default=0, help="weights and data seed")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write every figure as JSON to PATH ('-' for stdout)")


def _arg_error(msg):
    import argparse

    return argparse.ArgumentTypeError(msg)


# ---- the run -------------------------------------------------------------------------

def run(args):
    limiter = None
    if args.threads:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            raise RnncapError("--threads needs the package threadpoolctl to set NumPy's BLAS "
                              "threads: pip install threadpoolctl")
        limiter = threadpool_limits(args.threads, user_api="blas")
    try:
        return _run(args)
    finally:
        if limiter is not None:
            limiter.restore_original_limits()


def _run(args):
    repeats = args.repeats or (3 if args.quick else 15)
    warmup = args.warmup or (1 if args.quick else 3)
    dims = SIZES[args.size]
    with_torch = not args.no_torch
    if args.device == "gpu":
        xp_for("gpu")  # a clear error when CuPy or the GPU is missing
    info = measure.machine_info()
    if args.device == "cpu":
        # as ``rnncap train`` does; torch's side runs in this process and gains as well
        info["retain_freed_memory"] = retain_freed_memory()
    threads = info["blas"]["threads"]
    if with_torch:
        try:
            import torch
        except ModuleNotFoundError:
            raise RnncapError("the comparison needs PyTorch (pip install 'rnncap[vision]'); "
                              "pass --no-torch to time rnncap alone")
        torch.set_num_threads(threads)
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if args.device == "gpu" and not torch.cuda.is_available():
            raise RnncapError("--device gpu: PyTorch sees no CUDA device; pass --no-torch "
                              "to time rnncap alone")
    results = {"machine": info, "size": args.size, "dims": dims, "device": args.device,
               "repeats": repeats, "warmup": warmup, "command": " ".join(sys.argv)}
    if args.device == "cpu":
        from ..models.model import _MIN_DECODE_ROWS, _MIN_SHARD_ROWS, _shards

        rows = transformer.shard_rows(dims, _MIN_SHARD_ROWS)
        results["rnncap_shards"] = {N: len(_shards(N, np, rows)) for N in args.batch_sizes}
        results["rnncap_decode_shards"] = {N: len(_shards(N, np, _MIN_DECODE_ROWS)) for N in args.batch_sizes}
    _print_header(results)

    if "gemm" in args.parts:
        sync = measure.sync_for(args.device, with_torch)
        n = 128 if args.size.startswith("tiny") else 2048
        results["gemm_size"] = n
        results["gemm_flops"] = {"numpy" if args.device == "cpu" else "cupy":
                                 measure.gemm_peak(xp_for(args.device), n, sync=sync)}
        if args.device == "cpu":
            from ..models.model import _one_blas_thread

            with _one_blas_thread(np):
                results["gemm_flops"]["numpy 1 thread"] = measure.gemm_peak(np, n)
        if with_torch:
            results["gemm_flops"]["torch"] = measure.torch_gemm_peak(args.device, n)
        print(f"float32 GEMM {n}^3, best of 5 (the best is the peak below): " + ", ".join(
            f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in results["gemm_flops"].items()))

    if "train" in args.parts:
        results["train"] = []
        print("\ntraining step (forward + backward + Adam), alternating, "
              f"median of {repeats} after {warmup} warm-up")
        for N in args.batch_sizes:
            r = measure.bench_train(N, dims, repeats, warmup, args.device, with_torch, args.seed,
                                    args.full_length)
            if results.get("gemm_flops"):  # the peak: the best GEMM rate measured here
                peak = max(results["gemm_flops"].values())
                r["flop_rate"] = {name: r["flops_per_step"]["rnncap" if name == "rnncap" else "dense"]
                                  / r[name]["median_s"] for name in ("rnncap", "torch") if name in r}
                r["share_of_peak"] = {name: rate / peak for name, rate in r["flop_rate"].items()}
            results["train"].append(r)
            _print_train(r)

    if "decode" in args.parts:
        results["decode"] = []
        print(f"\ndecoding (max_length={dims['T']}), alternating, median of {repeats}")
        for N in args.batch_sizes:
            r = measure.bench_decode(N, dims, repeats, warmup, args.beam_size, args.device,
                                     with_torch, args.seed)
            results["decode"].append(r)
            _print_decode(r)

    if "memory" in args.parts and not args.quick and args.device == "cpu":
        results["memory"] = []
        print("\npeak memory of 2 training steps over the memory before them (fresh "
              "subprocess each, peak RSS; tracemalloc: NumPy's allocations in 1 step)")
        for N in args.batch_sizes:
            r = {"N": N, "rnncap": measure.run_memory_probe("rnncap", N, args.size, args.seed)}
            if with_torch:
                r["torch"] = measure.run_memory_probe("torch", N, args.size, args.seed)
            results["memory"].append(r)
            _print_memory(r)

    results["loadavg_end"] = measure.machine_info()["loadavg"]
    print(f"\nload average at the end: {_load(results['loadavg_end'])}")
    if args.json:
        text = json.dumps(results, indent=2, default=float)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


# ---- the printing --------------------------------------------------------------------

def _print_header(r):
    m = r["machine"]
    print(f"rnncap bench  {m['date']}  {m['cpu']} ({m['cpu_count']} CPUs, "
          f"load average {_load(m['loadavg'])})")
    b = m["blas"]
    print(f"numpy {m['numpy']}: {b.get('library')} kernel={b.get('kernel')} "
          f"threads={b['threads']}" + (f"  env {m['blas_env']}" if m["blas_env"] else ""))
    if "torch" in m:
        print(f"torch {m['torch']}: threads={m['torch_threads']}")
    print(f"size {r['size']} {r['dims']} float32, device {r['device']}")
    if m.get("retain_freed_memory"):
        print("glibc keeps freed memory for reuse, as rnncap's trainer asks, for both sides")
    if "rnncap_shards" in r:
        print("rnncap runs BLAS single-threaded, a batch in shards side by side; training: "
              + ", ".join(f"N={n} {k} shard{'s' * (k > 1)}" for n, k in r["rnncap_shards"].items())
              + "; decoding: " + ", ".join(f"N={n} {k}" for n, k in r["rnncap_decode_shards"].items()))


def _load(loadavg):
    return "n/a" if loadavg is None else " ".join(f"{x:.1f}" for x in loadavg)


def _spread(s):
    return f"{s['median_s'] * 1e3:8.1f} ms [{s['min_s'] * 1e3:.1f}-{s['max_s'] * 1e3:.1f}]"


def _print_train(r):
    print(f"N={r['N']}: {100 * r['target_fraction']:.0f}% of positions have a target, "
          f"{100 * r['steps_fraction']:.0f}% need a recurrent step")
    for name in ("rnncap", "torch"):
        if name in r:
            s = r[name]
            extra = ""
            if name in r.get("flop_rate", {}):
                rate, share = r["flop_rate"][name], r["share_of_peak"][name]
                extra = f"  {rate / 1e9:.1f} GFLOP/s = {100 * share:.0f}% of peak"
            print(f"  {name:7s} {_spread(s)}  {s['tokens_per_s']:9.0f} tokens/s{extra}")
    if "ratio" in r:
        pr = r["ratio_per_round"]
        print(f"  ratio rnncap/torch throughput: {r['ratio']:.2f} (of medians); per round "
              f"{pr['median']:.2f} median, {pr['min']:.2f}-{pr['max']:.2f}; first losses "
              + ", ".join(f"{k} {v:.5f}" for k, v in r["first_loss"].items()))


def _print_decode(r):
    print(f"N={r['N']}:" + ("" if r["beam"] == "timed" else f"  (beam: {r['beam']})"))
    for name in ("rnncap greedy", "torch greedy", "rnncap beam", "torch beam"):
        if name in r:
            s = r[name]
            print(f"  {name:14s} {_spread(s)}  {s['captions_per_s']:9.0f} captions/s")
    if "greedy_ratio" in r:
        pr = r["greedy_ratio_per_round"]
        print(f"  greedy ratio rnncap/torch: {r['greedy_ratio']:.2f} (of medians); per round "
              f"{pr['median']:.2f} median, {pr['min']:.2f}-{pr['max']:.2f}; token agreement "
              f"{100 * r['greedy_token_agreement']:.1f}%")
    if "beam_ratio" in r:
        pr = r["beam_ratio_per_round"]
        print(f"  beam-{r['beam_size']} ratio rnncap/torch: {r['beam_ratio']:.2f} (of medians); per "
              f"round {pr['median']:.2f} median, {pr['min']:.2f}-{pr['max']:.2f}; same top caption "
              f"for {100 * r['beam_caption_agreement']:.1f}% of images")


def _print_memory(r):
    parts = []
    for name in ("rnncap", "torch"):
        if name in r:
            m = r[name]
            if "error" in m:
                parts.append(f"{name} failed: {m['error']}")
                continue
            t = (f", tracemalloc {m['tracemalloc_step_peak_bytes'] / 2**20:.0f} MiB"
                 if "tracemalloc_step_peak_bytes" in m else "")
            parts.append(f"{name} +{m['peak_growth_bytes'] / 2**20:.0f} MiB{t}")
    print(f"N={r['N']}: " + "; ".join(parts))
