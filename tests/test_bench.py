"""Smoke tests of ``rnncap bench`` at a tiny size: every code path runs, and the
PyTorch mirror of the model really computes the same thing (same first loss, same
greedy and beam captions). No timing is asserted: timings depend on the machine."""
import json
import subprocess
import sys

import numpy as np
import pytest

from rnncap.bench import measure, workloads
from rnncap.cli import main

TINY = workloads.SIZES["tiny"]


def test_make_batch_is_a_valid_ragged_caption_batch():
    T = workloads.SIZES["coco"]["T"]
    f, c = workloads.make_batch(200, workloads.SIZES["coco"], seed=3)
    assert f.shape == (200, 512) and f.dtype == np.float32
    assert c.shape == (200, T + 1) and (c[:, 0] == workloads.START).all()
    used = c[:, 1:] != workloads.NULL
    # padding only after the caption, and every caption but the full ones ends in <END>
    assert (np.diff(used.astype(int), axis=1) <= 0).all()
    lengths = used.sum(axis=1)
    assert (c[np.arange(200), lengths] == workloads.END).all()
    assert 0.6 < used.mean() < 0.85  # COCO-like: about a quarter padding
    _, full = workloads.make_batch(5, workloads.SIZES["coco"], full_length=True)
    assert (full[:, 1:] != workloads.NULL).all() and not (full == workloads.END).any()


def test_step_flops_counts_the_matmuls():
    # N=1, T=1, every dim 1: forward has 4 products (proj, Wx, Wh, vocab) of 2*4H or
    # 2 flops; backward doubles all but the projection.
    d = dict(T=1, D=1, W=1, H=1, V=1)
    assert workloads.step_flops(1, d) == 2 * 2 + 3 * (2 * 2 * 4 + 2)
    assert workloads.step_flops(6, workloads.SIZES["coco"]) == 3 * workloads.step_flops(2, workloads.SIZES["coco"])
    # padding skipped: fewer recurrent steps and scored positions, fewer FLOPs
    _, c = workloads.make_batch(50, workloads.SIZES["coco"])
    steps, scored = workloads.work_done(c, workloads.SIZES["coco"])
    assert scored <= steps < 50 * 16
    assert workloads.step_flops(50, workloads.SIZES["coco"], steps, scored) < workloads.step_flops(50, workloads.SIZES["coco"])


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
        assert t["share_of_peak"]["rnncap"] > 0 and t["share_of_peak"]["torch"] > 0
    for d in r["decode"]:
        assert d["greedy_token_agreement"] == 1.0
        assert d["beam"] == "timed" and d["beam_caption_agreement"] == 1.0
        assert d["rnncap beam"]["captions_per_s"] > 0
    assert "memory" not in r  # --quick skips the subprocesses


def test_bench_attention_model_against_its_torch_twin(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    code = main(["bench", "--size", "tiny-attention", "--quick", "--batch-sizes", "3", "--repeats", "2",
                 "--warmup", "1", "--parts", "train,decode", "--json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    (t,) = r["train"]
    # same weights, same batch: the twin's first loss (cross-entropy + penalty) is ours
    assert t["first_loss"]["torch"] == pytest.approx(t["first_loss"]["rnncap"], rel=1e-5)
    assert t["ratio"] > 0 and 0 < t["flops_per_step"]["rnncap"] <= t["flops_per_step"]["dense"]
    (d,) = r["decode"]
    assert d["rnncap greedy"]["captions_per_s"] > 0 and "torch greedy" not in d
    assert measure.memory_probe("torch", 3, "tiny-attention")["peak_growth_bytes"] >= 0


def test_bench_without_torch_and_json_to_stdout(capsys):
    code = main(["bench", "--size", "tiny", "--no-torch", "--parts", "train", "--batch-sizes", "2",
                 "--repeats", "1", "--warmup", "1", "--json", "-"])
    assert code == 0
    text = capsys.readouterr().out
    r = json.loads(text[text.index("{\n"):])
    assert "torch" not in r["train"][0] and "ratio" not in r["train"][0]


def test_memory_probe_runs_in_a_subprocess():
    m = measure.run_memory_probe("rnncap", 3, "tiny", 0)
    assert "error" not in m, m
    assert m["method"] in ("VmHWM after clear_refs", "ru_maxrss")
    # at this size a step may fit in pages already resident, but it does allocate
    assert m["peak_growth_bytes"] >= 0 and m["tracemalloc_step_peak_bytes"] > 0


def test_bad_arguments_are_one_line_errors():
    for args in (["--batch-sizes", "3,x"], ["--batch-sizes", "0"], ["--parts", "train,nope"],
                 ["--size", "huge"], ["--repeats", "0"]):
        r = subprocess.run([sys.executable, "-m", "rnncap.cli", "bench", *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, args
        assert "Traceback" not in r.stderr and "error:" in r.stderr


# ---- the fast paths compute the same thing as the plain ones ---------------------------

@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_sequence_layers_with_lengths_skip_only_padding(cell):
    """With ``lengths`` the recurrence runs packed and skips steps past each sequence's
    end: the outputs it keeps and every gradient equal the full run's (float64)."""
    from rnncap.models import layers as L

    r = np.random.default_rng(0)
    fwd, bwd = getattr(L, f"{cell}_forward"), getattr(L, f"{cell}_backward")
    k = 4 if cell == "lstm" else 1
    N, T, D, H = 7, 6, 3, 4
    x, h0 = r.standard_normal((N, T, D)), r.standard_normal((N, H))
    Wx, Wh, b = r.standard_normal((D, k * H)), r.standard_normal((H, k * H)), r.standard_normal(k * H)
    for lengths in ([6, 0, 3, 6, 1, 2, 5], [6] * 7, [0] * 7, [1, 2, 3, 4, 5, 6, 6]):
        lengths = np.array(lengths)
        runs = np.arange(T)[None, :] < lengths[:, None]
        h_full, c_full = fwd(x, h0, Wx, Wh, b)
        h, cache = fwd(x, h0, Wx, Wh, b, lengths=lengths)
        np.testing.assert_allclose(h[runs], h_full[runs], rtol=1e-12, atol=1e-14)
        assert (h[~runs] == 0).all()
        dh = r.standard_normal((N, T, H))
        grads = bwd(dh, cache)
        expected = bwd(dh * runs[:, :, None], c_full)
        for name, g, e in zip(("dx", "dh0", "dWx", "dWh", "db"), grads, expected):
            np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12, err_msg=name)
    with pytest.raises(ValueError):
        fwd(x, h0, Wx, Wh, b, lengths=np.full(N, T + 1))


@pytest.mark.parametrize("cell,dropout", [("lstm", 0.0), ("lstm", 0.3), ("rnn", 0.3)])
def test_loss_in_shards_equals_loss_in_one_piece(cell, dropout):
    """On a 2-thread BLAS a batch of 130 runs as two shards side by side; with BLAS
    limited to one thread it runs whole. Same loss, same gradients (float64), and the
    dropout masks use the random stream the same way."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from rnncap.models import model as M

    kw = dict(vocab_size=19, input_dim=6, wordvec_dim=5, hidden_dim=7, cell_type=cell,
              dtype=np.float64, seed=2, dropout=dropout, label_smoothing=0.1)
    a, b = M.CaptioningModel(**kw), M.CaptioningModel(**kw)
    features, captions = workloads.make_batch(130, dict(T=9, D=6, W=5, H=7, V=19), seed=4)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        assert len(M._shards(130, np)) == 2
        loss_a, grads_a = a.loss(features, captions)
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        assert len(M._shards(130, np)) == 1
        loss_b, grads_b = b.loss(features, captions)
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    for k in grads_b:
        np.testing.assert_allclose(grads_a[k], grads_b[k], rtol=1e-10, atol=1e-13, err_msg=k)
    assert a.rng.random() == b.rng.random()


def test_loss_in_shards_restores_blas_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from rnncap.models import model as M

    m = M.CaptioningModel(19, 6, 5, 7, "lstm", seed=0)
    features, captions = workloads.make_batch(130, dict(T=9, D=6, W=5, H=7, V=19))
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        m.loss(features, captions)            # two shards
        m.loss(features[:40], captions[:40])  # one piece, one thread
        m.sample(features, max_length=4)
        assert {i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"} == {2}


def test_in_shards_splits_independent_rows_and_never_nests():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from rnncap.models import model as M
    from rnncap.inference.decoding import greedy_decode

    m = M.CaptioningModel(19, 6, 5, 7, "lstm", seed=0)
    features, _ = workloads.make_batch(40, dict(T=9, D=6, W=5, H=7, V=19))
    seen = []

    def decode(part):
        seen.append(len(part))
        # a sharded call inside a shard runs whole, on this thread
        assert len(m.in_shards(len, part)) == 1
        return greedy_decode(m, part, max_length=6)

    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        parts = m.in_shards(decode, features)
        assert {i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas"} == {2}
    assert sorted(seen) == [20, 20] and len(parts) == 2
    np.testing.assert_array_equal(np.concatenate(parts), greedy_decode(m, features, max_length=6))
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        assert len(m.in_shards(len, features[:15])) == 1  # under 2 x min_rows (8): whole
        assert len(m.in_shards(len, features[:16])) == 2
        m._min_decode_rows = 16                           # a model's own setting
        assert len(m.in_shards(len, features[:31])) == 1
        assert len(m.in_shards(len, features[:31], min_rows=4)) == 2  # the caller's first


def test_decoders_in_shards_match_one_piece():
    """greedy_decode and beam_search split large batches into groups of images run
    side by side; the captions are those of a single-threaded run."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from rnncap.inference import decoding
    from rnncap.models import model as M

    m = M.CaptioningModel(19, 6, 5, 7, "lstm", seed=1)
    features, _ = workloads.make_batch(37, dict(T=9, D=6, W=5, H=7, V=19), seed=5)
    runs = {}
    for threads in (2, 1):
        with threadpoolctl.threadpool_limits(threads, user_api="blas"):
            assert len(M._shards(37, np, M._MIN_DECODE_ROWS)) == (2 if threads == 2 else 1)
            runs[threads] = (decoding.greedy_decode(m, features, max_length=7),
                             decoding.beam_search(m, features, beam_size=3, max_length=7, n_best=2))
    np.testing.assert_array_equal(runs[2][0], runs[1][0])
    assert len(runs[2][1]) == 37
    for a, b in zip(runs[2][1], runs[1][1]):
        assert [h.ids.tolist() for h in a] == [h.ids.tolist() for h in b]
        assert [h.logprob for h in a] == pytest.approx([h.logprob for h in b], abs=1e-5)


def test_bench_encode_smoke(tmp_path, capsys):
    """benchmarks/bench_encode.py at a tiny size: both paths run, give the same
    features, the profile and the JSON come out; bad folders are one line."""
    pytest.importorskip("torch")
    pytest.importorskip("h5py")
    from PIL import Image

    from rnncap.bench import encode

    rng = np.random.default_rng(0)
    small, full = tmp_path / "small", tmp_path / "full"
    for folder, size in ((small, (224, 224)), (full, (341, 256))):
        folder.mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    out = tmp_path / "r.json"
    assert encode.main(["--photos", str(small), "--full-size", str(full), "--n", "3", "--n-full", "2",
                        "--repeats", "1", "--warmup", "0", "--profile", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "plain, features, 224 px" in text and "network: convolutions" in text and "fast/plain" in text
    r = json.loads(out.read_text())
    assert set(r["workloads"]) == {"features", "encode"}
    for w in r["workloads"].values():
        assert w["max_abs_diff"] <= 1e-4 and w["ratio"]["median"] > 0
    assert encode.main(["--photos", str(tmp_path / "nope"), "--full-size", str(full)]) == 2
    assert "no such folder" in capsys.readouterr().err
