"""rnncap.data.download against a local HTTP server on 127.0.0.1 (no outside network)."""
import hashlib
import http.server
import io
import re
import socket
import sys
import threading
import zipfile

import pytest

from rnncap import cli
from rnncap.data.download import download, extract_zip
from rnncap.errors import RnncapError

DATA = bytes(range(256)) * 40 + b"tail"  # 10,244 bytes


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves self.server.files. self.server.mode: "range" (honours Range),
    "ignore" (always 200), "drop" (the first response sends half its body, then
    closes the connection), "drop-always" (every response does)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append(self.headers.get("Range"))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if m and srv.mode != "ignore":
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            body = body[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.mode == "drop-always" or (srv.mode == "drop" and len(srv.requests) == 1):
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.files, srv.mode, srv.requests = {"/data.bin": DATA}, "range", []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def fetch(server, tmp_path, **kw):
    return download(server.url + "/data.bin", tmp_path / "data.bin", progress=False, backoff=0, **kw)


def test_plain_download_checks_size_and_sha(server, tmp_path):
    out = fetch(server, tmp_path, expected_size=len(DATA), sha256=hashlib.sha256(DATA).hexdigest())
    assert out == tmp_path / "data.bin" and out.read_bytes() == DATA
    assert not (tmp_path / "data.bin.part").exists() and server.requests == [None]
    assert fetch(server, tmp_path) == out and len(server.requests) == 1  # already there: no request


def test_resumes_existing_part_with_range(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(DATA[:1000])
    assert fetch(server, tmp_path).read_bytes() == DATA
    assert server.requests == ["bytes=1000-"]


def test_dropped_connection_is_resumed(server, tmp_path):
    server.mode = "drop"
    assert fetch(server, tmp_path, sha256=hashlib.sha256(DATA).hexdigest()).read_bytes() == DATA
    assert server.requests == [None, f"bytes={len(DATA) // 2}-"]


def test_gives_up_after_retries_and_keeps_part(server, tmp_path):
    server.mode = "drop-always"
    with pytest.raises(RnncapError, match="failed 3 times in a row") as e:
        fetch(server, tmp_path, retries=2)
    assert "run again to resume" in str(e.value) and "\n" not in str(e.value)
    assert len(server.requests) == 3 and server.requests[1] == f"bytes={len(DATA) // 2}-"
    assert (tmp_path / "data.bin.part").stat().st_size > len(DATA) // 2
    assert not (tmp_path / "data.bin").exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.mode = "ignore"
    (tmp_path / "data.bin.part").write_bytes(b"x" * 1000)  # would corrupt the file if appended to
    assert fetch(server, tmp_path).read_bytes() == DATA
    assert server.requests == ["bytes=1000-"]


def test_complete_part_gets_416_and_is_finished(server, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(DATA)
    assert fetch(server, tmp_path).read_bytes() == DATA
    assert server.requests == [f"bytes={len(DATA)}-"]


def test_progress_bar_on_a_terminal(server, tmp_path, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr("sys.stderr", Tty())
    server.mode = "drop"  # the bar must survive a resume
    download(server.url + "/data.bin", tmp_path / "data.bin", backoff=0)
    assert "data.bin" in sys.stderr.getvalue() and "10.0k" in sys.stderr.getvalue()


def test_checksum_mismatch_deletes_part(server, tmp_path):
    with pytest.raises(RnncapError, match="sha256") as e:
        fetch(server, tmp_path, sha256="0" * 64)
    assert "\n" not in str(e.value) and "deleted" in str(e.value)
    assert not (tmp_path / "data.bin.part").exists() and not (tmp_path / "data.bin").exists()


def test_size_mismatch(server, tmp_path):
    with pytest.raises(RnncapError, match=f"offers {len(DATA)} bytes, expected 5"):
        fetch(server, tmp_path, expected_size=5)
    assert not (tmp_path / "data.bin").exists()


def test_http_error(server, tmp_path):
    with pytest.raises(RnncapError, match="HTTP error 404"):
        download(server.url + "/nope.zip", tmp_path / "nope.zip", progress=False)


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_message(tmp_path):
    with pytest.raises(RnncapError) as e:
        download(f"http://127.0.0.1:{closed_port()}/x.zip", tmp_path / "x.zip", progress=False)
    assert str(e.value).startswith("cannot reach 127.0.0.1 (offline?): ") and "\n" not in str(e.value)


# ---- unpacking and the command ------------------------------------------------------

def make_zip(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("bad", ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt"])
def test_extract_refuses_escaping_paths(tmp_path, bad):
    (tmp_path / "a.zip").write_bytes(make_zip({"ok/x.txt": b"x", bad: b"evil"}))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(RnncapError, match="refusing to unpack"):
        extract_zip(tmp_path / "a.zip", dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / "evil.txt").exists()


def test_extract_and_broken_zip(tmp_path):
    (tmp_path / "a.zip").write_bytes(make_zip({"top/x.txt": b"x", "top/sub/y.txt": b"y"}))
    assert extract_zip(tmp_path / "a.zip", tmp_path) == [tmp_path.resolve() / "top"]
    assert (tmp_path / "top" / "sub" / "y.txt").read_bytes() == b"y"
    assert not list(tmp_path.glob(".unpack-*"))
    with pytest.raises(RnncapError, match="already exists"):
        extract_zip(tmp_path / "a.zip", tmp_path)
    (tmp_path / "b.zip").write_bytes(b"not a zip")
    with pytest.raises(RnncapError, match="not a readable zip"):
        extract_zip(tmp_path / "b.zip", tmp_path)


def test_cli_download_coco_cs231n(server, tmp_path, capsys):
    server.files["/coco_captioning.zip"] = make_zip({
        "coco_captioning/coco2014_captions.h5": b"h5", "coco_captioning/coco2014_vocab.json": b"{}"})
    dest = tmp_path / "data"
    url = server.url + "/coco_captioning.zip"
    assert cli.main(["download", "coco-cs231n", "--dest", str(dest), "--url", url]) == 0
    assert (dest / "coco_captioning" / "coco2014_vocab.json").read_bytes() == b"{}"
    assert not (dest / "coco_captioning.zip").exists()
    assert cli.main(["download", "coco-cs231n", "--dest", str(dest), "--url", url]) == 0
    assert "already" in capsys.readouterr().out and len(server.requests) == 1

    wrong = server.url + "/data.bin"
    assert cli.main(["download", "coco-cs231n", "--dest", str(tmp_path / "d2"), "--url", wrong]) == 2
    assert "not a readable zip" in capsys.readouterr().err

    offline = f"http://127.0.0.1:{closed_port()}/coco_captioning.zip"
    assert cli.main(["download", "coco-cs231n", "--dest", str(tmp_path / "d3"), "--url", offline]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnncap download: error: cannot reach 127.0.0.1 (offline?)") and err.count("\n") == 1


def test_cli_default_url_is_the_course_archive():
    args = cli.build_parser().parse_args(["download", "coco-cs231n"])
    from rnncap.data.download import DATASETS
    assert args.url is None and args.dest == "data"
    assert DATASETS["coco-cs231n"]["url"] == "http://cs231n.stanford.edu/coco_captioning.zip"


# ---- flickr8k: two archives of the published layout, served from 127.0.0.1 ------------

def tiny_jpeg():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def flickr8k_archives():
    """The two release files' layout: Flickr8k_Dataset.zip holds Flicker8k_Dataset/ with
    8,091 JPEGs (the same tiny one; the real ones are photos), Flickr8k_text.zip the
    token file (with the published bogus '.jpg.1' line) and the split lists at its top;
    both carry __MACOSX/ forks, as the published ones do."""
    pytest.importorskip("PIL")
    names = [f"{i:06d}_{i * 7919 % 100000:05x}.jpg" for i in range(8091)]
    jpeg = tiny_jpeg()
    photos = {f"Flicker8k_Dataset/{n}": jpeg for n in names}
    photos["__MACOSX/Flicker8k_Dataset/._" + names[0]] = b"fork"
    tokens = "".join(f"{n}#{k}\ta photo number {i} , view {k} .\n" for i, n in enumerate(names) for k in range(5))
    tokens += f"{names[0]}.1#0\ta line that names no image\n"
    text = {"Flickr8k.token.txt": tokens, "Flickr_8k.trainImages.txt": "\n".join(names[:6000]) + "\n",
            "Flickr_8k.devImages.txt": "\n".join(names[6000:7000]) + "\n",
            "Flickr_8k.testImages.txt": "\n".join(names[7000:8000]) + "\n",
            "readme.txt": "Flickr8k", "__MACOSX/._readme.txt": b"fork"}
    return {"/Flickr8k_Dataset.zip": make_zip(photos), "/Flickr8k_text.zip": make_zip(text)}


def test_cli_download_flickr8k_prints_the_terms_checks_the_layout_and_feeds_data(
        server, flickr8k_archives, tmp_path, capsys):
    from rnncap.data.datasets import load_dataset

    server.files.update(flickr8k_archives)
    dest = tmp_path / "data"
    assert cli.main(["download", "flickr8k", "--dest", str(dest), "--url", server.url + "/"]) == 0
    out, err = capsys.readouterr()
    assert "research use only" in err and "ready in" in out
    assert server.requests == [None, None]  # each archive fetched once, whole
    folder = dest / "flickr8k"
    assert not list(folder.glob("*.zip")) and not (folder / "__MACOSX").exists()
    with pytest.warns(UserWarning, match="name no image"):
        ds = load_dataset(folder)  # what --data takes
    assert {k: len(s) for k, s in ds.splits.items()} == {"train": 6000, "val": 1000, "test": 1000}
    assert ds["train"].references[0][0] == "a photo number 0 , view 0 ."

    assert cli.main(["download", "flickr8k", "--dest", str(dest), "--url", server.url]) == 0
    assert "already in" in capsys.readouterr().out and len(server.requests) == 2


def test_cli_download_flickr8k_from_a_folder_and_a_wrong_layout(server, flickr8k_archives, tmp_path, capsys):
    have = tmp_path / "have"
    have.mkdir()
    for name, data in flickr8k_archives.items():
        (have / name.lstrip("/")).write_bytes(data)
    dest = tmp_path / "data"
    assert cli.main(["download", "flickr8k", "--dest", str(dest), "--from", str(have)]) == 0
    assert "ready in" in capsys.readouterr().out and not server.requests
    assert (have / "Flickr8k_text.zip").exists()  # the user's archives are left alone
    # an unpacked copy is checked where it is
    assert cli.main(["download", "flickr8k", "--dest", str(tmp_path / "x"), "--from", str(dest / "flickr8k")]) == 0
    assert "use it as it is" in capsys.readouterr().out

    # archives that unpack to something else: one line naming what is missing
    server.files.update({"/Flickr8k_Dataset.zip": make_zip({"Flicker8k_Dataset/a.jpg": b"x"}),
                         "/Flickr8k_text.zip": flickr8k_archives["/Flickr8k_text.zip"]})
    assert cli.main(["download", "flickr8k", "--dest", str(tmp_path / "bad"), "--url", server.url]) == 2
    err = capsys.readouterr().err
    assert "holds 1 photos, not 8091" in err and err.strip().splitlines()[-1].startswith("rnncap download: error:")
    assert cli.main(["download", "flickr8k", "--dest", str(dest), "--from", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_cli_default_flickr8k_mirror():
    from rnncap.data.download import DATASETS

    spec = DATASETS["flickr8k"]
    assert spec["base"] == "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"
    assert spec["archives"] == ("Flickr8k_Dataset.zip", "Flickr8k_text.zip") and spec["images"] == 8091
