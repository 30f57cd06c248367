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
