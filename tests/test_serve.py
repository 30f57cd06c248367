"""``rnncap serve``: the JSON API (FastAPI's TestClient), every kind of bad input, the
busy answer, the page in a real headless Chromium, a bounded load on 127.0.0.1, and
the command's start-up and Ctrl-C.

The real-model tests share one tiny checkpoint (conftest ``tiny_checkpoint``) and one
server subprocess; nothing leaves 127.0.0.1.
"""
import collections
import contextlib
import io
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("httpx")
pytest.importorskip("PIL")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from rnncap import cli  # noqa: E402
from rnncap.inference.serve import Limits, create_app, describe_checkpoint  # noqa: E402

from servekit import cli_captions, hammer, rss_kb, running_server, serving_in_thread  # noqa: E402

MB = 1024 * 1024
LOAD_REQUESTS = 120  # about 0.1 s each on one worker; the 1,000-request run is marked slow
TEST_LIMITS = Limits(max_bytes=1 * MB, max_files=3, max_pixels=4_000_000)


# ---- fixtures -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def captioner(tiny_checkpoint):
    from rnncap.inference.sample import Captioner

    return Captioner.from_checkpoint(tiny_checkpoint["checkpoint"])


@pytest.fixture(scope="module")
def client(captioner, tiny_checkpoint):
    app = create_app(captioner, info=describe_checkpoint(tiny_checkpoint["checkpoint"]), limits=TEST_LIMITS)
    return TestClient(app)


@pytest.fixture(scope="module")
def photos(tiny_checkpoint):
    return [Path(p) for p in tiny_checkpoint["photos"]]


@pytest.fixture(scope="module")
def by_cli(tiny_checkpoint, photos):
    """``rnncap caption --json`` on every photo, run once: {path: caption}."""
    return cli_captions(tiny_checkpoint["checkpoint"], photos)


@pytest.fixture(scope="module")
def expected(captioner, photos):
    """The default caption of each photo, straight from Captioner.caption."""
    return {p.name: captioner.caption(str(p)) for p in photos}


def upload(client, *files, query=""):
    return client.post("/api/caption" + query, files=[("image", f) for f in files])


def good_request_works(client, photos, expected):
    """After any bad request, a good one still gets its caption."""
    p = photos[0]
    r = upload(client, (p.name, p.read_bytes(), "image/png"))
    assert r.status_code == 200, r.text
    assert r.json()["photos"][0]["captions"][0]["caption"] == expected[p.name]


# ---- the API with a real checkpoint -------------------------------------------------

def test_one_photo_several_captions_with_log_probabilities(client, captioner, photos, expected):
    p = photos[1]
    r = upload(client, (p.name, p.read_bytes(), "image/jpeg"), query="?n=3")
    assert r.status_code == 200, r.text
    body = r.json()
    [photo] = body["photos"]
    assert photo["name"] == p.name and (photo["width"], photo["height"]) == (200, 150)
    caps = photo["captions"]
    assert len(caps) == 3 and len({c["caption"] for c in caps}) == 3
    assert caps[0]["caption"] == expected[p.name]
    assert all(c["logprob"] < 0 and c["words"] == c["caption"].split() for c in caps)
    assert [c["logprob"] for c in caps] == sorted((c["logprob"] for c in caps), reverse=True)
    assert "attention" not in caps[0]  # not an attention model
    # The same numbers as Captioner.caption_details, the method the server calls.
    direct = captioner.caption_details([str(p)], n=3)[0]
    assert [c["caption"] for c in caps] == [d["caption"] for d in direct]
    np.testing.assert_allclose([c["logprob"] for c in caps], [d["logprob"] for d in direct], rtol=1e-12)
    assert set(photo["ms"]) == {"decode", "caption"} and set(body["ms"]) == {"queued", "total"}
    assert body["decoding"]["n"] == 3 and body["decoding"]["beam"] == 3


def test_several_photos_in_one_request_keep_their_order(client, photos, expected):
    r = upload(client, *[(p.name, p.read_bytes()) for p in photos[:3]])
    assert r.status_code == 200, r.text
    got = [(x["name"], x["captions"][0]["caption"]) for x in r.json()["photos"]]
    assert got == [(p.name, expected[p.name]) for p in photos[:3]]
    assert len(set(c for _, c in got)) > 1  # different scenes, different captions


def test_decoding_parameters_reach_the_captioner(client, captioner, photos):
    p = photos[2]
    for query, kwargs in (("?beam=1", {"beam": 1}), ("?beam=2&length_norm=1.5", {"beam": 2, "length_norm": 1.5})):
        r = upload(client, (p.name, p.read_bytes()), query=query)
        assert r.status_code == 200, r.text
        assert r.json()["photos"][0]["captions"][0]["caption"] == captioner.caption(str(p), **kwargs)
        assert r.json()["decoding"]["beam"] == kwargs["beam"]


def test_the_bytes_decide_not_the_name_or_type(client, photos, expected):
    p = photos[0]
    r = upload(client, ("notes.txt", p.read_bytes(), "text/plain"))
    assert r.status_code == 200
    assert r.json()["photos"][0]["captions"][0]["caption"] == expected[p.name]


def test_same_caption_as_rnncap_caption(client, by_cli, photos):
    for p in photos:
        r = upload(client, (p.name, p.read_bytes()))
        assert r.json()["photos"][0]["captions"][0]["caption"] == by_cli[str(p)]


def test_model_health_openapi_and_page(client):
    m = client.get("/api/model").json()
    assert m["checkpoint"] == "tiny.npz" and m["cell"] == "lstm" and m["model"] == "h0"
    assert m["attention"] is False
    assert m["encoder"]["name"] == "efficientnet-lite0" and m["vocab_size"] > 10
    assert m["training_data"] == "tiny-synthetic-scenes"
    assert m["decoding_defaults"] == {"beam": 3, "n": 1, "length_norm": 0.0, "max_length": 17}
    assert m["limits"]["max_bytes"] == MB and m["limits"]["max_files"] == 3
    assert m["limits"]["max_batch"] == 8 and m["limits"]["batch_wait_ms"] == 5
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["in_progress"] == 0
    spec = client.get("/openapi.json").json()
    assert {"/api/caption", "/api/model", "/api/health"} <= set(spec["paths"])
    body = spec["paths"]["/api/caption"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "image" in body["schema"]["properties"]
    # Swagger UI and ReDoc pull assets from a CDN: switched off.
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200


def test_the_page_names_no_other_host():
    static = Path(__file__).resolve().parents[1] / "rnncap" / "inference" / "static"
    for f in static.iterdir():
        text = f.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name


# ---- bad input: a 4xx JSON error naming the problem, then a good request works -------

def _png_header(width, height):
    """A PNG that declares width x height 8-bit gray pixels (with a scrap of data):
    what a decompression bomb looks like before it is decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


def _png(size=(64, 48)):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _corrupt_png():
    data = bytearray(_png())
    i = data.index(b"IDAT") + 40
    data[i:i + 200] = bytes(range(200))
    return bytes(data)


def _jpeg_cut(photos):
    data = photos[1].read_bytes()
    return data[: len(data) // 2]


def _chunks(total, size=64 * 1024):
    """A body sent chunked, with no Content-Length to trust."""
    head = b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n\r\n"
    yield head
    for _ in range(total // size):
        yield b"\0" * size


BAD_UPLOADS = {
    # name: (files or a callable request, status, words the error must contain)
    "not an image": (lambda ph: [("image", ("cat.jpg", b"hello, this is text", "image/jpeg"))], 422,
                     ["'cat.jpg'", "not an image"]),
    "zero bytes": (lambda ph: [("image", ("empty.png", b"", "image/png"))], 422, ["'empty.png'", "empty"]),
    "truncated": (lambda ph: [("image", ("half.jpg", _jpeg_cut(ph), "image/jpeg"))], 422,
                  ["'half.jpg'", "truncated"]),
    "corrupt": (lambda ph: [("image", ("bad.png", _corrupt_png(), "image/png"))], 422,
                ["'bad.png'", "corrupt"]),
    "bomb over the server's limit": (lambda ph: [("image", ("bomb.png", _png_header(3000, 3000)))], 422,
                                     ["'bomb.png'", "decompression bomb"]),
    "bomb over Pillow's limit": (lambda ph: [("image", ("huge.png", _png_header(40000, 40000)))], 422,
                                 ["'huge.png'", "too large"]),
    "one bad photo among good ones": (lambda ph: [("image", (ph[0].name, ph[0].read_bytes())),
                                                  ("image", ("x.gif", b"GIF89a broken"))], 422,
                                      ["'x.gif' (photo 2 of 2)"]),
    "missing field": (lambda ph: [("photo", (ph[0].name, ph[0].read_bytes()))], 400,
                      ["missing", "'image'", "'photo'"]),
    "too many files": (lambda ph: [("image", (f"p{i}.png", _png())) for i in range(4)], 400,
                       ["too many files", "at most 3"]),
    "over the size limit": (lambda ph: [("image", ("big.png", b"\0" * (MB + 10)))], 413, ["over the limit", "1 MB"]),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_get_a_clear_error_and_the_server_keeps_serving(case, client, photos, expected):
    files, status, words = BAD_UPLOADS[case]
    r = client.post("/api/caption", files=files(photos))
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert isinstance(message, str) and "\n" not in message
    for w in words:
        assert w in message, message
    good_request_works(client, photos, expected)


BAD_REQUESTS = {
    "over the limit, no Content-Length": (dict(content=_chunks(MB + 64 * 1024),
                                               headers={"content-type": "multipart/form-data; boundary=xyz"}),
                                          413, "over the limit"),
    "over the limit, Content-Length lies": (dict(content=b"".join(_chunks(MB + 64 * 1024)),
                                                 headers={"content-type": "multipart/form-data; boundary=xyz",
                                                          "content-length": "100"}),
                                            413, "over the limit"),
    "not multipart": (dict(content=b"\x89PNG...", headers={"content-type": "image/png"}), 415, "multipart/form-data"),
    "no boundary": (dict(content=b"abc", headers={"content-type": "multipart/form-data"}), 400, "multipart"),
    "text instead of a file": (dict(files=[("x", ("x", b"x"))], data={"image": "a photo"}), 400, "must carry files"),
    "beam 0": (dict(params={"beam": 0}), 422, "beam"),
    "beam too wide": (dict(params={"beam": 99}), 422, "beam"),
    "beam not a number": (dict(params={"beam": "wide"}), 422, "beam"),
    "length_norm NaN": (dict(params={"length_norm": "nan"}), 422, "length_norm"),
    "length_norm negative": (dict(params={"length_norm": -1}), 422, "length_norm"),
    "n above the beam": (dict(params={"n": 3, "beam": 2}), 422, "at most the beam size (2)"),
    "n above the default beam": (dict(params={"n": 4}), 422, "at most the beam size (3)"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_a_clear_error_and_the_server_keeps_serving(case, client, photos, expected):
    kwargs, status, word = BAD_REQUESTS[case]
    if "params" in kwargs and "files" not in kwargs:
        kwargs = {**kwargs, "files": [("image", (photos[0].name, photos[0].read_bytes()))]}
    r = client.post("/api/caption", **kwargs)
    assert r.status_code == status, r.text
    assert word in r.json()["error"], r.json()
    good_request_works(client, photos, expected)


def test_unknown_paths_and_methods_answer_json(client):
    assert client.get("/api/nothing").json() == {"error": "Not Found"}
    r = client.get("/api/caption")
    assert r.status_code == 405 and "error" in r.json()


# ---- attention and busy, with a stand-in captioner ----------------------------------

class FakeCaptioner:
    """Answers like an attention Captioner: word i of every caption looks at cell
    (i % h, i % w) of an h x w grid. ``hold`` (a threading.Event) makes every encoder
    batch wait for it; ``calls`` counts them."""

    max_length = 8
    h, w = 2, 3
    attends = True

    def __init__(self, hold=None):
        self.hold, self.calls = hold, 0

    def features(self, images):
        self.calls += 1
        if self.hold is not None:
            assert self.hold.wait(30)
        assert all(im.mode == "RGB" for im in images)  # decoded photos, as Captioner gets them
        return np.zeros((len(images), 1))

    def caption_details_from_features(self, feats, beam=None, n=1, length_norm=None, max_length=None,
                                      return_attention=False):
        out = []
        for _ in feats:
            entries = []
            for k in range(n):
                words = ["a", "red", "ball"] + ["again"] * k
                e = {"caption": " ".join(words), "logprob": -1.0 - k}
                if return_attention:
                    grid = np.full((len(words), self.h, self.w), 0.01)
                    for i in range(len(words)):
                        grid[i, i % self.h, i % self.w] = 0.95
                    e["attention"] = grid
                entries.append(e)
            out.append(entries)
        return out

    def caption_details(self, images, beam=None, n=1, length_norm=None, max_length=None,
                        return_attention=False):
        return self.caption_details_from_features(self.features(images), beam, n, length_norm, max_length,
                                                  return_attention)


def test_attention_weights_are_passed_through_per_word(photos):
    c = TestClient(create_app(FakeCaptioner(), info={"model": "attention"}))
    r = upload(c, (photos[0].name, photos[0].read_bytes()), query="?n=2")
    assert r.status_code == 200, r.text
    for cap in r.json()["photos"][0]["captions"]:
        att = np.array(cap["attention"])
        assert att.shape == (len(cap["words"]), FakeCaptioner.h, FakeCaptioner.w)
        for i, grid in enumerate(att):
            assert np.unravel_index(grid.argmax(), grid.shape) == (i % FakeCaptioner.h, i % FakeCaptioner.w)


def test_a_real_attention_checkpoint_gives_the_maps_of_caption(tmp_path, photos):
    """An (untrained) attention model through the real Captioner: each caption carries
    one 7 x 7 map per word, the maps of Captioner.caption(return_attention=True)."""
    from rnncap.models.attention import AttentionCaptioningModel
    from rnncap.checkpoint import save_checkpoint
    from rnncap.encoding.encoders import get_encoder
    from rnncap.inference.sample import Captioner
    from rnncap.data.vocab import Vocab

    vocab = Vocab.build(["a red box on a green mat", "two blue balls"])
    enc = get_encoder(pooling="map")
    model = AttentionCaptioningModel(len(vocab), enc.feature_dim, 8, 16, attention_dim=8, seed=1)
    path = tmp_path / "attention.npz"
    save_checkpoint(path, model, vocab, encoder=enc.identity(),
                    configs={"model": {"model": "attention", "cell_type": "lstm"}, "data": {"max_length": 6}})
    cap = Captioner.from_checkpoint(path)
    c = TestClient(create_app(cap, info=describe_checkpoint(path)))
    assert c.get("/api/model").json()["attention"] is True
    r = upload(c, (photos[0].name, photos[0].read_bytes()), query="?n=2")
    assert r.status_code == 200, r.text
    caps = r.json()["photos"][0]["captions"]
    caption, maps = cap.caption(str(photos[0]), return_attention=True)
    assert caps[0]["caption"] == caption and len(caps[0]["words"]) > 0
    np.testing.assert_allclose(np.array(caps[0]["attention"]), maps, atol=1e-4)
    assert all(np.array(x["attention"]).shape == (len(x["words"]), 7, 7) for x in caps)


@pytest.mark.parametrize("max_batch", [1, 8])
def test_beyond_capacity_503_with_retry_after_then_serving_again(photos, max_batch):
    hold = threading.Event()
    fake = FakeCaptioner(hold)
    app = create_app(fake, limits=Limits(workers=1, max_pending=2, max_batch=max_batch))
    data = photos[0].read_bytes()
    with TestClient(app) as c:
        results = []
        threads = [threading.Thread(target=lambda: results.append(upload(c, ("a.png", data)).status_code))
                   for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while c.get("/api/health").json()["in_progress"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.get("/api/health").json()["in_progress"] == 2
        r = upload(c, ("b.png", data))
        assert r.status_code == 503 and "busy" in r.json()["error"]
        assert int(r.headers["retry-after"]) >= 1
        assert fake.calls == 1  # one captioning, one waiting: the bound holds
        hold.set()
        for t in threads:
            t.join(30)
        assert results == [200, 200]
        assert upload(c, ("c.png", data)).status_code == 200
        assert c.get("/api/health").json()["in_progress"] == 0


# ---- batching: requests that arrive together are captioned together ---------------

def post_together(url, uploads):
    """POST each (files, query) of ``uploads`` from its own thread and client, all
    released at once; the responses, in order."""
    start = threading.Barrier(len(uploads))
    out = [None] * len(uploads)

    def send(k, files, query):
        with httpx.Client(timeout=120) as c:
            start.wait()
            out[k] = c.post(url + "api/caption" + query, files=files)

    threads = [threading.Thread(target=send, args=(k, *u)) for k, u in enumerate(uploads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


def one_photo(p):
    return [("image", (p.name, p.read_bytes()))]


# Long enough that the photos of requests sent at once always meet in one batch (also
# those whose request is not yet being read); a full batch starts at once, so the
# tests do not wait for it.
GATHER = dict(batch_wait_ms=20_000, batch_wait_always=True)


def test_requests_arriving_together_share_a_batch_and_each_gets_its_own_caption(captioner, photos):
    alone = {p.name: captioner.caption_details([str(p)])[0][0] for p in photos}
    app = create_app(captioner, limits=Limits(max_batch=len(photos), **GATHER))
    with serving_in_thread(app) as url:
        answers = post_together(url, [(one_photo(p), "") for p in photos])
        stats = httpx.get(url + "api/health").json()["batches"]
    assert [r.status_code for r in answers] == [200] * len(photos), [r.text for r in answers]
    for p, r in zip(photos, answers):
        [photo] = r.json()["photos"]
        assert photo["name"] == p.name and photo["batch"] == len(photos)
        assert photo["captions"][0]["caption"] == alone[p.name]["caption"]
        assert photo["captions"][0]["logprob"] == pytest.approx(alone[p.name]["logprob"], rel=1e-5)
    assert len({r.json()["photos"][0]["captions"][0]["caption"] for r in answers}) > 1  # not one caption for all
    assert stats == {"count": 1, "photos": len(photos), "largest": len(photos), "max_batch": len(photos)}


def test_decoding_options_of_requests_in_one_batch_are_each_honoured(captioner, photos):
    asks = [(photos[0], "", {}), (photos[0], "?beam=1", {"beam": 1}), (photos[1], "?n=3", {"n": 3}),
            (photos[2], "?beam=2&length_norm=1.5", {"beam": 2, "length_norm": 1.5}), (photos[1], "", {})]
    app = create_app(captioner, limits=Limits(max_batch=len(asks), **GATHER))
    with serving_in_thread(app) as url:
        answers = post_together(url, [(one_photo(p), query) for p, query, _ in asks])
    for (p, query, kwargs), r in zip(asks, answers):
        assert r.status_code == 200, r.text
        [photo] = r.json()["photos"]
        assert photo["batch"] == len(asks)
        want = captioner.caption_details([str(p)], **kwargs)[0]
        assert [c["caption"] for c in photo["captions"]] == [c["caption"] for c in want], query
        np.testing.assert_allclose([c["logprob"] for c in photo["captions"]], [c["logprob"] for c in want],
                                   rtol=1e-5)
        assert r.json()["decoding"]["beam"] == kwargs.get("beam", 3)


@pytest.mark.parametrize("max_batch", [1, 2])
def test_max_batch_bounds_the_batch_and_a_bigger_request_keeps_its_order(captioner, photos, expected, max_batch):
    """--max-batch 1 captions photo by photo, as before batching; a request with more
    photos than a batch holds is spread over several, in order."""
    app = create_app(captioner, limits=Limits(max_batch=max_batch, **GATHER))
    with serving_in_thread(app) as url:
        answers = post_together(url, [([("image", (p.name, p.read_bytes())) for p in photos[:3]], ""),
                                      (one_photo(photos[3]), "")])
        stats = httpx.get(url + "api/health").json()["batches"]
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    got = [(x["name"], x["captions"][0]["caption"]) for r in answers for x in r.json()["photos"]]
    assert got == [(p.name, expected[p.name]) for p in photos]
    assert all(x["batch"] <= max_batch for r in answers for x in r.json()["photos"])
    assert stats["largest"] == max_batch and stats["photos"] == 4 and stats["count"] == 4 // max_batch


def test_a_photo_that_fails_to_decode_fails_only_its_own_request(captioner, photos, expected):
    uploads = [(one_photo(photos[0]), ""), ([("image", ("cat.jpg", b"hello, this is text"))], ""),
               ([("image", (photos[2].name, photos[2].read_bytes())), ("image", ("half.jpg", _jpeg_cut(photos)))], ""),
               (one_photo(photos[1]), "")]
    app = create_app(captioner, limits=Limits(max_batch=5, **GATHER))
    with serving_in_thread(app) as url:
        first, text, half, last = post_together(url, uploads)
        assert text.status_code == 422 and "'cat.jpg'" in text.json()["error"]
        assert half.status_code == 422 and "'half.jpg' (photo 2 of 2)" in half.json()["error"]
        for p, r in ((photos[0], first), (photos[1], last)):
            assert r.status_code == 200, r.text
            assert r.json()["photos"][0]["captions"][0]["caption"] == expected[p.name]
            assert r.json()["photos"][0]["batch"] == 2  # captioned together; the bad ones left out
        # The batcher goes on: the next requests are captioned.
        again = post_together(url, [(one_photo(p), "") for p in photos[:2]])
        assert [r.json()["photos"][0]["captions"][0]["caption"] for r in again] == [expected[p.name]
                                                                                     for p in photos[:2]]


class FailsOnWidth13(FakeCaptioner):
    """Breaks (a stand-in for a bug) on any batch holding a photo 13 pixels wide."""

    def features(self, images):
        if any(im.width == 13 for im in images):
            raise RuntimeError("no 13")
        return super().features(images)


def test_an_error_in_a_batch_fails_only_the_request_that_causes_it():
    uploads = [([("image", ("a.png", _png((20, 10))))], ""), ([("image", ("b.png", _png((13, 10))))], ""),
               ([("image", ("c.png", _png((30, 10))))], "")]
    app = create_app(FailsOnWidth13(), limits=Limits(max_batch=3, **GATHER))
    with serving_in_thread(app) as url:
        a, b, c = post_together(url, uploads)
    assert (a.status_code, b.status_code, c.status_code) == (200, 500, 200)
    assert "internal error" in b.json()["error"]
    assert a.json()["photos"][0]["captions"][0]["caption"] == "a red ball"


def test_shutting_down_fails_queued_requests_with_503_and_ends_the_workers(photos):
    from rnncap.inference.serve import ApiError, _Batcher

    hold = threading.Event()
    fake = FakeCaptioner(hold)
    batcher = _Batcher(fake, Limits(max_batch=1, workers=1))
    batcher.start()
    [worker] = batcher._threads
    photo = [(photos[0].name, "photo", photos[0].read_bytes())]
    running, queued = batcher.submit(photo, {}), batcher.submit(photo, {})
    deadline = time.monotonic() + 20
    while fake.calls < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    batcher.close()
    error = queued.exception(timeout=5)
    assert isinstance(error, ApiError) and error.status == 503 and "shutting down" in error.message
    hold.set()
    results, _, _ = running.result(timeout=20)  # the batch under way ends on its own
    assert results[0]["captions"][0]["caption"] == "a red ball"
    worker.join(10)
    assert not worker.is_alive() and fake.calls == 1


def test_a_batch_waits_only_for_photos_on_their_way(photos):
    from rnncap.inference.serve import _Batcher

    photo = [(photos[0].name, "photo", photos[0].read_bytes())]
    batcher = _Batcher(FakeCaptioner(), Limits(max_batch=4, batch_wait_ms=20_000))
    try:
        alone = batcher.submit(photo, {})  # nobody else is being read: no wait at all
        results, _, _ = alone.result(timeout=10)
        assert results[0]["batch"] == 1
        batcher.expect()  # a request is being read: the next batch waits for it
        first = batcher.submit(photo, {})
        time.sleep(0.3)
        assert not first.done()
        second = batcher.submit(photo, {}, expected=True)
        assert [r["batch"] for f in (first, second) for r in f.result(timeout=10)[0]] == [2, 2]
        batcher.expect()  # ... and stops waiting once that request is refused
        third = batcher.submit(photo, {})
        time.sleep(0.3)
        assert not third.done()
        batcher.unexpect()
        assert third.result(timeout=10)[0][0]["batch"] == 1
        assert batcher.stats()["count"] == 3
    finally:
        batcher.close()


def test_a_lone_client_is_not_kept_waiting_and_a_refused_body_is_not_waited_for(photos):
    app = create_app(FakeCaptioner(), limits=Limits(batch_wait_ms=20_000, max_bytes=MB))
    with TestClient(app) as client:
        big = client.post("/api/caption", files=[("image", ("big.jpg", b"x" * (2 * MB)))])
        assert big.status_code == 413
        t = time.monotonic()
        r = client.post("/api/caption", files=one_photo(photos[0]))
        assert r.status_code == 200 and time.monotonic() - t < 10  # not the 20 s wait
        assert r.json()["photos"][0]["batch"] == 1


def test_a_request_of_no_photos_does_not_wait_for_ever():
    from rnncap.inference.serve import _Batcher

    results, _, _ = _Batcher(FakeCaptioner(), Limits()).submit([], {}).result(timeout=5)
    assert results == []


def test_cors_is_off_unless_asked(photos):
    origin = {"Origin": "http://elsewhere.test"}
    off = TestClient(create_app(FakeCaptioner()))
    assert "access-control-allow-origin" not in off.get("/api/health", headers=origin).headers
    on = TestClient(create_app(FakeCaptioner(), cors_origins=["http://elsewhere.test"]))
    assert on.get("/api/health", headers=origin).headers["access-control-allow-origin"] == "http://elsewhere.test"
    pre = on.options("/api/caption", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200


# ---- the command ------------------------------------------------------------------

def test_serve_help_and_one_line_errors(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--host", "--port", "--max-upload-mb", "--cors-origin", "--max-batch",
                 "--batch-wait-ms", "runs/demo/model/best.npz"):
        assert flag in out
    monkeypatch.chdir(tmp_path)  # no runs/demo here
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rnncap demo" in err and "--checkpoint" in err
    assert cli.main(["serve", "--checkpoint", "nope.npz"]) == 2
    assert "nope.npz" in capsys.readouterr().err


def test_the_flags_set_the_limits():
    from rnncap.inference.serve import limits_from_args

    args = cli.build_parser().parse_args(["serve", "--max-batch", "1", "--batch-wait-ms", "0", "--workers", "2"])
    assert limits_from_args(args) == Limits(max_batch=1, batch_wait_ms=0.0, workers=2)
    args = cli.build_parser().parse_args(["serve", "--batch-wait-always"])
    assert limits_from_args(args) == Limits(batch_wait_always=True)
    assert limits_from_args(cli.build_parser().parse_args(["serve"])) == Limits()


def test_a_busy_port_is_a_one_line_error(tiny_checkpoint, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert cli.main(["serve", "--checkpoint", str(tiny_checkpoint["checkpoint"]), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"127.0.0.1:{port}" in err


# ---- the real server: load, browser, Ctrl-C -----------------------------------------

@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_checkpoint["checkpoint"]) as s:
        yield s


def test_load_no_errors_and_the_same_captions(server, photos):
    proc, url, _, _ = server
    payloads = [(p.name, p.read_bytes()) for p in photos]
    single = {}
    for i, (name, data) in enumerate(payloads):
        r = httpx.post(url + "api/caption", files={"image": (name, data)}, timeout=60)
        assert r.status_code == 200, r.text
        single[i] = r.json()["photos"][0]["captions"][0]["caption"]
    records, _ = hammer(url, payloads, LOAD_REQUESTS, concurrency=8)
    assert all(r is not None for r in records)
    assert {r["status"] for r in records} == {200}, {r["status"] for r in records}
    assert all(r["captions"] == [single[r["payload"]]] for r in records)
    assert all(r["retry_after_ok"] for r in records)
    assert proc.poll() is None
    # Eight clients at once: photos of different requests were captioned together.
    assert httpx.get(url + "api/health").json()["batches"]["largest"] > 1


def test_real_server_counts_the_body_it_reads(server, photos):
    """Over a real socket: a chunked upload past the 10 MB default (no Content-Length
    to trust) gets its 413, and the next request its caption."""
    _, url, _, _ = server
    r = httpx.post(url + "api/caption", content=_chunks(11 * MB),
                   headers={"content-type": "multipart/form-data; boundary=xyz"}, timeout=60)
    assert r.status_code == 413 and "10 MB" in r.json()["error"]
    r = httpx.post(url + "api/caption", files={"image": (photos[0].name, photos[0].read_bytes())}, timeout=60)
    assert r.status_code == 200


def urllib_post(url, body, headers=None):
    """POST with Python's urllib, which sends its whole body before reading the answer
    (and asks for Connection: close): (status, headers, parsed JSON body)."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "multipart/form-data; boundary=xyz", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, json.loads(e.read())


@pytest.mark.parametrize("how, size", [("Content-Length", 12 * MB), ("chunked", 30 * MB)])
def test_urllib_reads_the_413_of_an_oversized_upload(server, photos, expected, how, size):
    """The server reads and drops the rest of an oversized body (up to 4x the limit)
    before answering, so a client that sends everything first reads the 413 JSON
    instead of a reset connection. (Chunked, the server reads 10 MB before it knows:
    the rest must outgrow the sockets' buffers for the test to mean anything.)"""
    _, url, _, _ = server
    status, _, body = urllib_post(url + "api/caption", b"".join(_chunks(size)) if how == "Content-Length"
                                  else _chunks(size))
    assert status == 413 and "10 MB" in body["error"], body
    status, _, body = urllib_post(url + "api/caption", _multipart(photos[0]))
    assert status == 200 and body["photos"][0]["captions"][0]["caption"] == expected[photos[0].name]


def _multipart(photo):
    return (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="' + photo.name.encode()
            + b'"\r\n\r\n' + photo.read_bytes() + b"\r\n--xyz--\r\n")


def test_a_body_beyond_the_drain_bound_ends_its_connection(server, photos):
    """Past 4x the limit (40 MB here) the server stops reading: the connection ends,
    and the server goes on serving."""
    import socket

    _, url, _, _ = server
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    endless, sent, chunk = 200 * MB, 0, b"\0" * (256 * 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"POST /api/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n")
        frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        with contextlib.suppress(ConnectionError):
            while sent < endless:
                s.sendall(frame)
                sent += len(chunk)
        assert sent < endless  # the server closed the connection long before
        with contextlib.suppress(ConnectionError):
            rest = s.recv(1 << 16)
            while rest and s.recv(1 << 16):
                pass
    assert httpx.get(url + "api/health", timeout=30).json()["status"] == "ok"
    r = httpx.post(url + "api/caption", files={"image": (photos[0].name, photos[0].read_bytes())}, timeout=60)
    assert r.status_code == 200


def test_urllib_reads_the_503_of_a_busy_server(photos):
    """The drain serves every early answer: the busy one too."""
    hold = threading.Event()
    app = create_app(FakeCaptioner(hold), limits=Limits(max_pending=1, max_bytes=16 * MB))
    with serving_in_thread(app) as url:
        held = threading.Thread(target=lambda: httpx.post(url + "api/caption", timeout=60,
                                                          files={"image": ("a.png", photos[0].read_bytes())}))
        held.start()
        try:
            deadline = time.monotonic() + 20
            while httpx.get(url + "api/health").json()["in_progress"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            status, headers, body = urllib_post(url + "api/caption", b"".join(_chunks(12 * MB)))
            assert status == 503 and "busy" in body["error"] and int(headers["Retry-After"]) >= 1
        finally:
            hold.set()
            held.join(30)


@pytest.mark.slow
def test_resident_memory_does_not_grow_over_1000_requests(tiny_checkpoint, photos):
    """Its own server, where glibc returns every block of 128 KB or more to the system
    when it is freed: by default it raises that threshold to the largest block freed so
    far and keeps such blocks in its heap, so resident memory follows the largest
    batches seen (tens of MB up and down with batches of 1 to 8 photos) rather than
    what is in use. The warm-up captions a batch of every size once: torch keeps what
    it prepared for each batch size (about 13 MB in all for sizes 1 to 8, measured)."""
    with running_server(tiny_checkpoint["checkpoint"], env={"MALLOC_MMAP_THRESHOLD_": "131072"}) as (proc, url, _, _):
        if rss_kb(proc.pid) is None:
            pytest.skip("needs /proc to read resident memory")
        payloads = [(p.name, p.read_bytes()) for p in photos]
        for size in range(1, 9):  # one request of k photos, alone: one batch of k
            r = httpx.post(url + "api/caption", files=[("image", payloads[i % len(payloads)]) for i in range(size)],
                           timeout=120)
            assert {p["batch"] for p in r.json()["photos"]} == {size}
        hammer(url, payloads, 100, concurrency=8)  # and caches, allocator pools
        before = rss_kb(proc.pid)
        samples = []
        for _ in range(9):
            records, _ = hammer(url, payloads, 100, concurrency=8)
            assert {r["status"] for r in records} == {200}
            samples.append(rss_kb(proc.pid))
    growth_mb = (samples[-1] - before) / 1024
    # A leak of one photo's bytes per request (>= 10 KB) would add > 9 MB here.
    assert growth_mb < 8, (before, samples)


@pytest.mark.slow
def test_fuzz_the_api_from_its_openapi_schema(server):
    """schemathesis reads /openapi.json from the live server and sends requests made
    from it, valid and invalid (query parameters of every type and range, multipart
    bodies with zero to many files of generated bytes and tiny real PNGs), 200 at
    most. No answer may be a 5xx; every error is JSON {"error": "..."} and
    documented in the schema (schemathesis' checks: status codes, content types,
    headers, response schemas, invalid data refused). Left out: its check that
    every schema-valid request is accepted, since whether bytes are a usable photo is
    decided by decoding them, which no schema can say."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import positive_data_acceptance

    proc, url, _, _ = server
    schema = schemathesis.openapi.from_url(url + "openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {("POST", "/api/caption"), ("GET", "/api/model")}
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                       for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    seen = collections.Counter()

    @given(case=cases)
    @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        r = case.call(base_url=url.rstrip("/"), timeout=60)
        seen[r.status_code] += 1
        assert r.status_code < 500, (r.status_code, r.text, case.as_curl_command())
        if r.status_code >= 400:
            [content_type] = r.headers["content-type"]  # schemathesis keeps each header's values in a list
            assert content_type.startswith("application/json"), case.as_curl_command()
            assert isinstance(r.json()["error"], str) and "\n" not in r.json()["error"]
        case.validate_response(r, excluded_checks=[positive_data_acceptance])

    t = time.monotonic()
    fuzz()
    assert time.monotonic() - t < 120  # about 10 s on a busy 2-core machine
    assert seen[200] > 0 and sum(n for code, n in seen.items() if 400 <= code < 500) > 0, seen
    assert proc.poll() is None


def _browser():
    """Headless Debian Chromium through chromium-driver (never Selenium Manager),
    with every page request logged and anything not on loopback sent to a dead proxy."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    driver_path, chrome = shutil.which("chromedriver") or "/usr/bin/chromedriver", shutil.which("chromium")
    if not (Path(driver_path).exists() and chrome):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,900",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--disable-extensions",
                "--proxy-server=127.0.0.1:9"):  # loopback bypasses the proxy; nothing else gets out
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=opts)


def _requested_urls(driver):
    import json

    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def _wait_for(driver, css, timeout=60):
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(EC.visibility_of_element_located(("css selector", css)))


def test_the_page_in_a_real_browser(server, by_cli, photos, tmp_path):
    _, url, _, _ = server
    driver = _browser()
    try:
        driver.get(url)
        _wait_for(driver, "#model")
        photo = photos[1]
        driver.find_element("css selector", "#file").send_keys(str(photo.resolve()))
        first = _wait_for(driver, ".card .captions li .text")
        assert first.text == by_cli[str(photo)]
        assert len(driver.find_elements("css selector", ".card .captions li")) == 3
        assert "p = " in driver.find_element("css selector", ".card .prob").text
        assert "tiny.npz" in driver.find_element("css selector", "#model").text

        not_image = tmp_path / "holiday.jpg"
        not_image.write_text("this is not a photo")
        driver.find_element("css selector", "#file").send_keys(str(not_image))
        error = _wait_for(driver, ".card .error")
        assert "not an image" in error.text and "holiday.jpg" in error.text

        png = tmp_path / "page.png"
        driver.save_screenshot(str(png))
        from PIL import Image

        shot = np.asarray(Image.open(png).convert("RGB"))
        assert shot.std() > 10 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 200  # not blank

        urls = _requested_urls(driver)
        assert any(u.endswith("/api/caption?n=3") for u in urls), urls
        outside = [u for u in urls if not (u.startswith(url) or u.startswith(("blob:", "data:")))]
        assert outside == [], outside
    finally:
        driver.quit()


def test_hovering_a_word_shows_its_attention_map(photos):
    with serving_in_thread(create_app(FakeCaptioner(), info={"model": "attention"})) as url:
        driver = _browser()
        try:
            driver.get(url)
            driver.find_element("css selector", "#file").send_keys(str(photos[0].resolve()))
            _wait_for(driver, ".card .captions li .text")
            canvas_alpha = ("const c = document.querySelector('.card canvas');"
                            "if (!c.width) return 0; const d = c.getContext('2d')"
                            ".getImageData(0, 0, c.width, c.height).data; let s = 0;"
                            "for (let i = 3; i < d.length; i += 4) s += d[i]; return s;")
            assert driver.execute_script(canvas_alpha) == 0
            from selenium.webdriver import ActionChains

            word = driver.find_elements("css selector", ".card .captions li .word")[1]
            ActionChains(driver).move_to_element(word).perform()
            # Word 1 looks at cell (1, 1) of the 2 x 3 grid: that spot stays clear,
            # a corner of the photo is shaded.
            probe = ("const c = document.querySelector('.card canvas'); const g = c.getContext('2d');"
                     "const a = (fx, fy) => g.getImageData(Math.floor(fx * c.width), "
                     "Math.floor(fy * c.height), 1, 1).data[3]; return [a(0.5, 0.75), a(0.02, 0.02)];")
            looked, corner = driver.execute_script(probe)
            assert looked < 60 < corner, (looked, corner)
            ActionChains(driver).move_to_element(driver.find_element("css selector", "#model")).perform()
            assert driver.execute_script(canvas_alpha) == 0
        finally:
            driver.quit()


def test_ctrl_c_stops_the_server_cleanly(server):
    """Last in the module: the shared server is stopped as a user would stop it."""
    import signal

    proc, url, out, err = server
    assert out[0].startswith("rnncap serve: ") and url in out[0] and "Ctrl-C" in out[0]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    time.sleep(0.2)  # let the reader thread collect the last lines
    text = "".join(err)
    assert "Traceback" not in text and "rnncap serve: stopped" in text, text


def test_a_checkpoint_standardised_without_pca_is_described(tmp_path):
    # The README's best recipe (attention on maps) stores a standardisation with no PCA
    # components; describing it for the page and /api/model once raised AttributeError.
    from rnncap.checkpoint import save_checkpoint
    from rnncap.data.vocab import Vocab
    from rnncap.inference.serve import describe_checkpoint
    from rnncap.models.attention import AttentionCaptioningModel

    vocab = Vocab.from_words(["<NULL>", "<START>", "<END>", "<UNK>", "a", "dog"])
    model = AttentionCaptioningModel(len(vocab), 6, 4, 5, attention_dim=3, seed=0)
    path = tmp_path / "maps.npz"
    save_checkpoint(path, model, vocab, pca={"mean": np.zeros(6, np.float32), "components": None,
                                             "scale": np.ones(6, np.float32)})
    info = describe_checkpoint(path)
    assert info["pca_dim"] is None and info["model_class"] == "AttentionCaptioningModel"


def test_the_listening_socket_gives_connections_without_nagles_delay():
    """uvicorn serves on the socket ``_listen`` makes; asyncio sets TCP_NODELAY on a
    connection only when that socket says TCP. Without it, each request after the
    first on a kept-alive connection waited 40 ms for the client's delayed ACK."""
    import asyncio
    import socket

    from rnncap.inference.serve import _listen

    sock = _listen("127.0.0.1", 0)
    seen = []

    async def main():
        def on_connect():
            class Grab(asyncio.Protocol):
                def connection_made(self, transport):
                    s = transport.get_extra_info("socket")
                    seen.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                    transport.close()
            return Grab()

        server = await asyncio.get_running_loop().create_server(on_connect, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            writer.close()

    try:
        asyncio.run(main())
    finally:
        sock.close()
    assert seen and seen[0] != 0
