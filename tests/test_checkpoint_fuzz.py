"""The checkpoint reader fuzzed at the level of zip members.

A real checkpoint (parameters, optimizer state, PCA, JSON header) has members replaced,
inserted, removed or cut short: random bytes, a zip inside the zip, bare pickles and
pickled object arrays (whose payload would write a file if it ever ran), strings,
complex numbers and records, forged .npy headers, a 2-D ``__meta__``. Every outcome
must be a clean load or one ``CheckpointError`` line naming the file; an entry that is
not a valid array is named too.
"""
from __future__ import annotations

import io
import pickle
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnncap.checkpoint import load_checkpoint, save_checkpoint
from rnncap.cli import main
from rnncap.errors import CheckpointError
from rnncap.models.model import CaptioningModel
from rnncap.data.vocab import Vocab


class _Payload:
    """Unpickling this runs exec(), which writes the file ``path``: proof it ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def _npy(array):
    f = io.BytesIO()
    np.lib.format.write_array(f, array, allow_pickle=True)
    return f.getvalue()


def _zip(members, compression=zipfile.ZIP_STORED):
    f = io.BytesIO()
    with zipfile.ZipFile(f, "w", compression) as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are part of the fuzz
        for name, blob in members:
            z.writestr(name, blob)
    return f.getvalue()


def _good_members(tmp_path):
    vocab = Vocab.build(["a red ball", "a blue cube"])
    model = CaptioningModel(len(vocab), 3, 4, 5, seed=0)
    opt = {name: {"m": np.zeros_like(p), "v": np.ones_like(p), "t": 3} for name, p in model.params.items()}
    pca = {"mean": np.zeros(3, np.float32), "components": np.eye(3, dtype=np.float32)}
    path = tmp_path / "good.npz"
    save_checkpoint(path, model, vocab, pca=pca, train_state={"optimizer": opt, "epoch": 1})
    with zipfile.ZipFile(path) as z:
        return [(n, z.read(n)) for n in z.namelist()]


def _payloads(canary):
    """Strategies for what a member holds."""
    inner = _zip([("param/Wx.npy", _npy(np.zeros((4, 5), np.float32)))])
    header = b"\x93NUMPY\x01\x00"
    forged = [  # .npy headers that lie or ask for too much
        header + b"v\x00{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }" + b" " * 42 + b"\n",
        header + b"v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (-4, 5), }" + b" " * 50 + b"\n",
        header + b"v\x00{'descr': 'not a dtype', 'fortran_order': False, 'shape': (4,), }" + b" " * 40 + b"\n",
        b"\x93NUMPY\x03\x00" + _npy(np.zeros(3))[8:],
    ]
    weird = [np.array(["a", "b"]), np.zeros((4, 5), np.complex64), np.zeros((4, 5), dtype=[("a", "<f4")]),
             np.zeros(3, "datetime64[s]"), np.zeros((2, 2), np.uint8), np.zeros((4, 5), np.float16),
             np.zeros((4, 5), np.int64), np.zeros((4, 5), bool), np.zeros(0, np.float32)]
    return st.one_of(
        st.binary(max_size=300),
        st.just(inner),
        st.just(pickle.dumps(_Payload(canary))),
        st.just(_npy(np.array([_Payload(canary)], dtype=object))),
        st.sampled_from(forged),
        st.sampled_from([_npy(a) for a in weird]),
        st.builds(lambda n, s: _npy(np.random.default_rng(s).standard_normal(n).astype(np.float32)),
                  st.integers(0, 30), st.integers(0, 9)),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_checkpoint_members_fuzz(tmp_path, data):
    members = _good_members(tmp_path)
    canary = tmp_path / "payload-ran"
    names = [n for n, _ in members]
    for _ in range(data.draw(st.integers(1, 3))):
        action = data.draw(st.sampled_from(["replace", "insert", "remove", "truncate"]))
        i = data.draw(st.integers(0, len(members) - 1))
        if action == "replace":
            members[i] = (members[i][0], data.draw(_payloads(canary)))
        elif action == "insert":
            name = data.draw(st.sampled_from(names + ["junk", "opt/x.npy", "opt/Wx.npy", "param/extra.npy",
                                                      "pca/scale.npy", "nested.zip", "param/"]))
            members.insert(i, (name, data.draw(_payloads(canary))))
        elif action == "remove" and len(members) > 1:
            members.pop(i)
        elif action == "truncate":
            blob = members[i][1]
            members[i] = (members[i][0], blob[:data.draw(st.integers(0, max(len(blob) - 1, 0)))])
    compression = data.draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    path = tmp_path / "fuzz.npz"
    path.write_bytes(_zip(members, compression))
    try:
        ck = load_checkpoint(path)
    except CheckpointError as e:
        message = str(e)
        assert "fuzz.npz" in message
        assert "\n" not in message
    else:
        assert set(ck.model.params) == {"W_proj", "b_proj", "W_embed", "Wx", "Wh", "b", "W_vocab", "b_vocab"}
        for name, p in ck.model.params.items():
            assert isinstance(p, np.ndarray) and p.dtype == ck.model.dtype, name
    assert not canary.exists(), "a pickle payload ran"


def _damaged(tmp_path, name, blob):
    members = [(n, blob if n == name else b) for n, b in _good_members(tmp_path)]
    path = tmp_path / "ckpt.npz"
    path.write_bytes(_zip(members))
    return path


@pytest.mark.parametrize("what, blob, expect", [
    ("raw bytes", b"\x00\x01 not an array", "no .npy header"),
    ("a zip in the zip", _zip([("x.npy", _npy(np.zeros(3)))]), "a zip archive"),
    ("a bare pickle", pickle.dumps({"a": 1}), "pickled data"),
    ("a pickled object array", _npy(np.array([{"a": 1}], dtype=object)), "pickled objects"),
    ("strings", _npy(np.full((4, 5), "x")), "not numbers"),
    ("cut short", _npy(np.zeros((4, 5), np.float32))[:-7], "truncated"),
])
def test_each_malformed_entry_is_one_line_naming_the_file_and_entry(tmp_path, capsys, what, blob, expect):
    path = _damaged(tmp_path, "param/Wx.npy", blob)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(f"{path}: entry 'param/Wx.npy'"), str(e.value)
    assert expect in str(e.value)
    # The command line prints it as one line, no traceback.
    code = main(["caption", str(tmp_path / "x.jpg"), "--checkpoint", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "ckpt.npz: entry 'param/Wx.npy'" in err


def test_a_pickle_payload_never_runs(tmp_path):
    canary = tmp_path / "payload-ran"
    for blob in (pickle.dumps(_Payload(canary)), _npy(np.array([_Payload(canary)], dtype=object))):
        with pytest.raises(CheckpointError, match="entry 'opt/Wx/m.npy'"):
            load_checkpoint(_damaged(tmp_path, "opt/Wx/m.npy", blob))
    assert not canary.exists()
    pickle.loads(pickle.dumps(_Payload(canary)))  # the payload is live: it does run when unpickled
    assert canary.exists()


def test_meta_that_is_not_a_1d_byte_array(tmp_path):
    with pytest.raises(CheckpointError, match=r"entry '__meta__.npy' is not the JSON header .* shape \(2, 3\)"):
        load_checkpoint(_damaged(tmp_path, "__meta__.npy", _npy(np.zeros((2, 3), np.uint8))))


def test_an_opt_entry_without_a_key_is_refused(tmp_path):
    members = _good_members(tmp_path) + [("opt/Wx.npy", _npy(np.zeros((4, 5), np.float32)))]
    path = tmp_path / "ckpt.npz"
    path.write_bytes(_zip(members))
    with pytest.raises(CheckpointError, match="entry 'opt/Wx.npy' is not named opt/<parameter>/<key>"):
        load_checkpoint(path)


def test_a_good_checkpoint_still_loads_with_all_its_arrays(tmp_path):
    path = tmp_path / "ckpt.npz"
    path.write_bytes(_zip(_good_members(tmp_path), zipfile.ZIP_DEFLATED))  # compressed is fine too
    ck = load_checkpoint(path)
    assert ck.train_state["optimizer"]["Wx"]["t"] == 3
    np.testing.assert_array_equal(ck.train_state["optimizer"]["Wx"]["v"], np.ones((4, 5)))
    np.testing.assert_array_equal(ck.pca["components"], np.eye(3))
    assert ck.train_state["epoch"] == 1


@pytest.mark.parametrize("field, value", [("optimizer_scalars", [1, 2]), ("train_state", [3]),
                                          ("model_rng", {"bit_generator": "nope"}), ("configs", "x"),
                                          ("history", 5), ("encoder", [1])])
def test_a_header_field_of_the_wrong_type_is_one_line(tmp_path, field, value):
    """Hand-edited JSON header fields: CheckpointError naming the file, never a traceback."""
    import json

    from rnncap.checkpoint import load_checkpoint, save_checkpoint
    from rnncap.errors import CheckpointError
    from rnncap.models.model import CaptioningModel
    from rnncap.data.vocab import Vocab

    vocab = Vocab.build(["a dog runs"])
    good = tmp_path / "good.npz"
    save_checkpoint(good, CaptioningModel(len(vocab), 4, 3, 5, seed=0), vocab)
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == "__meta__.npy":
                meta = json.loads(np.load(io.BytesIO(data)).tobytes().decode())
                meta[field] = value
                buf = io.BytesIO()
                np.save(buf, np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
                data = buf.getvalue()
            zout.writestr(item, data)
    with pytest.raises(CheckpointError, match=r"bad\.npz: damaged checkpoint header"):
        load_checkpoint(bad)
