"""Synthetic scenes whose captions can be checked: the data behind ``rnncap demo``.

A scene is a group of one to three identical shapes, or two different shapes side
by side; each group has a count, a size, a colour and a shape. Scenes are drawn with
Pillow on textured backgrounds. Five reference captions per scene come from a small
grammar and paraphrase each other ("three large red circles", "there are three big
red circles", "a small blue square to the left of a large yellow triangle", "on the
left a little blue square and on the right a big yellow triangle", ...). Because
the grammar is small, any caption can be parsed back into facts and judged against
its scene, which gives a *semantic accuracy*: the fraction of captions that parse
and say exactly what the scene holds.

Read top to bottom: the vocabulary of the world, scenes and how they are sampled,
drawing, the grammar that writes captions, the parser and judge that read them back,
and writing a whole dataset in the caption-list JSON format.

Every attribute is drawn uniformly, so a caption cannot be guessed from the caption
prior (the most common training caption fits under 5% of new scenes): a model has
to look at the image.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import DataError

FORMAT_VERSION = 1

SHAPES = ("circle", "square", "triangle")
# Saturated, well separated hues; backgrounds are kept unsaturated so they never
# pass for an object colour. (A fifth, purple, was dropped: the pretrained
# features confused it with green.)
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 210, 40),
}
SIZES = ("small", "large")
COUNTS = (1, 2, 3)

# Object diameter as a fraction of the image side.
_SIZE_RANGE = {"small": (0.15, 0.165), "large": (0.26, 0.28)}

# Words the grammar may use for each value (the first is the canonical one).
_COUNT_WORDS = {1: ("a", "one"), 2: ("two",), 3: ("three",)}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}


# ---- scenes -------------------------------------------------------------------------

class Group(NamedTuple):
    """``count`` identical objects: same size, colour and shape."""
    count: int
    size: str
    colour: str
    shape: str


@dataclass(frozen=True)
class Scene:
    """What an image shows, and everything needed to draw it again.

    groups: one or two ``Group``s, ordered left to right (every object of groups[0]
    lies left of every object of groups[1]). objects: (group index, centre x, centre
    y, diameter, angle in degrees, rgb) in pixels of an image ``image_size`` square.
    background: base rgb, texture kind and a seed for its noise.
    """
    groups: tuple
    objects: tuple
    background: dict
    image_size: int

    def to_dict(self):
        return {
            "groups": [g._asdict() for g in self.groups],
            "objects": [{"group": o[0], "x": o[1], "y": o[2], "diameter": o[3],
                         "angle": o[4], "rgb": list(o[5])} for o in self.objects],
            "background": dict(self.background),
            "image_size": self.image_size,
        }

    @classmethod
    def from_dict(cls, d):
        try:
            groups = tuple(Group(int(g["count"]), g["size"], g["colour"], g["shape"])
                           for g in d["groups"])
            objects = tuple((int(o["group"]), float(o["x"]), float(o["y"]), float(o["diameter"]),
                             float(o["angle"]), tuple(int(c) for c in o["rgb"]))
                            for o in d["objects"])
            return cls(groups, objects, dict(d["background"]), int(d["image_size"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"scene record is malformed ({e!r}); regenerate the dataset "
                            f"with rnncap demo") from None


def _sample_group(rng, counts):
    return Group(int(rng.choice(counts)), str(rng.choice(SIZES)),
                 str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))


def sample_scene(rng, image_size=128, two_group_prob=0.5):
    """Draw a random scene. ``rng`` is a numpy Generator; the scene is a pure
    function of its state.

    A scene is one group of 1-3 objects or, with ``two_group_prob``, two single
    objects side by side. (Pooled CNN features count one group fairly well, but
    not two at once: with pairs of groups of 1-3, a captioner got the whole
    description right for 17% of unseen two-group scenes.)
    """
    if rng.random() < two_group_prob:
        groups = [_sample_group(rng, (1,))]
        # The two differ in colour and in shape: then they never pass for one group
        # of two, and a caption naming them is true in one left-right order only.
        while True:
            g = _sample_group(rng, (1,))
            if g.colour != groups[0].colour and g.shape != groups[0].shape:
                break
        groups.append(g)
    else:
        groups = [_sample_group(rng, COUNTS)]

    S = image_size
    margin = 0.04 * S
    if len(groups) == 1:
        regions = [(margin, S - margin)]
    else:
        # A gap either side of a random split keeps "left of" unambiguous.
        split = rng.uniform(0.42, 0.58) * S
        gap = 0.03 * S
        regions = [(margin, split - gap), (split + gap, S - margin)]

    for _ in range(100):  # rejection sampling; a handful of tries is the norm
        objects = _place_objects(rng, groups, regions, S, margin)
        if objects is not None:
            break
    else:  # pragma: no cover - the sizes above always fit
        raise RuntimeError("could not place the objects of a scene")

    base = _background_colour(rng)
    background = {"rgb": base, "texture": str(rng.choice(("noise", "blotches", "stripes"))),
                  "seed": int(rng.integers(2**31))}
    return Scene(tuple(groups), tuple(objects), background, int(image_size))


def _place_objects(rng, groups, regions, S, margin):
    objects = []
    for gi, (g, (x0, x1)) in enumerate(zip(groups, regions)):
        lo, hi = _SIZE_RANGE[g.size]
        for _ in range(g.count):
            d = rng.uniform(lo, hi) * S
            r = d / 2
            for _ in range(200):
                x = rng.uniform(x0 + r, x1 - r)
                y = rng.uniform(margin + r, S - margin - r)
                # Keep objects apart so counts stay countable.
                if all((x - o[1]) ** 2 + (y - o[2]) ** 2 > (r + o[3] / 2 + 0.10 * S) ** 2
                       for o in objects):
                    break
            else:
                return None
            angle = rng.uniform(-20, 20) if g.shape != "circle" else 0.0
            rgb = tuple(int(np.clip(c + rng.integers(-10, 11), 0, 255)) for c in COLOURS[g.colour])
            objects.append((gi, round(x, 2), round(y, 2), round(d, 2), round(angle, 2), rgb))
    return objects


def _background_colour(rng):
    # Unsaturated and fairly light: a grey level plus a small tint. (Over a wide
    # brightness range, pretrained features see colour relative to the background,
    # and a blue square on light grey starts to look like a yellow one on dark.)
    level = rng.uniform(150, 215)
    tint = rng.uniform(-8, 8, size=3)
    return [int(np.clip(level + t, 0, 255)) for t in tint]


# ---- drawing ------------------------------------------------------------------------

def render_scene(scene, supersample=2):
    """Draw a scene as an RGB PIL image, ``scene.image_size`` pixels square.

    Shapes are drawn ``supersample`` times larger and scaled down, which
    anti-aliases their edges. The result depends on the scene alone.
    """
    from PIL import Image, ImageDraw

    S = scene.image_size
    k = int(supersample)
    # The texture is made at the final size (the costly part) and blown up with
    # NEAREST, so the BOX filter below gives it back unchanged.
    img = Image.fromarray(_background(scene.background, S))
    if k != 1:
        img = img.resize((S * k, S * k), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for gi, x, y, d, angle, rgb in scene.objects:
        shape = scene.groups[gi].shape
        x, y, r = x * k, y * k, d * k / 2
        if shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=rgb)
        else:
            # Sized to cover about a circle's area: a square's half-side is shrunk,
            # a triangle's circumradius grown (inside the circle it would have
            # 40% of the area and read as a smaller size).
            n, rr = (4, r * 0.9 * np.sqrt(2)) if shape == "square" else (3, r * 1.25)
            start = np.deg2rad(angle) + (np.pi / 4 if n == 4 else -np.pi / 2)
            pts = [(x + rr * np.cos(start + 2 * np.pi * i / n),
                    y + rr * np.sin(start + 2 * np.pi * i / n) + (0.25 * rr if n == 3 else 0.0))
                   for i in range(n)]
            draw.polygon(pts, fill=rgb)
    if k != 1:
        img = img.resize((S, S), Image.BOX)
    return img


def _background(bg, size):
    rng = np.random.default_rng(bg["seed"])
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = np.asarray(bg["rgb"], dtype=np.float32)
    if bg["texture"] == "blotches":
        # Low-frequency brightness variation: a coarse random grid, smoothly upsampled.
        from PIL import Image

        coarse = rng.uniform(-30, 30, size=(4, 4)).astype(np.float32)
        img += np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))[..., None]
    elif bg["texture"] == "stripes":
        # Faint and broad: bold, fine stripes doubled the captioner's mistakes
        # (pretrained features respond strongly to them).
        freq, theta = rng.uniform(3, 8), rng.uniform(0, np.pi)
        t = np.arange(size, dtype=np.float32) / size
        phase = 2 * np.pi * freq * (t[None, :] * np.cos(theta) + t[:, None] * np.sin(theta))
        img += (7 * np.sin(phase))[..., None]
    img += rng.standard_normal(img.shape, dtype=np.float32) * 7
    return np.clip(img, 0, 255).astype(np.uint8)


# ---- the grammar: scene -> captions -------------------------------------------------

def _noun_phrase(g, rng):
    count = _COUNT_WORDS[g.count][rng.integers(len(_COUNT_WORDS[g.count]))]
    size = _SIZE_WORDS[g.size][rng.integers(len(_SIZE_WORDS[g.size]))]
    noun = g.shape if g.count == 1 else g.shape + "s"
    return f"{count} {size} {g.colour} {noun}"


def _be(g):
    return "is" if g.count == 1 else "are"


# Templates over noun phrases; L and R are the left and right groups, A the only one.
_ONE_GROUP = (
    "{A}",
    "there {beA} {A}",
    "a picture of {A}",
    "an image of {A}",
    "{A} in the picture",
)
# Only templates that name the left group first: with right-first ones as well, the
# decoder must choose at the first word which half of the image to read, and from
# a couple of thousand scenes it does not learn to (measured: 65% of two-object
# scenes right with left-first captions only, 43% with both).
_TWO_GROUPS = (
    "{L} to the left of {R}",
    "{L} on the left and {R} on the right",
    "on the left {L} and on the right {R}",
    "there {beL} {L} to the left of {R}",
    "a picture of {L} to the left of {R}",
)


def describe(scene, rng, k=5):
    """``k`` reference captions for a scene, each from a different template while
    there are enough templates, distinct where the grammar allows."""
    templates = _ONE_GROUP if len(scene.groups) == 1 else _TWO_GROUPS
    order = rng.permutation(len(templates))
    g = scene.groups
    captions = []
    for i in range(k):
        t = templates[order[i % len(templates)]]
        for _ in range(20):  # re-draw the word choices until the caption is new
            fields = ({"A": _noun_phrase(g[0], rng), "beA": _be(g[0])} if len(g) == 1 else
                      {"L": _noun_phrase(g[0], rng), "R": _noun_phrase(g[1], rng), "beL": _be(g[0])})
            c = t.format(**fields)
            if c not in captions:
                break
        captions.append(c)
    return captions


# ---- what a model trained on these scenes knows -------------------------------------

def grammar_words():
    """Every word a caption of these scenes can use (the grammar's whole vocabulary)."""
    words = {w for ws in (*_COUNT_WORDS.values(), *_SIZE_WORDS.values()) for w in ws}
    words |= set(COLOURS) | set(SHAPES) | {s + "s" for s in SHAPES} | {"is", "are"}
    for template in _ONE_GROUP + _TWO_GROUPS:
        words |= {w for w in template.split() if not w.startswith("{")}
    return words


def trained_on_scenes(configs, vocab):
    """Whether a checkpoint's captioner learnt these scenes rather than photos: its data
    config says so (``synthetic``), or, for checkpoints written before it did, every
    word it knows is one of the grammar's."""
    data = (configs or {}).get("data") or {}
    if "synthetic" in data:
        return bool(data["synthetic"])
    words = {w for w in vocab.idx_to_word if not (w.startswith("<") and w.endswith(">"))}
    return bool(words) and words <= grammar_words()


def scenes_warning(vocab_size):
    """What ``rnncap caption``, the web page and ``/api/model`` say about such a model."""
    return (f"this model was trained on rnncap's synthetic scenes, not on photos: it knows "
            f"{vocab_size} words about coloured circles, squares and triangles, and describes any "
            f"photo in them. For a model of real photos, see the README's 'Train on Flickr8k' "
            f"(rnncap download flickr8k --dest data, then rnncap features and rnncap train).")


# ---- the parser: caption -> facts ---------------------------------------------------

_WORD_COUNT = {w: n for n, ws in _COUNT_WORDS.items() for w in ws}
_WORD_SIZE = {w: s for s, ws in _SIZE_WORDS.items() for w in ws}
_NOUNS = {**{s: (s, True) for s in SHAPES}, **{s + "s": (s, False) for s in SHAPES}}


def tokenize(text):
    """Lower-case words, with punctuation and special tokens like <END> dropped."""
    words = "".join(c if c.isalpha() or c.isspace() or c in "<>" else " " for c in text.lower())
    return [w for w in words.split() if not (w.startswith("<") and w.endswith(">"))]


class _Words:
    """A cursor over a token list for the recursive-descent parser."""

    def __init__(self, tokens):
        self.tokens, self.i = tokens, 0

    def take(self, phrase):
        """Consume ``phrase`` (space separated words) if it comes next."""
        ws = phrase.split()
        if self.tokens[self.i:self.i + len(ws)] == ws:
            self.i += len(ws)
            return True
        return False

    def next(self):
        if self.i >= len(self.tokens):
            return None
        self.i += 1
        return self.tokens[self.i - 1]

    def done(self):
        return self.i == len(self.tokens)


def _parse_noun_phrase(w):
    count = _WORD_COUNT.get(w.next())
    size = _WORD_SIZE.get(w.next())
    colour = w.next()
    noun = _NOUNS.get(w.next())
    if count is None or size is None or colour not in COLOURS or noun is None:
        return None
    shape, singular = noun
    if singular != (count == 1):  # "two circle", "a squares"
        return None
    return Group(count, size, colour, shape)


def parse_caption(text):
    """Read a caption back into facts.

    Returns a tuple of ``Group``s ordered left to right (one or two of them), or
    None when the caption is not a sentence of the grammar.
    """
    w = _Words(tokenize(text))
    be = None
    if w.take("there is"):
        be = 1
    elif w.take("there are"):
        be = 2
    else:
        w.take("a picture of") or w.take("an image of")

    if w.take("on the left"):
        left = _parse_noun_phrase(w)
        right = _parse_noun_phrase(w) if w.take("and on the right") else None
        groups = (left, right)
        first = left
    else:
        first = _parse_noun_phrase(w)
        if w.done() or w.take("in the picture"):
            groups = (first,)
        elif w.take("to the left of"):
            groups = (first, _parse_noun_phrase(w))
        elif w.take("to the right of"):
            groups = (_parse_noun_phrase(w), first)
        elif w.take("on the left and"):
            second = _parse_noun_phrase(w)
            groups = (first, second) if w.take("on the right") else (None,)
        elif w.take("on the right and"):
            second = _parse_noun_phrase(w)
            groups = (second, first) if w.take("on the left") else (None,)
        else:
            return None
    if not w.done() or any(g is None for g in groups):
        return None
    if be is not None and (first.count == 1) != (be == 1):  # "there are a ..."
        return None
    return groups


# ---- the judge: facts vs scene ------------------------------------------------------

class Verdict(NamedTuple):
    """``correct``: the caption parses and states exactly the scene's groups, each
    with the right count, size, colour and shape, in the right left-right order.
    ``errors`` names what was wrong: "unparsed", "groups" (wrong number of groups),
    "position" (both groups right but swapped), or attribute names."""
    correct: bool
    parsed: bool
    errors: tuple


def judge_caption(text, scene):
    """Judge one caption against the scene it describes."""
    said = parse_caption(text)
    if said is None:
        return Verdict(False, False, ("unparsed",))
    truth = scene.groups
    if len(said) != len(truth):
        return Verdict(False, True, ("groups",))
    if len(said) == 2 and said != truth and said == truth[::-1]:
        return Verdict(False, True, ("position",))
    errors = [f for s, t in zip(said, truth) for f in Group._fields if getattr(s, f) != getattr(t, f)]
    return Verdict(not errors, True, tuple(dict.fromkeys(errors)))


def semantic_accuracy(captions, scenes):
    """Fraction of captions judged correct against their scenes, and a Counter of
    the error kinds among the wrong ones."""
    captions, scenes = list(captions), list(scenes)
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes")
    if not captions:
        raise ValueError("no captions to judge")
    errors = Counter()
    correct = 0
    for c, s in zip(captions, scenes):
        v = judge_caption(c, s)
        correct += v.correct
        errors.update(v.errors)
    return correct / len(captions), errors


# ---- a whole dataset ----------------------------------------------------------------

def scene_rng(seed, index):
    """The generator for scene ``index`` of a dataset: each scene depends only on
    (seed, index), so a dataset of any size is a prefix of a larger one."""
    return np.random.default_rng([int(seed), int(index)])


def split_of(index, n, fractions=(0.8, 0.1, 0.1)):
    n_train = int(round(n * fractions[0]))
    n_val = int(round(n * fractions[1]))
    return "train" if index < n_train else "val" if index < n_train + n_val else "test"


def write_dataset(out_dir, n_scenes, seed=0, image_size=128, n_captions=5,
                  fractions=(0.8, 0.1, 0.1), progress=None):
    """Generate ``n_scenes`` scenes into ``out_dir``: PNGs in ``images/`` and a
    caption-list ``captions.json`` whose image records also carry each ``scene``
    (for judging). Deterministic in (n_scenes, seed, image_size, n_captions).

    ``progress``, if given, wraps the range of scene indices (e.g. tqdm).
    Returns the path of captions.json.
    """
    if n_scenes < 3:
        raise ValueError(f"n_scenes must be >= 3 (one per split), got {n_scenes}")
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    indices = range(n_scenes)
    for i in (progress(indices) if progress else indices):
        rng = scene_rng(seed, i)
        scene = sample_scene(rng, image_size=image_size)
        name = f"scene_{i:05d}.png"
        render_scene(scene).save(out_dir / "images" / name, compress_level=1)
        records.append({"file": name, "split": split_of(i, n_scenes, fractions),
                        "captions": describe(scene, rng, n_captions),
                        "scene": scene.to_dict()})
    data = {"name": "rnncap-synthetic-shapes", "image_dir": "images",
            "generator": {"format_version": FORMAT_VERSION, "seed": int(seed),
                          "n_scenes": int(n_scenes), "image_size": int(image_size),
                          "n_captions": int(n_captions)},
            "images": records}
    path = out_dir / "captions.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # a half-written file never passes for a dataset
    return path


def load_scenes(captions_json):
    """Map image file name -> Scene from a dataset written by ``write_dataset``."""
    path = Path(captions_json)
    try:
        data = json.loads(path.read_text())
        return {r["file"]: Scene.from_dict(r["scene"]) for r in data["images"]}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a synthetic dataset with scene records ({e!r}); "
                        f"generate one with rnncap demo") from None
