"""The encoder's fast path (a few images per network call, fused convolutions, padding
the narrow input, uint8 pixels, photos read ahead in threads) gives the features of the
plain path it replaced, in the same order, with the same errors, touching no input."""
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from rnncap.data.images import read_ahead  # noqa: E402
from rnncap.encoding import encoders  # noqa: E402
from rnncap.encoding.encoders import POOLINGS, get_encoder  # noqa: E402
from rnncap.errors import DataError  # noqa: E402

TOL = 1e-4  # the most a feature may move, absolute


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """As in test_encoders: a handful of images, on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _photos(n=7, seed=0):
    """Photos of several shapes, squashed by the encoder: some resized, one not."""
    rng = np.random.default_rng(seed)
    shapes = [(256, 341), (224, 224), (130, 97), (341, 256), (300, 300), (64, 200), (224, 224)]
    return [rng.integers(0, 256, (*shapes[i % len(shapes)], 3), dtype=np.uint8) for i in range(n)]


def _max_diff(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("pooling", POOLINGS)
def test_lite0_fast_path_gives_the_plain_paths_features(pooling):
    photos = _photos()
    old = get_encoder(pooling=pooling, fast=False)
    new = get_encoder(pooling=pooling)
    assert 1 < new.chunk < len(photos)  # several network calls in one batch
    assert new._net.fused == encoders._fused_conv_available()
    assert _max_diff(new.encode(photos), old.encode(photos)) <= TOL
    # Same features, so the same identity: caches and checkpoints made before stay valid.
    assert new.identity() == old.identity()


@pytest.mark.parametrize("size", [240, 97])
@pytest.mark.parametrize("fused", [True, False])
def test_every_padding_case_and_both_kinds_of_op(size, fused, monkeypatch):
    """224 pads every strided conv asymmetrically; 240 pads the early ones so and the
    last one symmetrically; 97 only symmetrically. Fused or plain ops alike."""
    if fused and not encoders._fused_conv_available():
        pytest.skip("this torch has no oneDNN fused convolutions")
    monkeypatch.setattr(encoders, "CHUNK_BYTES", 1)  # one image per call
    photos = _photos(3, seed=size)
    old = get_encoder(image_size=size, fast=False)
    new = get_encoder(image_size=size)
    new._net.fused = fused
    assert new.chunk == 1
    assert _max_diff(new.encode(photos), old.encode(photos)) <= TOL
    assert _max_diff(new.encode_maps(photos), old.encode_maps(photos)) <= TOL
    assert _max_diff(new.classify(photos), old.classify(photos)) <= TOL


def test_the_asymmetric_padding_is_really_tested():
    """224 puts the odd pixel of every strided conv at the bottom/right: the case where
    the fast path pads a block's input instead of its expanded map."""
    net = get_encoder()._net
    strided = [b._depthwise_conv for b in net._blocks if b._depthwise_conv.stride[0] == 2]
    side, asymmetric = 112, 0
    for conv in strided:
        left, right, top, bottom = conv.pads(side, side)
        asymmetric += left != right
        side = -(-side // 2)
    assert asymmetric == len(strided) == 4


def test_vgg16_fast_path_gives_the_plain_paths_features(monkeypatch, tmp_path):
    """Narrow random VGG-16 (see test_encoders.small_vgg); the fast path only chunks it."""
    monkeypatch.setattr(encoders, "_VGG16_CFG", (4, 4, "M", 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, "M", 8, 8, 8, "M"))
    monkeypatch.setattr(encoders, "_VGG16_FC", 16)
    torch.manual_seed(0)
    torch.save({k: torch.randn_like(v) * 0.1 for k, v in encoders._build_vgg16().state_dict().items()},
               tmp_path / "w.pth")
    old = get_encoder("vgg16", weights=tmp_path / "w.pth", fast=False)
    new = get_encoder("vgg16", weights=tmp_path / "w.pth")
    assert new._net.largest_map(224) == 4 * 224 * 224
    monkeypatch.setattr(encoders, "CHUNK_BYTES", 2 * 4 * 4 * 224 * 224)
    new.chunk = encoders._chunk_size(new._net, 224)
    assert new.chunk == 2
    photos = _photos(5)
    assert _max_diff(new.encode(photos), old.encode(photos)) <= TOL
    assert new.identity() == old.identity()


def test_chunk_size_follows_the_largest_activation():
    lite0 = get_encoder()
    # EfficientNet-Lite0 at 224: 96 channels at 112 x 112 (padded: 114 x 114) is the largest.
    assert lite0._net.largest_map(224) == 96 * 114 * 114
    assert lite0.chunk == encoders.CHUNK_BYTES // (4 * 96 * 114 * 114) == 3
    assert get_encoder(image_size=448).chunk == 1
    assert get_encoder(fast=False).chunk is None


def test_pixels_batches_preprocessed_batches_and_lists_agree_and_stay_untouched():
    enc = get_encoder()
    photos = _photos(4)
    copies = [p.copy() for p in photos]
    pixels = np.stack([enc.pixels(p) for p in photos])
    floats = np.stack([enc.preprocess(p) for p in photos])
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 224, 224, 3)
    pixels_copy, floats_copy = pixels.copy(), floats.copy()
    # torch normalises the pixels to exactly numpy's numbers, in channels-last layout.
    with torch.inference_mode():
        t = enc._tensor(pixels)
    assert t.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(t.numpy(), floats)
    a, b, c = enc.encode(pixels), enc.encode(floats), enc.encode(photos, batch_size=2)
    np.testing.assert_array_equal(a, b)
    assert _max_diff(c, a) <= TOL
    for p, q in zip(photos, copies):
        np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(pixels, pixels_copy)
    np.testing.assert_array_equal(floats, floats_copy)
    pil = Image.fromarray(photos[0])
    before = np.asarray(pil).copy()
    enc.encode([pil])
    np.testing.assert_array_equal(np.asarray(pil), before)


def test_a_bad_photo_in_a_list_raises_its_own_error_on_both_paths(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(_photos(1)[0]).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for fast in (True, False):
        enc = get_encoder(fast=fast)
        with pytest.raises(DataError, match="bad.jpg"):
            enc.encode([good] * 4 + [bad, tmp_path / "missing.png"])
        with pytest.raises(DataError, match="missing.png"):
            enc.encode([good, tmp_path / "missing.png", bad])


# ---- read_ahead ---------------------------------------------------------------------

def test_read_ahead_keeps_the_order_and_puts_errors_in_place():
    rng = np.random.default_rng(0)
    delays = rng.uniform(0, 0.01, 23)

    def read(i):  # threads finish out of order
        time.sleep(delays[i])
        if i % 7 == 3:
            raise DataError(f"image {i} is broken")
        return i * 10

    batches = list(read_ahead(read, range(23), 5, workers=3))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    flat = [x for b in batches for x in b]
    for i, x in enumerate(flat):
        if i % 7 == 3:
            assert isinstance(x, DataError) and str(x) == f"image {i} is broken"
        else:
            assert x == i * 10
    assert list(read_ahead(read, [], 5)) == []


def test_read_ahead_reads_the_next_batch_while_the_caller_works():
    started = threading.Event()

    def read(i):
        if i >= 2:
            started.set()
        return i

    batches = read_ahead(read, range(4), 2)
    assert next(batches) == [0, 1]
    assert started.wait(10), "the second batch was not read while the first was in use"
    assert next(batches) == [2, 3]


def test_read_ahead_lets_other_errors_through_and_stops_when_closed():
    calls = []

    def read(i):
        calls.append(i)
        if i == 4:
            raise ValueError("a bug, not a bad image")
        return i

    with pytest.raises(ValueError, match="a bug"):
        list(read_ahead(read, range(10), 2, workers=1))
    calls.clear()
    batches = read_ahead(read, range(100), 2, workers=1)
    next(batches)
    batches.close()
    assert len(calls) <= 4  # this batch and the one read ahead, nothing after


def test_calls_side_by_side_on_one_thread_each_give_the_same_features():
    """With two torch threads a batch's calls run on two one-thread workers at once;
    the features and their order do not change, nor does the caller's thread count."""
    photos = _photos(8)
    old, new = get_encoder(fast=False), get_encoder()
    want = old.encode(photos)
    torch.set_num_threads(2)
    try:
        got = new.encode(photos)
        assert torch.get_num_threads() == 2
        workers = encoders._one_thread_workers(2)
        assert [workers.submit(torch.get_num_threads).result() for _ in range(4)] == [1] * 4
        assert _max_diff(got, want) <= TOL
        # Small batches: split across the threads, one image stays on this thread.
        assert _max_diff(new.encode(photos[:2]), want[:2]) <= TOL
        assert _max_diff(new.encode(photos[:1]), want[:1]) <= TOL
    finally:
        torch.set_num_threads(1)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_encodes_with_threads_of_its_own():
    """The workers are threads of the process that made them: a child forked after
    them (a server's worker processes) must not wait on threads it does not have."""
    import multiprocessing

    photos = _photos(6)
    new = get_encoder()
    torch.set_num_threads(2)
    try:
        want = new.encode(photos)  # the parent's workers exist now
        ctx = multiprocessing.get_context("fork")
        results = ctx.Queue()
        child = ctx.Process(target=lambda: results.put(new.encode(photos)))
        child.start()
        try:
            got = results.get(timeout=60)
        finally:
            child.join(5)
            if child.is_alive():  # hung on the parent's threads
                child.kill()
    finally:
        torch.set_num_threads(1)
    assert _max_diff(got, want) <= TOL
