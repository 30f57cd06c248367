"""Trainer, optimizers and checkpoints: exact resume, divergence, atomic and safe files."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rnncap.training import optim
from rnncap.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint
from rnncap.config import TrainConfig
from rnncap.errors import CheckpointError, TrainingDiverged
from rnncap.models.model import CaptioningModel
from rnncap.training.train import Trainer, with_params
from rnncap.data.vocab import Vocab


def toy_problem(seed=0, n_images=12, n_caps=30, V=20, D=8, T=6):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n_images, D)).astype(np.float32)
    caps = rng.integers(4, V, size=(n_caps, T + 1)).astype(np.int32)
    caps[:, 0] = 1
    caps[:, -1] = 2
    caps[::3, -2:] = 0  # some padding
    caps[::3, -3] = 2
    idx = rng.integers(0, n_images, size=n_caps)
    vocab = Vocab.from_words(["<NULL>", "<START>", "<END>", "<UNK>"] + [f"w{i}" for i in range(4, V)])
    return feats, caps, idx, vocab


def make_model(vocab, D=8, cell="lstm", dropout=0.3, seed=3):
    return CaptioningModel(len(vocab), D, 6, 10, cell_type=cell, seed=seed, dropout=dropout)


def make_trainer(model, data, vocab, out, cfg, val=None):
    def ckpt_fn(path, state, params=None):
        save_checkpoint(path, model if params is None else with_params(model, params), vocab,
                        train_state={k: v for k, v in state.items() if k != "history"},
                        history=state["history"], configs={"train": cfg.__dict__})
    return Trainer(model, data, cfg, val=val, out_dir=str(out), checkpoint_fn=ckpt_fn, progress=False,
                   log=lambda m: None)


def resume_trainer(path, data, out, cfg):
    ck = load_checkpoint(path)
    tr = make_trainer(ck.model, data, ck.vocab, out, cfg)
    state = dict(ck.train_state)
    state["history"] = ck.history
    tr.restore(state)
    return tr


@pytest.mark.parametrize("optimizer,ema", [("adam", 0.0), ("sgd", 0.0), ("adam", 0.8)])
def test_resume_is_bitwise_exact(tmp_path, optimizer, ema):
    """k steps, stop, resume, m more == k+m steps without a stop (dropout on, mid-epoch
    stop), the moving average of the weights too."""
    feats, caps, idx, vocab = toy_problem()
    data = (feats, caps, idx)
    k, total = 5, 11  # 30 captions / batch 8 -> 4 iterations per epoch: k stops mid-epoch 2
    base = dict(optimizer=optimizer, lr=1e-2, batch_size=8, epochs=4, seed=7, lr_decay=0.9, ema=ema)

    ref = make_model(vocab)
    t_ref = make_trainer(ref, data, vocab, tmp_path / "ref", TrainConfig(**base, max_iters=total))
    t_ref.fit()

    m1 = make_model(vocab)
    t1 = make_trainer(m1, data, vocab, tmp_path / "a", TrainConfig(**base, max_iters=k))
    t1.fit()
    assert t1.iteration == k
    t2 = resume_trainer(tmp_path / "a" / "last.npz", data, tmp_path / "a", TrainConfig(**base, max_iters=total))
    assert t2.iteration == k
    t2.fit()
    assert t2.iteration == total
    for name in ref.params:
        assert np.array_equal(ref.params[name], t2.model.params[name]), name
    assert t2.history["train_loss"] == t_ref.history["train_loss"]
    assert (t2.ema is None) == (t_ref.ema is None) == (ema == 0)
    for name in t_ref.ema or {}:
        assert np.array_equal(t_ref.ema[name], t2.ema[name]), name
        assert not np.array_equal(t_ref.ema[name], ref.params[name]), name


def test_the_moving_average_follows_the_weights_and_is_what_is_validated_and_kept(tmp_path):
    """With ema = d: the average is d * ema + (1 - d) * w after every update from the
    starting weights (the raw weights train as without it), val_fn and the val loss see
    the average while the model keeps its own weights afterwards, and best.npz and the
    epoch snapshots hold the average while last.npz holds the raw weights and the
    average."""
    feats, caps, idx, vocab = toy_problem()
    data = (feats, caps, idx)
    base = dict(lr=1e-2, batch_size=8, epochs=2, seed=7)

    plain = make_model(vocab)
    start = {k: v.copy() for k, v in plain.params.items()}
    steps = []
    t_plain = make_trainer(plain, data, vocab, tmp_path / "plain", TrainConfig(**base))
    step = t_plain.step
    # copies: the trainer's update writes over the model's arrays
    t_plain.step = lambda rows, lr: (step(rows, lr), steps.append({k: v.copy() for k, v in plain.params.items()}))[0]
    t_plain.fit()
    expected = dict(start)
    d = np.float32(0.7)
    for params in steps:
        expected = {k: d * expected[k] + np.float32(1 - 0.7) * params[k] for k in expected}

    model = make_model(vocab)
    seen = []

    def val_fn(m):
        seen.append({k: v.copy() for k, v in m.params.items()})
        return {"val_cider": -float(len(seen))}  # epoch 1 stays the best

    out = tmp_path / "ema"
    tr = make_trainer(model, data, vocab, out, TrainConfig(**base, ema=0.7, average=2),
                      val=(feats, caps, idx))
    tr.val_fn, tr.select_key, tr.select_mode, tr.keep_top = val_fn, "val_cider", "max", 2
    tr.fit()
    for k in plain.params:
        assert np.array_equal(model.params[k], plain.params[k]), k  # training is unchanged
        assert np.array_equal(tr.ema[k], expected[k]), k
        assert np.array_equal(seen[-1][k], expected[k]), k  # validated: the average
        assert not np.array_equal(tr.ema[k], model.params[k]), k
    best, last = load_checkpoint(out / "best.npz"), load_checkpoint(out / "last.npz")
    assert best.train_state["best"]["epoch"] == 1
    snapshot = load_checkpoint(out / "epoch-1.npz")
    for k in plain.params:
        assert np.array_equal(best.model.params[k], seen[0][k]), k  # the average at epoch 1
        assert np.array_equal(snapshot.model.params[k], seen[0][k]), k
        assert np.array_equal(last.model.params[k], model.params[k]), k
        assert np.array_equal(last.train_state["ema"][k], tr.ema[k]), k
    assert "ema" not in snapshot.train_state and "ema" not in best.train_state  # written once, as the weights


def test_a_moving_average_of_the_wrong_shape_is_one_line(tmp_path):
    feats, caps, idx, vocab = toy_problem()
    model = make_model(vocab)
    ema = {k: v.copy() for k, v in model.params.items()}
    save_checkpoint(tmp_path / "ok.npz", model, vocab, train_state={"ema": ema})
    loaded = load_checkpoint(tmp_path / "ok.npz").train_state["ema"]
    assert all(np.array_equal(loaded[k], ema[k]) for k in ema)
    name = sorted(ema)[0]
    save_checkpoint(tmp_path / "bad.npz", model, vocab, train_state={"ema": {**ema, name: ema[name][:1]}})
    with pytest.raises(CheckpointError, match=rf"bad.npz: entry 'ema/{name}' has shape"):
        load_checkpoint(tmp_path / "bad.npz")
    save_checkpoint(tmp_path / "part.npz", model, vocab, train_state={"ema": {name: ema[name]}})
    with pytest.raises(CheckpointError, match=r"part.npz: the moving average \(ema/...\) covers"):
        load_checkpoint(tmp_path / "part.npz")


def test_training_reduces_loss_and_writes_logs(tmp_path):
    feats, caps, idx, vocab = toy_problem()
    model = make_model(vocab, dropout=0.0)
    cfg = TrainConfig(lr=3e-2, lr_decay=0.95, batch_size=10, epochs=15, seed=0)
    tr = make_trainer(model, (feats, caps, idx), vocab, tmp_path, cfg, val=(feats, caps, idx))
    h = tr.fit()
    assert h["val_loss"][-1] < 0.7 * h["val_loss"][0]
    for f in ("last.npz", "best.npz", "log.csv", "val_log.csv"):
        assert (tmp_path / f).exists(), f
    ck = load_checkpoint(tmp_path / "best.npz")
    assert ck.train_state["best"]["val_loss"] == min(h["val_loss"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    feats, caps, idx, vocab = toy_problem()
    model = make_model(vocab, dropout=0.0)
    cfg = TrainConfig(lr=1e-2, batch_size=10, epochs=3, seed=0)
    tr = make_trainer(model, (feats, caps, idx), vocab, tmp_path, cfg)
    tr.cfg.epochs = 1
    tr.fit()
    good = (tmp_path / "last.npz").read_bytes()
    tr.cfg.epochs = 3
    model.params["W_vocab"][0, 0] = np.nan
    with pytest.raises(TrainingDiverged, match=r"iteration 4 \(epoch 2\)"):
        tr.fit()
    assert (tmp_path / "last.npz").read_bytes() == good
    load_checkpoint(tmp_path / "last.npz")


def test_clip_by_global_norm():
    g = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    c, norm = optim.clip_by_global_norm(g, 1.0)
    assert norm == pytest.approx(5.0)
    assert np.sqrt(sum((v ** 2).sum() for v in c.values())) == pytest.approx(1.0)
    assert g["a"][0] == 3.0  # inputs untouched
    c2, _ = optim.clip_by_global_norm(g, 10.0)
    assert np.array_equal(c2["a"], g["a"])


def test_adam_matches_reference_and_is_pure():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(5)
    w0 = w.copy()
    state = {}
    m = np.zeros(5)
    v = np.zeros(5)
    ref = w.copy()
    for t in range(1, 4):
        g = rng.standard_normal(5)
        g0 = g.copy()
        w, state = optim.adam(w, g, state, lr=0.1)
        assert np.array_equal(g, g0)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        mhat, vhat = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
        ref = ref - 0.1 * mhat / (np.sqrt(vhat) + 1e-8)
    assert np.allclose(w, ref, rtol=1e-6, atol=1e-9)
    assert not np.array_equal(w, w0)


@pytest.mark.parametrize("shape, layout", [((7, 5), "C"), ((300, 250), "C"), ((300, 250), "F"),
                                           ((300, 500), "strided")])
def test_adam_keeps_the_bits_of_its_plain_expression_and_its_inputs(shape, layout):
    # The rule writes into fresh arrays with out=, a cache-sized chunk at a time; it
    # must give exactly what the expressions give in float32, for a parameter smaller
    # than a chunk, one of several chunks and a part-chunk (75,000 numbers), and one
    # that is not C-contiguous; and leave w, dw and the state's arrays alone.
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32)
    w = {"C": w, "F": np.asfortranarray(w), "strided": w[:, ::2]}[layout]
    state, m, v, ref = {}, np.zeros_like(w), np.zeros_like(w), w.copy()
    f = np.float32
    for t in range(1, 5):
        g = rng.standard_normal(w.shape).astype(np.float32)
        kept = (w.copy(), g.copy(), {k: a.copy() for k, a in state.items() if hasattr(a, "shape")})
        w, new = optim.adam(w, g, state, lr=0.01)
        assert np.array_equal(kept[1], g) and all(np.array_equal(a, state[k]) for k, a in kept[2].items())
        assert not np.shares_memory(w, kept[0]) and w.dtype == np.float32
        state = new
        m = f(0.9) * m + f(0.1) * g
        v = f(0.999) * v + f(1.0 - 0.999) * (g * g)
        step = 0.01 * np.sqrt(1.0 - 0.999 ** t) / (1.0 - 0.9 ** t)
        ref = ref - f(step) * m / (np.sqrt(v) + f(1e-8))
        assert np.array_equal(w, ref) and np.array_equal(state["m"], m) and np.array_equal(state["v"], v)


@pytest.mark.parametrize("rule", ["adam", "sgd"])
def test_update_all_gives_the_same_bits_as_one_by_one(rule):
    rng = np.random.default_rng(2)
    shapes = {"big": (70, 60), "mid": (30, 50), "b": (60,)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    fn = optim.RULES[rule]
    one, one_states = dict(params), {k: {} for k in params}
    together, states = dict(params), {k: {} for k in params}
    for _ in range(3):
        for k in one:
            one[k], one_states[k] = fn(one[k], grads[k], one_states[k], lr=0.01)
        new, states = optim.update_all(fn, together, grads, states, 0.01)
        assert set(new) == set(params)
        together.update(new)
    for k in params:
        assert np.array_equal(together[k], one[k]), k
        for key, a in one_states[k].items():
            assert np.array_equal(states[k][key], a), (k, key)


def test_update_all_in_place_gives_the_same_bits_over_the_callers_own_arrays():
    """in_place: Adam's results go over the parameters and their m and v from the
    second step on (the first has no m and v yet); the numbers are the pure rule's.
    Arrays it may not write (read-only, not contiguous) get fresh ones instead."""
    rng = np.random.default_rng(3)
    shapes = {"big": (300, 250), "b": (60,), "frozen": (20, 30), "strided": (40, 60)}
    start = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(4)]
    pure, pure_states = {k: a.copy() for k, a in start.items()}, {k: {} for k in shapes}
    own, own_states = {k: a.copy() for k, a in start.items()}, {k: {} for k in shapes}
    own["strided"] = np.ascontiguousarray(own["strided"].T).T  # the same values, F order
    for step, g in enumerate(grads):
        own["frozen"].flags.writeable = False
        before = dict(own)
        new, own_states = optim.update_all(optim.adam, own, g, own_states, 0.01, in_place=True)
        for k in ("big", "b"):
            assert (new[k] is before[k]) == (step > 0), (k, step)
        assert not np.shares_memory(new["frozen"], before["frozen"])
        if step == 0:  # not C-contiguous: a fresh (C-order) array, written over later
            assert not np.shares_memory(new["strided"], before["strided"])
        own.update(new)
        pure_new, pure_states = optim.update_all(optim.adam, pure, g, pure_states, 0.01)
        pure.update(pure_new)
    for k in shapes:
        assert np.array_equal(own[k], pure[k]), k
        assert np.array_equal(own_states[k]["m"], pure_states[k]["m"]), k
        assert np.array_equal(own_states[k]["v"], pure_states[k]["v"]), k


# -- checkpoint files ------------------------------------------------------------------

def saved(tmp_path):
    feats, caps, idx, vocab = toy_problem()
    model = make_model(vocab)
    path = tmp_path / "c.npz"
    save_checkpoint(path, model, vocab, encoder={"name": "x"}, configs={"data": {"max_length": 5}})
    return path, model


def test_checkpoint_roundtrip(tmp_path):
    path, model = saved(tmp_path)
    ck = load_checkpoint(path)
    for k in model.params:
        assert np.array_equal(ck.model.params[k], model.params[k])
    assert ck.encoder == {"name": "x"}
    assert ck.model.config() == model.config()
    assert ck.meta["format_version"] == FORMAT_VERSION


def _rewrite(path, mutate):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["__meta__"].tobytes())
    mutate(arrays, meta)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def test_checkpoint_errors(tmp_path):
    path, _ = saved(tmp_path)
    raw = path.read_bytes()
    cases = {
        "missing.npz": None,
        "trunc.npz": raw[: len(raw) // 2],
        "text.npz": b"hello, not a checkpoint\n",
        "empty.npz": b"",
    }
    for name, content in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(p)

    newer = tmp_path / "newer.npz"
    newer.write_bytes(raw)
    _rewrite(newer, lambda a, m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match="upgrade rnncap"):
        load_checkpoint(newer)

    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(CheckpointError, match="not an rnncap checkpoint"):
        load_checkpoint(other)

    shape = tmp_path / "shape.npz"
    shape.write_bytes(raw)
    _rewrite(shape, lambda a, m: a.update({"param/Wx": np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match="'Wx' has shape"):
        load_checkpoint(shape)


def test_pickle_payload_is_refused_and_not_executed(tmp_path):
    path, _ = saved(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = np.empty(1, dtype=object)
    evil[0] = Evil()
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["param/W_proj"] = evil
    bad = tmp_path / "evil.npz"
    np.savez(bad, **arrays)  # np.savez pickles the object array
    with pytest.raises(CheckpointError, match="pickled"):
        load_checkpoint(bad)
    assert not marker.exists()

    # The same payload in the JSON header slot is refused too.
    arrays["__meta__"] = evil
    np.savez(bad, **arrays)
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    assert not marker.exists()


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    path, model = saved(tmp_path)
    before = path.read_bytes()
    feats, caps, idx, vocab = toy_problem()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, vocab)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt-")] == []


# -- SIGKILL mid-epoch and mid-save ----------------------------------------------------

KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_train import toy_problem, make_model, make_trainer
    from rnncap.config import TrainConfig
    import rnncap.checkpoint as C
    mode, out = sys.argv[1], sys.argv[2]
    feats, caps, idx, vocab = toy_problem()
    model = make_model(vocab)
    cfg = TrainConfig(lr=1e-2, batch_size=8, epochs=50, seed=1, checkpoint_every=3)
    tr = make_trainer(model, (feats, caps, idx), vocab, out, cfg)
    real_savez = np.savez
    saves = [0]
    def slow_savez(f, **arrays):
        saves[0] += 1
        if mode == "save" and saves[0] == 3:
            real_savez(f, **arrays)
            f.flush()
            print("IN-SAVE", flush=True)
            time.sleep(60)  # killed here: the temporary file is written, not renamed
        return real_savez(f, **arrays)
    C.np.savez = slow_savez
    real_step = tr.step
    def step(rows, lr):
        r = real_step(rows, lr)
        if mode == "epoch" and tr.iteration == 10:
            print("MID-EPOCH", flush=True)
            time.sleep(60)
        return r
    tr.step = step
    tr.fit()
""")


# 30 captions, batch 8: 4 updates an epoch. Saves happen every 3 updates and at each
# epoch end: after updates 3, 4, 6, 8, 9, ... "epoch" is killed after update 10 (last
# save: 9); "save" is killed inside its third save (update 6), so the last complete one
# is from update 4.
@pytest.mark.parametrize("mode,marker,expected", [("epoch", "MID-EPOCH", 9), ("save", "IN-SAVE", 4)])
def test_sigkill_keeps_a_loadable_checkpoint_and_resume_works(tmp_path, mode, marker, expected):
    out = tmp_path / "run"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(tests=os.path.dirname(__file__)))
    proc = subprocess.Popen([sys.executable, str(script), mode, str(out)], stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline()
        assert marker in line
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ck = load_checkpoint(out / "last.npz")
    it = ck.train_state["iteration"]
    assert it == expected
    feats, caps, idx, vocab = toy_problem()
    cfg = TrainConfig(lr=1e-2, batch_size=8, epochs=50, seed=1, checkpoint_every=3, max_iters=it + 4)
    tr = resume_trainer(out / "last.npz", (feats, caps, idx), out, cfg)
    tr.fit()
    assert tr.iteration == it + 4
    assert load_checkpoint(out / "last.npz").train_state["iteration"] == it + 4


# -- snapshots of the best epochs, per-step figures --------------------------------------

def scripted_trainer(tmp_path, scores, keep_top, epochs, **kw):
    """A Trainer whose val_fn reports ``scores[epoch - 1]`` as val_cider, kept on max."""
    feats, caps, idx, vocab = toy_problem()
    model = make_model(vocab, dropout=0.0)
    cfg = TrainConfig(lr=1e-2, batch_size=10, epochs=epochs, seed=0)
    tr = make_trainer(model, (feats, caps, idx), vocab, tmp_path, cfg)
    tr.val_fn = lambda m: {"val_cider": scores[tr.epoch - 1]}
    tr.select_key, tr.select_mode = "val_cider", "max"
    tr.keep_top = keep_top
    for k, v in kw.items():
        setattr(tr, k, v)
    return tr, model


def test_the_best_epochs_are_kept_as_snapshots_and_survive_resume(tmp_path):
    scores = [0.1, 0.5, 0.3, 0.4, 0.2, 0.6]
    tr, model = scripted_trainer(tmp_path, scores, keep_top=2, epochs=3)
    params_after = {}
    tr.log = lambda m: params_after.setdefault(tr.epoch, {k: v.copy() for k, v in model.params.items()})
    tr.fit()
    assert tr.top == [[2, 0.5], [3, 0.3]]
    assert sorted(p.name for p in tmp_path.glob("epoch-*.npz")) == ["epoch-2.npz", "epoch-3.npz"]
    snap = load_checkpoint(tmp_path / "epoch-2.npz")
    assert "optimizer" not in snap.train_state  # parameters only
    for k in model.params:
        assert np.array_equal(snap.model.params[k], params_after[2][k])

    # Resumed with more epochs: epoch 4 (0.4) pushes out epoch 3, epoch 6 pushes out 4.
    feats, caps, idx, vocab = toy_problem()
    tr2 = resume_trainer(tmp_path / "last.npz", (feats, caps, idx), tmp_path,
                         TrainConfig(lr=1e-2, batch_size=10, epochs=6, seed=0))
    assert tr2.top == [[2, 0.5], [3, 0.3]]
    tr2.val_fn = lambda m: {"val_cider": scores[tr2.epoch - 1]}
    tr2.select_key, tr2.select_mode, tr2.keep_top = "val_cider", "max", 2
    tr2.fit()
    assert tr2.top == [[6, 0.6], [2, 0.5]]
    assert sorted(p.name for p in tmp_path.glob("epoch-*.npz")) == ["epoch-2.npz", "epoch-6.npz"]
    assert load_checkpoint(tmp_path / "last.npz").train_state["top"] == [[6, 0.6], [2, 0.5]]
    assert tr2.best["epoch"] == 6


def test_step_stats_reach_the_history_and_the_log(tmp_path):
    calls = []
    tr, _ = scripted_trainer(tmp_path, [0.1, 0.2], keep_top=0, epochs=2,
                             step_stats=lambda: {"reward": float(len(calls.append(0) or calls))})
    h = tr.fit()
    assert h["train_reward"] == [float(i) for i in range(1, tr.iteration + 1)]
    header = (tmp_path / "log.csv").read_text().splitlines()[0]
    assert header == "iteration,epoch,train_loss,train_reward"
    val_header = (tmp_path / "val_log.csv").read_text().splitlines()[0]
    assert "train_reward" not in val_header and "val_cider" in val_header
    assert "epoch_seconds" in val_header and len(h["epoch_seconds"]) == 2
    assert all(s > 0 for s in h["epoch_seconds"])


@pytest.mark.parametrize("average_score,kept", [(0.9, True), (0.4, False)])
def test_the_average_of_the_best_epochs_is_kept_only_when_val_prefers_it(tmp_path, average_score, kept):
    from rnncap.training.train import average_top_epochs, with_params

    scores = [0.1, 0.5, 0.3]
    tr, model = scripted_trainer(tmp_path, scores, keep_top=2, epochs=3)
    tr.val_fn = lambda m: {"val_cider": scores[tr.epoch - 1] if m is model else average_score}
    feats, caps, idx, vocab = toy_problem()

    def ckpt_fn(path, state, params=None):
        save_checkpoint(path, model if params is None else with_params(model, params), vocab,
                        train_state={k: v for k, v in state.items() if k != "history"},
                        history=state["history"])

    tr.checkpoint_fn = ckpt_fn
    tr.fit()
    snaps = [load_checkpoint(tmp_path / f"epoch-{e}.npz").model.params for e in (2, 3)]
    before = {k: v.copy() for k, v in model.params.items()}
    assert average_top_epochs(tr, model, tr.val_fn, ckpt_fn) == average_score
    best = load_checkpoint(tmp_path / "best.npz")
    for k in model.params:
        assert np.array_equal(model.params[k], before[k])  # the model itself is untouched
        want = (snaps[0][k].astype(np.float64) + snaps[1][k]) / 2 if kept else snaps[0][k]
        np.testing.assert_allclose(best.model.params[k], want, rtol=1e-6, atol=1e-7)
    assert best.train_state["best"].get("averaged") == ([2, 3] if kept else None)
    assert load_checkpoint(tmp_path / "last.npz").train_state["best"] == best.train_state["best"]


# -- rnncap train's defaults: selection on val CIDEr-D, decoding defaults in the checkpoint --

from test_robustness import trained  # noqa: E402,F401  (a fixture: a tiny dataset and a default run)

def test_rnncap_train_keeps_the_best_val_cider_and_records_decoding_defaults(trained):
    """test_robustness's ``trained``: `rnncap train` with its defaults on a tiny dataset."""
    from rnncap.cli import main
    from rnncap.config import DecodeConfig

    tmp_path, data, feats, out = trained
    last, best = load_checkpoint(out / "last.npz"), load_checkpoint(out / "best.npz")
    cider, kept = last.history["val_cider"], best.train_state["best"]
    assert len(cider) == 2
    if kept.get("averaged"):  # the average of the two epochs, better on val than either
        assert kept["averaged"] == [1, 2] and kept["val_cider"] > max(cider)
    else:
        assert kept["val_cider"] == max(cider) and kept["epoch"] == 1 + int(np.argmax(cider))
    assert {k: best.configs["decode"][k] for k in ("beam_size", "length_norm", "rules", "block_trigrams")} \
        == {"beam_size": DecodeConfig().beam_size, "length_norm": DecodeConfig().length_norm,
            "rules": True, "block_trigrams": DecodeConfig().block_trigrams}
    assert best.configs["decode"]["bad_endings"]  # derived from the train captions
    assert best.configs["train"]["select"] == "cider" and best.configs["data"]["standardize"] is True

    out2 = tmp_path / "run2"
    assert main(["train", "--data", str(data), "--features", str(feats), "--out", str(out2), "--hidden", "8",
                 "--wordvec", "4", "--epochs", "1", "--batch-size", "8", "--beam", "5", "--length-norm", "0",
                 "--select", "loss", "--no-rules", "--no-block-trigrams", "--quiet"]) == 0
    ck = load_checkpoint(out2 / "best.npz")
    assert {k: ck.configs["decode"][k] for k in ("beam_size", "length_norm", "rules", "block_trigrams")} == \
        {"beam_size": 5, "length_norm": 0.0, "rules": False, "block_trigrams": False}
    assert "val_cider" not in ck.history and "val_loss" in ck.train_state["best"]

    # rnncap evaluate decodes with them unless told otherwise
    for extra, want in (([], (5, 0.0)), (["--beam", "2", "--length-norm", "0.5"], (2, 0.5))):
        ev = tmp_path / f"eval{len(extra)}"
        assert main(["evaluate", "--checkpoint", str(out2 / "best.npz"), "--data", str(data), "--features",
                     str(feats), "--out", str(ev), "--no-meteor", "--report-images", "0", "--json",
                     *extra]) == 0
        run = json.loads((ev / "metrics.json").read_text())["run"]
        assert (run["beam"], run["length_norm"]) == want


def test_captioner_uses_the_checkpoints_decoding_defaults(tmp_path):
    from rnncap.config import DecodeConfig, decode_config, to_dict
    from rnncap.inference.decoding import beam_decode, greedy_decode
    from rnncap.inference.sample import Captioner

    feats, caps, idx, vocab = toy_problem()
    model = make_model(vocab, dropout=0.0, seed=5)
    assert decode_config({}) == DecodeConfig(3, 0.0)  # checkpoints older than decoding defaults
    assert decode_config({"decode": to_dict(DecodeConfig(4, 0.7))}) == DecodeConfig(4, 0.7)
    cap = Captioner(model, vocab, None, max_length=6, decode=DecodeConfig(4, 0.7))
    assert cap.decoding() == (4, 0.7) and cap.decoding(1, None) == (1, 0.7)
    banned = vocab.never_generated
    rules = cap.rules  # the no-repeat rule: these checkpoints record no bad endings
    assert rules.no_repeat and not rules.bad_endings
    want = [vocab.decode(r) for r in beam_decode(model, feats, beam_size=4, max_length=6, length_norm=0.7,
                                                 banned=banned, rules=rules)]
    assert cap.caption_features(feats) == want
    assert cap.caption_features(feats, beam=1) == [vocab.decode(r) for r in greedy_decode(
        model, feats, max_length=6, banned=banned, rules=rules)]
    assert Captioner(model, vocab, None).decode == DecodeConfig(3, 0.0)


def test_warmup_scales_the_first_updates_linearly(tmp_path):
    """--warmup W: update i (counted from 1) runs at lr * i / W. Adam's first update is
    proportional to its rate, so with W = 4 the first update is a quarter of the
    update without warm-up (same batch, same dropout masks)."""
    feats, caps, idx, vocab = toy_problem()
    deltas = {}
    for w in (0, 4):
        m = CaptioningModel(len(vocab), feats.shape[1], 6, 10, cell_type="lstm", seed=3, dropout=0.3)
        start = {k: v.copy() for k, v in m.params.items()}
        cfg = TrainConfig(lr=1e-2, batch_size=8, epochs=1, seed=7, clip_norm=0.0, max_iters=1, warmup=w)
        make_trainer(m, (feats, caps, idx), vocab, tmp_path / f"w{w}", cfg).fit()
        deltas[w] = {k: m.params[k].astype(np.float64) - start[k] for k in start}
    for k in deltas[0]:
        np.testing.assert_allclose(deltas[4][k], deltas[0][k] / 4, rtol=1e-3, atol=1e-7, err_msg=k)
    assert any(np.abs(d).max() > 1e-4 for d in deltas[0].values())
