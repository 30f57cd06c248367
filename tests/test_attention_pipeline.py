"""The attention model through the product's commands: `rnncap features --maps`,
`rnncap train --model attention`, `rnncap caption --attention`, `rnncap evaluate`
(its report shows the maps, checked in headless Chromium), and the checkpoint side:
the model class is recorded and rebuilt, checkpoints from before it still load."""
import html
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from rnncap.cli import main

from conftest import FLICKR8K, FLICKR8K_FULLSIZE as FULLSIZE, write_flickr_subset
from test_report import CHROMIUM, _chromium

pytest.importorskip("torch")
pytest.importorskip("h5py")


def test_map_features_at_train_time_equal_features_at_caption_time(tmp_path):
    """Same photo -> the very same standardised (L, D) maps in training and captioning."""
    from PIL import Image, ImageDraw

    from rnncap.models.attention import AttentionCaptioningModel
    from rnncap.checkpoint import load_checkpoint, save_checkpoint
    from rnncap.encoding.encoders import get_encoder
    from rnncap.encoding.features import apply_pca, extract_features, fit_standardizer, load_features, read_identity, read_pca
    from rnncap.inference.sample import Captioner
    from rnncap.data.vocab import Vocab

    paths = []
    for i in range(5):
        im = Image.new("RGB", (90 + 20 * i, 70 + 7 * i), (220, 220, 220))
        ImageDraw.Draw(im).rectangle((5 + 9 * i, 8, 40 + 9 * i, 50), fill=(40 * i, 200 - 30 * i, 90))
        p = tmp_path / f"im{i}.png"
        im.save(p)
        paths.append(str(p))
    h5 = tmp_path / "maps.h5"
    extract_features({"train": ([f"im{i}" for i in range(5)], paths)}, get_encoder(pooling="map"), h5,
                     progress=False, pca_dim=8)
    raw, _ = load_features(h5, "train", pca=False)
    transform = fit_standardizer(apply_pca(raw, read_pca(h5)), read_pca(h5))
    train_feats = apply_pca(raw, transform)
    assert train_feats.shape == (5, 49, 8)
    vocab = Vocab.build(["a red box"])
    model = AttentionCaptioningModel(len(vocab), 8, 4, 6, attention_dim=3, seed=0)
    ckpt = tmp_path / "c.npz"
    save_checkpoint(ckpt, model, vocab, encoder=read_identity(h5), pca=transform,
                    configs={"data": {"max_length": 5}})
    assert isinstance(load_checkpoint(ckpt).model, AttentionCaptioningModel)
    cap = Captioner.from_checkpoint(ckpt)
    assert cap.encoder.pooling == "map" and cap.attends
    np.testing.assert_allclose(cap.features(paths), train_feats, rtol=0, atol=2e-2)  # float16 cache
    np.testing.assert_allclose(cap.features(paths[::-1])[::-1], cap.features(paths), rtol=0, atol=1e-5)
    caption, maps = cap.caption(paths[0], beam=2, return_attention=True)
    assert maps.shape == (len(caption.split()), 7, 7)
    np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    assert caption == cap.caption(paths[0], beam=2)


def test_checkpoints_from_before_the_attention_model_still_load(tmp_path):
    """A checkpoint without "model_class" in its header is a CaptioningModel."""
    import zipfile

    from rnncap.checkpoint import load_checkpoint, save_checkpoint
    from rnncap.models.model import CaptioningModel
    from rnncap.data.vocab import Vocab

    vocab = Vocab.build(["a dog runs"])
    model = CaptioningModel(len(vocab), 5, 4, 3, cell_type="rnn", seed=1)
    new = tmp_path / "new.npz"
    save_checkpoint(new, model, vocab)
    old = tmp_path / "old.npz"
    with zipfile.ZipFile(new) as zin, zipfile.ZipFile(old, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "__meta__.npy":
                meta_arr = np.load(__import__("io").BytesIO(data))
                meta = json.loads(meta_arr.tobytes().decode())
                assert meta.pop("model_class") == "CaptioningModel"
                buf = __import__("io").BytesIO()
                np.save(buf, np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
                data = buf.getvalue()
            zout.writestr(item, data)
    got = load_checkpoint(old).model
    assert type(got) is CaptioningModel and got.cell_type == "rnn"
    assert all((got.params[k] == v).all() for k, v in model.params.items())


@pytest.fixture(scope="module")
def attention_run(tmp_path_factory):
    """Real photos (200 train, 40 val) -> maps with a per-channel PCA -> a few epochs
    of the attention model through `rnncap train`."""
    if not (FLICKR8K / "captions.json").exists():
        pytest.skip("needs ../shared/data/flickr8k (real Flickr8k photos); not present here")
    d = tmp_path_factory.mktemp("attention_run")
    data = write_flickr_subset(d / "captions.json", n_train=200, n_val=40)
    maps = d / "maps.h5"
    assert main(["features", "--data", str(data), "--out", str(maps), "--maps", "--pca", "64", "--quiet"]) == 0
    out = d / "run"
    assert main(["train", "--data", str(data), "--features", str(maps), "--out", str(out),
                 "--model", "attention", "--hidden", "128", "--wordvec", "64", "--attention-dim", "64",
                 "--min-count", "3", "--epochs", "3", "--batch-size", "100", "--lr", "4e-3",
                 "--max-length", "12", "--standardize", "--quiet"]) == 0
    return data, maps, out


@pytest.mark.flickr8k
def test_attention_model_trains_captions_and_draws_its_maps(attention_run, tmp_path):
    from PIL import Image

    from rnncap.models.attention import AttentionCaptioningModel
    from rnncap.checkpoint import load_checkpoint
    from rnncap.inference.sample import Captioner

    data, maps, out = attention_run
    ckpt = load_checkpoint(out / "last.npz")
    assert isinstance(ckpt.model, AttentionCaptioningModel)
    assert ckpt.meta["model_class"] == "AttentionCaptioningModel"
    assert ckpt.encoder["pooling"] == "map" and ckpt.pca["scale"].shape == (64,)
    hist = ckpt.history["train_loss"]
    assert hist[-1] < hist[0] - 5  # it learns

    photos = sorted(str(p) for p in (FULLSIZE / "images").glob("*.jpg"))[:3]
    if not photos:
        pytest.skip("needs ../shared/data/flickr8k_val_fullsize")
    fig = tmp_path / "att.png"
    r = subprocess.run([sys.executable, "-m", "rnncap.cli", "caption", photos[0], "--checkpoint",
                        str(out / "last.npz"), "--attention", str(fig), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    caption = json.loads(r.stdout)[0]["caption"]
    cap = Captioner.from_checkpoint(out / "last.npz")
    same, att = cap.caption(photos[0], return_attention=True)
    assert same == caption and att.shape == (len(caption.split()), 7, 7)
    im = Image.open(fig)
    panels = 1 + len(caption.split())  # the photo, then a panel per word
    assert im.width >= min(panels, 6) * 176 and np.asarray(im).std() > 10
    r = subprocess.run([sys.executable, "-m", "rnncap.cli", "caption", photos[0], "--checkpoint",
                        str(out / "last.npz"), "--attention", str(fig), "--beam", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.flickr8k
def test_self_critical_stage_runs_on_the_attention_model(attention_run, tmp_path):
    """`rnncap train --scst` from an attention checkpoint: two updates, the attention
    model's own stage defaults recorded (temperature 1, 3 epochs), parameters moved, and
    the result still an attention model that captions."""
    from rnncap.checkpoint import load_checkpoint
    from rnncap.models.attention import AttentionCaptioningModel

    data, maps, out = attention_run
    scst = tmp_path / "scst"
    assert main(["train", "--scst", "--init", str(out / "last.npz"), "--out", str(scst),
                 "--batch-size", "10", "--max-iters", "2", "--quiet"]) == 0
    start, ckpt = load_checkpoint(out / "last.npz"), load_checkpoint(scst / "last.npz")
    train = ckpt.configs["train"]
    assert train["stage"] == "scst" and train["temperature"] == 1.0 and train["epochs"] == 3
    assert isinstance(ckpt.model, AttentionCaptioningModel) and ckpt.train_state["iteration"] == 2
    assert not np.array_equal(ckpt.model.params["W_att"], start.model.params["W_att"])
    assert len(ckpt.history["train_reward"]) == 2 and (scst / "best.npz").exists()


@pytest.mark.flickr8k
def test_evaluate_report_shows_the_attention_maps(attention_run, tmp_path):
    data, maps, out = attention_run
    ev = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(out / "last.npz"), "--data", str(data), "--features",
                 str(maps), "--split", "val", "--beam", "2", "--out", str(ev), "--no-meteor",
                 "--report-images", "4"]) == 0
    page = (ev / "report.html").read_text()
    assert page.count('class="attention"') == 4
    if CHROMIUM is None:
        pytest.skip("no headless Chromium to render the report")
    probe = ev / "probe.html"
    probe.write_text(page.replace("</body>", """<pre id="probe"></pre><script>
window.addEventListener("load", function () {
  document.getElementById("probe").textContent = JSON.stringify(
    Array.from(document.querySelectorAll("img.attention")).map(function (i) {
      return [i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width]; }));
});
</script></body>"""))
    proc = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri(), tmp_path=tmp_path)
    m = re.search(r'<pre id="probe">(.*?)</pre>', proc.stdout, re.S)
    assert m and m.group(1), proc.stderr[-500:]
    imgs = json.loads(html.unescape(m.group(1)))
    assert len(imgs) == 4 and all(ok and w > 100 and h > 100 and shown > 100 for ok, w, h, shown in imgs)


def test_h0_checkpoints_refuse_attention_maps(tmp_path, capsys):
    from rnncap.checkpoint import save_checkpoint
    from rnncap.encoding.encoders import get_encoder
    from rnncap.models.model import CaptioningModel
    from rnncap.data.vocab import Vocab

    vocab = Vocab.build(["a dog"])
    save_checkpoint(tmp_path / "h0.npz", CaptioningModel(len(vocab), 1280, 4, 3, seed=0), vocab,
                    encoder=get_encoder().identity())
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "p.png")
    assert main(["caption", str(tmp_path / "p.png"), "--checkpoint", str(tmp_path / "h0.npz"),
                 "--attention", str(tmp_path / "a.png")]) != 0
    err = capsys.readouterr().err
    assert "attention" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.flickr8k
def test_the_wrong_kind_of_features_is_one_clear_line(attention_run, flickr_subset, tmp_path, capsys):
    data, maps, _ = attention_run
    _, pooled = flickr_subset
    for features, model in ((pooled, "attention"), (maps, "h0")):
        code = main(["train", "--data", str(data), "--features", str(features), "--model", model,
                     "--out", str(tmp_path / model), "--epochs", "1", "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and "Traceback" not in "\n".join(err)
        assert str(features) in err[-1] and "--maps" in err[-1]


@pytest.mark.flickr8k
def test_deep_output_through_the_commands(attention_run, tmp_path, capsys):
    """`rnncap train --deep-output`: recorded in the checkpoint, rebuilt by `rnncap
    caption` (step = the training forward is tested in test_attention_model); only the
    attention model takes it, as one clear line."""
    from rnncap.checkpoint import load_checkpoint
    from rnncap.inference.sample import Captioner

    data, maps, _ = attention_run
    out = tmp_path / "deep"
    assert main(["train", "--data", str(data), "--features", str(maps), "--out", str(out),
                 "--model", "attention", "--deep-output", "--hidden", "32", "--wordvec", "16",
                 "--attention-dim", "16", "--epochs", "1", "--batch-size", "100", "--quiet"]) == 0
    ckpt = load_checkpoint(out / "last.npz")
    assert ckpt.configs["model"]["deep_output"] and ckpt.model.deep_output
    assert ckpt.model.params["Wo_z"].shape == (64, 32)
    photos = sorted(str(p) for p in (FULLSIZE / "images").glob("*.jpg"))[:1]
    if photos:
        caption = Captioner.from_checkpoint(out / "last.npz").caption(photos[0])
        assert isinstance(caption, str) and caption
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--features", str(maps), "--out", str(tmp_path / "h0"),
                 "--deep-output", "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "rnncap train: error: --deep-output is the attention model's; --model is h0"
