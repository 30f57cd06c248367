"""A first try tells the truth about the model in hand: a checkpoint trained on the
synthetic scenes (``rnncap demo``'s) says so on the web page, in ``/api/model`` and in
``rnncap caption``'s stderr (once), with the way to a real-photo model; one trained on
photos says nothing of the kind.
"""
import subprocess
import sys

import numpy as np
import pytest

from rnncap.data import synth
from rnncap.data.vocab import Vocab


def test_every_word_the_grammar_writes_is_a_grammar_word():
    rng = np.random.default_rng(0)
    written = set()
    for i in range(300):
        scene = synth.sample_scene(synth.scene_rng(7, i))
        for caption in synth.describe(scene, rng):
            written |= set(synth.tokenize(caption))
    assert written <= synth.grammar_words(), written - synth.grammar_words()
    assert "dog" not in synth.grammar_words()


def test_what_a_checkpoint_learnt():
    scenes = Vocab.build(["a picture of two small red circles", "three big blue squares"])
    photos = Vocab.build(["a dog runs on the grass"])
    assert synth.trained_on_scenes({"data": {"synthetic": True}}, photos)  # the config decides
    assert not synth.trained_on_scenes({"data": {"synthetic": False}}, scenes)
    # checkpoints written before the field: their words tell
    assert synth.trained_on_scenes({"data": {"captions": "x.json"}}, scenes)
    assert not synth.trained_on_scenes({}, photos)
    assert not synth.trained_on_scenes({}, Vocab.build([]))  # no words at all: no claim
    line = synth.scenes_warning(36)
    assert "36 words" in line and "synthetic scenes" in line and "rnncap download flickr8k" in line


def test_demo_records_its_data_as_synthetic(tmp_path, monkeypatch):
    """rnncap demo's train step writes synthetic=True into the checkpoint's data config."""
    pytest.importorskip("h5py")
    from rnncap import demo
    from rnncap.checkpoint import load_checkpoint

    rng = np.random.default_rng(0)
    vocab = Vocab.build(["a red circle", "two blue squares"])
    caps = np.array([vocab.encode("a red circle", 16), vocab.encode("two blue squares", 16)], dtype=np.int64)
    split = {"features": rng.standard_normal((2, 8)).astype(np.float32), "captions": caps,
             "image_idx": np.array([0, 1]), "references": [["a red circle"], ["two blue squares"]],
             "scenes": [None, None]}
    data = {"splits": {"train": split}, "vocab": vocab, "encoder": {"name": "x"}, "pca": None}
    demo.train(data, tmp_path, epochs=1, hidden=8, wordvec=4, progress=False, log=lambda msg: None)
    ckpt = load_checkpoint(tmp_path / "model" / "best.npz")
    assert ckpt.configs["data"]["synthetic"] is True


@pytest.fixture(scope="module")
def photo_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint again, its data config saying it learnt photos."""
    from rnncap.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint["checkpoint"])
    configs = dict(ckpt.configs, data={**(ckpt.configs.get("data") or {}), "synthetic": False})
    path = tmp_path_factory.mktemp("photo_checkpoint") / "photos.npz"
    save_checkpoint(path, ckpt.model, ckpt.vocab, encoder=ckpt.encoder, pca=ckpt.pca, configs=configs,
                    history=ckpt.history)
    return path


def test_api_model_and_the_page_say_so(tiny_checkpoint, photo_checkpoint):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from rnncap.inference.sample import Captioner
    from rnncap.inference.serve import create_app, describe_checkpoint

    # tests/servekit.py's checkpoint records no `synthetic`: its words give it away
    info = describe_checkpoint(tiny_checkpoint["checkpoint"])
    assert info["trained_on"] == "synthetic scenes"
    assert f"{info['vocab_size']} words" in info["warning"]
    client = TestClient(create_app(Captioner.from_checkpoint(tiny_checkpoint["checkpoint"]), info=info))
    assert client.get("/api/model").json()["warning"] == info["warning"]
    page = client.get("/").text
    assert 'id="warning"' in page
    script = client.get("/static/app.js").text
    assert "m.warning" in script and '$("warning")' in script

    other = describe_checkpoint(photo_checkpoint)
    assert other["trained_on"] == "photos" and other["warning"] is None


def caption_stderr(checkpoint, photos):
    r = subprocess.run([sys.executable, "-m", "rnncap.cli", "caption", *map(str, photos),
                        "--checkpoint", str(checkpoint)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_rnncap_caption_says_it_once_on_stderr(tiny_checkpoint, photo_checkpoint):
    photos = tiny_checkpoint["photos"][:3]
    err = caption_stderr(tiny_checkpoint["checkpoint"], photos)
    notes = [line for line in err.splitlines() if line.startswith("rnncap caption: note:")]
    assert len(notes) == 1 and "synthetic scenes" in notes[0] and "Train on Flickr8k" in notes[0]
    assert "note:" not in caption_stderr(photo_checkpoint, photos)
