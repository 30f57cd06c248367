"""Caption quality: the COCO metrics, perplexity, and how varied the captions are.

``coco_metrics`` scores generated captions against ALL reference captions of each image
with the COCO caption evaluation toolkit (``pycocoevalcap``): BLEU-1..4, METEOR,
ROUGE-L and CIDEr (the toolkit's CIDEr is CIDEr-D), on the toolkit's 0-1 scale
(CIDEr-D is not bounded by 1: it is 10 x a mean of cosines). The toolkit tokenises with
the Stanford PTB tokenizer and runs METEOR, both in Java. Without Java the captions are
tokenised by ``ptb_tokenize`` here (a pure-Python mirror of the toolkit's tokenisation)
and METEOR is reported as None; one line on stderr says so. See docs/metrics.md.

``perplexity`` is the exponentiated mean negative log-likelihood per word; ``diversity``
measures whether the model says something different for different photos.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

import numpy as np

from ..errors import DataError

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

# The toolkit drops these tokens after PTB tokenisation (pycocoevalcap's PUNCTUATIONS).
# Its bracket names are upper case but the tokenizer runs with -lowerCase, so in
# practice brackets survive as "-lrb-" etc.; the pure-Python path mirrors that.
_DROPPED = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
            ".", "?", "!", ",", ":", "-", "--", "...", ";"}


# ---- the COCO metrics ---------------------------------------------------------------

def coco_metrics(references, candidates, java=None, meteor=True):
    """Score one candidate caption per image against all of that image's references.

    references: {image_id: [str, ...]}; candidates: {image_id: str}. Every candidate id
    needs at least one reference; references of other images are ignored (they do
    not enter CIDEr-D's document frequencies either).

    java: None detects ``java`` on the PATH; False forces the pure-Python path.
    meteor: False skips METEOR (reported as None) without a note, to save the ~15 s
    the METEOR jar takes to load its paraphrase table.

    Returns (summary, per_image): summary maps each of METRICS to a float (METEOR None
    when skipped); per_image maps each image id to the same keys. BLEU in the summary
    is the corpus BLEU (n-gram counts pooled over all images), as the toolkit
    computes it; the other summary values are means of the per-image scores.
    """
    ids = list(candidates)
    if not ids:
        raise DataError("no captions to score")
    for i in ids:
        refs = references.get(i)
        if not refs:
            raise DataError(f"image {i!r}: no reference captions to score its caption against")
    refs = {i: [str(r) for r in references[i]] for i in ids}
    cands = {i: [str(candidates[i])] for i in ids}

    if java is None:
        java = shutil.which("java") is not None
        if not java:
            _note("Java not found: METEOR skipped, captions tokenised in pure Python "
                  "(install a Java runtime for the full COCO toolkit)")
    gts = res = None
    if java:
        try:
            gts, res = _ptb_tokenize_java(refs, cands)
        except Exception as e:  # the toolkit's tokenizer failed: keep going without it
            _note(f"the PTB tokenizer (Java) failed ({_one_line(e)}): "
                  f"captions tokenised in pure Python, METEOR skipped")
            java = False
    if gts is None:
        gts = {i: [ptb_tokenize(r) for r in rs] for i, rs in refs.items()}
        res = {i: [ptb_tokenize(c) for c in cs] for i, cs in cands.items()}

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    per_image = {i: {} for i in ids}
    summary = {}
    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        summary[f"BLEU-{n + 1}"] = float(bleu[n])
        for i, s in zip(ids, bleu_per[n]):
            per_image[i][f"BLEU-{n + 1}"] = float(s)

    meteor_scores = None
    if java and meteor:
        try:
            meteor_scores = _meteor(gts, res)
        except Exception as e:
            _note(f"METEOR (Java) failed ({_one_line(e)}): METEOR skipped")
    summary["METEOR"] = None if meteor_scores is None else float(meteor_scores[0])
    for n, i in enumerate(ids):
        per_image[i]["METEOR"] = None if meteor_scores is None else float(meteor_scores[1][n])

    for name, scorer in (("ROUGE-L", Rouge()), ("CIDEr", Cider())):
        score, scores = scorer.compute_score(gts, res)
        summary[name] = float(score)
        for i, s in zip(ids, scores):
            per_image[i][name] = float(s)
    return summary, per_image


def _note(message):
    print(f"note: {message}", file=sys.stderr, flush=True)


def _one_line(e):
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:200]


def _ptb_tokenize_java(refs, cands):
    """Run the toolkit's Stanford PTB tokenizer (with the toolkit's flags and its
    punctuation filter) over all captions in one JVM. Unlike the toolkit's own wrapper
    this writes its temporary file outside site-packages and keeps the JVM's chatter
    off the terminal."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)),
                       ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    order = [(d, i, j) for d, src in ((0, refs), (1, cands)) for i, caps in src.items()
             for j in range(len(caps))]
    lines = [" ".join((refs, cands)[d][i][j].split()) for d, i, j in order]
    # A final sentinel line, so a trailing empty caption cannot go missing.
    text = "\n".join(lines + ["sentinel"]) + "\n"
    with tempfile.TemporaryDirectory(prefix="rnncap-ptb-") as tmp:
        path = os.path.join(tmp, "captions.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        proc = subprocess.run(
            ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
             "-preserveLines", "-lowerCase", "-encoding", "utf-8", path],
            capture_output=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"exit status {proc.returncode}: {proc.stderr.decode(errors='replace')[-300:]}")
    out = proc.stdout.decode("utf-8", errors="replace").split("\n")
    if len(out) < len(lines) + 1 or out[len(lines)].strip() != "sentinel":
        raise RuntimeError(f"expected {len(lines)} tokenised lines back, got {len(out) - 1}")
    punct = set(ptbtokenizer.PUNCTUATIONS)
    gts = {i: [None] * len(caps) for i, caps in refs.items()}
    res = {i: [None] * len(caps) for i, caps in cands.items()}
    for (d, i, j), line in zip(order, out):
        (gts, res)[d][i][j] = " ".join(w for w in line.rstrip().split(" ") if w not in punct)
    return gts, res


def _meteor(gts, res):
    """METEOR 1.5 through the toolkit's wrapper. Returns (score, per-image scores)."""
    from pycocoevalcap.meteor.meteor import Meteor

    # "|||" separates fields in the jar's protocol; the wrapper strips it from the
    # candidate only.
    gts = {i: [r.replace("|||", " ") for r in rs] for i, rs in gts.items()}
    scorer = Meteor()
    try:
        score, scores = scorer.compute_score(gts, res)
        return float(score), [float(s) for s in scores]
    finally:
        # The wrapper holds its lock when compute_score raises, and its __del__ would
        # then wait on it forever; free it, and stop the JVM now rather than at exit.
        if scorer.lock.locked():
            scorer.lock.release()
        proc = scorer.meteor_p
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            try:
                pipe.close()
            except OSError:  # stdin of a dead JVM may still hold unflushed bytes
                pass


# ---- pure-Python tokenisation ----------------------------------------------------------

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_QUOTES = {"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"}
_CLITICS = ("n't", "'s", "'m", "'d", "'re", "'ve", "'ll")
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
                "wanna": ["wan", "na"]}
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "st.", "jr.", "sr.", "vs.", "etc.", "mt.",
                  "prof.", "inc.", "co.", "ltd."}
# Always tokens of their own: commas and colons not inside a number, runs of ! and ?,
# and these marks.
_SEPARATE = re.compile(r"(?<!\d),|,(?!\d)|(?<!\d):|:(?!\d)|[!?]+|[;\"`()\[\]{}&+*=]")
_LEADING = "$#-'<>~^%"
_TRAILING = "'%-<>~^"


def ptb_tokenize(text):
    """Tokenise a caption the way the toolkit does, without Java.

    Mirrors ``PTBTokenizer -preserveLines -lowerCase`` followed by the toolkit's
    punctuation filter: lower-case; split off punctuation (keeping it inside numbers
    like "3.5", "1,000" and "5:00", abbreviations like "mr.", "u." and "u.s.", and words like
    "t-shirt" and "1/2"); split clitics ("dog's" -> "dog 's", "don't" -> "do n't",
    "can't" -> "ca n't"); then drop the punctuation tokens the toolkit drops (quotes,
    . , ; : ! ? - -- ...). Brackets become "-lrb-" etc. and "!!" stays, as in the
    toolkit. Returns the tokens joined by single spaces.
    """
    text = "".join(_QUOTES.get(c, c) for c in str(text).lower())
    text = _SEPARATE.sub(lambda m: f" {m.group(0)} ", text)
    tokens = []
    for chunk in text.split():
        tokens += _split_chunk(chunk)
    return " ".join(t for t in tokens if t not in _DROPPED and t not in ('"', "`"))


def _split_chunk(chunk):
    if chunk in _BRACKETS:
        return [_BRACKETS[chunk]]
    if chunk == "'n'":  # as in "slip 'n' slide"
        return [chunk]
    pre, post = [], []
    if len(chunk) > 2 and chunk[0] == chunk[-1] == "'":  # 'quoted'
        pre, post, chunk = ["'"], ["'"], chunk[1:-1]
    # An apostrophe that starts a word ("'em", "'90s") or a clitic stays.
    while chunk and chunk[0] in _LEADING and chunk not in _CLITICS and not (
            chunk[0] == "'" and chunk[1:2].isalnum()):
        n = 2 if chunk.startswith("--") else 1
        pre.append(chunk[:n])
        chunk = chunk[n:]
    while chunk and chunk not in _CLITICS:
        if chunk.endswith("..."):
            post.insert(0, "...")
            chunk = chunk[:-3]
        elif chunk.endswith("--"):
            post.insert(0, "--")
            chunk = chunk[:-2]
        elif chunk[-1] in _TRAILING:
            post.insert(0, chunk[-1])
            chunk = chunk[:-1]
        elif chunk[-1] == "." and chunk not in _ABBREVIATIONS and not re.fullmatch(
                r"(?:[a-z]\.)+", chunk):
            post.insert(0, ".")
            chunk = chunk[:-1]
        else:
            break
    core = _SPLIT_WORDS.get(chunk)
    if core is None:
        clitic = next((c for c in _CLITICS if chunk.endswith(c) and len(chunk) > len(c)), None)
        core = [chunk[:-len(clitic)], clitic] if clitic else ([chunk] if chunk else [])
    return pre + core + post


# ---- perplexity ----------------------------------------------------------------------

def perplexity(model, features, captions, image_idx=None, batch_size=256):
    """Per-word perplexity of reference captions under the model.

    captions: (M, T+1) int ids starting with <START>, padded with <NULL>.
    features: (M, D) aligned with the captions, or (N, D) with ``image_idx`` (M,)
    giving each caption's image row.

    ``exp(total NLL / number of predicted tokens)``: the NLL is summed over every
    position whose target is not <NULL> (the words and the <END>), through
    ``model.loss(..., train=False)`` (which averages over the batch, hence x batch size);
    label smoothing and any penalty the model trains with are left out
    (``model.likelihood_only()``), so this is the true NLL.
    """
    captions = np.asarray(captions)
    if captions.ndim != 2 or captions.shape[1] < 2:
        raise ValueError(f"captions must be (M, T+1) with T >= 1, got shape {captions.shape}")
    plain = model.likelihood_only()
    M = captions.shape[0]
    total, tokens = 0.0, 0
    for start in range(0, M, batch_size):
        rows = slice(start, min(start + batch_size, M))
        caps = captions[rows]
        feats = features[rows] if image_idx is None else features[np.asarray(image_idx)[rows]]
        loss, _ = plain.loss(feats, caps, train=False)
        total += float(loss) * caps.shape[0]
        tokens += int(np.count_nonzero(caps[:, 1:] != model.null_id))
    if tokens == 0:
        raise ValueError("no caption tokens to score")
    return math.exp(total / tokens)


# ---- diversity -----------------------------------------------------------------------

def diversity(captions_by_image, bad_endings=None):
    """How varied the generated captions are.

    captions_by_image: {image_id: caption} or {image_id: [captions]}. Captions are
    compared after ``ptb_tokenize`` (case and punctuation do not make them differ).

    Returns a dict:
      images               number of images
      captions             number of captions
      distinct_captions    number of different captions over all images
      distinct_fraction    distinct_captions / captions (1 = all different)
      unique_image_fraction share of images none of whose captions any other image got
      vocab_used           number of different words used
      mean_length          mean caption length in words
      top_caption          the most frequent caption
      top_caption_share    its share of all captions (1 = the same caption for every photo)
      and the ``defects`` counts: repeated_words, repeated_trigrams and, given
      ``bad_endings`` (words), mid_phrase_endings
    """
    per_image = {}
    for i, caps in captions_by_image.items():
        caps = [caps] if isinstance(caps, str) else list(caps)
        per_image[i] = [ptb_tokenize(c) for c in caps]
    all_caps = [c for caps in per_image.values() for c in caps]
    if not all_caps:
        raise ValueError("no captions to measure")
    counts = Counter(all_caps)
    images_with = Counter(c for caps in per_image.values() for c in set(caps))
    unique = sum(all(images_with[c] == 1 for c in set(caps)) for caps in per_image.values() if caps)
    top, top_n = counts.most_common(1)[0]
    words = [c.split() for c in all_caps]
    return {
        "images": len(per_image),
        "captions": len(all_caps),
        "distinct_captions": len(counts),
        "distinct_fraction": len(counts) / len(all_caps),
        "unique_image_fraction": unique / len(per_image),
        "vocab_used": len({w for ws in words for w in ws}),
        "mean_length": float(np.mean([len(ws) for ws in words])),
        "top_caption": top,
        "top_caption_share": top_n / len(all_caps),
        **defects(words, bad_endings),
    }


def defects(captions, bad_endings=None):
    """How many captions (strings or token lists) show each defect the decoding rules
    forbid (``rnncap.inference.decoding.allowed``):

      repeated_words      a word right after itself ("a a dog", "sled sled")
      repeated_trigrams   a trigram said twice ("a crowd of people ... a crowd of people")
      mid_phrase_endings  the last word is one of ``bad_endings`` ("... in front of a");
                          only when ``bad_endings`` is given. This counts captions
                          cut at the decoder's maximum length too, which no rule
                          about <END> can prevent (a loop such as "a group of a
                          group of ..." is; trigram blocking stops those)
    """
    words = [c.split() if isinstance(c, str) else list(c) for c in captions]
    out = {
        "repeated_words": sum(any(a == b for a, b in zip(ws, ws[1:])) for ws in words),
        "repeated_trigrams": sum(len(set(tri := list(zip(ws, ws[1:], ws[2:])))) < len(tri) for ws in words),
    }
    if bad_endings is not None:
        bad = set(bad_endings)
        out["mid_phrase_endings"] = sum(bool(ws) and ws[-1] in bad for ws in words)
    return out
