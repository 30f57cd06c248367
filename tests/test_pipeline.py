"""The whole path: dataset -> features -> train -> caption a photo, through the CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest

from rnncap.cli import main

from conftest import FLICKR8K_FULLSIZE as FULLSIZE

pytest.importorskip("torch")
pytest.importorskip("h5py")


def _scene(path, colour, size=(96, 64)):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", size, (230, 230, 230))
    ImageDraw.Draw(im).ellipse((10, 10, 50, 50), fill=colour)
    im.save(path)


def test_features_at_train_time_equal_features_at_caption_time(tmp_path):
    """The best-known cause of "the same caption for every image" is a preprocessing
    mismatch between training and captioning. Same image -> the very same features."""
    from rnncap.checkpoint import save_checkpoint
    from rnncap.encoding.encoders import get_encoder
    from rnncap.encoding.features import extract_features, load_features, read_identity, read_pca
    from rnncap.models.model import CaptioningModel
    from rnncap.inference.sample import Captioner
    from rnncap.data.vocab import Vocab

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (90, 90, 90)]
    paths = []
    for i, c in enumerate(colours):
        p = tmp_path / (f"im{i}.png" if i % 2 else f"im{i}.jpg")
        _scene(p, c, size=(96 + 17 * i, 64 + 9 * i))  # varied sizes and aspect ratios
        paths.append(str(p))
    enc = get_encoder("efficientnet-lite0")
    h5 = tmp_path / "f.h5"
    ids = [f"im{i}" for i in range(len(paths))]
    extract_features({"train": (ids, paths)}, enc, h5, batch_size=4, progress=False, pca_dim=3)
    train_feats, got_ids = load_features(h5, "train", pca=True)
    assert list(got_ids) == ids and train_feats.shape == (6, 3)

    vocab = Vocab.build(["a red ball"])
    model = CaptioningModel(len(vocab), 3, 4, 5, cell_type="lstm", seed=0)
    ckpt = tmp_path / "c.npz"
    save_checkpoint(ckpt, model, vocab, encoder=read_identity(h5), pca=read_pca(h5),
                    configs={"data": {"max_length": 5}})
    cap = Captioner.from_checkpoint(ckpt)
    caption_feats = cap.features(paths[::-1])[::-1]  # another order and batch layout
    np.testing.assert_allclose(caption_feats, train_feats, rtol=0, atol=1e-5)
    assert isinstance(cap.caption(paths[0]), str)


@pytest.mark.flickr8k
@pytest.mark.skipif(not (FULLSIZE / "captions.json").exists(),
                    reason="needs ../shared/data/flickr8k_val_fullsize (real full-size Flickr8k photos)")
def test_train_on_real_photos_then_caption_full_size_photos(tmp_path, flickr_subset):
    data, feats = flickr_subset
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--features", str(feats), "--out", str(out),
                 "--cell", "lstm", "--hidden", "256", "--wordvec", "128", "--min-count", "3",
                 # 300 photos: the defaults' lr decay of 0.8 (tuned on all of Flickr8k)
                 # leaves a model this small under-trained after 8 epochs.
                 "--epochs", "8", "--batch-size", "100", "--lr", "4e-3", "--lr-decay", "0.95", "--dropout", "0.2",
                 "--max-length", "14", "--quiet"]) == 0
    ckpt = out / "best.npz"
    assert ckpt.exists()

    photos = sorted(str(p) for p in (FULLSIZE / "images").glob("*.jpg"))[:10]
    r = subprocess.run([sys.executable, "-m", "rnncap.cli", "caption", *photos, "--checkpoint", str(ckpt),
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)
    assert [x["photo"] for x in results] == photos
    captions = [x["caption"] for x in results]

    from rnncap.checkpoint import load_checkpoint

    vocab = load_checkpoint(ckpt).vocab
    for c in captions:
        words = c.split()
        assert 2 <= len(words) <= 15, c
        assert all(w in vocab.word_to_idx and not w.startswith("<") for w in words), c
    assert len(set(captions)) >= 3, captions  # not the same caption for every photo

    # "End properly": the decoder emits <END> rather than running into the length cap.
    from rnncap.inference.decoding import beam_decode
    from rnncap.inference.sample import Captioner

    cap = Captioner.from_checkpoint(ckpt)
    ids = beam_decode(cap.model, cap.features(photos), beam_size=3, max_length=cap.max_length,
                      banned=vocab.never_generated)
    ended = [(row == vocab.end_id).any() for row in ids]
    assert sum(ended) >= 8, ids

    # length_norm reaches the beam search: Captioner gives what beam_decode ranks with it,
    # which here differs from ranking by log-probability alone (so a dropped argument shows)
    feats = cap.features(photos)
    by_norm = {a: [vocab.decode(r) for r in beam_decode(cap.model, feats, beam_size=3, max_length=cap.max_length,
                                                          length_norm=a, banned=vocab.never_generated,
                                                          rules=cap.rules)]
               for a in (0.0, 1.0, 2.0, 4.0)}
    differs = [a for a in (1.0, 2.0, 4.0) if by_norm[a] != by_norm[0.0]]
    assert differs, "length normalisation changed no caption"
    assert cap.caption_many(photos, length_norm=differs[0]) == by_norm[differs[0]]
    assert cap.caption_many(photos, length_norm=0.0) == by_norm[0.0]
    # Without one, the checkpoint's own decoding default is used.
    assert cap.caption_many(photos) == cap.caption_many(photos, length_norm=cap.decode.length_norm)
