"""The HTML report: self-contained, escaped, and really rendered by headless Chromium."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from rnncap.evaluation.report import THUMBNAIL, loss_curve_svg, write_report

PIL = pytest.importorskip("PIL.Image")

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium installed (apt install chromium)")

EVIL = '<script>document.title="pwned"</script> & "quotes"'


def history(n=200):
    it = np.arange(1, n + 1)
    return {"iteration": it.tolist(), "train_loss": (3 * np.exp(-it / 60) + 2).tolist(),
            "epoch": (it / 50).tolist(), "val_iteration": [50, 100, 150, 200],
            "val_loss": [3.1, 2.6, float("nan"), None]}


@pytest.fixture
def report(tmp_path):
    red = tmp_path / "red.png"
    PIL.new("RGB", (640, 480), (230, 20, 20)).save(red)
    tall = tmp_path / "tall.jpg"
    PIL.new("RGB", (100, 300), (20, 20, 230)).save(tall)
    items = [
        {"image_id": "red.png", "image": str(red), "greedy": "a red square", "beam": "a big red square",
         "references": ["a red image", EVIL], "scores": {"BLEU-4": 0.5, "METEOR": None, "CIDEr": 1.25}},
        {"image_id": 7, "image": tall, "greedy": EVIL, "beam": "a blue bar", "references": ["blue"]},
        {"image_id": "in-memory", "image": PIL.new("RGB", (50, 40), (20, 200, 20)), "greedy": "green"},
        {"image_id": "none", "image": None, "greedy": "no photo at all"},
        {"image_id": "gone", "image": tmp_path / "missing.jpg", "greedy": "unreadable photo"},
    ]
    summary = {"BLEU-4": 0.1234567, "METEOR": None, "CIDEr": 0.5, "images": 5, "top_caption": EVIL}
    path = write_report(tmp_path / "out", items, summary, history=history(), title=f"run {EVIL}")
    return path


def test_report_is_self_contained_and_escaped(report):
    text = report.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "<script" not in text.lower()          # EVIL appears only escaped
    assert text.count("&lt;script&gt;") >= 4      # title x2, summary, greedy, reference
    assert "<link" not in text and "@import" not in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", text)
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert len(srcs) == 3 and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert text.count('<div class="card">') == 5
    assert "no image" in text and "image not available: missing.jpg" in text
    assert "<svg" in text and 'class="train"' in text and 'class="val"' in text
    assert "0.1235" in text and "n/a" in text  # 4 decimals, None as n/a


def test_loss_curve_points():
    svg = loss_curve_svg(history(10))
    train = re.search(r'class="train"[^>]*points="([^"]+)"', svg).group(1).split()
    val = re.search(r'class="val"[^>]*points="([^"]+)"', svg).group(1).split()
    assert len(train) == 10 and len(val) == 2  # NaN and None validation losses skipped
    xs = [float(p.split(",")[0]) for p in train]
    ys = [float(p.split(",")[1]) for p in train]
    assert xs == sorted(xs) and ys == sorted(ys)  # loss falls, so y (downwards) grows
    # validation losses given per iteration (no val_iteration) are plotted too
    assert 'class="val"' in loss_curve_svg({"iteration": [1, 2, 3], "train_loss": [3, 2, 1],
                                            "val_loss": [None, 2.5, 1.5]})
    assert loss_curve_svg({"iteration": [], "train_loss": []}) == ""
    assert loss_curve_svg({"iteration": [5], "train_loss": [2.0]}).startswith("<svg")


def test_report_without_history_or_items(tmp_path):
    path = write_report(tmp_path, [], {"CIDEr": 0.1})
    text = path.read_text()
    assert "<svg" not in text and "Captions (0 images)" in text
    assert not list(tmp_path.glob("*.tmp"))


def _chromium(*args, tmp_path):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@needs_chromium
def test_report_renders_in_chromium(report, tmp_path):
    # A copy of the report with a probe script appended (the report itself has no
    # script): after the page loads it writes what the browser made of it.
    probe = report.with_name("probe.html")
    probe.write_text(report.read_text().replace("</body>", """<pre id="probe"></pre><script>
window.addEventListener("load", function () {
  var imgs = Array.from(document.images).map(function (i) {
    return [i.complete, i.naturalWidth, i.naturalHeight]; });
  document.getElementById("probe").textContent = JSON.stringify({
    imgs: imgs, cards: document.querySelectorAll(".card").length,
    scripts: document.scripts.length, title: document.title,
    svg: document.querySelectorAll("svg polyline").length,
    text: document.body.innerText});
});
</script></body>"""))
    proc = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri(), tmp_path=tmp_path)
    m = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert m and m.group(1), f"no probe output; stderr: {proc.stderr[-500:]}"
    import html
    got = json.loads(html.unescape(m.group(1)))
    # thumbnails: 640x480 -> 256x192, 100x300 -> 85x256, 50x40 stays
    assert got["imgs"] == [[True, THUMBNAIL, 192], [True, 85, THUMBNAIL], [True, 50, 40]]
    assert got["cards"] == 5 and got["svg"] == 2
    assert got["scripts"] == 1 and got["title"] == f"run {EVIL}"  # the title's script is text
    for text in ("a big red square", "a blue bar", "no photo at all", EVIL, "0.1235"):
        assert text in got["text"]


@needs_chromium
def test_report_screenshot_is_not_blank(report, tmp_path):
    shot = tmp_path / "shot.png"
    proc = _chromium(f"--screenshot={shot}", "--window-size=1200,2000", report.as_uri(), tmp_path=tmp_path)
    assert shot.exists(), proc.stderr[-500:]
    assert shot.stat().st_size > 20_000
    px = np.asarray(PIL.open(shot).convert("RGB")).astype(int)
    assert px.shape[:2] == (2000, 1200)
    # the red and the blue photo are on screen (JPEG shifts colours a little)
    red = (px[..., 0] > 190) & (px[..., 1] < 60) & (px[..., 2] < 60)
    blue = (px[..., 2] > 190) & (px[..., 0] < 60) & (px[..., 1] < 60)
    assert red.sum() > 0.8 * 256 * 192 and blue.sum() > 0.8 * 85 * 256
    colours = np.unique(px[..., 0] << 16 | px[..., 1] << 8 | px[..., 2])
    assert len(colours) > 50  # text, lines, photos: not blank


# ---- evaluate_split and the `rnncap evaluate` command ------------------------------------
# (they live here because the command's main product is the report)

from rnncap.inference.decoding import beam_decode, greedy_decode  # noqa: E402
from rnncap.evaluation.evaluate import evaluate_split  # noqa: E402
from rnncap.models.model import CaptioningModel  # noqa: E402
from rnncap.data.vocab import Vocab  # noqa: E402

WORDS = ["a", "dog", "cat", "runs", "sits", "on", "grass", "red", "ball", "the"]


def tiny_model(vocab, dim=6, seed=0):
    m = CaptioningModel(len(vocab), dim, 8, 16, cell_type="lstm", seed=seed)
    m.params["W_vocab"] *= 4  # peaked enough that beam and greedy differ
    m.params["b_vocab"][vocab.end_id] += 1.5
    return m


def test_evaluate_split_decodes_scores_and_measures():
    vocab = Vocab.build([" ".join(WORDS)])
    model = tiny_model(vocab)
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((12, 6)).astype(np.float32)
    refs = [[f"a {w} runs on the grass", f"the {w} sits"] for w in WORDS[:12]] + [["x"]] * 2
    refs = refs[:12]
    ids = [f"im{i}" for i in range(12)]
    caps, _, _ = vocab.encode_batch([r for rs in refs for r in rs], 8)
    idx = np.repeat(np.arange(12), 2)
    summary, per_image, results = evaluate_split(model, vocab, feats, refs, ids, beam=3, max_length=9,
                                                 captions=caps, image_idx=idx, java=False, batch_size=5)
    greedy = [vocab.decode(r) for r in greedy_decode(model, feats, 9)]
    beamed = [vocab.decode(r) for r in beam_decode(model, feats, 3, 9)]
    assert [per_image[i]["greedy"] for i in ids] == greedy
    assert [per_image[i]["beam"] for i in ids] == beamed and greedy != beamed
    assert results == [{"image_id": i, "caption": c} for i, c in zip(ids, beamed)]
    from rnncap.evaluation.metrics import coco_metrics, perplexity

    want, _ = coco_metrics(dict(zip(ids, refs)), dict(zip(ids, beamed)), java=False)
    for k, v in want.items():
        assert summary[k] == v
    assert summary["perplexity"] == pytest.approx(perplexity(model, feats[idx], caps))
    assert summary["decoder"] == "beam-3" and summary["images"] == 12
    assert set(per_image["im0"]["scores"]) >= {"BLEU-4", "CIDEr"}


def test_evaluate_split_exposes_a_model_that_ignores_the_image():
    vocab = Vocab.build([" ".join(WORDS)])
    model = tiny_model(vocab)
    model.params["W_proj"][:] = 0.0  # every photo starts from the same state
    feats = np.random.default_rng(1).standard_normal((8, 6)).astype(np.float32)
    summary, _, _ = evaluate_split(model, vocab, feats, [["a dog"]] * 8, list(range(8)), beam=2,
                                   max_length=6, java=False)
    assert summary["distinct_captions"] == 1 and summary["top_caption_share"] == 1.0
    assert summary["unique_image_fraction"] == 0.0


class TinyEncoder:
    """Mean and std of each colour channel: a fast stand-in for a CNN (6-d)."""

    feature_dim = 6
    feature_shape = (6,)
    image_size = 8
    pooling = "mean"

    def __init__(self, tag="tiny"):
        self.tag = tag

    def identity(self):
        return {"name": self.tag, "feature_dim": 6, "image_size": 8, "preprocessing": "thumb",
                "weights_sha256": None}

    def preprocess(self, image):
        from rnncap.data.images import load_image

        im = load_image(image).resize((8, 8))
        return np.asarray(im, np.float32).transpose(2, 0, 1) / 255

    def encode(self, x, batch_size=32):
        x = np.stack([self.preprocess(i) for i in x]) if isinstance(x, list) else np.asarray(x)
        return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], axis=1).astype(np.float32)


@pytest.fixture
def eval_setup(tmp_path):
    """A caption-list dataset of coloured photos, a checkpoint, and a feature cache."""
    from rnncap.checkpoint import save_checkpoint

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    images = []
    for i in range(9):
        colour = ("red", "green", "blue")[i % 3]
        a = rng.integers(0, 80, (24, 32, 3), dtype=np.uint8)
        a[..., i % 3] += 150
        PIL.fromarray(a).save(tmp_path / "images" / f"p{i}.png")
        images.append({"file": f"p{i}.png", "split": "train" if i < 5 else "val",
                       "captions": [f"a {colour} ball on the grass", f"the {colour} dog runs"]})
    data = tmp_path / "captions.json"
    data.write_text(json.dumps({"image_dir": "images", "images": images}))
    vocab = Vocab.build([c for im in images[:5] for c in im["captions"]] + ["red green blue"])
    ckpt = tmp_path / "model.npz"
    save_checkpoint(ckpt, tiny_model(vocab), vocab, encoder=TinyEncoder().identity(),
                    configs={"data": {"max_length": 7}}, history=history(30))
    return tmp_path, data, ckpt


def _evaluate(argv, capsys):
    from rnncap.cli import main

    rc = main(["evaluate", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_evaluate_command_with_a_feature_cache(eval_setup, capsys):
    from rnncap.data.datasets import load_dataset
    from rnncap.encoding.features import extract_features
    from rnncap.checkpoint import load_checkpoint

    tmp, data, ckpt = eval_setup
    split = load_dataset(data)["val"]
    feats_h5 = tmp / "feats.h5"
    extract_features({"val": (split.image_ids, split.image_paths)}, TinyEncoder(), feats_h5,
                     progress=False)
    rc, out, err = _evaluate(["--checkpoint", str(ckpt), "--data", str(data), "--features", str(feats_h5),
                              "--out", str(tmp / "eval"), "--json", "--no-meteor", "--beam", "2"], capsys)
    assert rc == 0, err
    summary = json.loads(out)
    for k in ("BLEU-1", "BLEU-4", "ROUGE-L"):
        assert 0.0 <= summary[k] <= 1.0
    assert summary["METEOR"] is None and summary["CIDEr"] >= 0 and summary["perplexity"] > 1
    assert summary["images"] == 4

    # the captions are the model's beam captions of exactly these photos
    model = load_checkpoint(ckpt).model
    vocab = load_checkpoint(ckpt).vocab
    enc = TinyEncoder()
    want = [vocab.decode(r) for r in beam_decode(model, enc.encode(split.image_paths), 2, 8)]
    results = json.loads((tmp / "eval" / "results.json").read_text())
    assert results == [{"image_id": i, "caption": c} for i, c in zip(split.image_ids, want)]
    metrics = json.loads((tmp / "eval" / "metrics.json").read_text())
    assert metrics["summary"] == summary and len(metrics["per_image"]) == 4
    page = (tmp / "eval" / "report.html").read_text()
    assert page.count('<div class="card">') == 4 and page.count("data:image/jpeg;base64,") == 4
    assert "<svg" in page and "a red ball on the grass" in page

    # the same photos encoded by the checkpoint's encoder give the same numbers
    import rnncap.encoding.encoders

    orig = rnncap.encoding.encoders.get_encoder
    try:
        rnncap.encoding.encoders.get_encoder = lambda name, weights=None, device="cpu", pooling="mean", \
            image_size=None: TinyEncoder(name)
        rc, out2, err = _evaluate(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp / "eval2"),
                                   "--json", "--no-meteor", "--beam", "2"], capsys)
    finally:
        rnncap.encoding.encoders.get_encoder = orig
    assert rc == 0, err
    assert json.loads(out2) == summary
    assert json.loads((tmp / "eval2" / "results.json").read_text()) == results


def test_evaluate_command_table_and_errors(eval_setup, capsys):
    from rnncap.encoding.features import extract_features
    from rnncap.data.datasets import load_dataset

    tmp, data, ckpt = eval_setup
    split = load_dataset(data)["val"]
    other = tmp / "other.h5"
    extract_features({"val": (split.image_ids, split.image_paths)}, TinyEncoder("another"), other,
                     progress=False)
    rc, out, err = _evaluate(["--checkpoint", str(ckpt), "--data", str(data), "--features", str(other),
                              "--out", str(tmp / "e")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "another encoder" in err and "Traceback" not in err
    rc, out, err = _evaluate(["--checkpoint", str(ckpt), "--data", str(data), "--split", "test",
                              "--out", str(tmp / "e")], capsys)
    assert rc == 2 and "no split 'test'" in err

    import rnncap.encoding.encoders

    orig = rnncap.encoding.encoders.get_encoder
    try:
        rnncap.encoding.encoders.get_encoder = lambda name, weights=None, device="cpu", pooling="mean", \
            image_size=None: TinyEncoder(name)
        rc, out, err = _evaluate(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp / "e"),
                                  "--beam", "1", "--max-images", "2", "--no-meteor"], capsys)
    finally:
        rnncap.encoding.encoders.get_encoder = orig
    assert rc == 0, err
    assert "val: 2 images, greedy decoding" in out
    for label in ("BLEU-4", "METEOR", "CIDEr", "perplexity", "distinct captions", "most common caption"):
        assert label in out


def test_evaluate_command_on_shipped_features(tmp_path, capsys):
    # A miniature cs231n coco_captioning folder: features ship with the dataset (here
    # 4-d "PCA" and 10-d "fc7"), no photos; val image 0 has no caption.
    h5py = pytest.importorskip("h5py")
    from rnncap.checkpoint import save_checkpoint

    words = ["<NULL>", "<START>", "<END>", "<UNK>", "a", "dog", "cat", "runs"]
    vocab = Vocab(words)
    folder = tmp_path / "coco_captioning"
    folder.mkdir()
    (folder / "coco2014_vocab.json").write_text(json.dumps({"idx_to_word": words}))
    row = lambda *w: [1, *[words.index(x) for x in w], 2] + [0] * (4 - len(w))  # noqa: E731
    rng = np.random.default_rng(0)
    with h5py.File(folder / "coco2014_captions.h5", "w") as f:
        f["train_captions"] = np.array([row("a", "dog"), row("a", "cat")], dtype=np.int32)
        f["train_image_idxs"] = np.array([0, 1], dtype=np.int32)
        f["val_captions"] = np.array([row("a", "dog", "runs"), row("cat", "runs"), row("a", "cat")], dtype=np.int32)
        f["val_image_idxs"] = np.array([1, 1, 2], dtype=np.int32)
    for split, n in (("train", 2), ("val", 3)):
        for suffix, dim in (("_pca", 4), ("", 10)):
            with h5py.File(folder / f"{split}2014_vgg16_fc7{suffix}.h5", "w") as f:
                f["features"] = rng.standard_normal((n, dim)).astype(np.float32)
    for dim in (4, 10):  # a model on the PCA features, and one on raw fc7
        ckpt = tmp_path / f"m{dim}.npz"
        save_checkpoint(ckpt, tiny_model(vocab, dim=dim), vocab, configs={"data": {"max_length": 5}})
        rc, out, err = _evaluate(["--checkpoint", str(ckpt), "--data", str(folder), "--json",
                                  "--no-meteor", "--out", str(tmp_path / f"e{dim}")], capsys)
        assert rc == 0, err
        assert "1 of 3 images have no reference captions" in err
        summary = json.loads(out)
        assert summary["images"] == 2 and summary["perplexity"] > 1
        results = json.loads((tmp_path / f"e{dim}" / "results.json").read_text())
        assert [r["image_id"] for r in results] == ["val/1", "val/2"]
        assert "no image" in (tmp_path / f"e{dim}" / "report.html").read_text()
