"""Smoke tests of ``rnncap bench`` at a tiny size: every code path runs, and the
PyTorch mirror of the model really computes the same thing (same first loss, same
greedy and beam captions). No timing is asserted: timings depend on the machine."""
import json
import subprocess
import sys

import numpy as np
import pytest

from rnncap import bench
from rnncap.cli import main

TINY = bench.SIZES["tiny"]


def test_make_batch_is_a_valid_ragged_caption_batch():
    T = bench.SIZES["coco"]["T"]
    f, c = bench.make_batch(200, bench.SIZES["coco"], seed=3)
    assert f.shape == (200, 512) and f.dtype == np.float32
    assert c.shape == (200, T + 1) and (c[:, 0] == bench.START).all()
    used = c[:, 1:] != bench.NULL
    # padding only after the caption, and every caption but the full ones ends in <END>
    assert (np.diff(used.astype(int), axis=1) <= 0).all()
    lengths = used.sum(axis=1)
    assert (c[np.arange(200), lengths] == bench.END).all()
    assert 0.6 < used.mean() < 0.85  # COCO-like: about a quarter padding
    _, full = bench.make_batch(5, bench.SIZES["coco"], full_length=True)
    assert (full[:, 1:] != bench.NULL).all() and not (full == bench.END).any()


def test_step_flops_counts_the_matmuls():
    # N=1, T=1, every dim 1: forward has 4 products (proj, Wx, Wh, vocab) of 2*4H or
    # 2 flops; backward doubles all but the projection.
    d = dict(T=1, D=1, W=1, H=1, V=1)
    assert bench.step_flops(1, d) == 2 * 2 + 3 * (2 * 2 * 4 + 2)
    assert bench.step_flops(6, bench.SIZES["coco"]) == 3 * bench.step_flops(2, bench.SIZES["coco"])
    # padding skipped: fewer recurrent steps and scored positions, fewer FLOPs
    _, c = bench.make_batch(50, bench.SIZES["coco"])
    steps, scored = bench.work_done(c, bench.SIZES["coco"])
    assert scored <= steps < 50 * 16
    assert bench.step_flops(50, bench.SIZES["coco"], steps, scored) < bench.step_flops(50, bench.SIZES["coco"])


def test_bench_tiny_end_to_end(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    code = main(["bench", "--size", "tiny", "--quick", "--batch-sizes", "3,4", "--repeats", "2",
                 "--warmup", "1", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    for needle in ("tokens/s", "captions/s", "ratio rnncap/torch", "GFLOP/s"):
        assert needle in text
    r = json.loads(out.read_text())
    assert r["size"] == "tiny" and r["machine"]["blas"]["threads"] >= 1
    assert [t["N"] for t in r["train"]] == [3, 4]
    for t in r["train"]:
        # the PyTorch model starts from rnncap's weights: same loss on the same batch
        assert t["first_loss"]["torch"] == pytest.approx(t["first_loss"]["rnncap"], rel=1e-5)
        assert t["rnncap"]["n"] == 2 and t["rnncap"]["median_s"] > 0 and t["ratio"] > 0
    for d in r["decode"]:
        assert d["greedy_token_agreement"] == 1.0
        assert d["beam"] == "timed" and d["beam_caption_agreement"] == 1.0
        assert d["rnncap beam"]["captions_per_s"] > 0
    assert "memory" not in r  # --quick skips the subprocesses


def test_bench_without_torch_and_json_to_stdout(capsys):
    code = main(["bench", "--size", "tiny", "--no-torch", "--parts", "train", "--batch-sizes", "2",
                 "--repeats", "1", "--warmup", "1", "--json", "-"])
    assert code == 0
    text = capsys.readouterr().out
    r = json.loads(text[text.index("{\n"):])
    assert "torch" not in r["train"][0] and "ratio" not in r["train"][0]


def test_memory_probe_runs_in_a_subprocess():
    m = bench._run_memory_probe("rnncap", 3, "tiny", 0)
    assert "error" not in m, m
    assert m["maxrss_bytes"] > 0 and m["maxrss_delta_bytes"] >= 0
    assert m["tracemalloc_step_peak_bytes"] > 0


def test_bad_arguments_are_one_line_errors():
    for args in (["--batch-sizes", "3,x"], ["--batch-sizes", "0"], ["--parts", "train,nope"],
                 ["--size", "huge"], ["--repeats", "0"]):
        r = subprocess.run([sys.executable, "-m", "rnncap.cli", "bench", *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, args
        assert "Traceback" not in r.stderr and "error:" in r.stderr
