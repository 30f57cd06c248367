"""Captioning new photos: ``Captioner`` and the ``rnncap caption`` command.

Read top to bottom: a checkpoint gives the decoder, the vocabulary, the encoder's
identity and the PCA; a photo goes through the very same path as at training time
(``load_image`` -> ``encoder.preprocess``/``encode`` -> ``apply_pca``), then the
decoder writes the caption.

    from rnncap.inference.sample import Captioner
    Captioner.from_checkpoint("runs/train/best.npz").caption("photo.jpg")
"""
from __future__ import annotations

import json
import sys

from ..errors import CheckpointError, RnncapError


class Captioner:
    """Photo in, caption out, with everything taken from one checkpoint.

    ``caption(path)`` -> str; ``caption_many(paths)`` -> N strings; ``features(images)``
    -> the (N, D) feature rows, or (N, L, D) maps, the model reads;
    ``caption_features(features)`` -> N strings from such rows.

    decode: the decoding defaults (a ``DecodeConfig``: beam size, length normalisation)
    that the methods use when their ``beam``/``length_norm`` are None; from a checkpoint,
    the ones it records (older checkpoints: beam 3, no length normalisation).
    """

    warning = None  # a line people should read before trusting the captions (see from_checkpoint)

    def __init__(self, model, vocab, encoder, pca=None, max_length=30, decode=None):
        from ..config import decode_config

        self.model, self.vocab, self.encoder, self.pca = model, vocab, encoder, pca
        self.max_length = max_length
        self.decode = decode if decode is not None else decode_config({})

    def decoding(self, beam=None, length_norm=None):
        """(beam, length_norm): the ones given, else this captioner's defaults."""
        return (self.decode.beam_size if beam is None else beam,
                self.decode.length_norm if length_norm is None else length_norm)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", weights=None):
        """Load a checkpoint and the image encoder it was trained with.

        weights: a weights file for encoders that need one supplied (vgg16).
        """
        from ..checkpoint import load_checkpoint
        from ..encoding.encoders import describe_mismatch, get_encoder

        ckpt = load_checkpoint(path, device=device)
        ident = ckpt.encoder
        if not ident:
            raise CheckpointError(
                f"{path}: records no image encoder (it was trained on features that came with "
                f"the dataset), so it can caption features but not photos")
        encoder = get_encoder(ident["name"], weights=weights, pooling=ident.get("pooling") or "mean")
        diff = describe_mismatch(ident, encoder.identity())
        if diff:
            raise CheckpointError(f"{path}: trained with another {ident['name']} encoder than the one "
                                  f"available here ({diff})")
        from ..encoding.features import transformed_dim

        expected = transformed_dim(ckpt.pca, encoder.feature_dim)
        if expected != ckpt.model.input_dim:
            raise CheckpointError(f"{path}: the model expects {ckpt.model.input_dim}-d features "
                                  f"but its encoder and PCA give {expected}-d")
        data_cfg = ckpt.configs.get("data") or {}
        max_length = int(data_cfg.get("max_length", 29)) + 1  # room for <END>
        from ..config import decode_config

        from ..data.synth import scenes_warning, trained_on_scenes

        cap = cls(ckpt.model, ckpt.vocab, encoder, ckpt.pca, max_length=max_length,
                  decode=decode_config(ckpt.configs))
        # What the model learnt, for whoever shows its captions (rnncap caption, serve).
        if trained_on_scenes(ckpt.configs, ckpt.vocab):
            cap.warning = scenes_warning(len(ckpt.vocab))
        return cap

    def features(self, images):
        """Encoder features (after the feature transform, if any) for a list of paths /
        PIL images: (N, D) float32, or (N, L, D) maps for an attention model, exactly
        as ``rnncap features`` and ``rnncap train`` computed them."""
        from ..encoding.features import apply_pca
        from ..data.images import load_image

        feats = self.encoder.encode([load_image(im) for im in images])
        return apply_pca(feats, self.pca) if self.pca is not None else feats

    @property
    def attends(self):
        """True for attention models: they can say where they looked for each word."""
        return hasattr(self.model, "attention_dim")

    def _decode(self, feats, beam, n, length_norm, max_length, attention):
        """Per image, its ``n`` best hypotheses as (ids, logprob or None, attention
        (len(ids), L) or None), best first: greedy for beam 1, else beam search."""
        from .decoding import beam_search, greedy_decode

        if attention and not self.attends:
            raise ValueError("this checkpoint holds an h0 model: only attention models have "
                             "attention maps")
        L, banned = max_length or self.max_length, self.vocab.never_generated
        if beam <= 1:
            out = greedy_decode(self.model, feats, max_length=L, banned=banned, return_attention=attention)
            ids, alphas = out if attention else (out, None)
            return [[(row, None, None if alphas is None else alphas[i])] for i, row in enumerate(ids)]
        return [[(h.ids, h.logprob, h.attention) for h in hyps] for hyps in beam_search(
            self.model, feats, beam_size=beam, max_length=L, length_norm=length_norm, n_best=n,
            banned=banned, return_attention=attention)]

    def _attention_maps(self, ids, alphas):
        """(n_words, side, side) float32: where each word of ``vocab.decode(ids)`` was
        chosen from, on the encoder's square map (the <END> step left out)."""
        words = len(self.vocab.decode(ids).split())
        side = int(round(alphas.shape[1] ** 0.5))
        return alphas[:words].reshape(words, side, side)

    def caption_features(self, features, beam=None, max_length=None, length_norm=None):
        """Captions (strings) for a batch of feature rows. beam: 1 = greedy; length_norm:
        beam search ranks by logprob / len ** length_norm (0 = by log-probability
        alone); None = this captioner's defaults (``decoding``)."""
        beam, length_norm = self.decoding(beam, length_norm)
        best = self._decode(features, beam, 1, length_norm, max_length, attention=False)
        return [self.vocab.decode(hyps[0][0]) for hyps in best]

    def caption(self, image, beam=None, max_length=None, length_norm=None, return_attention=False):
        """The caption of one photo (a path or a PIL image). ``return_attention``
        (attention models): (caption, maps), maps (n_words, h, w) float32 giving for
        each word of the caption the weights over the encoder's h x w map it was
        chosen with (each sums to 1)."""
        if not return_attention:
            return self.caption_features(self.features([image]), beam=beam, max_length=max_length,
                                         length_norm=length_norm)[0]
        top = self.caption_details([image], beam=beam, max_length=max_length, length_norm=length_norm,
                                   return_attention=True)[0][0]
        return top["caption"], top["attention"]

    def caption_many(self, images, beam=None, max_length=None, batch_size=16, length_norm=None):
        out = []
        for i in range(0, len(images), batch_size):
            out += self.caption_features(self.features(images[i:i + batch_size]), beam=beam,
                                         max_length=max_length, length_norm=length_norm)
        return out

    def caption_details(self, images, beam=None, n=1, length_norm=None, max_length=None,
                        return_attention=False):
        """The ``n`` best captions of each photo with their log-probabilities: a list
        (per image) of lists of ``{"caption": str, "logprob": float}``, best first;
        with ``return_attention`` (attention models) each also has "attention", the
        (n_words, h, w) maps of ``caption()``.

        The first caption is ``caption()``'s for the same arguments: beam 1 is greedy
        decoding (log-probability from ``sequence_log_prob``), a wider beam gives its
        ``n`` best finished hypotheses. n cannot exceed the beam (a beam of width k
        holds k captions). ``logprob`` is the model's over the whole vocabulary.
        """
        from .decoding import sequence_log_prob

        beam, length_norm = self.decoding(beam, length_norm)
        if not 1 <= n <= max(beam, 1):
            raise ValueError(f"n must be between 1 and the beam size ({beam}), got {n}")
        feats = self.features(images)
        best = self._decode(feats, beam, n, length_norm, max_length, return_attention)
        if beam <= 1:
            lps = sequence_log_prob(self.model, feats, [hyps[0][0] for hyps in best])
            best = [[(ids, lp, att)] for [(ids, _, att)], lp in zip(best, lps)]
        out = []
        for hyps in best:
            entries = []
            for ids, lp, att in hyps:
                entry = {"caption": self.vocab.decode(ids), "logprob": float(lp)}
                if return_attention:
                    entry["attention"] = self._attention_maps(ids, att)
                entries.append(entry)
            out.append(entries)
        return out


def add_arguments(p):
    from ..cli import nonneg_float, positive_int

    p.add_argument("photos", nargs="+", metavar="PHOTO", help="image files (JPEG, PNG, ...)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint from `rnncap train`")
    p.add_argument("--beam", type=positive_int,
                   help="beam size; 1 = greedy (default: the checkpoint's; 3 for checkpoints that record none)")
    p.add_argument("--length-norm", type=nonneg_float,
                   help="beam length normalisation: rank by logprob / len**alpha (default: the "
                        "checkpoint's; 0 = off for checkpoints that record none)")
    p.add_argument("--max-length", type=positive_int, help="most words per caption (default: from training)")
    p.add_argument("--weights", help="encoder weights file, for encoders that need one (vgg16)")
    p.add_argument("--json", action="store_true", help="print one JSON list of {photo, caption}")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="photos encoded and decoded together (default %(default)s)")
    p.add_argument("--attention", metavar="OUT.png",
                   help="attention models: also draw the photo and each word's attention map over "
                        "it into OUT.png (several photos: OUT-<photo name>.png)")


def attention_paths(out, photos):
    """Where ``--attention OUT.png`` writes each photo's figure."""
    from pathlib import Path

    out = Path(out)
    if len(photos) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{Path(p).stem}{out.suffix or '.png'}") for p in photos]


def _write_attention_figure(cap, image, path, args):
    """Caption ``image`` and draw its attention figure into ``path``; the caption."""
    from ..evaluation.report import attention_figure

    caption, maps = cap.caption(image, beam=args.beam, max_length=args.max_length,
                                length_norm=args.length_norm, return_attention=True)
    attention_figure(image, caption.split(), maps).save(path)
    print(f"{path}: attention maps of \"{caption}\"", file=sys.stderr)
    return caption


def run(args):
    from ..errors import DataError
    from ..data.images import load_image

    cap = Captioner.from_checkpoint(args.checkpoint, weights=args.weights)
    if args.attention and not cap.attends:
        raise RnncapError(f"--attention: {args.checkpoint} holds an h0 model (the image is only its "
                          f"initial state); attention maps need one trained with --model attention")
    if cap.warning:
        print(f"rnncap caption: note: {cap.warning}", file=sys.stderr)
    figures = dict(zip(args.photos, attention_paths(args.attention, args.photos))) if args.attention else {}
    results, failed = [], 0
    # Photos are read one by one, so that a bad one costs only its own caption, then
    # encoded and decoded --batch-size at a time; the output keeps the arguments' order.
    for start in range(0, len(args.photos), args.batch_size):
        batch = args.photos[start:start + args.batch_size]
        images = []
        for path in batch:
            try:
                images.append(load_image(path))
            except DataError as e:
                images.append(e)
        plain = [i for i, (path, im) in enumerate(zip(batch, images))
                 if not isinstance(im, DataError) and path not in figures]
        captions = dict(zip(plain, cap.caption_many(
            [images[i] for i in plain], beam=args.beam, max_length=args.max_length,
            batch_size=args.batch_size, length_norm=args.length_norm)))
        for i, (path, image) in enumerate(zip(batch, images)):
            if isinstance(image, DataError):
                print(f"rnncap caption: error: {image}", file=sys.stderr)
                failed += 1
                continue
            caption = captions[i] if i in captions else _write_attention_figure(cap, image, figures[path], args)
            if args.json:
                results.append({"photo": path, "caption": caption})
            else:
                print(f"{path}\t{caption}", flush=True)
    if args.json:
        print(json.dumps(results, indent=1))
    return 1 if failed else 0
