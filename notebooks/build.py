"""Write the notebooks in this folder from the cells below: the one place they are edited.

    python notebooks/build.py          # rewrite notebooks/*.ipynb
    python notebooks/build.py --check  # exit 1 if a committed notebook differs from this

The notebooks are written without outputs (they are never committed with any) and with
fixed cell ids, so rebuilding an unchanged notebook changes nothing. tests/test_notebooks.py
executes every notebooks/*.ipynb and checks that each equals what this script writes.

Every notebook follows the same rules: imports at the top, then the settings (one
variable makes a run bigger), no state hidden between cells, plots with matplotlib,
and at most 2 minutes top to bottom on 2 cores with the default settings.
"""
import argparse
import pathlib
import sys

import nbformat

HERE = pathlib.Path(__file__).resolve().parent


def md(text):
    return ("markdown", text)


def code(text):
    return ("code", text)


# ---- 01: the layers -------------------------------------------------------------------

LAYERS = [
    md("""# 01 · The recurrent layers, forward and backward

rnncap's captioners are built from small layers, each a pair in the CS231n style:
`x_forward(...) -> (out, cache)` and `x_backward(dout, cache) -> grads`. This notebook
runs the vanilla RNN and the LSTM, one step and a whole sequence, and checks every
backward pass against numerical gradients. Then it redoes the homework notes' worked
example (with the notes' two slips corrected) and shows why the LSTM exists: the
gradient that flows back through time.

Shapes: N sequences, T time steps, D input features, H hidden units. Arrays are batch
first and row-major (`x @ W`)."""),
    code("""import numpy as np
import matplotlib.pyplot as plt

from rnncap.models.layers import (lstm_backward, lstm_forward, lstm_step_backward, lstm_step_forward,
                                  rnn_backward, rnn_forward, rnn_step_backward, rnn_step_forward,
                                  temporal_affine_forward)

SEED = 0      # every random array below is drawn from a generator seeded with this
T_LONG = 60   # time steps in the vanishing-gradient plot (a bigger setting: 200)"""),
    md("""## Numerical gradients

A backward pass is right when it agrees with centred differences,
`(f(x + h) - f(x - h)) / 2h`, of a scalar built from the layer's output: the sum of
the output times a fixed random upstream gradient `dout`. The error measure is
`||a - b|| / (||a|| + ||b||)`; in float64, a correct backward pass gives about 1e-10."""),
    code("""def numeric_gradient(f, x, h=1e-5):
    \"\"\"d f() / d x by centred differences; f reads x, which is nudged and restored.\"\"\"
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        plus = f()
        x[i] = old - h
        minus = f()
        x[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad


def rel_error(a, b):
    return np.linalg.norm(a - b) / max(1e-8, np.linalg.norm(a) + np.linalg.norm(b))


def check(named_pairs, f):
    \"\"\"Compare each analytic gradient with the numerical one of f.\"\"\"
    for name, x, analytic in named_pairs:
        err = rel_error(analytic, numeric_gradient(f, x))
        print(f"{name:>7}: relative error {err:.1e}")
        assert err < 1e-7, f"{name}: the backward pass disagrees with the numerical gradient\""""),
    md("""## The RNN step

`next_h = tanh(x @ Wx + prev_h @ Wh + b)`, with x (N, D), prev_h (N, H), Wx (D, H),
Wh (H, H), b (H,)."""),
    code("""rng = np.random.default_rng(SEED)
N, D, H = 3, 5, 4
x, prev_h = rng.standard_normal((N, D)), rng.standard_normal((N, H))
Wx, Wh, b = rng.standard_normal((D, H)) * 0.5, rng.standard_normal((H, H)) * 0.5, rng.standard_normal(H)

next_h, cache = rnn_step_forward(x, prev_h, Wx, Wh, b)
dnext_h = rng.standard_normal(next_h.shape)
dx, dprev_h, dWx, dWh, db = rnn_step_backward(dnext_h, cache)
print("next_h", next_h.shape)
check([("x", x, dx), ("prev_h", prev_h, dprev_h), ("Wx", Wx, dWx), ("Wh", Wh, dWh), ("b", b, db)],
      lambda: np.sum(rnn_step_forward(x, prev_h, Wx, Wh, b)[0] * dnext_h))"""),
    md("""## The RNN over a sequence

`rnn_forward` runs the step over T time steps from h0 and keeps every hidden state:
x (N, T, D) gives h (N, T, H). Its backward pass walks back in time, adding the
gradient that arrives from the loss at step t to the one carried from step t + 1."""),
    code("""rng = np.random.default_rng(SEED)
N, T, D, H = 2, 6, 4, 5
x, h0 = rng.standard_normal((N, T, D)), rng.standard_normal((N, H))
Wx, Wh, b = rng.standard_normal((D, H)) * 0.5, rng.standard_normal((H, H)) * 0.5, rng.standard_normal(H)

h, cache = rnn_forward(x, h0, Wx, Wh, b)
dh = rng.standard_normal(h.shape)
dx, dh0, dWx, dWh, db = rnn_backward(dh, cache)
print("h", h.shape)
check([("x", x, dx), ("h0", h0, dh0), ("Wx", Wx, dWx), ("Wh", Wh, dWh), ("b", b, db)],
      lambda: np.sum(rnn_forward(x, h0, Wx, Wh, b)[0] * dh))"""),
    md("""## The LSTM step

`a = x @ Wx + prev_h @ Wh + b` (N, 4H) splits into the gates i, f, o (sigmoid) and g
(tanh); `next_c = f * prev_c + i * g` and `next_h = o * tanh(next_c)`. Both outputs
reach the loss, so the check sums both against their upstream gradients."""),
    code("""rng = np.random.default_rng(SEED)
N, D, H = 3, 5, 4
x, prev_h, prev_c = rng.standard_normal((N, D)), rng.standard_normal((N, H)), rng.standard_normal((N, H))
Wx, Wh, b = rng.standard_normal((D, 4 * H)) * 0.5, rng.standard_normal((H, 4 * H)) * 0.5, rng.standard_normal(4 * H)

next_h, next_c, cache = lstm_step_forward(x, prev_h, prev_c, Wx, Wh, b)
dnext_h, dnext_c = rng.standard_normal(next_h.shape), rng.standard_normal(next_c.shape)
dx, dprev_h, dprev_c, dWx, dWh, db = lstm_step_backward(dnext_h, dnext_c, cache)


def lstm_step_loss():
    h, c, _ = lstm_step_forward(x, prev_h, prev_c, Wx, Wh, b)
    return np.sum(h * dnext_h) + np.sum(c * dnext_c)


check([("x", x, dx), ("prev_h", prev_h, dprev_h), ("prev_c", prev_c, dprev_c), ("Wx", Wx, dWx),
       ("Wh", Wh, dWh), ("b", b, db)], lstm_step_loss)"""),
    md("""## The LSTM over a sequence

`lstm_forward` starts from h0 and c0 = 0 and returns every hidden state h (N, T, H)."""),
    code("""rng = np.random.default_rng(SEED)
N, T, D, H = 2, 6, 4, 5
x, h0 = rng.standard_normal((N, T, D)), rng.standard_normal((N, H))
Wx, Wh, b = rng.standard_normal((D, 4 * H)) * 0.5, rng.standard_normal((H, 4 * H)) * 0.5, rng.standard_normal(4 * H)

h, cache = lstm_forward(x, h0, Wx, Wh, b)
dh = rng.standard_normal(h.shape)
dx, dh0, dWx, dWh, db = lstm_backward(dh, cache)
print("h", h.shape)
check([("x", x, dx), ("h0", h0, dh0), ("Wx", Wx, dWx), ("Wh", Wh, dWh), ("b", b, db)],
      lambda: np.sum(lstm_forward(x, h0, Wx, Wh, b)[0] * dh))"""),
    md("""## The worked example of the notes, corrected

The homework notes run a vanilla RNN by hand for T = 2 steps: scalar inputs x = [1, 2],
hidden size 2, `W_hx = [0.5, -0.3]^T`, `W_hh = [[0.1, 0.2], [0.4, 0.5]]`,
`W_hy = [0.6, 0.4]`, zero biases and h0 = 0. The notes use columns (`W h`); rnncap uses
rows (`h @ W`), so the matrices go in transposed.

The notes make two slips ([docs/worked-example.md](../docs/worked-example.md) has the
arithmetic): they write **y_1 = 0.277**, which is only the first term of
`0.6 * 0.462 + 0.4 * (-0.291)`, and **h_2 = (0.744, -0.545)**, an arithmetic slip in
the second step. The right values follow."""),
    code("""W_hx = np.array([[0.5], [-0.3]])
W_hh = np.array([[0.1, 0.2], [0.4, 0.5]])
W_hy = np.array([[0.6, 0.4]])

x = np.array([1.0, 2.0]).reshape(1, 2, 1)                     # N=1, T=2, D=1
h, _ = rnn_forward(x, np.zeros((1, 2)), W_hx.T, W_hh.T, np.zeros(2))
y, _ = temporal_affine_forward(h, W_hy.T, np.zeros(1))

notes = {"y_1": 0.277, "h_2": (0.744, -0.545)}
print("h_1 =", h[0, 0].round(5), "  y_1 =", y[0, 0, 0].round(5), f"  (the notes: {notes['y_1']})")
print("h_2 =", h[0, 1].round(5), "  y_2 =", y[0, 1, 0].round(5), f"  (the notes' h_2: {notes['h_2']})")
assert np.allclose(y[0, :, 0], [0.160745, 0.25046], atol=1e-5)
assert np.allclose(h[0, 1], [0.75649, -0.50858], atol=1e-5)

# Forgetting the transpose of W_hh goes unseen at step 1 (h0 = 0) but not at step 2:
h_wrong, _ = rnn_forward(x, np.zeros((1, 2)), W_hx.T, W_hh, np.zeros(2))
print("h_2 with W_hh not transposed:", h_wrong[0, 1].round(3))"""),
    md("""## The vanishing gradient, seen

Take a loss that reads only the **last** hidden state, and ask how much each input
x_t, earlier and earlier, moves it: the norm of dL/dx_t. In a tanh RNN the gradient
passes through `Wh` and the tanh's slope at every step back, and with weights of a
usual size it shrinks geometrically. The LSTM's cell state is carried forward by the
forget gate alone (`c_t = f * c_{t-1} + ...`), so with f near 1 the gradient crosses
many steps. Both layers here get the same kind of random weights (scaled by
1/sqrt(fan-in)); the LSTM's forget-gate bias starts at 1, as is usual."""),
    code("""rng = np.random.default_rng(SEED)
N, D, H = 8, 16, 32
x = rng.standard_normal((N, T_LONG, D))
h0 = np.zeros((N, H))
dh = np.zeros((N, T_LONG, H))
dh[:, -1] = rng.standard_normal((N, H))          # the loss reads the last step only


def weights(k):
    return (rng.standard_normal((D, k * H)) / np.sqrt(D), rng.standard_normal((H, k * H)) / np.sqrt(H))


Wx, Wh = weights(1)
_, cache = rnn_forward(x, h0, Wx, Wh, np.zeros(H))
rnn_norms = np.linalg.norm(rnn_backward(dh, cache)[0], axis=(0, 2))

Wx, Wh = weights(4)
b = np.zeros(4 * H)
b[H:2 * H] = 1.0                                  # the forget gate's bias (gates i, f, o, g)
_, cache = lstm_forward(x, h0, Wx, Wh, b)
lstm_norms = np.linalg.norm(lstm_backward(dh, cache)[0], axis=(0, 2))

steps_back = np.arange(T_LONG)[::-1]             # 0 = the last step
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.semilogy(steps_back, rnn_norms, label="vanilla RNN")
ax.semilogy(steps_back, lstm_norms, label="LSTM")
ax.set_xlabel("steps back from the loss")
ax.set_ylabel("||dL / dx_t||")
ax.set_title("Gradient flowing back through time")
ax.legend()
plt.show()
for k in (1, 10, 30):
    if k < T_LONG:
        print(f"{k:>2} steps back: RNN {rnn_norms[-1 - k]:.1e}, LSTM {lstm_norms[-1 - k]:.1e}")"""),
    md("""The RNN's curve falls in a straight line on the log scale: a constant factor lost
per step. The LSTM keeps orders of magnitude more gradient for its early inputs, which
is why captioners, whose first word depends on the image given at step 0, use it."""),
]


# ---- 02: the captioning model -----------------------------------------------------------

CAPTIONING = [
    md("""# 02 · The captioning model

A captioner turns an image into a feature vector with a pretrained CNN, projects it
into the LSTM's initial hidden state, and writes the caption word by word from
`<START>`. Here it learns the synthetic scenes of `rnncap demo`: coloured shapes whose
captions come from a small grammar, so every caption can be judged right or wrong.

1. Draw the scenes and encode them with the CNN (EfficientNet-Lite0).
2. Overfit 50 captions: the loss must go to almost zero, and sampling gives them back.
3. Train on all the training scenes, then compare greedy decoding and beam search on
   scenes the model has never seen.

Shapes: N images, D features, T words, V vocabulary, W word vectors, H hidden units."""),
    code("""import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from rnncap import (CaptioningModel, Trainer, Vocab, beam_search, extract_features, get_encoder,
                    greedy_decode, load_dataset, load_features)
from rnncap.config import TrainConfig
from rnncap.data import synth
from rnncap.data.datasets import encode_split
from rnncap.training.optim import adam

SCENES = 300     # synthetic scenes (80% train, 10% val); a bigger setting: 2000
EPOCHS = 15      # passes over the training captions in step 3
SEED = 0
OUT = Path(os.environ.get("RNNCAP_NOTEBOOK_OUT", "../runs/notebooks")) / "02"
MAX_WORDS = 16   # T, words per caption: the grammar's longest has 14"""),
    md("""## 1. Scenes, features, vocabulary

Each scene gets five reference captions. The encoder pools its feature map over the
left and the right half of the image separately (`pooling="halves"`), so that the
model can tell which shape is on which side; a PCA fitted on the train features
brings the 2 × 1280 numbers down to 128."""),
    code("""captions_json = synth.write_dataset(OUT / f"scenes-{SCENES}", SCENES, seed=SEED)
dataset = load_dataset(captions_json, missing="error")
encoder = get_encoder(pooling="halves")
cache = OUT / f"features-{SCENES}.h5"
extract_features({name: (s.image_ids, s.image_paths) for name, s in dataset.splits.items()},
                 encoder, cache, progress=False, pca_dim=128)
features = {name: load_features(cache, name)[0] for name in dataset.splits}          # (n, 128) each

vocab = Vocab.build([c for refs in dataset["train"].references for c in refs])
captions, image_idx, _ = encode_split(dataset["train"], vocab, MAX_WORDS)              # (M, T + 2), (M,)
scenes = synth.load_scenes(captions_json)
print(f"{len(vocab)} words; train: {len(features['train'])} scenes, {len(captions)} captions; "
      f"val: {len(features['val'])} scenes")
print("a caption as ids:", captions[0], "->", repr(vocab.decode(captions[0])))"""),
    md("""## 2. Overfit 50 captions

One caption for each of 50 scenes, and nothing else: a model that cannot learn these
by heart has a bug. `model.loss(features, captions)` returns the loss and a gradient
for every entry of `model.params`; Adam updates them."""),
    code("""first = np.unique(image_idx, return_index=True)[1][:50]      # the first caption of 50 scenes
small_caps, small_feats = captions[first], features["train"][image_idx[first]]

model = CaptioningModel(len(vocab), small_feats.shape[1], wordvec_dim=64, hidden_dim=128, cell_type="lstm",
                        null_id=vocab.null_id, start_id=vocab.start_id, end_id=vocab.end_id,
                        dtype=np.float64, seed=SEED)
state = {k: {} for k in model.params}
losses = []
for step in range(150):
    loss, grads = model.loss(small_feats, small_caps)
    for k in model.params:
        model.params[k], state[k] = adam(model.params[k], grads[k], state[k], lr=1e-2)
    losses.append(loss)

fig, ax = plt.subplots(figsize=(6, 3))
ax.semilogy(losses)
ax.set_xlabel("update")
ax.set_ylabel("loss (sum over words, mean over captions)")
ax.set_title("Overfitting 50 captions")
plt.show()
print(f"loss {losses[0]:.2f} -> {losses[-1]:.3f}")
assert losses[-1] < 0.05 * losses[0]"""),
    md("""Sampling them back: greedy decoding (the most likely word at each step) feeds each
chosen word into the next step, exactly as during training but with the model's own
words instead of the reference's."""),
    code("""sampled = [vocab.decode(row) for row in greedy_decode(model, small_feats, max_length=MAX_WORDS + 1)]
truth = [vocab.decode(row) for row in small_caps]
same = sum(s == t for s, t in zip(sampled, truth))
print(f"{same} of 50 captions come back word for word")
for s, t in list(zip(sampled, truth))[:5]:
    print(f"  sampled: {s:45}  trained on: {t}")"""),
    md("""## 3. All the training scenes; greedy against beam search

Now a model learns from every training caption, with the product's `Trainer`
(minibatches, Adam, learning-rate decay, weight decay). The validation scenes are
unseen. A caption is judged right when the grammar's parser reads back exactly the
scene's objects (count, size, colour, shape, and which is left)."""),
    code("""model = CaptioningModel(len(vocab), features["train"].shape[1], wordvec_dim=64, hidden_dim=128,
                        cell_type="lstm", null_id=vocab.null_id, start_id=vocab.start_id,
                        end_id=vocab.end_id, seed=SEED)
cfg = TrainConfig(lr=5e-3, lr_decay=0.9, batch_size=32, epochs=EPOCHS, weight_decay=1e-3, seed=SEED)
history = Trainer(model, (features["train"], captions, image_idx), cfg, progress=False,
                  log=lambda msg: None).fit()

val_scenes = [scenes[os.path.basename(p)] for p in dataset["val"].image_paths]
greedy = [vocab.decode(r) for r in greedy_decode(model, features["val"], max_length=MAX_WORDS + 1)]
beam = [vocab.decode(hyps[0].ids) for hyps in
        beam_search(model, features["val"], beam_size=3, max_length=MAX_WORDS + 1)]
for name, caps in (("greedy", greedy), ("beam 3", beam)):
    accuracy, errors = synth.semantic_accuracy(caps, val_scenes)
    print(f"{name}: {accuracy:.0%} of {len(caps)} unseen scenes described exactly; "
          f"commonest errors: {dict(errors.most_common(3))}")"""),
    code("""fig, axes = plt.subplots(1, 4, figsize=(12, 3.6))
for ax, i in zip(axes, range(4)):
    ax.imshow(Image.open(dataset["val"].image_paths[i]))
    ax.set_title(f"greedy: {greedy[i]}\\nbeam: {beam[i]}", fontsize=8)
    ax.axis("off")
plt.tight_layout()
plt.show()"""),
    md("""Beam search keeps the 3 best partial captions at every step instead of one, so it
can recover from a first word that looked best but led nowhere. On these short,
regular captions the two mostly agree; on real photos (notebook 03 and
[docs/results.md](../docs/results.md)) beam search scores higher."""),
]


# ---- 03: real photos ----------------------------------------------------------------------

REAL = [
    md("""# 03 · Real photos: Flickr8k

The same pipeline on photographs: Flickr8k features from EfficientNet-Lite0's last
block (a 7 × 7 map of 320 channels per photo), a short training run of the attention
LSTM (Show, Attend and Tell), the COCO caption metrics on validation photos, and
where the model looked for each word.

It needs the Flickr8k photos and captions: `rnncap download flickr8k --dest data`
makes `data/flickr8k` at the top of the repository (research use only: see the
README). Set `RNNCAP_FLICKR8K` to use a copy elsewhere. **Without the data, every cell
below says so and does nothing.**

The default run is small (a few hundred photos, a few epochs, under 2 minutes), so
its captions are generic and its scores low. The README's "Train on Flickr8k"
commands train the real model (CIDEr-D about 0.55 on val)."""),
    code("""import os
from dataclasses import replace
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from rnncap import (AttentionCaptioningModel, Trainer, Vocab, beam_search, coco_metrics, extract_features,
                    get_encoder, load_dataset)
from rnncap.config import DataConfig, TrainConfig
from rnncap.evaluation.report import attention_figure
from rnncap.training.trainer import prepare_data

TRAIN_PHOTOS = 300   # of Flickr8k's 6,000 training photos; a bigger setting: 6000 (features ~5 min, training ~1 h)
VAL_PHOTOS = 50      # of the 1,000 validation photos
EPOCHS = 4
SEED = 0
OUT = Path(os.environ.get("RNNCAP_NOTEBOOK_OUT", "../runs/notebooks")) / "03"
CANDIDATES = ["../data/flickr8k", "../../shared/data/flickr8k"]   # what the download makes; this project's copy
DATA = Path(os.environ.get("RNNCAP_FLICKR8K") or next((p for p in CANDIDATES if Path(p).exists()), CANDIDATES[0]))
HAVE_DATA = DATA.exists()
print(f"Flickr8k: {DATA.resolve()}" if HAVE_DATA else
      f"Flickr8k is not at {DATA.resolve()}: the cells below skip. Get it with `rnncap download flickr8k "
      f"--dest data` (from the repository's top folder), or set RNNCAP_FLICKR8K to its folder.")"""),
    md("""## 1. A few hundred photos, encoded

The photos of each split are taken in the dataset's order; their features go into
an HDF5 cache that a rerun reuses."""),
    code("""if HAVE_DATA:
    full = load_dataset(DATA)

    def first(split, n):
        return replace(split, image_ids=split.image_ids[:n], image_paths=split.image_paths[:n],
                       references=split.references[:n])

    dataset = replace(full, splits={"train": first(full["train"], TRAIN_PHOTOS),
                                    "val": first(full["val"], VAL_PHOTOS)})
    cache = OUT / f"maps-{TRAIN_PHOTOS}-{VAL_PHOTOS}.h5"
    extract_features({name: (s.image_ids, s.image_paths) for name, s in dataset.splits.items()},
                     get_encoder(pooling="block-map"), cache, progress=False)
    vocab = Vocab.build([c for refs in dataset["train"].references for c in refs], min_count=3)
    data, _, transform = prepare_data(dataset, vocab, cache, DataConfig(min_count=3), standardize=True)
    train_maps, train_caps, train_idx, _ = data["train"]
    val_maps = data["val"][0]
    print(f"{len(vocab)} words; train maps {train_maps.shape} (photos, locations, channels), "
          f"{len(train_caps)} captions")
else:
    print("skipped: no Flickr8k")"""),
    md("""## 2. A short training run of the attention LSTM

Before each word the model scores the 49 locations of the map against its hidden
state, takes the softmax of the scores as weights α, and reads the weighted mean of
the map ([docs/attention.md](../docs/attention.md))."""),
    code("""if HAVE_DATA:
    model = AttentionCaptioningModel(len(vocab), train_maps.shape[-1], wordvec_dim=128, hidden_dim=256,
                                     attention_dim=128, null_id=vocab.null_id, start_id=vocab.start_id,
                                     end_id=vocab.end_id, seed=SEED, dropout=0.3)
    cfg = TrainConfig(lr=3e-3, lr_decay=0.8, batch_size=64, epochs=EPOCHS, seed=SEED)
    history = Trainer(model, (train_maps, train_caps, train_idx), cfg, progress=False,
                      log=lambda msg: None).fit()
    print(f"trained {EPOCHS} epochs")
else:
    print("skipped: no Flickr8k")"""),
    md("""## 3. The COCO metrics on validation photos

BLEU, ROUGE-L and CIDEr-D against each photo's five references (METEOR is left out
here: it needs Java and takes ~15 s to start; `rnncap evaluate` reports it)."""),
    code("""if HAVE_DATA:
    hyps = beam_search(model, val_maps, beam_size=3, max_length=17, length_norm=0.5, return_attention=True)
    captions = {i: vocab.decode(h[0].ids) for i, h in enumerate(hyps)}
    references = dict(enumerate(dataset["val"].references))
    summary, _ = coco_metrics(references, captions, java=False, meteor=False)
    print({k: round(v, 3) for k, v in summary.items() if v is not None})
else:
    print("skipped: no Flickr8k")"""),
    md("""## 4. Where it looked

For each word of a caption, the attention weights over the 7 × 7 map, upsampled onto
the photo: bright where the model looked."""),
    code("""if HAVE_DATA:
    for i in range(2):
        words = captions[i].split()
        alphas = np.asarray(hyps[i][0].attention)[:len(words)]             # (words, 49)
        side = int(round(alphas.shape[1] ** 0.5))
        figure = attention_figure(dataset["val"].image_paths[i], words, alphas.reshape(len(words), side, side))
        plt.figure(figsize=(12, 4))
        plt.imshow(figure)
        plt.axis("off")
        plt.title(captions[i])
        plt.show()
else:
    print("skipped: no Flickr8k")"""),
]


NOTEBOOKS = {"01_layers.ipynb": LAYERS, "02_captioning_model.ipynb": CAPTIONING, "03_real_photos.ipynb": REAL}


def build(stem, cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for i, (kind, text) in enumerate(cells):
        make = nbformat.v4.new_markdown_cell if kind == "markdown" else nbformat.v4.new_code_cell
        cell = make(text)
        cell.id = f"{stem[:2]}-{i:02d}"  # fixed ids: a rebuild changes nothing
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if a notebook differs")
    args = p.parse_args(argv)
    stale = []
    for name, cells in NOTEBOOKS.items():
        text, path = build(name, cells), HERE / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"differ from notebooks/build.py: {', '.join(stale)} (run python notebooks/build.py)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
