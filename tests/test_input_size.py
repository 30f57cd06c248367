"""The encoder's input size as an option (``rnncap features --input-size``): a finer
map, recorded in the encoder identity so that captioning rebuilds the same encoder."""
from __future__ import annotations

import json

import numpy as np
import pytest

from rnncap.encoding.encoders import describe_mismatch, get_encoder


def test_448_pixels_give_lite0_a_14_by_14_map():
    enc = get_encoder("efficientnet-lite0", pooling="block-map", image_size=448)
    assert enc.image_size == 448 and enc.feature_shape == (196, 320)
    photo = np.random.default_rng(0).integers(0, 255, (100, 150, 3), dtype=np.uint8)
    from PIL import Image

    feats = enc.encode([Image.fromarray(photo)])
    assert feats.shape == (1, 196, 320)
    ident = enc.identity()
    assert ident["image_size"] == 448 and "448x448" in ident["preprocessing"]
    # The default encoder is another encoder: its features are not interchangeable.
    default = get_encoder("efficientnet-lite0", pooling="block-map").identity()
    assert default["image_size"] == 224
    assert describe_mismatch(default, ident).startswith("image_size")
    # The pooled features keep their size (1280), from a map 4 times as large.
    assert get_encoder("efficientnet-lite0", image_size=448).feature_shape == (1280,)


def test_bad_input_sizes_are_one_clear_error():
    from rnncap.errors import RnncapError

    with pytest.raises(RnncapError, match="32..2048"):
        get_encoder("efficientnet-lite0", image_size=16)


def test_a_checkpoint_trained_on_448_features_captions_at_448(tmp_path, capsys):
    from rnncap.checkpoint import save_checkpoint
    from rnncap.cli import main
    from rnncap.data import synth
    from rnncap.data.datasets import load_dataset
    from rnncap.config import DataConfig
    from rnncap.encoding.features import load_features, read_identity
    from rnncap.inference.sample import Captioner
    from rnncap.models.attention import AttentionCaptioningModel
    from rnncap.training.train import dataset_vocab

    data = synth.write_dataset(tmp_path / "data", 4, seed=2, image_size=64)
    assert main(["features", "--data", str(data), "--out", str(tmp_path / "f448.h5"), "--maps", "block",
                 "--input-size", "448", "--quiet"]) == 0
    ident = read_identity(tmp_path / "f448.h5")
    assert ident["image_size"] == 448 and ident["pooling"] == "block-map"
    feats, ids = load_features(tmp_path / "f448.h5", "train", pca=False)
    assert feats.shape[1:] == (196, 320)

    vocab = dataset_vocab(load_dataset(str(data)), DataConfig(min_count=1))
    model = AttentionCaptioningModel(len(vocab), 320, 8, 16, attention_dim=8, seed=0)
    save_checkpoint(tmp_path / "m.npz", model, vocab, encoder=ident,
                    configs={"data": {"captions": str(data), "max_length": 10}})
    cap = Captioner.from_checkpoint(tmp_path / "m.npz")
    assert cap.encoder.image_size == 448
    photo = str(sorted((tmp_path / "data" / "images").glob("*.png"))[0])
    f = cap.features([photo])
    assert f.shape == (1, 196, 320)
    # The very features the cache holds for that photo: the caption path is the training path.
    row = next(k for k, i in enumerate(ids) if str(i) in photo)
    np.testing.assert_allclose(f[0], feats[row], atol=2e-2)
    caption, attention = cap.caption(photo, return_attention=True)
    assert attention.shape[1:] == (14, 14)
    capsys.readouterr()
    assert main(["caption", photo, "--checkpoint", str(tmp_path / "m.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["caption"] == caption
