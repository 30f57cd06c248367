"""load_image: every real-world image kind becomes RGB; every bad file is one DataError."""
import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from rnncap.errors import DataError  # noqa: E402
from rnncap.data.images import load_image  # noqa: E402

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _save(im, path, **kw):
    im.save(path, **kw)
    return path


def _png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width, height, bit_depth, color_type, rows=None):
    """A PNG written by hand, for kinds Pillow cannot write (16-bit RGB, huge headers)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    raw = b"" if rows is None else b"".join(b"\x00" + r for r in rows)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def _pixels(im):
    assert im.mode == "RGB"
    return np.asarray(im)


# ---- sources ------------------------------------------------------------------------

def test_path_bytes_pil_and_arrays_give_the_same_rgb(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    path = _save(Image.fromarray(a), tmp_path / "x.png")
    for src in (path, str(path), path.read_bytes(), Image.open(path), a):
        im = load_image(src)
        assert im.size == (20, 12)
        np.testing.assert_array_equal(_pixels(im), a)
    gray = a[:, :, 0].copy()
    np.testing.assert_array_equal(_pixels(load_image(gray)), np.repeat(gray[:, :, None], 3, axis=2))


def test_inputs_are_not_mutated(tmp_path):
    src = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    out = load_image(src)
    assert out is not src and src.mode == "RGBA" and src.getpixel((0, 0)) == (10, 20, 30, 0)
    rgb = Image.new("RGB", (4, 4), RED)
    assert load_image(rgb) is not rgb


@pytest.mark.parametrize("orientation,size,top_left", [
    (1, (40, 20), RED),   # stored upright: red on the left
    (3, (40, 20), BLUE),  # rotated 180
    (6, (20, 40), RED),   # needs 90 degrees clockwise: the left edge ends on top
    (8, (20, 40), BLUE),  # needs 90 degrees anticlockwise: the right edge ends on top
])
def test_exif_orientation_is_applied(tmp_path, orientation, size, top_left):
    im = Image.new("RGB", (40, 20), BLUE)
    im.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(im, tmp_path / "o.jpg", exif=exif, quality=95)
    out = load_image(path)
    assert out.size == size
    assert np.abs(_pixels(out)[1, 1].astype(int) - top_left).max() < 20


# ---- modes --------------------------------------------------------------------------

def test_grayscale_and_one_bit(tmp_path):
    g = load_image(_save(Image.new("L", (5, 5), 77), tmp_path / "g.png"))
    assert (_pixels(g) == 77).all()
    one = Image.new("1", (8, 8), 0)
    one.putpixel((3, 3), 1)
    b = _pixels(load_image(_save(one, tmp_path / "b.png")))
    assert tuple(b[3, 3]) == WHITE and tuple(b[0, 0]) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(tmp_path, fmt):
    path = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / f"c.{fmt.lower()}", format=fmt)
    assert Image.open(path).mode == "CMYK"
    px = _pixels(load_image(path))[8, 8].astype(int)
    assert np.abs(px - RED).max() < 10


def test_alpha_is_composited_on_white(tmp_path):
    im = Image.new("RGBA", (4, 1), (0, 0, 0, 0))          # fully transparent black
    im.putpixel((1, 0), (255, 0, 0, 255))                  # opaque red
    im.putpixel((2, 0), (0, 0, 0, 128))                    # half-transparent black
    px = _pixels(load_image(_save(im, tmp_path / "a.png")))
    assert tuple(px[0, 0]) == WHITE
    assert tuple(px[0, 1]) == RED
    assert 120 <= px[0, 2, 0] <= 135 and px[0, 2, 0] == px[0, 2, 1] == px[0, 2, 2]
    la = Image.new("LA", (2, 2), (0, 0))
    assert (_pixels(load_image(_save(la, tmp_path / "la.png"))) == 255).all()


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    plain = _pixels(load_image(_save(p, tmp_path / "p.png")))
    assert tuple(plain[1, 1]) == RED and tuple(plain[0, 0]) == (0, 0, 0)
    gif = _save(p, tmp_path / "t.gif", transparency=0)
    assert "transparency" in Image.open(gif).info
    px = _pixels(load_image(gif))
    assert tuple(px[0, 0]) == WHITE and tuple(px[1, 1]) == RED


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    path = _save(Image.fromarray(values), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    px = _pixels(load_image(path))
    np.testing.assert_array_equal(px[0, :, 0], [0, 1, 128, 255])
    i32 = _save(Image.fromarray(values.astype(np.int32)), tmp_path / "i.tif")
    assert Image.open(i32).mode == "I"
    np.testing.assert_array_equal(_pixels(load_image(i32))[0, :, 1], [0, 1, 128, 255])


def test_sixteen_bit_rgb_png(tmp_path):
    row = struct.pack(">6H", 65535, 0, 0, 0, 32896, 65535)  # red, then (0, 128, 255)
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png(2, 1, 16, 2, [row]))
    px = _pixels(load_image(path)).astype(int)
    assert tuple(px[0, 0]) == RED
    assert np.abs(px[0, 1] - (0, 128, 255)).max() <= 1


# ---- refusals -----------------------------------------------------------------------

def _refused(src, *words, **kw):
    with pytest.raises(DataError) as e:
        load_image(src, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert str(w) in msg, msg
    return msg


def test_missing_empty_directory_and_non_image(tmp_path):
    _refused(tmp_path / "nope.jpg", "not found", "nope.jpg")
    (tmp_path / "zero.jpg").write_bytes(b"")
    _refused(tmp_path / "zero.jpg", "empty", "zero.jpg")
    _refused(b"", "empty")
    _refused(tmp_path, "directory")
    (tmp_path / "notes.jpg").write_text("these are not pixels\n" * 20)
    _refused(tmp_path / "notes.jpg", "not an image", "notes.jpg")


def test_truncated_and_corrupt_jpeg(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "cut.jpg", "cut.jpg", "truncated")
    bad = bytearray(data)
    bad[2:40] = b"\x00" * 38  # destroy the segment headers after SOI
    (tmp_path / "bad.jpg").write_bytes(bytes(bad))
    _refused(tmp_path / "bad.jpg", "bad.jpg")


def test_pixel_limit_is_configurable(tmp_path):
    path = _save(Image.new("RGB", (100, 100)), tmp_path / "big.png")
    assert load_image(path, max_pixels=10_000).size == (100, 100)
    _refused(path, "big.png", "10,000 pixels", "limit of 9,999", max_pixels=9_999)
    _refused(np.zeros((100, 100, 3), np.uint8), "limit", max_pixels=50)


@pytest.mark.parametrize("side", [10_000, 20_000])
def test_decompression_bombs_are_refused_from_the_header(tmp_path, side):
    # 10,000^2 is over our default limit (Pillow only warns); 20,000^2 is over Pillow's
    # hard limit. The file is tiny: only the header claims the size.
    path = tmp_path / f"bomb{side}.png"
    path.write_bytes(_png(side, side, 1, 0))
    assert path.stat().st_size < 200
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may leak out
        _refused(path, path.name)


def test_bad_arrays():
    _refused(np.zeros((4, 4, 3), np.float64), "uint8")
    _refused(np.zeros((4, 4, 4), np.uint8), "shape")
    _refused(np.zeros((0, 4, 3), np.uint8), "empty")
    with pytest.raises(TypeError):
        load_image(12)


# ---- fuzz ---------------------------------------------------------------------------

def _seed_files():
    rng = np.random.default_rng(2)
    im = Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8))
    out = []
    for fmt, mode in [("PNG", "RGB"), ("JPEG", "RGB"), ("GIF", "P"), ("BMP", "RGB"),
                      ("TIFF", "RGB"), ("PNG", "RGBA"), ("WEBP", "RGB"), ("ICO", "RGBA")]:
        buf = io.BytesIO()
        try:
            im.convert(mode).save(buf, fmt)
        except (KeyError, OSError):  # a codec missing from this Pillow build
            continue
        out.append(buf.getvalue())
    return out


SEEDS = _seed_files()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _clean_or_data_error(data):
    try:
        im = load_image(data, max_pixels=4_000_000)
    except DataError as e:
        assert "\n" not in str(e)
        return
    assert im.mode == "RGB" and im.width > 0 and im.height > 0


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data):
    _clean_or_data_error(data)


@FUZZ
@given(st.sampled_from(range(len(SEEDS))), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                     max_size=6), st.integers(1, 10**6))
def test_fuzz_damaged_real_files(which, flips, cut):
    data = bytearray(SEEDS[which])
    for pos, val in flips:
        data[pos % len(data)] = val
    _clean_or_data_error(bytes(data[: max(1, cut % (len(data) + 1))]))
