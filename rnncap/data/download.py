"""Download a dataset's archives, resumably, and unpack them.

``rnncap download coco-cs231n`` fetches the CS231n ``coco_captioning.zip`` (COCO 2014
captions pre-encoded with a 1,004-word vocabulary, plus VGG-16 fc7 features) and
unpacks it into ``DEST/coco_captioning``, the folder ``load_dataset`` reads as it is.

``rnncap download flickr8k`` fetches Flickr8k's two archives (the photos and the text
files) from the mirror most tutorials use, prints the dataset's terms first, unpacks
both into ``DEST/flickr8k`` and checks the layout: 8,091 photos, the token file and
the split lists. That folder is what ``--data`` takes. ``--from DIR`` uses archives
(or an unpacked copy) the user already has.

An interrupted download continues where it stopped when run again.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath

from ..errors import RnncapError

DATASETS = {
    "coco-cs231n": {
        "url": "http://cs231n.stanford.edu/coco_captioning.zip",
        "filename": "coco_captioning.zip",
        "size": None,      # not published by the course; checked against Content-Length
        "sha256": None,    # not published by the course; pass --sha256 to check one
        "check": "coco_captioning/coco2014_captions.h5",  # present once unpacked
    },
    "flickr8k": {
        # The release files of jbrownlee/Datasets on GitHub; --url BASE takes them from BASE/.
        "base": "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k",
        "archives": ("Flickr8k_Dataset.zip", "Flickr8k_text.zip"),
        "folder": "flickr8k",
        "images": 8091,
        "terms": ("Flickr8k (M. Hodosh, P. Young and J. Hockenmaier, \"Framing Image Description as a "
                  "Ranking Task\", JAIR 47, 2013) is for research use only: the photos come from "
                  "Flickr and belong to their owners; do not redistribute them, or anything made "
                  "from them, and cite the paper in work that uses it."),
    },
}


def add_arguments(parser):
    parser.add_argument("dataset", choices=sorted(DATASETS), help="which dataset to fetch")
    parser.add_argument("--dest", default="data", metavar="DIR",
                        help="folder to download and unpack into (default: %(default)s)")
    parser.add_argument("--url", help="download from this URL instead of the dataset's own "
                                      f"(coco-cs231n: {DATASETS['coco-cs231n']['url']}); for "
                                      f"flickr8k the folder URL its two archives sit in (default "
                                      f"{DATASETS['flickr8k']['base']})")
    parser.add_argument("--from", dest="source", metavar="DIR",
                        help="flickr8k: a folder you already have, holding its two archives "
                             "(unpacked into --dest) or the dataset unpacked (checked in place)")
    parser.add_argument("--sha256", metavar="HEX", help="expected SHA-256 of the archive")
    parser.add_argument("--keep-archive", action="store_true", help="keep the .zip after unpacking")


def run(args) -> int:
    spec = DATASETS[args.dataset]
    if "archives" in spec:
        return fetch_folder(args, spec)
    if args.source:
        raise RnncapError(f"--from: only for flickr8k; for {args.dataset} give --url")
    dest = Path(args.dest)
    done = dest / spec["check"]
    if done.exists():
        print(f"{args.dataset} is already in {done.parent}")
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    archive = download(args.url or spec["url"], dest / spec["filename"], expected_size=spec["size"],
                       sha256=args.sha256 or spec["sha256"])
    extract_zip(archive, dest)
    if not done.exists():
        raise RnncapError(f"{archive}: unpacked, but it holds no {spec['check']}; is --url the right archive?")
    if not args.keep_archive:
        archive.unlink()
    print(f"{args.dataset} is ready in {done.parent}")
    return 0


def fetch_folder(args, spec):
    """A dataset of several archives unpacked into one folder, DEST/<folder>: print its
    terms, fetch what is missing (or take it from ``--from``), unpack, check the layout."""
    folder = Path(args.dest) / spec["folder"]
    if args.source:
        source = Path(args.source)
        if not source.is_dir():
            raise RnncapError(f"--from {source}: no such folder")
        if not flickr8k_problems(source, spec["images"]):
            print(f"{args.dataset} is complete in {source}; use it as it is: --data {source}")
            return 0
    if not flickr8k_problems(folder, spec["images"]):
        print(f"{args.dataset} is already in {folder}")
        return 0
    print(f"{args.dataset}: {spec['terms']}", file=sys.stderr)
    if args.sha256:
        raise RnncapError(f"--sha256: {args.dataset} has {len(spec['archives'])} archives; it checks one")
    folder.mkdir(parents=True, exist_ok=True)
    base = (args.url or spec["base"]).rstrip("/")
    for name in spec["archives"]:
        given = Path(args.source) / name if args.source else None
        if given is not None and not given.is_file():
            raise RnncapError(f"--from {args.source}: holds neither the unpacked dataset nor {name}")
        archive = given if given is not None else download(f"{base}/{name}", folder / name)
        extract_zip(archive, folder, replace=True)
        if given is None and not args.keep_archive:
            archive.unlink()
    problems = flickr8k_problems(folder, spec["images"])
    if problems:
        raise RnncapError(f"{folder}: unpacked, but {problems}; are these the Flickr8k archives?")
    print(f"{args.dataset} is ready in {folder}: rnncap features --data {folder} --out ...")
    return 0


def flickr8k_problems(folder, n_images):
    """What is missing from an unpacked Flickr8k folder (one line), or "" when nothing is:
    the token file, the three split lists and ``n_images`` photos in the photo folder."""
    from .datasets import FLICKR8K_SPLIT_FILES

    folder = Path(folder)
    text = next((d for d in (folder, folder / "Flickr8k_text") if (d / "Flickr8k.token.txt").is_file()), None)
    if text is None:
        return "it has no Flickr8k.token.txt"
    lists = [f for f in FLICKR8K_SPLIT_FILES.values() if not (text / f).is_file()]
    if lists:
        return f"it has no {', '.join(lists)}"
    photos = next((d for d in (folder / "Flicker8k_Dataset", folder / "Flickr8k_Dataset") if d.is_dir()), None)
    if photos is None:
        return "it has no photo folder (Flicker8k_Dataset)"
    n = sum(1 for p in photos.iterdir() if p.suffix.lower() == ".jpg")
    if n != n_images:
        return f"{photos} holds {n} photos, not {n_images}"
    return ""


# ---- resumable HTTP download --------------------------------------------------------

def download(url, dest_path, expected_size=None, sha256=None, progress=True, *,
             retries=5, timeout=30.0, backoff=1.0) -> Path:
    """Fetch ``url`` into ``dest_path`` and return its Path.

    Bytes go to ``dest_path + ".part"``; a later call (or a retry after a dropped
    connection, up to ``retries`` in a row) continues it with an HTTP Range request,
    and starts over when the server ignores Range. The finished file is checked
    against the server's size, ``expected_size`` and ``sha256`` (when given), then
    renamed into place, so ``dest_path`` only ever holds a complete file. A file
    that fails the checks is deleted. A ``dest_path`` that already exists is
    checked and returned without downloading."""
    import http.client
    import urllib.error
    import urllib.parse
    import urllib.request

    dest = Path(dest_path)
    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        _verify(dest, expected_size, sha256, what="existing file", delete=False)
        return dest
    host = urllib.parse.urlsplit(url).hostname or url
    total = expected_size
    bar = _progress_bar(dest.name) if progress else None
    failures = 0
    try:
        while True:
            have = part.stat().st_size if part.exists() else 0
            if total is not None and have >= total:
                break
            request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
            try:
                with urllib.request.urlopen(request, timeout=timeout) as resp:
                    if resp.status == 206:
                        start, size = _content_range(resp.headers.get("Content-Range"))
                        if start != have:  # not the bytes we asked for: start over
                            part.unlink()
                            raise ConnectionError(f"server resumed at byte {start}, not {have}")
                    else:  # 200: the whole file, whatever Range said
                        have, size = 0, _int_or_none(resp.headers.get("Content-Length"))
                    if size is not None and expected_size is not None and size != expected_size:
                        raise RnncapError(f"{url}: the server offers {size} bytes, expected {expected_size}")
                    total = size if size is not None else total
                    if bar is not None:
                        bar.reset(total=total)
                        bar.update(have)
                    with open(part, "ab" if have else "wb") as f:
                        while chunk := resp.read(1 << 20):
                            f.write(chunk)
                            if bar is not None:
                                bar.update(len(chunk))
                got = part.stat().st_size
                if total is None or got >= total:
                    break
                raise ConnectionError(f"connection closed after {got} of {total} bytes")
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:  # our .part already reaches the end
                    _, size = _content_range(e.headers.get("Content-Range"))
                    if size == have:
                        total = have
                        break
                    part.unlink()
                    continue
                raise RnncapError(f"{url}: HTTP error {e.code} {e.reason}") from None
            except urllib.error.URLError as e:
                raise RnncapError(f"cannot reach {host} (offline?): {e.reason}") from None
            except (OSError, http.client.HTTPException) as e:
                failures += 1
                if failures > retries:
                    raise RnncapError(f"{url}: download failed {failures} times in a row ({e}); "
                                      f"run again to resume from {part}") from None
                time.sleep(backoff * min(2 ** (failures - 1), 30))
                continue
            failures = 0
    finally:
        if bar is not None:
            bar.close()
    _verify(part, total if expected_size is None else expected_size, sha256, what="download", delete=True)
    os.replace(part, dest)
    return dest


def _verify(path, size, sha256, *, what, delete):
    problem = None
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        problem = f"{what} has {actual_size} bytes, expected {size}"
    elif sha256:
        digest = sha256_file(path)
        if digest != sha256.lower():
            problem = f"{what} has sha256 {digest}, expected {sha256.lower()}"
    if problem:
        if delete:
            path.unlink()
            problem += "; deleted it, run again to download afresh"
        else:
            problem += "; delete it to download again"
        raise RnncapError(f"{path}: {problem}")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _content_range(value):
    """(first byte, total size or None) from 'bytes 100-199/1000' or 'bytes */1000'."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        raise ConnectionError(f"unreadable Content-Range {value!r}")
    return (int(m.group(1)) if m.group(1) else None), _int_or_none(m.group(2))


def _int_or_none(text):
    return int(text) if text and text.isdigit() else None


def _progress_bar(name):
    from ..progress import progress_bar

    return progress_bar(desc=name, unit="B", unit_scale=True, unit_divisor=1024)


# ---- safe unpacking -----------------------------------------------------------------

def extract_zip(archive, dest, replace=False) -> list[Path]:
    """Unpack ``archive`` into ``dest`` and return the top-level paths made.

    Refuses members that would land outside ``dest`` (absolute paths, ``..``), and
    unpacks into a temporary folder first, so an interrupted run leaves no
    half-unpacked dataset behind. macOS's ``__MACOSX/`` resource forks are left out.
    A top-level path that exists already is an error, or with ``replace`` (a run
    unpacking again after an interrupted one) is replaced."""
    import zipfile

    archive, dest = Path(archive), Path(dest).resolve()
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise RnncapError(f"{archive}: not a readable zip archive ({e}); delete it and download again") from None
    with zf:
        for name in zf.namelist():
            p = PurePosixPath(name.replace("\\", "/"))
            if p.is_absolute() or ".." in p.parts or re.match(r"^[A-Za-z]:", name) \
                    or not (dest / p).resolve().is_relative_to(dest):
                raise RnncapError(f"{archive}: refusing to unpack {name!r}, which points outside {dest}")
        members = [n for n in zf.namelist() if PurePosixPath(n.replace("\\", "/")).parts[0] != "__MACOSX"]
        tops = sorted({PurePosixPath(n.replace("\\", "/")).parts[0] for n in members})
        clash = [t for t in tops if (dest / t).exists()]
        if clash and not replace:
            raise RnncapError(f"{dest / clash[0]} already exists; move it away to unpack {archive.name} again")
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest))
        try:
            zf.extractall(tmp, members=members)
            for t in tops:
                if (dest / t).is_dir() and not (dest / t).is_symlink():
                    shutil.rmtree(dest / t)
                os.replace(tmp / t, dest / t)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return [dest / t for t in tops]
