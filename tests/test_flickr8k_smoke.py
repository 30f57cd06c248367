"""The Flickr8k experiment (experiments/flickr8k.py) end to end on a slice of the real
data (through `rnncap train`'s defaults), plus the arithmetic its parity check relies
on: the PyTorch twin converts into an rnncap model that computes the same loss."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def test_twin_converts_to_an_rnncap_model_with_the_same_loss():
    torch = pytest.importorskip("torch")
    twin_mod = _load("torch_twin")
    V, D, W, H = 30, 12, 10, 8
    twin = twin_mod.build_twin(V, D, W, H, dropout=0.5, seed=3).eval()
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((6, D)).astype(np.float32)
    caps = rng.integers(4, V, (6, 9))
    caps[:, 0] = 1
    caps[:, 6] = 2
    caps[:, 7:] = 0
    caps[0, 3] = 2  # a short caption: the padding after it must not count
    caps[0, 4:] = 0
    with torch.no_grad():
        want = float(twin.loss(torch.from_numpy(feats), torch.from_numpy(caps)))
    model = twin_mod.to_rnncap(twin)
    got, _ = model.loss(feats, caps, train=False)
    assert got == pytest.approx(want, rel=1e-5)
    # and decoding goes through the converted weights: step matches the twin's scores
    with torch.no_grad():
        scores = twin(torch.from_numpy(feats), torch.from_numpy(caps[:, :1])).numpy()[:, 0]
    step_scores, _ = model.step(np.ones(6, dtype=np.int64), model.init_state(feats))
    np.testing.assert_allclose(step_scores, scores, rtol=1e-4, atol=1e-5)

    # load_rnncap is its inverse: an rnncap model's weights go into the twin and back
    # unchanged, and the twin then computes rnncap's loss
    from rnncap.models.model import CaptioningModel

    ours = CaptioningModel(V, D, W, H, cell_type="lstm", seed=5)
    ours.params["b"] = rng.standard_normal(4 * H).astype(np.float32)  # distinct gate biases
    twin = twin_mod.load_rnncap(twin_mod.build_twin(V, D, W, H, seed=9), ours).eval()
    back = twin_mod.to_rnncap(twin)
    for k, v in ours.params.items():
        np.testing.assert_allclose(back.params[k], v, rtol=0, atol=1e-7, err_msg=k)
    with torch.no_grad():
        theirs = float(twin.loss(torch.from_numpy(feats), torch.from_numpy(caps)))
    assert ours.loss(feats, caps, train=False)[0] == pytest.approx(theirs, rel=1e-5)


@pytest.mark.flickr8k
def test_experiment_on_a_slice_of_flickr8k_beats_the_untrained_model(tmp_path, flickr_subset):
    pytest.importorskip("pycocoevalcap")
    exp = _load("flickr8k")
    # The first 300 train images (1,500 captions) and 60 val images, read from the
    # session's feature cache of exactly those photos (conftest.flickr_subset); a small
    # LSTM, greedy only. Measured: untrained val CIDEr about 0.01, 0.09 after 6 epochs.
    _, features = flickr_subset
    rc = exp.main(["--out", str(tmp_path), "--data", str(FLICKR8K), "--runs", "lstm",
                   "--features", str(features),
                   "--train-images", "300", "--val-images", "60", "--epochs", "6",
                   "--batch-size", "32", "--hidden", "128", "--wordvec", "128",
                   "--decoders", "greedy", "--no-meteor", "--length-norms", "0,1"])
    assert rc == 0
    result = json.loads((tmp_path / "lstm-s0" / "metrics.json").read_text())
    assert result["train_images"] == 300 and result["val_images"] == 60
    assert not list(tmp_path.glob("*.h5"))  # the cache was read, not extracted again
    before = result["untrained_val_cider"]
    after = result["metrics"]["greedy"]["CIDEr"]
    assert after > before + 0.04 and after > 3 * before, (before, after)
    assert "Beam length normalisation" in (tmp_path / "results.md").read_text()
    sweep = json.loads((tmp_path / "lstm-s0" / "length_norm.json").read_text())
    assert [(r["beam"], r["length_norm"]) for r in sweep] == [(3, 0.0), (3, 1.0), (5, 0.0), (5, 1.0)]
    # dividing by length favours longer captions: on average they get no shorter
    assert sweep[1]["mean_length"] >= sweep[0]["mean_length"] and sweep[3]["mean_length"] >= sweep[2]["mean_length"]
    # the kept model is `rnncap train`'s best.npz: raw 1280-d encoder features (the
    # cache's PCA not used) with the default standardisation stored in the checkpoint
    from rnncap.checkpoint import load_checkpoint

    ckpt = load_checkpoint(str(tmp_path / "lstm-s0" / "best.npz"))
    assert ckpt.encoder["name"] == "efficientnet-lite0"
    assert ckpt.model.input_dim == 1280
    assert ckpt.pca.get("components") is None and ckpt.pca.get("scale") is not None
    assert result["chosen"]["epoch"] is not None and len(result["history"]) == 6


@pytest.mark.flickr8k
def test_experiment_runs_the_spatial_captioners_through_the_commands(tmp_path):
    """The attention rows: `rnncap features --maps block`, `rnncap train`, `rnncap train
    --scst` and `rnncap evaluate` (rules on), then an ensemble, on 40 + 10 photos."""
    if not (FLICKR8K / "captions.json").exists():
        pytest.skip("needs ../shared/data/flickr8k (real Flickr8k photos); not present here")
    for module in ("torch", "h5py", "pycocoevalcap"):
        pytest.importorskip(module)
    exp = _load("flickr8k")
    rc = exp.main(["--out", str(tmp_path), "--data", str(FLICKR8K), "--runs",
                   "attention,attention-scst,ens-attention-scst", "--seeds", "0",
                   "--train-images", "40", "--val-images", "10", "--epochs", "1", "--batch-size", "20",
                   "--hidden", "32", "--wordvec", "32", "--no-meteor"])
    assert rc == 0
    from rnncap.checkpoint import load_checkpoint
    from rnncap.encoding.features import read_identity

    assert read_identity(tmp_path / "maps-block.h5")["pooling"] == "block-map"
    att = json.loads((tmp_path / "attention-s0" / "command.json").read_text())
    scst = json.loads((tmp_path / "attention-scst-s0" / "command.json").read_text())
    ens = json.loads((tmp_path / "ens-attention-scst" / "command.json").read_text())
    assert "--model attention" in att["train_command"] and "--hidden 32" in att["train_command"]
    assert f"--init {tmp_path / 'attention-s0' / 'best.npz'}" in scst["train_command"]
    ckpt = load_checkpoint(str(tmp_path / "attention-scst-s0" / "best.npz"))
    assert ckpt.configs["model"]["model"] == "attention" and ckpt.model.hidden_dim == 32
    # scored by `rnncap evaluate` on the 10 val photos with beam 3 and the rules
    scored = json.loads((tmp_path / "attention-s0" / "eval" / "metrics.json").read_text())["run"]
    assert scored["images"] == 10 and scored["beam"] == 3 and scored["rules"] and scored["block_trigrams"]
    for row in (att, scst):
        assert 0 <= row["metrics"]["CIDEr"] and row["metrics"]["repeated_words"] == 0  # a rule
        assert row["train_seconds"] > 0
    # an ensemble of one member decodes exactly like it, so it scores the same
    assert ens["members"] == ["attention-scst-s0"]
    assert ens["metrics"]["CIDEr"] == pytest.approx(scst["metrics"]["CIDEr"], abs=1e-12)
    assert ens["metrics"]["BLEU-4"] == pytest.approx(scst["metrics"]["BLEU-4"], abs=1e-12)
    table = (tmp_path / "results.md").read_text()
    assert "| attention | 0 | maps-block |" in table and "| ens-attention-scst | 0 |" in table
    assert "- ens-attention-scst (seeds 0): attention-scst-s0" in table
    # a second call finds everything done and trains or scores nothing again
    before = (tmp_path / "attention-s0" / "last.npz").stat().st_mtime
    assert exp.main(["--out", str(tmp_path), "--data", str(FLICKR8K), "--runs", "attention,ens-attention-scst",
                     "--train-images", "40", "--val-images", "10", "--no-meteor"]) == 0
    assert (tmp_path / "attention-s0" / "last.npz").stat().st_mtime == before
