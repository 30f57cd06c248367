"""The synthetic scene generator, its grammar, parser and judge."""
import json

import numpy as np
import pytest

from rnncap.data import synth
from rnncap.errors import DataError
from rnncap.data.synth import Group, judge_caption, parse_caption


def scenes(n, seed=0, size=64):
    out = []
    for i in range(n):
        rng = synth.scene_rng(seed, i)
        s = synth.sample_scene(rng, image_size=size)
        out.append((s, synth.describe(s, rng, 5)))
    return out


SCENES = scenes(300)


def rich_scenes(n, seed=5):
    """Pairs of groups of any count, which the generator does not draw but the
    grammar and parser handle: scenes with groups only, for the captions."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        gs = tuple(Group(int(rng.choice(synth.COUNTS)), str(rng.choice(synth.SIZES)),
                         str(rng.choice(list(synth.COLOURS))), str(rng.choice(synth.SHAPES)))
                   for _ in range(2))
        if (gs[0].colour, gs[0].shape) != (gs[1].colour, gs[1].shape):
            s = synth.Scene(gs, (), {}, 64)
            out.append((s, synth.describe(s, rng, 5)))
    return out


RICH = rich_scenes(200)


# ---- generation ---------------------------------------------------------------------

def test_scenes_are_deterministic_in_seed_and_index():
    a = synth.sample_scene(synth.scene_rng(7, 3))
    b = synth.sample_scene(synth.scene_rng(7, 3))
    c = synth.sample_scene(synth.scene_rng(7, 4))
    assert a == b and a != c
    assert np.array_equal(np.asarray(synth.render_scene(a)), np.asarray(synth.render_scene(b)))


def test_scene_layout_matches_its_description():
    for s, _ in SCENES:
        assert len(s.groups) in (1, 2)
        assert sum(g.count for g in s.groups) == len(s.objects)
        for gi, g in enumerate(s.groups):
            assert sum(o[0] == gi for o in s.objects) == g.count
        if len(s.groups) == 2:
            # Every object of the left group lies left of every object of the right one.
            left = max(o[1] + o[3] / 2 for o in s.objects if o[0] == 0)
            right = min(o[1] - o[3] / 2 for o in s.objects if o[0] == 1)
            assert left < right
            # A pair is two single objects that differ in colour and in shape.
            a, b = s.groups
            assert a.count == b.count == 1 and a.colour != b.colour and a.shape != b.shape
        for _, x, y, d, _, _ in s.objects:
            assert 0 <= x - d / 2 and x + d / 2 <= s.image_size
            assert 0 <= y - d / 2 and y + d / 2 <= s.image_size


def test_attributes_are_balanced():
    # A caption must not be guessable from the prior: every value of every attribute
    # shows up with roughly its uniform share.
    many = [synth.sample_scene(synth.scene_rng(1, i), image_size=32) for i in range(1500)]
    groups = [g for s in many for g in s.groups]
    single = [s.groups[0] for s in many if len(s.groups) == 1]
    for field, values, pool in (("count", synth.COUNTS, single), ("size", synth.SIZES, groups),
                                ("colour", tuple(synth.COLOURS), groups), ("shape", synth.SHAPES, groups)):
        counts = np.array([sum(getattr(g, field) == v for g in pool) for v in values])
        share = counts / counts.sum()
        assert np.all(np.abs(share - 1 / len(values)) < 0.05), (field, share)
    n_two = sum(len(s.groups) == 2 for s in many)
    assert 0.45 < n_two / len(many) < 0.55
    assert all(g.count == 1 for s in many if len(s.groups) == 2 for g in s.groups)


def test_render_draws_the_objects_in_their_colours():
    s = synth.Scene(groups=(Group(1, "large", "red", "circle"),),
                    objects=((0, 32.0, 32.0, 20.0, 0.0, (215, 40, 40)),),
                    background={"rgb": [128, 128, 128], "texture": "noise", "seed": 0},
                    image_size=64)
    img = np.asarray(synth.render_scene(s)).astype(int)
    assert img.shape == (64, 64, 3)
    assert np.abs(img[32, 32] - [215, 40, 40]).max() < 5    # inside the circle
    assert np.abs(img[4, 4] - [128, 128, 128]).max() < 40   # background, with noise


def test_scene_dict_round_trip():
    for s, _ in SCENES[:20]:
        assert synth.Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(DataError):
        synth.Scene.from_dict({"groups": []})


# ---- grammar and parser -------------------------------------------------------------

def test_every_generated_caption_parses_back_to_its_scene():
    n_caps = 0
    for s, caps in SCENES + RICH:
        assert len(caps) == 5
        for c in caps:
            assert parse_caption(c) == s.groups, c
            assert judge_caption(c, s) == synth.Verdict(True, True, ())
            n_caps += 1
    assert n_caps == 2500


def test_references_paraphrase_each_other():
    distinct = [len(set(caps)) for _, caps in SCENES + RICH]
    assert min(distinct) >= 4 and np.mean(distinct) > 4.9
    templates_seen = set()
    for _, caps in SCENES + RICH:
        for c in caps:
            templates_seen.add(" ".join(w for w in c.split() if w in
                                        ("left", "right", "there", "picture", "image", "on")))
    assert len(templates_seen) >= 8


def test_parser_reads_captions_as_the_model_emits_them():
    g = (Group(2, "small", "red", "circle"), Group(1, "large", "blue", "square"))
    for text in ("Two small red circles to the left of a large blue square.",
                 "two small red circles to the left of a large blue square <END>",
                 "  one big blue square to the right of two little red circles "):
        assert parse_caption(text) == g


@pytest.mark.parametrize("text,error", [
    ("two small red circles to the left of a large green square", "colour"),
    ("three small red circles to the left of a large blue square", "count"),
    ("two large red circles to the left of a large blue square", "size"),
    ("two small red triangles to the left of a large blue square", "shape"),
    ("two small red circles to the right of a large blue square", "position"),
    ("a large blue square on the left and two small red circles on the right", "position"),
    ("two small red circles", "groups"),
    ("a small red circle", "groups"),
])
def test_wrong_facts_are_judged_false(text, error):
    scene = synth.Scene(groups=(Group(2, "small", "red", "circle"), Group(1, "large", "blue", "square")),
                        objects=(), background={}, image_size=64)
    assert judge_caption("two small red circles to the left of a large blue square", scene).correct
    v = judge_caption(text, scene)
    assert not v.correct and v.parsed and error in v.errors


@pytest.mark.parametrize("text", [
    "",
    "a",
    "red circle",
    "two small red circle",                # number agreement
    "a small red circles",
    "there are a small red circle",        # "there are" with a singular subject
    "there is two small red circles",
    "two small pink circles",              # not a colour of this world
    "two small red hexagons",
    "two red small circles",               # word order
    "two small red circles to the left of",
    "two small red circles to the left of a large blue square and",
    "two small red circles on the left and a large blue square",
    "on the left two small red circles",
    "the cat sat on the mat",
    "two small red circles two small red circles",
])
def test_nonsense_does_not_parse(text):
    assert parse_caption(text) is None
    scene = SCENES[0][0]
    assert judge_caption(text, scene) == synth.Verdict(False, False, ("unparsed",))


def test_semantic_accuracy_counts_and_names_errors():
    pairs = SCENES[:10]
    caps = [c[0] for _, c in pairs]
    caps[3] = "the cat sat on the mat"
    acc, errors = synth.semantic_accuracy(caps, [s for s, _ in pairs])
    assert acc == pytest.approx(0.9)
    assert errors == {"unparsed": 1}
    with pytest.raises(ValueError):
        synth.semantic_accuracy(caps, [])


def test_prior_only_captions_score_near_zero():
    # The most common reference caption of the training scenes, said for every
    # held-out scene, is almost never right: the captions are not guessable.
    from collections import Counter

    train, test = SCENES[:200], SCENES[200:]
    most_common = Counter(c for _, caps in train for c in caps).most_common(1)[0][0]
    acc, _ = synth.semantic_accuracy([most_common] * len(test), [s for s, _ in test])
    assert acc < 0.05


# ---- a dataset on disk --------------------------------------------------------------

def test_write_dataset(tmp_path):
    path = synth.write_dataset(tmp_path / "d", 10, seed=3, image_size=48)
    data = json.loads(path.read_text())
    assert data["image_dir"] == "images"
    recs = data["images"]
    assert [r["split"] for r in recs] == ["train"] * 8 + ["val"] + ["test"]
    for r in recs:
        assert (tmp_path / "d" / "images" / r["file"]).is_file()
        assert len(r["captions"]) == 5
    scenes_ = synth.load_scenes(path)
    for i, r in enumerate(recs):
        assert scenes_[r["file"]] == synth.sample_scene(synth.scene_rng(3, i), image_size=48)
        assert all(judge_caption(c, scenes_[r["file"]]).correct for c in r["captions"])
    # Same arguments, same bytes.
    again = synth.write_dataset(tmp_path / "e", 10, seed=3, image_size=48)
    assert again.read_text() == path.read_text()
    assert (tmp_path / "e/images/scene_00004.png").read_bytes() == \
        (tmp_path / "d/images/scene_00004.png").read_bytes()


def test_load_scenes_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        synth.load_scenes(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"file": "a.png", "captions": ["x"]}]}))
    with pytest.raises(DataError, match="scene"):
        synth.load_scenes(bad)
