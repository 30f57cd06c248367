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
    """Photo in, caption out, with everything taken from one checkpoint (or several:
    an ensemble).

    ``caption(path)`` -> str; ``caption_many(paths)`` -> N strings; ``features(images)``
    -> the (N, D) feature rows, or (N, L, D) maps, the model reads;
    ``caption_features(features)`` -> N strings from such rows.

    decode: the decoding defaults (a ``DecodeConfig``: beam size, length normalisation,
    the decoding rules) that the methods use when their ``beam``/``length_norm`` are
    None; from a checkpoint, the ones it records (older checkpoints: beam 3, no length
    normalisation). For an ensemble (``model`` an ``Ensemble``), ``encoder`` and
    ``pca`` are lists, one per member; members with the same encoder identity share one
    ``Encoder`` object, and each photo is encoded once per distinct encoder.
    """

    warning = None  # a line people should read before trusting the captions (see from_checkpoint)

    def __init__(self, model, vocab, encoder, pca=None, max_length=30, decode=None):
        from ..config import decode_config

        self.model, self.vocab, self.encoder, self.pca = model, vocab, encoder, pca
        self.max_length = max_length
        self.decode = decode if decode is not None else decode_config({})

    @property
    def rules(self):
        """The decoders' ``Rules`` from ``decode`` (``rnncap.inference.decoding.rules_for``)."""
        from .decoding import rules_for

        return rules_for(self.vocab, self.decode)

    def decoding(self, beam=None, length_norm=None):
        """(beam, length_norm): the ones given, else this captioner's defaults."""
        return (self.decode.beam_size if beam is None else beam,
                self.decode.length_norm if length_norm is None else length_norm)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", weights=None, average=None):
        """Load a checkpoint and the image encoder it was trained with; several paths
        (a list of two or more) make an ensemble of them (``average``: "logprob" or
        "prob"; default the first checkpoint's ``DecodeConfig.ensemble``).

        weights: a weights file for encoders that need one supplied (vgg16).
        """
        from ..checkpoint import load_checkpoint
        from ..config import decode_config

        paths = [path] if isinstance(path, (str, bytes)) or not hasattr(path, "__iter__") else list(path)
        ckpts = [load_checkpoint(p, device=device) for p in paths]
        encoders, shared = [], {}
        for p, ckpt in zip(paths, ckpts):
            encoders.append(_member_encoder(p, ckpt, weights, shared))
        data_cfg = ckpts[0].configs.get("data") or {}
        max_length = int(data_cfg.get("max_length", 29)) + 1  # room for <END>
        decode = decode_config(ckpts[0].configs)
        if len(ckpts) == 1:
            cap = cls(ckpts[0].model, ckpts[0].vocab, encoders[0], ckpts[0].pca, max_length=max_length,
                      decode=decode)
        else:
            from .ensemble import ensemble_decode, ensemble_of

            decode = ensemble_decode(ckpts, average)
            model = ensemble_of(ckpts, paths, average=decode.ensemble)
            cap = cls(model, ckpts[0].vocab, encoders, [c.pca for c in ckpts], max_length=max_length,
                      decode=decode)
        # What the model learnt, for whoever shows its captions (rnncap caption, serve).
        from ..data.synth import scenes_warning, trained_on_scenes

        if any(trained_on_scenes(c.configs, c.vocab) for c in ckpts):
            cap.warning = scenes_warning(len(ckpts[0].vocab))
        return cap

    @property
    def members(self):
        """The ensemble's members (one model: itself), with their encoders and PCA."""
        if isinstance(self.encoder, list):
            return list(zip(self.model.members, self.encoder, self.pca))
        return [(self.model, self.encoder, self.pca)]

    def features(self, images):
        """Encoder features (after the feature transform, if any) for a list of paths /
        PIL images: (N, D) float32, or (N, L, D) maps for an attention model, exactly
        as ``rnncap features`` and ``rnncap train`` computed them. For an ensemble, a
        ``MemberFeatures`` of each member's, every photo encoded once per distinct
        encoder."""
        from ..encoding.features import apply_pca
        from ..data.images import load_image

        if len({id(encoder) for _, encoder, _ in self.members}) > 1:
            images = [load_image(im) for im in images]  # once, for every encoder
        encoded, arrays = {}, []
        for _, encoder, pca in self.members:
            if id(encoder) not in encoded:
                encoded[id(encoder)] = encoder.encode(images)
            feats = encoded[id(encoder)]
            arrays.append(apply_pca(feats, pca) if pca is not None else feats)
        if not isinstance(self.encoder, list):
            return arrays[0]
        from .ensemble import MemberFeatures

        return MemberFeatures(arrays)

    @property
    def attends(self):
        """True for models that attend over the spatial map (the attention model, a
        Transformer trained on maps): they can say where they looked for each word."""
        return getattr(self.model, "spatial", False)

    def _decode(self, feats, beam, n, length_norm, max_length, attention):
        """Per image, its ``n`` best hypotheses as (ids, logprob or None, attention
        (len(ids), L) or None), best first: greedy for beam 1, else beam search."""
        from .decoding import beam_search, greedy_decode

        if attention and not self.attends:
            raise ValueError("this checkpoint's model does not attend over a spatial map: only "
                             "attention models and Transformers trained on maps have attention maps")
        L, banned, rules = max_length or self.max_length, self.vocab.never_generated, self.rules
        if beam <= 1:
            out = greedy_decode(self.model, feats, max_length=L, banned=banned, return_attention=attention,
                                rules=rules)
            ids, alphas = out if attention else (out, None)
            return [[(row, None, None if alphas is None else alphas[i])] for i, row in enumerate(ids)]
        return [[(h.ids, h.logprob, h.attention) for h in hyps] for hyps in beam_search(
            self.model, feats, beam_size=beam, max_length=L, length_norm=length_norm, n_best=n,
            banned=banned, return_attention=attention, rules=rules)]

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
        """Captions of ``images``, ``batch_size`` at a time: each batch is encoded (the
        encoder reads its photos ahead) and then decoded, both on every core. Encoding
        the next batch while this one decodes made both compete for the cores and was
        slower once the decoder used them all (docs/performance.md)."""
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
        return self.caption_details_from_features(self.features(images), beam=beam, n=n,
                                                  length_norm=length_norm, max_length=max_length,
                                                  return_attention=return_attention)

    def caption_details_from_features(self, feats, beam=None, n=1, length_norm=None, max_length=None,
                                      return_attention=False):
        """``caption_details`` for rows of ``features()`` already computed: a server
        encodes the photos of several requests in one batch, then decodes each set of
        decoding options on its own rows."""
        from .decoding import sequence_log_prob

        beam, length_norm = self.decoding(beam, length_norm)
        if not 1 <= n <= max(beam, 1):
            raise ValueError(f"n must be between 1 and the beam size ({beam}), got {n}")
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


def _member_encoder(path, ckpt, weights, shared):
    """The image encoder a checkpoint was trained with, checked against what it gives
    here; ``shared`` maps an identity to the encoder already built for it, so members
    trained on the same features share one."""
    import json

    from ..encoding.encoders import describe_mismatch, get_encoder
    from ..encoding.features import transformed_dim

    ident = ckpt.encoder
    if not ident:
        raise CheckpointError(
            f"{path}: records no image encoder (it was trained on features that came with "
            f"the dataset), so it can caption features but not photos")
    key = json.dumps(ident, sort_keys=True)
    if key not in shared:
        encoder = get_encoder(ident["name"], weights=weights, pooling=ident.get("pooling") or "mean",
                              image_size=ident.get("image_size"))
        diff = describe_mismatch(ident, encoder.identity())
        if diff:
            raise CheckpointError(f"{path}: trained with another {ident['name']} encoder than the one "
                                  f"available here ({diff})")
        shared[key] = encoder
    encoder = shared[key]
    expected = transformed_dim(ckpt.pca, encoder.feature_dim)
    if expected != ckpt.model.input_dim:
        raise CheckpointError(f"{path}: the model expects {ckpt.model.input_dim}-d features "
                              f"but its encoder and PCA give {expected}-d")
    return encoder


def add_checkpoint_arguments(p, required=True, help="a checkpoint from `rnncap train`"):
    """--checkpoint A.npz [B.npz ...] and --ensemble, shared by the commands that caption."""
    from .decoding import add_rule_arguments
    from .ensemble import AVERAGES

    p.add_argument("--checkpoint", nargs="+", required=required, metavar="CKPT",
                   help=help + "; several make an ensemble that averages their next-word distributions")
    p.add_argument("--ensemble", choices=AVERAGES,
                   help="how an ensemble averages: the mean of log-probabilities or of probabilities "
                        "(default: the first checkpoint's; logprob)")
    add_rule_arguments(p)


def captioner_from_args(args, checkpoints=None):
    """The ``Captioner`` of --checkpoint (one or several), with the rule flags applied."""
    from .decoding import with_rule_arguments

    cap = Captioner.from_checkpoint(checkpoints or args.checkpoint, weights=getattr(args, "weights", None),
                                    average=getattr(args, "ensemble", None))
    cap.decode = with_rule_arguments(cap.decode, args)
    return cap


def add_arguments(p):
    from ..cli import nonneg_float, positive_int

    p.add_argument("photos", nargs="*", metavar="PHOTO", help="image files (JPEG, PNG, ...)")
    add_checkpoint_arguments(p)
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

    if not args.photos:  # --checkpoint takes every name after it
        raise RnncapError("no photo given: name the photos before --checkpoint "
                          "(rnncap caption PHOTO... --checkpoint CKPT...)")
    cap = captioner_from_args(args)
    if args.attention and not cap.attends:
        raise RnncapError(f"--attention: {' '.join(args.checkpoint)}: attention maps need one checkpoint "
                          f"whose model attends over a spatial map (--model attention, or --model "
                          f"transformer on `rnncap features --maps`); an h0 model only starts from "
                          f"the image, and an ensemble has no one map")
    if cap.warning:
        print(f"rnncap caption: note: {cap.warning}", file=sys.stderr)
    figures = dict(zip(args.photos, attention_paths(args.attention, args.photos))) if args.attention else {}
    results, failed = [], 0
    # Photos are read one by one, so that a bad one costs only its own caption, then
    # encoded and decoded --batch-size at a time (as ``Captioner.caption_many``); the
    # output keeps the arguments' order.
    def read_and_encode(batch):
        images = []
        for path in batch:
            try:
                images.append(load_image(path))
            except DataError as e:
                images.append(e)
        plain = [i for i, (path, im) in enumerate(zip(batch, images))
                 if not isinstance(im, DataError) and path not in figures]
        return batch, images, plain, cap.features([images[i] for i in plain]) if plain else None

    batches = (args.photos[i:i + args.batch_size] for i in range(0, len(args.photos), args.batch_size))
    for batch, images, plain, feats in map(read_and_encode, batches):
        captions = dict(zip(plain, cap.caption_features(
            feats, beam=args.beam, max_length=args.max_length, length_norm=args.length_norm))) if plain else {}
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
