"""Bad input through the real commands: one clear line, no traceback, nothing corrupted."""
import json

import numpy as np
import pytest

pytest.importorskip("h5py")
pytest.importorskip("PIL")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rnncap.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from rnncap.cli import main  # noqa: E402
from rnncap.errors import CheckpointError  # noqa: E402
from rnncap.encoding.features import extract_features  # noqa: E402
from rnncap.models.model import CaptioningModel  # noqa: E402
from rnncap.data.vocab import Vocab  # noqa: E402
from test_features import TinyEncoder, _images  # noqa: E402

WORDS = "red green blue dog cat runs sits on grass a the".split()


def _dataset(folder, seed=0, words=WORDS):
    ids, paths = _images(folder / "images", 12, seed)
    rng = np.random.default_rng(seed)
    images = []
    for i, name in enumerate(ids):
        caps = [" ".join(rng.choice(words, size=int(rng.integers(3, 7)))) for _ in range(3)]
        images.append({"file": name, "split": "train" if i < 9 else "val", "captions": caps})
    data = folder / "captions.json"
    data.write_text(json.dumps({"name": "tiny", "image_dir": "images", "images": images}))
    return data, ids, [str(p) for p in paths]


@pytest.fixture()
def trained(tmp_path):
    data, ids, paths = _dataset(tmp_path)
    feats = tmp_path / "f.h5"
    extract_features({"train": (ids[:9], paths[:9]), "val": (ids[9:], paths[9:])}, TinyEncoder(), feats,
                     progress=False)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--features", str(feats), "--out", str(out), "--hidden", "8",
                 "--wordvec", "4", "--epochs", "2", "--batch-size", "8", "--quiet"]) == 0
    return tmp_path, data, feats, out


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def _other_features(tmp, encoder, pca_dim=None):
    ids = sorted(p.name for p in (tmp / "images").iterdir())
    paths = [str(tmp / "images" / i) for i in ids]
    other = tmp / f"other-{encoder.name}-{pca_dim}.h5"
    extract_features({"train": (ids[:9], paths[:9]), "val": (ids[9:], paths[9:])}, encoder, other,
                     progress=False, pca_dim=pca_dim)
    return other


def test_resume_with_features_of_another_encoder_is_refused(trained, capsys):
    tmp, data, feats, out = trained
    other = _other_features(tmp, TinyEncoder(tag="another-net"))
    before = (out / "last.npz").read_bytes()
    capsys.readouterr()
    code = main(["train", "--resume", str(out / "last.npz"), "--features", str(other), "--epochs", "3",
                 "--quiet"])
    _one_line_error(capsys, code, "another encoder", "another-net")
    assert (out / "last.npz").read_bytes() == before


def test_resume_uses_the_checkpoints_pca_not_the_caches(trained, capsys):
    """A cache with its own PCA does not change what a resumed model is fed."""
    tmp, data, feats, out = trained
    other = _other_features(tmp, TinyEncoder(), pca_dim=3)
    before = load_checkpoint(out / "last.npz").pca  # no PCA; the default standardisation
    assert main(["train", "--resume", str(out / "last.npz"), "--features", str(other), "--epochs", "3",
                 "--quiet"]) == 0
    after = load_checkpoint(out / "last.npz").pca
    assert (before is None) == (after is None)
    if after is not None:
        assert after.get("components") is None and set(after) == set(before)
        for k, v in after.items():
            assert v is None or np.array_equal(v, before[k]), k


def test_resume_with_another_vocabulary_is_refused(trained, capsys):
    tmp, data, feats, out = trained
    d = json.loads(data.read_text())
    for rec in d["images"]:
        rec["captions"] = [c.replace("dog", "horse") for c in rec["captions"]]
    changed = tmp / "changed.json"
    changed.write_text(json.dumps(d))
    capsys.readouterr()
    code = main(["train", "--resume", str(out / "last.npz"), "--data", str(changed), "--epochs", "3", "--quiet"])
    _one_line_error(capsys, code, "does not match", "last.npz")


def test_resume_extends_training(trained, capsys):
    tmp, data, feats, out = trained
    assert main(["train", "--resume", str(out / "last.npz"), "--epochs", "3", "--quiet"]) == 0
    ck = load_checkpoint(out / "last.npz")
    assert ck.train_state["epoch"] == 3
    assert len(ck.history["val_loss"]) == 3


def test_training_without_features_names_the_fix(tmp_path, capsys):
    data, _, _ = _dataset(tmp_path)
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--quiet"])
    _one_line_error(capsys, code, "--features", "rnncap features")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04garbage", b"not a checkpoint"])
def test_caption_with_a_broken_checkpoint(tmp_path, capsys, content):
    ck = tmp_path / "broken.npz"
    ck.write_bytes(content)
    code = main(["caption", str(tmp_path / "x.jpg"), "--checkpoint", str(ck)])
    _one_line_error(capsys, code, "broken.npz")


def test_features_with_an_unknown_encoder(tmp_path, capsys):
    data, _, _ = _dataset(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["features", "--data", str(data), "--out", str(tmp_path / "f.h5"), "--encoder", "resnet-9000"])
    assert e.value.code == 2
    assert "resnet-9000" in capsys.readouterr().err


def test_model_rejects_features_of_the_wrong_size():
    vocab = Vocab.build(["a b c"])
    m = CaptioningModel(len(vocab), 6, 4, 5, cell_type="lstm", seed=0)
    with pytest.raises(ValueError, match=r"features must be \(N, 6\)"):
        m.loss(np.zeros((2, 7), np.float32), np.ones((2, 4), np.int64))


# -- fuzzing the checkpoint reader ------------------------------------------------------

def _good_checkpoint(path):
    vocab = Vocab.build(["a red ball", "a blue cube"])
    save_checkpoint(path, CaptioningModel(len(vocab), 3, 4, 5, seed=0), vocab)
    return path.read_bytes()


def test_a_damaged_zip_version_is_one_line(tmp_path):
    """A flipped byte in the zip directory that asks for a zip version zipfile cannot
    read (found by the fuzz below: NotImplementedError) is a CheckpointError too."""
    import struct

    blob = bytearray(_good_checkpoint(tmp_path / "good.npz"))
    at = blob.index(b"PK\x01\x02")  # the first central-directory record
    blob[at + 6:at + 8] = struct.pack("<H", 64)  # "version needed to extract": 6.4
    p = tmp_path / "bad.npz"
    p.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"bad.npz: truncated or corrupt checkpoint \(NotImplementedError"):
        load_checkpoint(p)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_checkpoint_reader_fuzz(tmp_path, data):
    """Random bytes, and real checkpoints with random damage: either a clean load or a
    CheckpointError, never anything else."""
    good = tmp_path / "good.npz"
    raw = good.read_bytes() if good.exists() else _good_checkpoint(good)
    kind = data.draw(st.sampled_from(["random", "flip", "cut"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=2048))
    elif kind == "flip":
        blob = bytearray(raw)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    else:
        blob = raw[: data.draw(st.integers(0, len(raw) - 1))]
    p = tmp_path / "fuzz.npz"
    p.write_bytes(blob)
    try:
        ck = load_checkpoint(p)
    except CheckpointError as e:
        assert "fuzz.npz" in str(e)
    else:
        assert set(ck.model.params) == {"W_proj", "b_proj", "W_embed", "Wx", "Wh", "b", "W_vocab", "b_vocab"}
