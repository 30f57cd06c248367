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


# ---- warnings and progress, as a log shows them -----------------------------------------

def test_a_warning_the_user_caused_is_one_line_of_rnncap(tmp_path):
    (tmp_path / "one.json").write_text('{"images": [{"file": "gone.jpg", "split": "train", '
                                       '"captions": ["a cat on a mat"]}]}')
    r = subprocess.run([sys.executable, "-m", "rnncap.cli", "features", "--data", "one.json",
                        "--out", "f.h5"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("rnncap features: warning: one.json: skipped 1 of 1 images"), r.stderr
    assert lines[1].startswith("rnncap features: error: one.json: no usable images")
    assert len(lines) == 2 and "UserWarning" not in r.stderr and ".py:" not in r.stderr


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_log_progress_writes_every_ten_percent_every_thirty_seconds_and_the_end():
    import io

    from rnncap.progress import LogProgress

    out, clock = io.StringIO(), Clock()
    bar = LogProgress(total=200, desc="train features", unit="img", file=out, clock=clock)
    for _ in range(200):
        clock.t += 0.01
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split("(")[1].split("%")[0] for line in lines] == [str(p) for p in range(10, 101, 10)]
    assert lines[0].startswith("train features: 20/200 img (10%)") and "\r" not in out.getvalue()

    out, clock = io.StringIO(), Clock()
    bar = LogProgress(total=None, desc="download", unit="B", file=out, clock=clock)
    for _ in range(5):
        clock.t += 20.0
        bar.update(1000)
    assert len(out.getvalue().splitlines()) == 2  # at 40 s and 80 s: one line per 30 s at most
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("download: 5000 B")

    out = io.StringIO()
    LogProgress(total=10, file=out).close()  # nothing done: nothing to say
    silent = LogProgress(total=10, file=out, enabled=False)
    silent.update(10)
    silent.close()
    assert out.getvalue() == ""


def test_progress_bar_is_tqdm_on_a_terminal_only():
    import io

    from rnncap.progress import LogProgress, progress_bar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert not isinstance(progress_bar(total=3, file=Tty()), LogProgress)
    assert isinstance(progress_bar(total=3, file=io.StringIO()), LogProgress)


def test_training_in_a_log_writes_short_lines_not_a_redrawn_bar(monkeypatch):
    import io

    from rnncap import CaptioningModel, Trainer
    from rnncap.config import TrainConfig

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    rng = np.random.default_rng(0)
    caps = rng.integers(4, 9, size=(40, 6))
    caps[:, 0] = 1
    model = CaptioningModel(10, 5, 4, 6, cell_type="lstm", seed=0)
    Trainer(model, (rng.standard_normal((40, 5)), caps, np.arange(40)), TrainConfig(batch_size=4, epochs=1),
            progress=True, log=lambda msg: None).fit()
    text = log.getvalue()
    assert "\r" not in text and "epoch 1/1: " in text
    assert 1 <= len(text.splitlines()) <= 11
