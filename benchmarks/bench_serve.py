"""Latency and throughput of ``rnncap serve`` under a bounded load on 127.0.0.1.

    python benchmarks/bench_serve.py --checkpoint runs/demo/model/best.npz \\
        --photos ../shared/data/flickr8k_val_fullsize/images [--requests 1000] [--concurrency 8]

Starts the real command (``rnncap serve --port 0``) in a subprocess, checks every
photo once alone, then sends REQUESTS one-photo uploads from CONCURRENCY clients
(tests/servekit.py ``hammer``) and prints p50/p95 latency, throughput, the 503s, whether
every caption equalled its single-request caption, and the server's resident memory
before and after. Serving flags after ``--`` go to ``rnncap serve``. See docs/serving.md.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
from servekit import hammer, latency_summary, rss_kb, running_server  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/demo/model/best.npz")
    ap.add_argument("--photos", required=True, help="a folder of photos, or photo files", nargs="+")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--limit", type=int, default=32, help="use at most this many photos (default %(default)s)")
    ap.add_argument("serve_args", nargs="*", help="extra `rnncap serve` flags, after --")
    args = ap.parse_args()
    files = [p for a in args.photos for p in (sorted(Path(a).iterdir()) if Path(a).is_dir() else [Path(a)])]
    payloads = [(p.name, p.read_bytes()) for p in files[:args.limit]]

    with running_server(args.checkpoint, *args.serve_args) as (proc, url, _, _):
        single = []
        for name, data in payloads:  # also warms the server up
            r = httpx.post(url + "api/caption", files={"image": (name, data)}, timeout=120)
            r.raise_for_status()
            single.append(r.json()["photos"][0]["captions"][0]["caption"])
        rss_before = rss_kb(proc.pid)
        records, wall = hammer(url, payloads, args.requests, concurrency=args.concurrency)
        rss_after = rss_kb(proc.pid)
    s = latency_summary(records, wall)
    statuses = sorted({r["status"] for r in records})
    same = all(r["captions"] == [single[r["payload"]]] for r in records if r["status"] == 200)
    print(f"{args.requests} requests, {args.concurrency} clients, {len(payloads)} photos, "
          f"{' '.join(args.serve_args) or 'default serve flags'}")
    print(f"p50 {s['p50_ms']:.0f} ms, p95 {s['p95_ms']:.0f} ms, {s['per_s']:.2f} requests/s "
          f"({wall:.1f} s); statuses {statuses}; 503s retried {s['busy_503']}; "
          f"captions equal to single requests: {same}")
    if rss_before:
        print(f"server resident memory: {rss_before / 1024:.0f} MB before, {rss_after / 1024:.0f} MB after "
              f"({(rss_after - rss_before) / 1024:+.1f} MB)")


if __name__ == "__main__":
    main()
