"""Evaluate a checkpoint on a split: COCO metrics, diversity, perplexity, HTML report.

    rnncap evaluate --checkpoint runs/train/best.npz --data captions.json --split val

``evaluate_split`` is the reusable core (the demo and the experiments call it): it
decodes every image greedily and with beam search, scores the beam captions against
all references with the COCO toolkit (``rnncap.evaluation.metrics``) and measures their
diversity and the model's perplexity on the references. The command adds the data
plumbing (dataset, features, checkpoint) and writes, into --out:

* ``results.json``  the COCO results format, ``[{"image_id", "caption"}]``;
* ``metrics.json``  the summary and the per-image scores and captions;
* ``report.html``   a self-contained page with photos, captions and scores.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, DataError

DIVERSITY_LABELS = {
    "distinct_captions": "distinct captions",
    "distinct_fraction": "distinct / all captions",
    "unique_image_fraction": "images with a caption of their own",
    "vocab_used": "vocabulary used (words)",
    "mean_length": "mean length (words)",
    "top_caption": "most common caption",
    "top_caption_share": "its share of the images",
    "mid_phrase_endings": "captions ending mid-phrase",
    "repeated_words": "captions with a word twice in a row",
    "repeated_trigrams": "captions with a trigram twice",
}


def evaluate_split(model, vocab, features, references, image_ids, beam=3, max_length=30,
                   length_norm=0.0, captions=None, image_idx=None, batch_size=100,
                   java=None, meteor=True, rules=None, bad_endings=None):
    """Decode, score and measure one split.

    features: (N, D) rows in the order of ``image_ids`` and ``references`` (a list of
    N lists of reference strings). beam: beam size for the scored captions (1 =
    greedy). captions/image_idx: encoded reference captions (M, T+1) and their image
    rows, for the perplexity (left out when None). java/meteor: as in
    ``rnncap.evaluation.metrics.coco_metrics``. rules: the decoders' ``Rules`` (None:
    none); bad_endings: the words a caption should not end on, for the defect counts.

    Returns (summary, per_image, results):
      summary    the COCO metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr; 0-1 scale), the
                 ``diversity`` figures, "perplexity" (when captions were given) and
                 "decoder" ("greedy" or "beam-K");
      per_image  {image_id: {"greedy", "beam", "references", "scores"}};
      results    the COCO results list [{"image_id", "caption"}] of the scored captions.
    """
    from ..inference.decoding import beam_decode, greedy_decode
    from .metrics import coco_metrics, diversity, perplexity

    image_ids = list(image_ids)
    N = len(image_ids)
    if N == 0:
        raise DataError("no images to evaluate")
    if len(set(image_ids)) != N:
        raise DataError("image ids repeat; each image must appear once")
    if len(features) != N or len(references) != N:
        raise ValueError(f"{N} image ids but {len(features)} feature rows and {len(references)} reference lists")

    greedy, beamed = [], []
    for start in range(0, N, batch_size):
        f = features[start:start + batch_size]
        greedy += [vocab.decode(row) for row in greedy_decode(
            model, f, max_length=max_length, banned=vocab.never_generated, rules=rules)]
        if beam > 1:
            rows = beam_decode(model, f, beam_size=beam, max_length=max_length, length_norm=length_norm,
                               banned=vocab.never_generated, rules=rules)
            beamed += [vocab.decode(row) for row in rows]
    scored = beamed if beam > 1 else greedy

    refs = {i: list(r) for i, r in zip(image_ids, references)}
    candidates = dict(zip(image_ids, scored))
    metrics, scores = coco_metrics(refs, candidates, java=java, meteor=meteor)
    summary = dict(metrics)
    summary.update(diversity(candidates, bad_endings=bad_endings))
    if captions is not None:
        summary["perplexity"] = perplexity(model, features, captions, image_idx=image_idx)
    summary["decoder"] = f"beam-{beam}" if beam > 1 else "greedy"

    per_image = {i: {"greedy": g, "beam": b, "references": refs[i], "scores": scores[i]}
                 for i, g, b in zip(image_ids, greedy, scored)}
    results = [{"image_id": coco_image_id(i), "caption": c} for i, c in candidates.items()]
    return summary, per_image, results


def coco_image_id(image_id):
    """COCO tools expect integer image ids: ids made of digits become ints, others
    (file names) stay as they are."""
    s = str(image_id)
    return int(s) if s.isdigit() else image_id


def format_summary(summary):
    """The summary as aligned text lines, for people."""
    lines = []
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        if key in summary:
            v = summary[key]
            lines.append(f"  {key:<36}{'n/a' if v is None else f'{v:.4f}'}")
    if "perplexity" in summary:
        lines.append(f"  {'perplexity':<36}{summary['perplexity']:.2f}")
    for key, label in DIVERSITY_LABELS.items():
        if key not in summary:
            continue
        v = summary[key]
        if key == "top_caption":
            text = json.dumps(v)
        elif key.endswith(("fraction", "share")):
            text = f"{100 * v:.1f}%"
        elif isinstance(v, float):
            text = f"{v:.2f}"
        else:
            text = str(v)
        lines.append(f"  {label:<36}{text}")
    return lines


# ---- the command ---------------------------------------------------------------------

def add_arguments(p):
    from ..cli import nonneg_float, nonneg_int, positive_int

    from ..inference.sample import add_checkpoint_arguments

    add_checkpoint_arguments(p)
    p.add_argument("--data", required=True, help="dataset file or folder (any supported format)")
    p.add_argument("--split", default="val", help="split to evaluate (default %(default)s)")
    p.add_argument("--beam", type=positive_int,
                   help="beam size; 1 = greedy (default: the checkpoint's; 3 for checkpoints that record none)")
    p.add_argument("--length-norm", type=nonneg_float,
                   help="beam length normalisation alpha: rank by logprob / len**alpha (default: the "
                        "checkpoint's; 0 = off for checkpoints that record none)")
    p.add_argument("--features", nargs="+", metavar="FEATS",
                   help="HDF5 feature cache(s) from `rnncap features` (default: the dataset's own "
                        "features, else encode the photos with the checkpoint's encoder); with "
                        "several checkpoints, each member reads the cache made by its encoder")
    p.add_argument("--weights", help="encoder weights file, for encoders that need one (vgg16)")
    p.add_argument("--image-dir", help="where the dataset's photos are, if not where it says")
    p.add_argument("--max-images", type=positive_int, help="evaluate only the first N images of the split")
    p.add_argument("--max-length", type=positive_int, help="most words per caption (default: from training)")
    p.add_argument("--out", default="runs/eval", help="folder for results, metrics and report (default %(default)s)")
    p.add_argument("--report-images", type=nonneg_int, default=60,
                   help="photos shown in report.html (default %(default)s)")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves ~15 s of Java start-up)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="where the decoder runs")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args):
    import dataclasses

    from ..checkpoint import load_checkpoint
    from ..data.datasets import encode_split, load_dataset
    from ..inference.decoding import rules_for, with_rule_arguments
    from .report import write_report

    from ..config import decode_config

    paths = list(args.checkpoint)
    ckpts = [load_checkpoint(p) for p in paths]
    ckpt, vocab = ckpts[0], ckpts[0].vocab
    if len(ckpts) > 1:
        from ..inference.ensemble import ensemble_decode, ensemble_of

        decode = ensemble_decode(ckpts, args.ensemble)
        model = ensemble_of(ckpts, paths, average=decode.ensemble)
    else:
        decode, model = decode_config(ckpt.configs), ckpt.model  # the checkpoint's decoding defaults
    decode = with_rule_arguments(decode, args)
    beam = decode.beam_size if args.beam is None else args.beam
    length_norm = decode.length_norm if args.length_norm is None else args.length_norm
    data_cfg = ckpt.configs.get("data") or {}
    train_max = int(data_cfg.get("max_length", 16))
    max_length = args.max_length or train_max + 1  # room for <END>

    dataset = load_dataset(args.data, image_dir=args.image_dir)
    split = dataset[args.split]
    n = min(args.max_images or len(split), len(split))
    if n == 0:
        raise DataError(f"{args.data}: split '{args.split}' has no images")
    if not decode.bad_endings:  # a checkpoint from before the list: the dataset's train captions
        from ..training.trainer import train_bad_endings

        decode = dataclasses.replace(decode, bad_endings=train_bad_endings(dataset, vocab))
    features = _member_features(args, paths, ckpts, dataset, split, n)
    for path, member, feats in zip(paths, ckpts, features):
        _check_feature_shape(path, member.model, feats, args.split)
    if len(ckpts) > 1:
        from ..inference.ensemble import MemberFeatures

        features = MemberFeatures(features)
    else:
        features = features[0]
    if args.device != "cpu":
        model.to(args.device)

    # Images without a reference caption cannot be scored.
    rows = [k for k in range(n) if split.references[k]]
    if len(rows) < n:
        print(f"note: {n - len(rows)} of {n} images have no reference captions and are left out",
              file=sys.stderr)
    if not rows:
        raise DataError(f"{args.data}: no image of split '{args.split}' has a reference caption")
    image_ids = [split.image_ids[k] for k in rows]
    captions, image_idx = None, None
    try:
        if len(ckpts) > 1:
            raise DataError("an ensemble is not one model with a loss")
        caps, idx, _ = encode_split(split, vocab, train_max, data_cfg.get("too_long", "truncate"))
        new_row = np.full(len(split), -1, dtype=np.int64)
        new_row[rows] = np.arange(len(rows))
        keep = new_row[idx] >= 0
        if keep.any():
            captions, image_idx = caps[keep], new_row[idx[keep]]
    except DataError as e:
        print(f"note: no perplexity: {e}", file=sys.stderr)

    summary, per_image, results = evaluate_split(
        model, vocab, features[rows], [split.references[k] for k in rows], image_ids,
        beam=beam, max_length=max_length, length_norm=length_norm, captions=captions,
        image_idx=image_idx, meteor=not args.no_meteor, rules=rules_for(vocab, decode),
        bad_endings=decode.bad_endings)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8")
    meta = {"checkpoint": paths[0] if len(paths) == 1 else paths, "data": str(args.data),
            "split": args.split, "images": len(rows), "beam": beam, "length_norm": length_norm,
            "max_length": max_length, "rules": decode.rules, "block_trigrams": decode.block_trigrams}
    if len(paths) > 1:
        meta["ensemble"] = model.average
    (out / "metrics.json").write_text(json.dumps({"run": meta, "summary": summary, "per_image": per_image},
                                                 indent=1, ensure_ascii=False), encoding="utf-8")
    items = [{"image_id": split.image_ids[k], "image": split.image_paths[k], **per_image[split.image_ids[k]]}
             for k in rows[:args.report_images]]
    if getattr(model, "spatial", False):
        _add_attention_figures(items, model, vocab, features[rows[:args.report_images]], beam,
                               max_length, length_norm, rules_for(vocab, decode))
    names = " + ".join(Path(p).name for p in paths)
    title = f"rnncap evaluate: {names} on {args.split} ({len(rows)} images)"
    report = write_report(out, items, summary, history=ckpt.history, title=title)

    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        rules = ("rules on" if decode.rules else "rules off") + (", trigrams blocked" if decode.block_trigrams else "")
        who = (f"checkpoint {paths[0]}" if len(paths) == 1
               else f"ensemble ({model.average}) of {', '.join(paths)}")
        print(f"{args.split}: {len(rows)} images, {summary['decoder']} decoding ({rules}), {who}")
        print("\n".join(format_summary(summary)))
    print(f"wrote {out / 'results.json'}, {out / 'metrics.json'}, {report}", file=sys.stderr)
    return 0


def _add_attention_figures(items, model, vocab, features, beam, max_length, length_norm, rules=None):
    """Each report item of an attention model gets the figure of its scored caption:
    the photo and where each word looked (``rnncap.evaluation.report.attention_figure``)."""
    from ..inference.decoding import beam_search
    from .report import attention_figure

    hyps = beam_search(model, features, beam_size=beam, max_length=max_length, length_norm=length_norm,
                       banned=vocab.never_generated, return_attention=True, rules=rules)
    for item, (top,) in zip(items, hyps):
        words = vocab.decode(top.ids).split()
        side = int(round(top.attention.shape[1] ** 0.5))
        if item.get("image") is not None:
            maps = top.attention[:len(words)].reshape(len(words), side, side)
            try:
                item["attention_figure"] = attention_figure(item["image"], words, maps, panel=112, columns=3)
            except Exception as e:  # a report should survive one unreadable photo
                print(f"note: no attention figure for {item['image_id']}: {e}", file=sys.stderr)


def _check_feature_shape(path, model, features, split):
    attends = getattr(model, "spatial", False)
    if features.shape[-1] != model.input_dim or features.ndim != (3 if attends else 2):
        raise CheckpointError(f"{path}: the model expects {model.input_dim}-d "
                              + ("spatial maps" if attends else "features")
                              + f" but the features for '{split}' have shape {features.shape[1:]}")


def _member_features(args, paths, ckpts, dataset, split, n):
    """Each checkpoint's features for the first n images of the split. Given
    --features, each checkpoint reads the cache whose recorded encoder identity is the
    one it was trained with (one cache may serve several); a single cache and a single
    checkpoint go together as before."""
    from ..encoding.encoders import describe_mismatch
    from ..encoding.features import read_identity

    caches = list(args.features or [])
    out = []
    for path, ckpt in zip(paths, ckpts):
        cache = None
        if len(caches) == 1 and len(paths) == 1:
            cache = caches[0]
        elif caches:
            if not ckpt.encoder:
                raise CheckpointError(f"{path}: records no image encoder, so no --features cache can be "
                                      f"matched to it")
            idents = {c: read_identity(c) for c in caches}
            cache = next((c for c in caches if not describe_mismatch(ckpt.encoder, idents[c])), None)
            if cache is None:
                raise CheckpointError(
                    f"{path}: none of the --features caches was made by its encoder "
                    f"({ckpt.encoder.get('name')}, pooling {ckpt.encoder.get('pooling') or 'mean'}, "
                    f"{ckpt.encoder.get('image_size')} px): "
                    + "; ".join(f"{c}: {describe_mismatch(ckpt.encoder, i)}" for c, i in idents.items()))
        out.append(_split_features(args, path, ckpt, dataset, split, n, cache))
    return out


def _split_features(args, path, ckpt, dataset, split, n, cache=None):
    """(n, D) features for the first n images of the split, made the way the
    checkpoint's training features were: from ``cache`` (an HDF5 file) when given."""
    if split.features is not None and not cache:
        feats = np.asarray(split.features[:n], dtype=np.float32)
        if feats.shape[1] != ckpt.model.input_dim and dataset.name == "coco-cs231n":
            # Loaded with its 512-d PCA; the model may have been trained on raw fc7.
            from ..data.datasets import load_dataset

            fc7 = load_dataset(args.data, pca=False)[args.split]
            feats = np.asarray(fc7.features[:n], dtype=np.float32)
        return feats
    if cache:
        return _cached_features(cache, args.split, split.image_ids[:n], ckpt, path)
    if not ckpt.encoder:
        raise CheckpointError(f"{path}: records no image encoder and {args.data} ships no "
                              f"features: pass --features FEATS.h5")
    paths = split.image_paths[:n]
    if any(p is None for p in paths):
        raise DataError(f"{args.data}: split '{args.split}' has no image files to encode; pass --features")
    from ..inference.sample import Captioner

    cap = Captioner.from_checkpoint(path, weights=args.weights)
    rows = [np.asarray(cap.features(paths[i:i + 32]), dtype=np.float32) for i in range(0, n, 32)]
    return np.concatenate(rows)


def _cached_features(path, split_name, image_ids, ckpt, ckpt_path):
    from ..encoding.encoders import describe_mismatch
    from ..encoding.features import apply_pca, load_features, read_identity

    if ckpt.encoder:
        diff = describe_mismatch(ckpt.encoder, read_identity(path))
        if diff:
            raise CheckpointError(f"{path}: features from another encoder than {ckpt_path} was trained "
                                  f"with ({diff})")
    # Raw features, then the checkpoint's own PCA: exactly what the model saw in training.
    feats, ids = load_features(path, split_name, pca=False)
    pos = {i: k for k, i in enumerate(ids)}
    missing = [i for i in image_ids if str(i) not in pos]
    if missing:
        raise DataError(f"{path}: {len(missing)} images of split '{split_name}' have no features "
                        f"(first: {missing[0]}); rerun `rnncap features`")
    feats = feats[[pos[str(i)] for i in image_ids]]
    return np.asarray(apply_pca(feats, ckpt.pca) if ckpt.pca is not None else feats, dtype=np.float32)
