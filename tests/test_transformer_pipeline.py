"""The Transformer through the product's commands, on small synthetic data: `rnncap
train --model transformer` (with exact --resume), `rnncap train --scst --init`,
`rnncap evaluate` (its report draws the attention maps), and a checkpoint on the real
encoder's 7x7 map through `rnncap caption --attention`, the Captioner and the web
API's hover maps and /api/model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rnncap.cli import main

pytest.importorskip("h5py")
Image = pytest.importorskip("PIL.Image")

LOC = 4  # the stand-in encoder's map: 2 x 2 locations of 6 channels


def map_dataset(tmp_path, n_train=24, n_val=6):
    """A caption-list JSON of tiny PNGs and an HDF5 cache of (4, 6) maps of them, made
    by a stand-in encoder (each quadrant's mean and spread) through the real
    ``extract_features`` (test_distributed's ``tiny_dataset``)."""
    from test_distributed import tiny_dataset

    class Quadrants:
        feature_dim, feature_shape = 6, (LOC, 6)

        def identity(self):
            return {"name": "quadrants", "feature_dim": 6, "image_size": 8, "preprocessing": "none",
                    "weights_sha256": None, "pooling": "map"}

        def preprocess(self, path):
            return np.asarray(Image.open(path).convert("RGB"), np.float32).transpose(2, 0, 1) / 255

        def encode(self, x, batch_size=32):
            x = np.asarray(x).reshape(len(x), 3, 2, 4, 2, 4)            # (n, C, 2, 4, 2, 4)
            x = x.transpose(0, 2, 4, 1, 3, 5).reshape(len(x), LOC, 3, 16)
            return np.concatenate([x.mean(axis=3), x.std(axis=3)], axis=2).astype(np.float32)

    return tiny_dataset(tmp_path, n_train, n_val, encoder=Quadrants(), side=8)


ARGS = ["--model", "transformer", "--hidden", "16", "--wordvec", "16", "--heads", "2", "--layers", "2",
        "--ffn", "32", "--batch-size", "10", "--lr", "3e-3", "--warmup", "4", "--seed", "5",
        "--select", "loss", "--average", "1", "--min-count", "1", "--quiet"]


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("transformer_run")
    data, maps = map_dataset(d)
    out = d / "run"
    assert main(["train", "--data", str(data), "--features", str(maps), "--out", str(out),
                 "--epochs", "3", *ARGS]) == 0
    return data, maps, out


def test_train_records_the_transformer_and_learns(transformer_run):
    from rnncap.checkpoint import load_checkpoint
    from rnncap.models.transformer import TransformerCaptioningModel

    _, _, out = transformer_run
    ckpt = load_checkpoint(out / "last.npz")
    m = ckpt.model
    assert isinstance(m, TransformerCaptioningModel) and ckpt.meta["model_class"] == "TransformerCaptioningModel"
    assert (m.embed_dim, m.num_heads, m.num_layers, m.ffn_dim, m.locations) == (16, 2, 2, 32, LOC)
    cfg = ckpt.configs
    assert cfg["model"]["model"] == "transformer" and cfg["model"]["dropout"] == 0.1  # the kind's default
    assert cfg["train"]["warmup"] == 4
    val = ckpt.history["val_loss"]
    assert len(val) == 3 and val[-1] < val[0]


def test_the_kinds_own_recipe_fills_what_is_not_given(transformer_run, tmp_path):
    from rnncap.checkpoint import load_checkpoint

    data, maps, _ = transformer_run
    given = [a for a in ARGS if a not in ("--lr", "3e-3", "--warmup", "4")]
    assert main(["train", "--data", str(data), "--features", str(maps), "--out", str(tmp_path / "r"),
                 "--max-iters", "1", *given]) == 0
    train = load_checkpoint(tmp_path / "r" / "last.npz").configs["train"]
    assert train["lr"] == 1e-3 and train["warmup"] == 250  # val's rate (docs/transformer.md), the warm-up


def test_resume_continues_exactly(transformer_run, tmp_path):
    from rnncap.checkpoint import load_checkpoint

    data, maps, out = transformer_run
    part = tmp_path / "part"
    assert main(["train", "--data", str(data), "--features", str(maps), "--out", str(part),
                 "--epochs", "1", *ARGS]) == 0
    assert main(["train", "--resume", str(part / "last.npz"), "--epochs", "3", "--quiet"]) == 0
    full, resumed = load_checkpoint(out / "last.npz"), load_checkpoint(part / "last.npz")
    for k, v in full.model.params.items():
        assert np.array_equal(v, resumed.model.params[k]), k


def test_self_critical_stage_runs_on_the_transformer(transformer_run, tmp_path):
    from rnncap.checkpoint import load_checkpoint
    from rnncap.models.transformer import TransformerCaptioningModel

    _, _, out = transformer_run
    scst = tmp_path / "scst"
    assert main(["train", "--scst", "--init", str(out / "last.npz"), "--out", str(scst),
                 "--batch-size", "6", "--max-iters", "2", "--quiet"]) == 0
    start, ckpt = load_checkpoint(out / "last.npz"), load_checkpoint(scst / "last.npz")
    assert isinstance(ckpt.model, TransformerCaptioningModel) and ckpt.train_state["iteration"] == 2
    assert not np.array_equal(ckpt.model.params["l0_W1"], start.model.params["l0_W1"])
    # The Transformer's own stage defaults, as Flickr8k val chose them (scst.MODEL_DEFAULTS):
    # its label-smoothed softmax sharpened at 0.5, and a rate of 1e-4.
    train = ckpt.configs["train"]
    assert train["temperature"] == 0.5 and train["lr"] == 1e-4


def test_self_critical_dropout_while_sampling_is_refused_in_one_line(transformer_run, tmp_path, capsys):
    _, _, out = transformer_run
    capsys.readouterr()
    assert main(["train", "--scst", "--init", str(out / "last.npz"), "--out", str(tmp_path / "s"),
                 "--sample-dropout", "0.2", "--max-iters", "1", "--quiet"]) != 0
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "--sample-dropout" in last and "TransformerCaptioningModel" in last


def test_evaluate_report_shows_the_attention_maps(transformer_run, tmp_path):
    data, maps, out = transformer_run
    ev = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(out / "last.npz"), "--data", str(data), "--features",
                 str(maps), "--split", "val", "--beam", "2", "--out", str(ev), "--no-meteor",
                 "--report-images", "3"]) == 0
    assert (ev / "report.html").read_text().count('class="attention"') == 3
    summary = json.loads((ev / "metrics.json").read_text())["summary"]
    assert "CIDEr" in json.dumps(summary)


def test_a_width_mismatch_is_one_clear_line(transformer_run, tmp_path, capsys):
    data, maps, _ = transformer_run
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--features", str(maps), "--out", str(tmp_path / "y"),
                 *ARGS, "--wordvec", "8"]) != 0
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("rnncap train: error:") and "--wordvec (8)" in last


def test_a_checkpoint_on_the_real_encoders_map_captions_and_serves_its_maps(tmp_path, capsys):
    """An (untrained) Transformer on EfficientNet-Lite0's 7x7 map: `rnncap caption
    --attention` draws a figure; the Captioner gives one 7x7 map per word; the web API
    answers the same maps and /api/model names the class."""
    pytest.importorskip("torch")
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    pytest.importorskip("multipart")
    from fastapi.testclient import TestClient

    from rnncap.checkpoint import save_checkpoint
    from rnncap.data.vocab import Vocab
    from rnncap.encoding.encoders import get_encoder
    from rnncap.inference.sample import Captioner
    from rnncap.inference.serve import create_app, describe_checkpoint
    from rnncap.models.transformer import TransformerCaptioningModel

    try:
        enc = get_encoder(pooling="map")
    except Exception as e:  # noqa: BLE001 - the weights package may be absent
        pytest.skip(f"no EfficientNet-Lite0 encoder here: {e}")
    vocab = Vocab.build(["a red box on a green mat", "two blue balls"])
    model = TransformerCaptioningModel(len(vocab), enc.feature_dim, 16, 2, 1, 32, locations=49, seed=1)
    model.params["b_vocab"][vocab.end_id] -= 3.0  # a few words before <END>
    path = tmp_path / "transformer.npz"
    save_checkpoint(path, model, vocab, encoder=enc.identity(),
                    configs={"model": {"model": "transformer"}, "data": {"max_length": 6}})
    photo = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(photo)

    fig = tmp_path / "att.png"
    assert main(["caption", str(photo), "--checkpoint", str(path), "--attention", str(fig), "--json"]) == 0
    caption = json.loads(capsys.readouterr().out)[0]["caption"]
    cap = Captioner.from_checkpoint(path)
    same, maps = cap.caption(str(photo), return_attention=True)
    assert same == caption and len(caption.split()) > 0 and maps.shape == (len(caption.split()), 7, 7)
    np.testing.assert_allclose(maps.reshape(len(maps), -1).sum(axis=1), 1.0, rtol=1e-5)
    assert Image.open(fig).width > 176

    info = describe_checkpoint(path)
    assert info["model_class"] == "TransformerCaptioningModel" and info["model"] == "transformer"
    c = TestClient(create_app(cap, info=info))
    assert c.get("/api/model").json()["attention"] is True
    r = c.post("/api/caption?n=2", files=[("image", (photo.name, photo.read_bytes(), "image/png"))])
    assert r.status_code == 200, r.text
    caps = r.json()["photos"][0]["captions"]
    assert caps[0]["caption"] == caption
    np.testing.assert_allclose(np.array(caps[0]["attention"]), maps, atol=1e-4)
