"""Load a photo from whatever a user hands us, as an 8-bit RGB PIL image.

Photos from the wild come rotated by an EXIF tag, grayscale, CMYK, 16-bit, paletted,
1-bit or with an alpha channel; some are truncated, empty, not images at all, or
decompression bombs. ``load_image`` turns every usable one into plain RGB and refuses
the rest with one ``DataError`` that names the file.

Choices worth knowing:

- Transparent pixels are composited onto **white**. Images with transparency are
  mostly logos, drawings and screenshots made to be seen on a white page; on black,
  dark line art would vanish.
- 16-bit samples are scaled to 8 bits by ``round(v / 257)`` (65535 -> 255), not
  clipped as Pillow's own ``convert`` does, which turns most 16-bit photos white.
  Mode ``I`` (32-bit integers) is read as 16-bit data, which is what Pillow gives
  for 16-bit PNG and TIFF files; values outside 0..65535 are clipped.
- Decoding is always forced in full (``Image.load``), so a truncated file fails here
  rather than coming back half gray. We rely on Pillow's default
  ``ImageFile.LOAD_TRUNCATED_IMAGES = False`` and do not change that global.
- The pixel limit (``max_pixels``, default ``DEFAULT_MAX_PIXELS``) is checked on the
  header before any pixel is decoded. Pillow's own hard limit
  (``2 * PIL.Image.MAX_IMAGE_PIXELS``) still applies on top of it.
- A broken EXIF block does not make a readable photo unusable: it is then shown
  unrotated.

``read_ahead`` reads the next batch of photos in threads while the caller works on
this one (``rnncap features``, ``Encoder.encode``, ``rnncap caption``).
"""
from __future__ import annotations

import io
import os
import threading
import warnings

from ..errors import DataError

# Pillow's warning threshold (about 89.5 million pixels, a 9,459 x 9,459 image):
# far above any camera photo we caption, low enough that one decode stays under 300 MB.
DEFAULT_MAX_PIXELS = 89_478_485

# warnings.catch_warnings swaps a process-wide filter list; serialise it so that
# threads decoding in parallel cannot leave a filter behind. Only the header read
# is under the lock, the decode is not.
_OPEN_LOCK = threading.Lock()

_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def load_image(src, *, max_pixels=None, name=None):
    """Return ``src`` as a fully decoded RGB ``PIL.Image.Image`` (a new object).

    src: a path (str or os.PathLike), the file's bytes, a PIL image, or a uint8
         numpy array of shape (H, W, 3) or (H, W).
    max_pixels: refuse images with more pixels than this (default DEFAULT_MAX_PIXELS).
    name: how to call the image in error messages (default: the path, or "<bytes>").

    Raises DataError (one line naming the file) for a missing, empty, non-image,
    truncated, corrupt or oversized file.
    """
    from PIL import Image

    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if isinstance(src, Image.Image):
        label = name or "<PIL image>"
        _check_pixels(src.size, limit, label)
        im = _decode(lambda: src, label, close=False)
    elif isinstance(src, (str, os.PathLike)):
        label = name or os.fspath(src)
        _check_file(src, label)
        im = _decode(lambda: _open(src, limit, label), label)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        if len(src) == 0:
            raise DataError(f"image {label} is empty (0 bytes)")
        data = io.BytesIO(bytes(src))
        im = _decode(lambda: _open(data, limit, label), label)
    elif type(src).__module__ == "numpy" and hasattr(src, "shape"):
        label = name or "<array>"
        return _from_array(src, limit, label)
    else:
        raise TypeError(f"load_image: expected a path, bytes, a PIL image or a uint8 array, "
                        f"got {type(src).__name__}")
    return im


def _check_file(path, label):
    if not os.path.exists(path):
        raise DataError(f"image file not found: {label}")
    if os.path.isdir(path):
        raise DataError(f"{label} is a directory, not an image file")
    if os.path.getsize(path) == 0:
        raise DataError(f"image file {label} is empty (0 bytes)")


def _check_pixels(size, limit, label):
    w, h = size
    if w * h > limit:
        raise DataError(f"image {label} is {w}x{h} = {w * h:,} pixels, over the limit of "
                        f"{limit:,} (a possible decompression bomb); raise max_pixels if it is genuine")


def _open(fp, limit, label):
    """Read only the header; refuse oversized images before any pixel is decoded."""
    from PIL import Image

    with _OPEN_LOCK, warnings.catch_warnings():
        # We make our own check just below, with our own limit.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise DataError(f"image {label} is too large to decode safely ({e})") from None
        except Image.UnidentifiedImageError:
            raise DataError(f"{label} is not an image file (or not a format Pillow can read)") from None
    try:
        _check_pixels(im.size, limit, label)
    except DataError:
        im.close()
        raise
    return im


def _decode(opener, label, close=True):
    """Open, decode every pixel, apply EXIF orientation and convert to RGB."""
    try:
        im = opener()
        try:
            im.load()
            out = _to_rgb(_apply_orientation(im))
            out.load()
        finally:
            if close:
                im.close()
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"image {label} is too large for the memory available") from None
    except Exception as e:  # Pillow's plugins raise many types on damaged data
        detail = str(e).strip() or type(e).__name__
        raise DataError(f"image {label} is truncated or corrupt and cannot be decoded: {detail}") from None
    return out


def _apply_orientation(im):
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # unreadable EXIF: keep the pixels, lose only the rotation
        return im


def _to_rgb(im):
    from PIL import Image

    if im.mode in _SIXTEEN_BIT_MODES:
        return _sixteen_to_rgb(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if im.mode == "RGB":
        return im.copy()
    return im.convert("RGB")


def _sixteen_to_rgb(im):
    import numpy as np
    from PIL import Image

    a = np.asarray(im).astype(np.float64)
    a8 = np.rint(np.clip(a, 0, 65535) / 257.0).astype(np.uint8)
    return Image.fromarray(a8).convert("RGB")


def _from_array(a, limit, label):
    import numpy as np
    from PIL import Image

    if a.dtype != np.uint8:
        raise DataError(f"image {label} has dtype {a.dtype}; expected uint8 pixels in 0..255 "
                        f"(for floats in [0, 1] pass (x * 255).round().astype(np.uint8))")
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise DataError(f"image {label} has shape {a.shape}; expected (H, W, 3) or (H, W)")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise DataError(f"image {label} is empty (shape {a.shape})")
    _check_pixels((a.shape[1], a.shape[0]), limit, label)
    return Image.fromarray(np.ascontiguousarray(a)).convert("RGB")


def read_ahead(read, items, batch_size, workers=2):
    """Yield ``[read(item), ...]`` batch by batch, in order, while threads read the next
    batch: reading overlaps whatever the caller does with this one (Pillow, NumPy and
    torch let go of the GIL while they decode, resize and compute). ``items`` may be
    any iterable; it is taken one batch ahead, never all at once.

    An item whose ``read`` raises ``DataError`` gets that error in its place, so the
    caller decides: skip it, count it or raise it. Other exceptions propagate. Closing
    the generator early cancels what is still queued.
    """
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    items = iter(items)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="rnncap-read")
    try:
        def submit():
            return [pool.submit(read, item) for item in itertools.islice(items, batch_size)]

        pending = submit()
        while pending:
            current, pending = pending, submit()
            yield [_result(fut) for fut in current]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(fut):
    try:
        return fut.result()
    except DataError as e:
        return e
