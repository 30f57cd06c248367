"""A self-contained HTML report: one file that opens in any browser, offline.

Photos are embedded as base64 JPEG thumbnails and the loss curve is an inline SVG
drawn here, so the file needs no matplotlib, no external CSS or JavaScript and no
network. Every piece of text goes through ``html.escape``.

    write_report("runs/eval", items, summary, history=ckpt.history)

items: a list of dicts, one per photo::

    {"image_id": ..., "image": path | PIL.Image | None, "greedy": str, "beam": str,
     "references": [str, ...], "scores": {metric: float or None},
     "attention_figure": PIL.Image (attention models: ``attention_figure``)}

Missing keys are left out of the page; an image that cannot be read shows a note
instead of failing the report.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path

THUMBNAIL = 256  # pixels, longest side

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; background: #fafafa; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.6em; }
table.summary { border-collapse: collapse; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; }
table.summary td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; }
.card { box-sizing: border-box; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 0.8em; width: 360px; }
.card img { display: block; max-width: 100%; margin: 0 auto 0.5em auto; }
.card img.attention { width: 100%; height: auto; }
.noimage { height: 120px; display: flex; text-align: center; align-items: center; justify-content: center;
           background: #eee; color: #777; margin-bottom: 0.5em; }
.id { font-size: 0.8em; color: #777; word-break: break-all; }
.cap { margin: 0.3em 0; } .cap b { display: inline-block; width: 4.5em; color: #555; }
ul.refs { margin: 0.3em 0; padding-left: 1.2em; color: #444; font-size: 0.9em; }
table.scores { font-size: 0.8em; border-collapse: collapse; margin-top: 0.4em; }
table.scores td { padding: 0 0.6em 0 0; }
svg text { font-family: system-ui, sans-serif; font-size: 12px; fill: #333; }
"""


def write_report(out_dir, items, summary, history=None, title="rnncap evaluation",
                 filename="report.html"):
    """Write the report into ``out_dir`` (created if needed). Returns its path.

    summary: {name: value} shown as a table (floats to 4 decimals, None as "n/a").
    history: {"iteration", "train_loss", "val_iteration", "val_loss", "epoch"} lists
    from training; when given, the loss curve is drawn. ``val_loss`` is plotted
    against ``val_iteration`` (or against ``iteration`` when it has the same length).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        "<h2>Summary</h2>",
        _summary_table(summary),
    ]
    curve = loss_curve_svg(history) if history else ""
    if curve:
        parts += ["<h2>Loss</h2>", curve]
    parts += [f"<h2>Captions ({len(items)} images)</h2>", '<div class="grid">']
    parts += [_card(item) for item in items]
    parts += ["</div>", "</body></html>"]
    path = out_dir / filename
    _write_atomic(path, "\n".join(parts) + "\n")
    return path


def _esc(value):
    return html.escape(str(value), quote=True)


def _fmt(value):
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if math.isfinite(value) else str(value)


def _summary_table(summary):
    rows = []
    for name, value in (summary or {}).items():
        cls = ' class="num"' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        rows.append(f"<tr><th>{_esc(name)}</th><td{cls}>{_esc(_fmt(value))}</td></tr>")
    return '<table class="summary">' + "".join(rows) + "</table>"


def _card(item):
    out = ['<div class="card">', _image_html(item.get("image"))]
    if item.get("image_id") is not None:
        out.append(f'<div class="id">{_esc(item["image_id"])}</div>')
    for key, label in (("greedy", "greedy"), ("beam", "beam"), ("caption", "caption")):
        if item.get(key) is not None:
            out.append(f'<p class="cap {key}"><b>{label}</b> {_esc(item[key])}</p>')
    if item.get("attention_figure") is not None:
        out.append(_attention_html(item["attention_figure"]))
    refs = item.get("references") or []
    if refs:
        out.append('<ul class="refs">' + "".join(f"<li>{_esc(r)}</li>" for r in refs) + "</ul>")
    scores = item.get("scores") or {}
    if scores:
        cells = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(_fmt(v))}</td></tr>" for k, v in scores.items())
        out.append(f'<table class="scores">{cells}</table>')
    out.append("</div>")
    return "".join(out)


def _image_html(image):
    if image is None:
        return '<div class="noimage">no image</div>'
    try:
        data, (w, h) = _thumbnail_jpeg(image)
    except Exception as e:  # a report should survive one unreadable photo
        name = os.path.basename(str(image)) if isinstance(image, (str, os.PathLike)) else type(image).__name__
        return f'<div class="noimage">image not available: {_esc(name)} ({_esc(type(e).__name__)})</div>'
    b64 = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{b64}" width="{w}" height="{h}" alt="photo">'


def _attention_html(figure):
    """An ``attention_figure`` as an embedded PNG, under the photo."""
    buf = io.BytesIO()
    figure.save(buf, format="PNG", optimize=True)
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<img class="attention" src="data:image/png;base64,{b64}" width="{figure.width}" '
            f'height="{figure.height}" alt="attention map of each word">')


def _thumbnail_jpeg(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        im = image.copy()
    else:
        with Image.open(image) as f:
            im = f.copy()
    im = im.convert("RGB")
    im.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue(), im.size


# ---- attention maps ------------------------------------------------------------------

def attention_figure(image, words, maps, panel=176, columns=6):
    """A figure for people: the photo, then one panel per generated word with its
    attention map over the photo, the word written underneath. A PIL RGB image.

    image: a path or PIL image; words: n strings; maps: (n, h, w) weights (each sums
    to 1). Every map is scaled to its own maximum and upsampled to the panel with
    bicubic filtering, so the regions it looked at stay bright and warm and the rest
    of the photo is dimmed.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from ..data.images import load_image

    photo = load_image(image).resize((panel, panel), Image.Resampling.BICUBIC)
    base = np.asarray(photo, dtype=np.float32) / 255.0
    maps = np.asarray(maps, dtype=np.float32)
    if len(words) != len(maps):
        raise ValueError(f"{len(words)} words but {len(maps)} attention maps")
    tiles = [(photo, "")]
    for word, m in zip(words, maps):
        heat = Image.fromarray(m / max(float(m.max()), 1e-12)).resize((panel, panel), Image.Resampling.BICUBIC)
        w = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)[:, :, None]
        warm = np.stack([np.ones_like(w[..., 0]), w[..., 0] ** 0.5 * 0.85, w[..., 0] * 0.2], axis=2)
        mixed = base * (0.25 + 0.75 * w) * (1 - 0.35 * w) + warm * 0.35 * w
        tiles.append((Image.fromarray((np.clip(mixed, 0, 1) * 255).astype(np.uint8)), word))
    label, gap = 22, 6
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    fig = Image.new("RGB", (cols * (panel + gap) + gap, rows * (panel + label + gap) + gap), "white")
    draw = ImageDraw.Draw(fig)
    for k, (tile, word) in enumerate(tiles):
        x = gap + (k % cols) * (panel + gap)
        y = gap + (k // cols) * (panel + label + gap)
        fig.paste(tile, (x, y))
        text = word if word else "photo"
        tw = draw.textlength(text)
        draw.text((x + (panel - tw) / 2, y + panel + 5), text, fill=(0, 0, 0) if word else (120, 120, 120))
    return fig


# ---- the loss curve ------------------------------------------------------------------

def loss_curve_svg(history, width=720, height=300):
    """Training (and validation) loss against iteration as an inline SVG string;
    "" when the history holds no finite training loss."""
    train = _finite_points(history.get("iteration", []), history.get("train_loss", []))
    val_x = history.get("val_iteration")
    if not val_x and len(history.get("val_loss", [])) == len(history.get("iteration", [])):
        val_x = history.get("iteration", [])
    val = _finite_points(val_x or [], history.get("val_loss", []))
    if not train and not val:
        return ""
    pts = train + val
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = 60, 20, 20, 40
    pw, ph = width - left - right, height - top - bottom

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="loss curve">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for v in _ticks(y0, y1):
        y = sy(v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick_label(v)}</text>')
    for v in _ticks(x0, x1):
        x = sx(v)
        out.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" stroke="#999"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 18}" text-anchor="middle">{_tick_label(v)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">iteration</text>')
    out.append(f'<text x="14" y="{top + ph / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {top + ph / 2})">loss</text>')
    for name, points, color, dots in (("train", train, "#1f77b4", False), ("val", val, "#d62728", True)):
        if not points:
            continue
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
        out.append(f'<polyline class="{name}" fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        if dots:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>' for x, y in points]
    legend_y = top + 14
    for k, (name, color, points) in enumerate((("train loss", "#1f77b4", train), ("val loss", "#d62728", val))):
        if points:
            lx = left + pw - 110
            ly = legend_y + 16 * k
            out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 20}" y2="{ly - 4}" stroke="{color}" stroke-width="2"/>')
            out.append(f'<text x="{lx + 26}" y="{ly}">{name}</text>')
    out.append("</svg>")
    return "".join(out)


def _finite_points(xs, ys):
    pts = []
    for x, y in zip(xs, ys):
        try:
            x, y = float(x), float(y)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x) and math.isfinite(y):
            pts.append((x, y))
    return pts


def _ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    span = hi - lo
    step = 10 ** math.floor(math.log10(span / n))
    for m in (1, 2, 5, 10):
        if span / (m * step) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _tick_label(v):
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def _write_atomic(path, text):
    """A reader never sees half a report: write beside it, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
