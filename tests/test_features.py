"""The HDF5 feature cache: extraction, resume after interruption, refusals, PCA, CLI."""
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("h5py")
pytest.importorskip("PIL")
pytest.importorskip("tqdm")
import h5py  # noqa: E402
from PIL import Image  # noqa: E402

from rnncap.errors import DataError, RnncapError  # noqa: E402
from rnncap.encoding.features import (apply_pca, extract_features, feature_info, fit_pca,  # noqa: E402
                             fit_standardizer, transformed_dim,
                             load_features, read_identity, read_pca)
from rnncap.data.images import load_image  # noqa: E402

FLICKR8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"


class TinyEncoder:
    """A fast stand-in with the Encoder interface: per-channel mean and std of an
    8x8 thumbnail (6-d). ``fail_after`` raises on that many network calls, to
    simulate a run killed midway."""

    feature_dim = 6
    feature_shape = (6,)
    image_size = 8
    pooling = "mean"

    def __init__(self, tag="tiny", fail_after=None):
        self.name, self.fail_after, self.calls = tag, fail_after, 0

    def identity(self):
        return {"name": self.name, "feature_dim": 6, "image_size": 8, "preprocessing": "thumb",
                "weights_sha256": None}

    def preprocess(self, image):
        im = load_image(image).resize((8, 8), Image.Resampling.BILINEAR)
        return np.asarray(im, np.float32).transpose(2, 0, 1) / 255

    def encode(self, x, batch_size=32):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        x = np.asarray(x)
        return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], axis=1).astype(np.float32)


def _images(folder, n, seed, prefix="img"):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids, paths = [], []
    for i in range(n):
        a = rng.integers(0, 256, (int(rng.integers(12, 40)), int(rng.integers(12, 40)), 3), dtype=np.uint8)
        a[:, :, i % 3] //= 4  # give the images distinct statistics
        p = folder / f"{prefix}{i:03d}.png"
        Image.fromarray(a).save(p)
        ids.append(p.name)
        paths.append(p)
    return ids, paths


@pytest.fixture
def items(tmp_path):
    return {"train": _images(tmp_path / "im", 11, 0, "tr"), "val": _images(tmp_path / "im", 4, 1, "va")}


def test_extract_then_load(items, tmp_path):
    out = tmp_path / "f.h5"
    enc = TinyEncoder()
    assert extract_features(items, enc, out, batch_size=3, progress=False, dataset="caps.json") == {"train": 11, "val": 4}
    for split, (ids, paths) in items.items():
        feats, got_ids = load_features(out, split)
        assert got_ids == ids and feats.dtype == np.float32 and feats.shape == (len(ids), 6)
        np.testing.assert_array_equal(feats, enc.encode(np.stack([enc.preprocess(p) for p in paths])))
    assert read_identity(out) == enc.identity()
    info = feature_info(out)
    assert info["splits"] == {"train": (11, 11), "val": (4, 4)} and info["pca_dim"] is None
    assert info["dataset"] == "caps.json"
    assert read_pca(out) is None
    with h5py.File(out) as f:
        assert f["train/done"].dtype == bool and f["train/features"].dtype == np.float32
    # Running again finds everything done and encodes nothing.
    again = TinyEncoder()
    assert extract_features(items, again, out, batch_size=3, progress=False) == {"train": 0, "val": 0}
    assert again.calls == 0


def test_interrupted_run_resumes_where_it_stopped(items, tmp_path):
    clean = tmp_path / "clean.h5"
    extract_features(items, TinyEncoder(), clean, batch_size=3, progress=False)

    out = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        extract_features(items, TinyEncoder(fail_after=2), out, batch_size=3, progress=False)
    with h5py.File(out) as f:
        np.testing.assert_array_equal(f["train/done"][...], [True] * 6 + [False] * 5)
    with pytest.raises(DataError, match="incomplete.*6 of 11"):
        load_features(out, "train")

    second = TinyEncoder()
    assert extract_features(items, second, out, batch_size=3, progress=False) == {"train": 5, "val": 4}
    assert second.calls == 2 + 2  # only the 5 unfinished train rows and the val split
    for split in items:
        np.testing.assert_array_equal(load_features(out, split)[0], load_features(clean, split)[0])


def test_refuses_to_mix_encoders_or_image_lists(items, tmp_path):
    out = tmp_path / "f.h5"
    extract_features(items, TinyEncoder(), out, batch_size=4, progress=False)
    with pytest.raises(RnncapError, match=r"f\.h5: was made with another encoder \(name 'tiny' vs 'other'\)"):
        extract_features(items, TinyEncoder("other"), out, progress=False)
    ids, paths = items["train"]
    with pytest.raises(RnncapError, match=r"split 'train' holds a different image list"):
        extract_features({"train": (ids[::-1], paths[::-1])}, TinyEncoder(), out, progress=False)
    with pytest.raises(RnncapError, match=r"split 'train' holds a different image list \(11 images, .* 10\)"):
        extract_features({"train": (ids[:10], paths[:10])}, TinyEncoder(), out, progress=False)
    # A new split can still be added to the same file.
    extract_features({"extra": (ids[:2], paths[:2])}, TinyEncoder(), out, progress=False)
    assert feature_info(out)["splits"]["extra"] == (2, 2)

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DataError, match="not an rnncap feature cache"):
        extract_features(items, TinyEncoder(), other, progress=False)
    with pytest.raises(DataError, match="not an rnncap feature cache"):
        load_features(other, "train")
    (tmp_path / "junk.h5").write_bytes(b"junk" * 10)
    with pytest.raises(DataError, match="junk.h5"):
        extract_features(items, TinyEncoder(), tmp_path / "junk.h5", progress=False)
    with pytest.raises(DataError, match="not found"):
        load_features(tmp_path / "missing.h5", "train")
    with pytest.raises(DataError, match="no split 'test' \\(it has train, val, extra\\)"):
        load_features(out, "test")


def test_bad_images_are_counted_and_skipped_then_the_run_names_them(items, tmp_path):
    ids, paths = items["train"]
    paths = list(paths)
    paths[7].write_text("not an image")
    paths[2].unlink()
    out = tmp_path / "f.h5"
    with pytest.raises(DataError, match=rf"2 of 11 images could not be read.*first: .*{paths[2].name}.*the other 9"):
        extract_features({"train": (ids, paths)}, TinyEncoder(), out, batch_size=3, progress=False)
    with h5py.File(out) as f:  # every other image is encoded; the two bad rows are not done
        np.testing.assert_array_equal(f["train/done"][...], [i not in (2, 7) for i in range(11)])
    with pytest.raises(DataError, match="incomplete"):
        load_features(out, "train")
    # Fixed, the same command reads only those two rows.
    Image.new("RGB", (8, 8), (10, 200, 30)).save(paths[7], format="PNG")
    Image.new("RGB", (8, 8), (200, 10, 30)).save(paths[2], format="PNG")
    enc = TinyEncoder()
    assert extract_features({"train": (ids, paths)}, enc, out, batch_size=3, progress=False) == {"train": 2}
    assert enc.calls == 1 and load_features(out, "train")[0].shape == (11, 6)


def test_pca_is_fitted_on_train_only_and_applied_identically(items, tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    extract_features(items, TinyEncoder(), a, batch_size=4, progress=False, pca_dim=3)
    other_val = {"train": items["train"], "val": _images(tmp_path / "other", 4, 7, "ov")}
    extract_features(other_val, TinyEncoder(), b, batch_size=4, progress=False, pca_dim=3)
    pa, pb = read_pca(a), read_pca(b)
    for key in ("mean", "components"):
        np.testing.assert_array_equal(pa[key], pb[key])  # val images had no say

    raw_train, _ = load_features(a, "train", pca=False)
    fitted = fit_pca(raw_train, 3)
    np.testing.assert_array_equal(fitted["components"], pa["components"])
    np.testing.assert_allclose(pa["mean"], raw_train.mean(axis=0), rtol=1e-6)
    raw_val, _ = load_features(a, "val", pca=False)
    val, _ = load_features(a, "val")
    assert val.shape == (4, 3) and val.dtype == np.float32
    np.testing.assert_array_equal(val, apply_pca(raw_val, pa))  # caption time uses the same function
    np.testing.assert_allclose(val, (raw_val - pa["mean"]) @ pa["components"], rtol=1e-5, atol=1e-6)
    with h5py.File(a) as f:
        assert f["pca"].attrs["fitted_on"] == "train" and f["pca"].attrs["n_fit"] == 11
        assert not f["pca"].attrs["whiten"]
    # Re-running with another K replaces the PCA without re-encoding.
    enc = TinyEncoder()
    extract_features(items, enc, a, progress=False, pca_dim=2)
    assert enc.calls == 0 and read_pca(a)["components"].shape == (6, 2)


class TinyMapEncoder(TinyEncoder):
    """Spatial maps: a 2x2 grid of locations, each with its own 6-d colour statistics."""

    feature_shape = (4, 6)
    pooling = "map"

    def identity(self):
        return {**super().identity(), "pooling": "map"}

    def encode(self, x, batch_size=32):
        x = np.asarray(x)
        q = x.reshape(len(x), 3, 2, 4, 2, 4).transpose(0, 2, 4, 1, 3, 5).reshape(len(x), 4, 3, 16)
        return np.concatenate([q.mean(axis=3), q.std(axis=3)], axis=2).astype(np.float32)


def test_spatial_maps_are_cached_in_half_precision_with_a_per_channel_pca(items, tmp_path):
    path = tmp_path / "maps.h5"
    extract_features(items, TinyMapEncoder(), path, batch_size=4, progress=False, pca_dim=3)
    with h5py.File(path) as f:
        assert f["train"]["features"].shape == (11, 4, 6) and f["train"]["features"].dtype == np.float16
    raw, _ = load_features(path, "train", pca=False)
    assert raw.shape == (11, 4, 6) and raw.dtype == np.float32
    direct = TinyMapEncoder().encode(np.stack([TinyEncoder().preprocess(p) for p in items["train"][1]]))
    np.testing.assert_allclose(raw, direct, rtol=1e-3, atol=1e-3)  # float16 on disk
    pca = read_pca(path)  # fitted on the 44 location vectors of train, one projection for all
    np.testing.assert_array_equal(pca["components"], fit_pca(raw.reshape(-1, 6), 3)["components"])
    projected, _ = load_features(path, "train")
    assert projected.shape == (11, 4, 3)
    np.testing.assert_allclose(projected[:, 2], apply_pca(raw[:, 2], pca), rtol=1e-5, atol=1e-6)
    # A pooled cache cannot be resumed with a map encoder.
    extract_features(items, TinyEncoder(), tmp_path / "pooled.h5", progress=False)
    with pytest.raises(RnncapError, match="another encoder"):
        extract_features(items, TinyMapEncoder(), tmp_path / "pooled.h5", progress=False)


def test_standardizer_gives_unit_variance_per_channel_on_train():
    rng = np.random.default_rng(0)
    maps = (rng.standard_normal((50, 7, 4)) * [1, 10, 0.1, 3] + [5, -2, 0, 1]).astype(np.float32)
    t = fit_standardizer(maps)
    z = apply_pca(maps, t)
    np.testing.assert_allclose(z.reshape(-1, 4).mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z.reshape(-1, 4).std(axis=0), 1, rtol=1e-4)
    assert maps.std() > 3  # the input is untouched
    # On top of a PCA: its projections are standardised, the PCA itself kept.
    pca = fit_pca(maps.reshape(-1, 4), 2)
    t2 = fit_standardizer(apply_pca(maps, pca), pca)
    assert t2["components"] is pca["components"] and t2["scale"].shape == (2,)
    np.testing.assert_allclose(apply_pca(maps, t2).reshape(-1, 2).std(axis=0), 1, rtol=1e-4)
    assert transformed_dim(t2, 4) == 2 and transformed_dim(t, 4) == 4 and transformed_dim(None, 4) == 4
    const = np.ones((5, 3), np.float32)  # a channel without variance keeps scale 1
    np.testing.assert_array_equal(fit_standardizer(const)["scale"], 1)


def test_fit_pca_math():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((200, 5)) * [5, 3, 1, 0.5, 0.1]) @ np.linalg.qr(rng.standard_normal((5, 5)))[0] + 2
    p = fit_pca(x.astype(np.float32), 3)
    c = p["components"].astype(np.float64)
    np.testing.assert_allclose(c.T @ c, np.eye(3), atol=1e-5)
    assert np.all(np.diff(p["explained_variance_ratio"]) <= 0) and p["explained_variance_ratio"].sum() < 1
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(vt[:3] @ c), np.eye(3), atol=1e-4)  # same axes as an SVD
    w = apply_pca(x.astype(np.float32), fit_pca(x, 3, whiten=True))
    np.testing.assert_allclose(w.std(axis=0, ddof=1), 1, rtol=1e-3)
    with pytest.raises(RnncapError, match="between 1 and 5"):
        fit_pca(x, 6)
    with pytest.raises(RnncapError, match="PCA expects 5-d"):
        apply_pca(np.zeros((2, 4), np.float32), p)
    with pytest.raises(RnncapError, match="train split"):
        extract_features({}, TinyEncoder(), Path(__import__("tempfile").mkdtemp()) / "x.h5",
                         progress=False, pca_dim=2)


# ---- with the real encoder ----------------------------------------------------------

@pytest.fixture(scope="module")
def lite0():
    torch = pytest.importorskip("torch")
    from rnncap.encoding.encoders import get_encoder

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_encoders.one_torch_thread
    yield get_encoder("efficientnet-lite0")
    torch.set_num_threads(n)


def test_real_encoder_matches_direct_encoding(lite0, tmp_path):
    ids, paths = _images(tmp_path / "im", 2, 3)
    out = tmp_path / "f.h5"
    extract_features({"train": (ids, paths)}, lite0, out, batch_size=2, progress=False)
    feats, _ = load_features(out, "train")
    np.testing.assert_allclose(feats, lite0.encode(paths), rtol=1e-4, atol=1e-4)
    assert read_identity(out) == lite0.identity()


@pytest.mark.flickr8k
@pytest.mark.skipif(not (FLICKR8K / "images").is_dir(), reason=f"Flickr8k not found at {FLICKR8K}")
def test_real_flickr8k_photos(lite0, tmp_path):
    records = [r for r in json.loads((FLICKR8K / "captions.json").read_text())["images"] if r["split"] == "val"][:3]
    ids = [r["file"] for r in records]
    paths = [FLICKR8K / "images" / i for i in ids]
    out = tmp_path / "f.h5"
    extract_features({"val": (ids, paths)}, lite0, out, batch_size=2, progress=False)
    feats, got = load_features(out, "val")
    assert got == ids and feats.shape == (3, 1280) and np.isfinite(feats).all()
    assert (feats >= 0).all() and (feats <= 6).all()  # pooled ReLU6 activations
    assert np.linalg.matrix_rank(feats) == 3


def test_cli(tmp_path, capsys, monkeypatch):
    from rnncap.encoding import encoders
    from rnncap.cli import main

    asked = []  # the real network is covered above; here the command's plumbing

    def fake_get_encoder(name, weights=None, device="cpu", pooling="mean", image_size=None):
        asked.append((name, weights, device))
        return TinyEncoder(name)

    monkeypatch.setattr(encoders, "get_encoder", fake_get_encoder)
    im = tmp_path / "data" / "images"
    records = []
    for split, n, seed in (("train", 5, 0), ("val", 2, 1)):
        ids, _ = _images(im, n, seed, split)
        records += [{"file": i, "split": split, "captions": [f"a picture number {k}"]} for k, i in enumerate(ids)]
    caps = tmp_path / "data" / "captions.json"
    caps.write_text(json.dumps({"image_dir": "images", "images": records}))
    out = tmp_path / "f.h5"
    rc = main(["features", "--data", str(caps), "--out", str(out), "--pca", "2", "--batch-size", "3", "--quiet"])
    assert rc == 0
    assert "encoded 7 images" in capsys.readouterr().out
    assert asked == [("efficientnet-lite0", None, "cpu")]
    info = feature_info(out)
    assert info["splits"] == {"train": (5, 5), "val": (2, 2)} and info["pca_dim"] == 2
    assert info["encoder"]["name"] == "efficientnet-lite0"
    assert load_features(out, "val")[0].shape == (2, 2)
    rc = main(["features", "--data", str(caps), "--out", str(out), "--encoder", "vgg16", "--weights", "w.pth",
               "--quiet"])
    assert rc == 2 and "another encoder (name 'efficientnet-lite0' vs 'vgg16')" in capsys.readouterr().err

    assert main(["features", "--data", str(caps), "--out", str(out), "--splits", "val,test", "--quiet"]) == 2
    assert "no split 'test'" in capsys.readouterr().err
    assert main(["features", "--data", str(caps), "--out", str(tmp_path / "g.h5"), "--splits", "val",
                 "--pca", "2", "--quiet"]) == 2
    assert "include train" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["features", "--data", str(caps), "--out", str(out), "--batch-size", "0"])
