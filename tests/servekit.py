"""Helpers for the ``rnncap serve`` tests and benchmarks/bench_serve.py: a tiny real
checkpoint made without any downloaded data, the real command started as a
subprocess on 127.0.0.1, an app served from a thread, and a bounded load generator.
Every address here is 127.0.0.1.

The checkpoint is a small LSTM trained for a few seconds on synthetic scenes encoded
by the real EfficientNet-Lite0, so a photo goes through exactly the path of a real
model (load_image -> encoder -> PCA -> decoder) and different scenes get different
captions.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

N_SCENES = 24
IMAGE_SIZE = 64
PCA_DIM = 16


def make_tiny_checkpoint(out):
    """Write OUT/tiny.npz and a few photos (PNG and JPEG); returns
    {"checkpoint": Path, "photos": [Path, ...]}."""
    from PIL import Image

    from rnncap.data import synth
    from rnncap.checkpoint import save_checkpoint
    from rnncap.config import TrainConfig
    from rnncap.encoding.encoders import get_encoder
    from rnncap.encoding.features import apply_pca, fit_pca
    from rnncap.models.model import CaptioningModel
    from rnncap.training.train import Trainer
    from rnncap.data.vocab import Vocab

    out = Path(out)
    data = json.loads(synth.write_dataset(out / "data", N_SCENES, seed=3, image_size=IMAGE_SIZE).read_text())
    paths = [out / "data" / data["image_dir"] / r["file"] for r in data["images"]]
    enc = get_encoder("efficientnet-lite0")
    pca = fit_pca(enc.encode([str(p) for p in paths]), PCA_DIM)
    feats = apply_pca(enc.encode([str(p) for p in paths]), pca)

    texts = [c for r in data["images"] for c in r["captions"]]
    owner = np.array([i for i, r in enumerate(data["images"]) for _ in r["captions"]])
    vocab = Vocab.build(texts)
    ids, kept, _ = vocab.encode_batch(texts, max_length=16)
    model = CaptioningModel(len(vocab), PCA_DIM, 32, 64, cell_type="lstm", seed=0)
    cfg = TrainConfig(lr=1e-2, epochs=25, batch_size=60, seed=0, lr_decay=1.0)
    trainer = Trainer(model, (feats, ids.astype(np.int64), owner[kept]), cfg, progress=False,
                      log=lambda msg: None)
    trainer.fit()

    ckpt = out / "tiny.npz"
    save_checkpoint(ckpt, model, vocab, encoder=enc.identity(), pca=pca,
                    configs={"model": model.config(), "data": {"captions": "tiny-synthetic-scenes",
                                                                "max_length": 16}},
                    history=trainer.history)
    photos = []
    for i, p in enumerate(paths[:4]):
        q = out / (f"photo{i}.jpg" if i % 2 else f"photo{i}.png")
        Image.open(p).convert("RGB").resize((160 + 40 * i, 120 + 30 * i)).save(q)
        photos.append(q)
    return {"checkpoint": ckpt, "photos": photos}


def cli_captions(checkpoint, photos, *extra):
    """``rnncap caption --json`` run as a user would: {photo path: caption}."""
    r = subprocess.run([sys.executable, "-m", "rnncap.cli", "caption", *map(str, photos),
                        "--checkpoint", str(checkpoint), "--json", *extra],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return {x["photo"]: x["caption"] for x in json.loads(r.stdout)}


@contextlib.contextmanager
def running_server(checkpoint, *extra, timeout=120, env=None):
    """``rnncap serve --checkpoint CKPT --port 0 ...`` in a subprocess (``env``: more
    environment variables); yields (process, base URL, stdout lines, stderr lines), the
    lines growing as the server prints. Stopped with SIGINT (Ctrl-C) at the end; the
    caller may stop it first."""
    cmd = [sys.executable, "-m", "rnncap.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines, url = [], None
    errs = []
    readers = [threading.Thread(target=lambda: errs.extend(proc.stderr), daemon=True)]
    readers[0].start()
    deadline = time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            if m:
                url = m.group(1)
                break
            if time.monotonic() > deadline:
                break
        if url is None:
            proc.kill()
            raise AssertionError(f"the server printed no URL: {''.join(lines)}{''.join(errs)}")
        readers.append(threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True))
        readers[-1].start()
        yield proc, url, lines, errs
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # The pipes reach their end with the process; close them once read (no
        # ResourceWarning for a test that stopped the server itself).
        for reader in readers:
            reader.join(timeout=5)
        proc.stdout.close()
        proc.stderr.close()


def rss_kb(pid):
    """Resident memory of a process in KiB (Linux /proc), or None elsewhere."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def serving_in_thread(app):
    """Serve an ASGI app with uvicorn from a thread on a free port of 127.0.0.1;
    yields the base URL."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.install_signal_handlers = lambda: None  # not the main thread  # noqa: E731
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        t.join(timeout=10)
        sock.close()


def hammer(url, payloads, n_requests, concurrency=8, timeout=120, max_retries=50, query=""):
    """POST ``n_requests`` uploads to URL/api/caption from ``concurrency`` clients at
    once (request i sends payloads[i % len], a (file name, bytes) pair). A 503 is
    retried after its Retry-After (at most 0.5 s here, ``max_retries`` times).

    Returns (records, wall seconds): records[i] = {"payload", "status", "seconds"
    (of the answered attempt), "captions" (top caption per photo, or None),
    "busy" (503s before it), "retry_after_ok" (every 503 carried Retry-After)}.
    """
    import httpx

    records = [None] * n_requests
    counter = iter(range(n_requests))
    lock = threading.Lock()

    def client():
        with httpx.Client(base_url=url, timeout=timeout) as c:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                name, data = payloads[i % len(payloads)]
                busy, retry_ok = 0, True
                while True:
                    t = time.perf_counter()
                    r = c.post("api/caption" + query, files={"image": (name, data)})
                    dt = time.perf_counter() - t
                    if r.status_code != 503 or busy >= max_retries:
                        break
                    busy += 1
                    retry_ok &= r.headers.get("retry-after", "").isdigit()
                    time.sleep(min(0.5, float(r.headers.get("retry-after") or 1)))
                caps = ([p["captions"][0]["caption"] for p in r.json()["photos"]]
                        if r.status_code == 200 else None)
                records[i] = {"payload": i % len(payloads), "status": r.status_code, "seconds": dt,
                              "captions": caps, "busy": busy, "retry_after_ok": retry_ok}

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - t0


def latency_summary(records, wall):
    """p50/p95 of answered requests' latency (ms) and throughput (requests/s)."""
    ok = sorted(r["seconds"] for r in records if r and r["status"] == 200)
    if not ok:
        return {"ok": 0}
    pick = lambda q: 1000 * ok[min(len(ok) - 1, int(round(q * (len(ok) - 1))))]  # noqa: E731
    return {"ok": len(ok), "p50_ms": pick(0.5), "p95_ms": pick(0.95), "per_s": len(ok) / wall,
            "busy_503": sum(r["busy"] for r in records if r)}
