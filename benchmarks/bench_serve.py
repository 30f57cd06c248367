"""Latency and throughput of ``rnncap serve``, batching against photo by photo, in one run.

    python benchmarks/bench_serve.py --checkpoint runs/demo/model/best.npz \\
        --photos ../shared/data/flickr8k_val_fullsize/images [--requests 1000] [--clients 1 8]

Starts two real servers (``rnncap serve --port 0``) side by side: the baseline with
``--max-batch 1`` (each photo captioned alone, as before batching) and the candidate
with the default flags (batches of up to 8 photos). Each photo is captioned once
alone by each (which also warms them up); then, for every number of clients, the
same REQUESTS one-photo uploads go to the baseline and then to the candidate
(tests/servekit.py ``hammer``), ``--rounds`` times in turn. It prints p50/p95 latency
and requests/s of each, the candidate/baseline ratios, the 503s, whether every
caption equalled its single-request caption, and the servers' resident memory.
Flags after ``--`` go to both servers. See docs/serving.md.
"""
import argparse
import shlex
import sys
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
from servekit import hammer, latency_summary, rss_kb, running_server  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/demo/model/best.npz")
    ap.add_argument("--photos", required=True, help="a folder of photos, or photo files", nargs="+")
    ap.add_argument("--requests", type=int, default=1000, help="requests per run (default %(default)s)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients (default 1 8)")
    ap.add_argument("--rounds", type=int, default=1, help="baseline then candidate, this many times (default 1)")
    ap.add_argument("--limit", type=int, default=32, help="use at most this many photos (default %(default)s)")
    ap.add_argument("--baseline", default="--max-batch 1", help="the baseline's serve flags (default %(default)r)")
    ap.add_argument("--candidate", default="", help="the candidate's serve flags (default: none, the defaults)")
    ap.add_argument("serve_args", nargs="*", help="`rnncap serve` flags for both, after --")
    args = ap.parse_args()
    files = [p for a in args.photos for p in (sorted(Path(a).iterdir()) if Path(a).is_dir() else [Path(a)])]
    payloads = [(p.name, p.read_bytes()) for p in files[:args.limit]]
    servers = {"baseline": shlex.split(args.baseline), "candidate": shlex.split(args.candidate)}

    with ExitStack() as stack:
        running, single = {}, {}
        for name, flags in servers.items():
            running[name] = stack.enter_context(running_server(args.checkpoint, *flags, *args.serve_args))
            single[name] = [caption_alone(running[name][1], p) for p in payloads]  # also warms it up
        rss_before = {name: rss_kb(s[0].pid) for name, s in running.items()}
        results = {}  # (name, clients) -> [records], wall seconds
        for clients in args.clients:
            for _ in range(args.rounds):
                for name, (_, url, _, _) in running.items():
                    records, wall = hammer(url, payloads, args.requests, concurrency=clients)
                    old = results.get((name, clients), ([], 0.0))
                    results[name, clients] = (old[0] + records, old[1] + wall)
        rss_after = {name: rss_kb(s[0].pid) for name, s in running.items()}
        batches = {name: httpx.get(s[1] + "api/health").json().get("batches") for name, s in running.items()}

    print(f"{args.requests} requests x {args.rounds} round(s) per run, {len(payloads)} photos, "
          f"{args.checkpoint}; both servers: {' '.join(args.serve_args) or 'no extra flags'}")
    print(f"single-request captions equal between the servers: {single['baseline'] == single['candidate']}")
    print("| server | flags | clients | p50 ms | p95 ms | requests/s | statuses | 503s retried | same captions |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |")
    summaries = {}
    for (name, clients), (records, wall) in results.items():
        s = summaries[name, clients] = latency_summary(records, wall)
        statuses = sorted({r["status"] for r in records})
        same = all(r["captions"] == [single[name][r["payload"]]] for r in records if r["status"] == 200)
        print(f"| {name} | {' '.join(servers[name]) or '(defaults)'} | {clients} | {s.get('p50_ms', 0):.0f} | "
              f"{s.get('p95_ms', 0):.0f} | {s.get('per_s', 0):.2f} | {statuses} | {s.get('busy_503', 0)} | {same} |")
    for clients in args.clients:
        b, c = summaries["baseline", clients], summaries["candidate", clients]
        if b.get("ok") and c.get("ok"):
            print(f"{clients} client(s): candidate/baseline requests/s {c['per_s'] / b['per_s']:.2f}x, "
                  f"p50 {c['p50_ms'] / b['p50_ms']:.2f}x, p95 {c['p95_ms'] / b['p95_ms']:.2f}x")
    for name in servers:
        print(f"{name}: batches {batches[name]}", end="")
        if rss_before[name]:
            print(f"; resident memory {rss_before[name] / 1024:.0f} MB before, {rss_after[name] / 1024:.0f} MB "
                  f"after ({(rss_after[name] - rss_before[name]) / 1024:+.1f} MB)", end="")
        print()


def caption_alone(url, payload):
    name, data = payload
    r = httpx.post(url + "api/caption", files={"image": (name, data)}, timeout=120)
    r.raise_for_status()
    return r.json()["photos"][0]["captions"][0]["caption"]


if __name__ == "__main__":
    main()
