"""Caption metrics: BLEU-1..4, CIDEr-D, ROUGE-L (and METEOR when Java is available).

These are our own pure-Python re-implementations of the scorers in pycocoevalcap (the
COCO caption evaluation toolkit), written to give the same numbers on the same tokenized
input. They follow that code line by line where it matters, including its quirks:

* BLEU (``pycocoevalcap.bleu``): corpus-level BLEU with the "closest" effective reference
  length (ties go to the shorter reference), the constants ``tiny = 1e-15`` added to the
  clipped match counts and ``small = 1e-9`` added to the guess counts (so a zero count
  gives a score near 0 instead of a division error), and the brevity penalty
  ``exp(1 - r/c)`` applied to every order when the total candidate length is shorter than
  the total effective reference length.
* CIDEr-D (``pycocoevalcap.cider``, which despite its name computes CIDEr-D): tf-idf
  n-gram vectors (n = 1..4) with document frequencies counted over the references of the
  evaluated images, idf = log(#images) - log(max(1, df)), clipped cosine similarity
  (``min(hyp, ref) * ref``), a Gaussian length penalty with sigma = 6, the mean over n,
  the mean over references, and the x10 scaling. As in pycocoevalcap the "length" fed to
  the penalty is the number of *bigrams* in a sentence (``len - 1`` for two or more
  words, 0 otherwise), not the number of words; for sentences of two or more words the
  difference of the two is the same.
* ROUGE-L (``pycocoevalcap.rouge``): LCS-based F-measure with beta = 1.2 using the best
  precision and the best recall over the references (taken independently), averaged
  over images. Sentences are split on single spaces (``split(" ")``) as there, so an
  empty sentence counts as one empty token.

Tokenization. pycocoevalcap runs the Stanford PTBTokenizer (Java) with ``-lowerCase`` and
then drops the punctuation tokens in ``PTB_PUNCTUATIONS``. ``tokenize`` is a small regular
expression imitation of that pipeline that needs no Java. It agrees with the Java tool on
ordinary captions (lower-casing, splitting off and dropping . , ; : ! ? quotes and
dashes, splitting clitics such as ``'s`` and ``n't``, keeping abbreviations such as
``mr.`` or ``u.s.``, and even the tool's quirk of keeping brackets as ``-lrb-`` /
``-rrb-`` tokens, because ``-lowerCase`` lower-cases them before the filter, which only
lists upper-case ``-LRB-``). Known differences, all rare in captions: PTB's heuristics for
sentence-final periods after unknown abbreviations, multi-part contractions
(``rock'n'roll``, ``'tis``, ``she'd've``), ``&`` inside upper-case abbreviations
(``AT&T`` stays whole in PTB, we split it), a quote between digits (``5'10"``), and
Unicode beyond the common quotes, dashes and ellipsis. Scores computed on our tokens therefore match the official toolkit
exactly when the tokens agree, and are very close otherwise.

METEOR has no pure-Python implementation here: when a ``java`` executable is on PATH and
pycocoevalcap is importable, ``meteor`` runs pycocoevalcap's METEOR 1.5 jar; otherwise the
metric is left out and a note says why.
"""

from __future__ import annotations

import math
import re
import shutil
import threading
from collections import Counter
from typing import Hashable, Mapping, Sequence

import numpy as np

__all__ = [
    "PTB_PUNCTUATIONS",
    "tokenize",
    "tokenize_captions",
    "bleu",
    "cider_d",
    "rouge_l",
    "meteor",
    "meteor_available",
    "compute_metrics",
    "METRIC_NAMES",
]

# The exact list pycocoevalcap's PTBTokenizer wrapper removes after tokenization.
PTB_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# Names of the keys compute_metrics returns (METEOR only when it could be computed).
METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")

# ---------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------

# Unicode punctuation PTBTokenizer normalises to its ASCII forms (which are then dropped).
_UNICODE_MAP = {
    "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
    "\u2026": " ... ", "\u2014": " -- ", "\u2013": " -- ",
}
# Brackets become these tokens. They survive the punctuation filter because PTB's
# -lowerCase turns -LRB- into -lrb- before pycocoevalcap compares against "-LRB-".
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Abbreviations whose final period PTB keeps (a small list covering caption-like text).
_ABBREVIATIONS = frozenset(
    ["mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "prof", "mt", "ft", "inc",
     "co", "corp", "ltd", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept",
     "oct", "nov", "dec", "ave", "blvd", "gen", "gov", "sen", "rep", "capt", "lt", "sgt"]
)
# Whole words PTB splits in two.
_BRACKET_TOKENS = frozenset(_BRACKETS.values())
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
                "wanna": ["wan", "na"]}
_CLITIC_RE = re.compile(r"^(.+?)('s|'re|'ve|'d|'ll|'m)$")
_ABBREV_LETTERS_RE = re.compile(r"^(?:[a-z]\.)+$")  # a. / u.s. / a.m. / e.g.


def _split_chunk(chunk: str) -> list[str]:
    """Split one whitespace-free chunk the way PTBTokenizer would (after global splits)."""
    if chunk in _BRACKET_TOKENS:
        return [chunk]
    # Leading/trailing hyphens are separate "-" tokens in PTB, which are then dropped.
    chunk = chunk.strip("-")
    if not chunk:
        return []
    # A sentence-final period is split off (and dropped) unless the word is an abbreviation.
    if chunk.endswith(".") and len(chunk) > 1:
        stem = chunk[:-1]
        # Kept: u.s. / a. / mr. / x.y. ; dropped: "dog." and numbers such as "3.5.".
        is_number = re.fullmatch(r"[\d.,]+", stem) is not None
        keep = not is_number and (
            "." in stem or _ABBREV_LETTERS_RE.match(chunk) or stem in _ABBREVIATIONS)
        if not keep:
            chunk = stem
    elif chunk == ".":
        return []
    # Opening single quotes are split off, except in '90s-style years and bare clitics.
    if chunk.startswith("'") and not re.match(r"^'(\d+s|s|re|ve|d|ll|m|em)$", chunk):
        chunk = chunk.lstrip("'")
    # A closing single quote (or possessive plural "dogs'") is split off.
    chunk = chunk.rstrip("'")
    if not chunk:
        return []
    if chunk in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[chunk])
    if chunk.endswith("n't") and len(chunk) > 3:
        return [chunk[:-3], "n't"]
    match = _CLITIC_RE.match(chunk)
    if match:
        return [match.group(1), match.group(2)]
    return [chunk]


def tokenize(text: str) -> str:
    """Tokenize a caption like pycocoevalcap's PTBTokenizer + punctuation filter, without Java.

    Returns the tokens joined by single spaces (the form all scorers take). See the module
    docstring for the known differences from the Java tokenizer.
    """
    text = text.replace("\n", " ").replace("\r", " ").lower()
    for src, dst in _UNICODE_MAP.items():
        text = text.replace(src, dst)
    for src, dst in _BRACKETS.items():
        text = text.replace(src, f" {dst} ")
    # Double quotes and backquotes become `` / '' tokens in PTB, which are dropped.
    text = text.replace('"', " ").replace("`", " ").replace("''", " ")
    # Ellipses (two or more periods in PTB's handling) and double dashes are dropped.
    text = re.sub(r"\.{2,}", " ", text)
    text = re.sub(r"-{2,}", " ", text)
    text = text.replace(";", " ")
    # Commas and colons are dropped except inside numbers (1,000 / 10:30).
    text = re.sub(r"[,:](?!\d)", " ", text)
    # Runs of ! and ? are their own tokens; a single one is then dropped by the filter.
    text = re.sub(r"[!?]+", lambda m: f" {m.group(0)} ", text)
    # Symbols PTB always splits off.
    text = re.sub(r"([%&+=<>*^|\\~])", r" \1 ", text)
    # Currency signs are split from the digits they touch.
    text = re.sub(r"\$(?=\d)", "$ ", text)
    text = re.sub(r"(?<=\d)\$", " $", text)
    text = re.sub(r"#(?=\d)", "# ", text)
    tokens: list[str] = []
    for chunk in text.split():
        tokens.extend(_split_chunk(chunk))
    return " ".join(t for t in tokens if t and t not in PTB_PUNCTUATIONS)


def tokenize_captions(captions: Mapping[Hashable, Sequence[str]]) -> dict:
    """Tokenize every caption of a mapping id -> list of captions (like PTBTokenizer.tokenize)."""
    return {key: [tokenize(c) for c in caps] for key, caps in captions.items()}


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------

def _ngram_counts(words: Sequence[str], n: int) -> Counter:
    """Counts of all 1..n-grams (as tuples) of a word list."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _check_inputs(hyps: Mapping, refs: Mapping) -> list:
    """Validate the scorer inputs; returns the list of ids to score (in hypothesis order)."""
    missing = [k for k in hyps if k not in refs]
    if missing:
        raise KeyError(f"{len(missing)} prediction id(s) have no references, e.g. {missing[0]!r}")
    for key in hyps:
        if not isinstance(hyps[key], str):
            raise TypeError(f"hypothesis for {key!r} must be a str, got {type(hyps[key]).__name__}")
        if isinstance(refs[key], str) or len(refs[key]) == 0:
            raise ValueError(f"references for {key!r} must be a non-empty list of str")
    return list(hyps)


# ---------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------

def bleu(hyps: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]], n: int = 4):
    """Corpus BLEU-1..n as pycocoevalcap's ``Bleu(n)`` (effective reference length "closest").

    Args:
      hyps: id -> tokenized hypothesis (tokens separated by whitespace).
      refs: id -> list of tokenized references.
    Returns:
      (scores, per_image): ``scores[k]`` is corpus BLEU-(k+1); ``per_image[k]`` lists the
      sentence-level BLEU-(k+1) of each id in ``hyps`` order (same formula per sentence).
    """
    ids = _check_inputs(hyps, refs)
    small, tiny = 1e-9, 1e-15  # pycocoevalcap's constants: avoid 0/0, keep 0 matches ~0
    total_guess = [0] * n
    total_correct = [0] * n
    total_testlen = 0
    total_reflen = 0
    per_image: list[list[float]] = [[] for _ in range(n)]
    for key in ids:
        words = hyps[key].split()
        testlen = len(words)
        counts = _ngram_counts(words, n)
        # Clip each hypothesis n-gram count by its largest count in any one reference.
        max_ref_counts: dict = {}
        reflens = []
        for ref in refs[key]:
            ref_words = ref.split()
            reflens.append(len(ref_words))
            for ngram, count in _ngram_counts(ref_words, n).items():
                if count > max_ref_counts.get(ngram, 0):
                    max_ref_counts[ngram] = count
        # "closest": the reference length nearest the hypothesis length, shorter on ties.
        reflen = min((abs(length - testlen), length) for length in reflens)[1]
        guess = [max(0, testlen - k) for k in range(n)]
        correct = [0] * n
        for ngram, count in counts.items():
            correct[len(ngram) - 1] += min(max_ref_counts.get(ngram, 0), count)

        total_testlen += testlen
        total_reflen += reflen
        for k in range(n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]

        score = 1.0
        for k in range(n):
            score *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
            per_image[k].append(score ** (1.0 / (k + 1)))
        ratio = (testlen + tiny) / (reflen + small)
        if ratio < 1:
            for k in range(n):
                per_image[k][-1] *= math.exp(1 - 1 / ratio)

    scores = []
    score = 1.0
    for k in range(n):
        score *= float(total_correct[k] + tiny) / (total_guess[k] + small)
        scores.append(score ** (1.0 / (k + 1)))
    ratio = (total_testlen + tiny) / (total_reflen + small)
    if ratio < 1:  # brevity penalty
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores, per_image


# ---------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------

def cider_d(hyps: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]],
            n: int = 4, sigma: float = 6.0):
    """Corpus CIDEr-D as pycocoevalcap's ``Cider()`` (n=4, sigma=6, x10).

    Document frequencies are counted over the references of the ids in ``hyps``, so the
    score depends on the whole evaluated set, as in pycocoevalcap.

    Returns:
      (score, per_image): the mean over ids and the list of per-id scores.
    """
    ids = _check_inputs(hyps, refs)
    ref_counts = {key: [_ngram_counts(r.split(), n) for r in refs[key]] for key in ids}
    # Document frequency: in how many images' reference sets an n-gram appears.
    doc_freq: Counter = Counter()
    for key in ids:
        doc_freq.update(set(ng for counts in ref_counts[key] for ng in counts))
    log_num_images = math.log(float(len(ids)))

    def to_vec(counts: Counter):
        """tf-idf vectors per n-gram order, their norms, and pycocoevalcap's "length"."""
        vec = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for ngram, term_freq in counts.items():
            order = len(ngram) - 1
            # An n-gram not in any reference gets df 1 (idf = log #images).
            idf = log_num_images - math.log(max(1.0, float(doc_freq.get(ngram, 0))))
            weight = float(term_freq) * idf
            vec[order][ngram] = weight
            norm[order] += weight ** 2
            if order == 1:  # pycocoevalcap quirk: the length is the number of bigrams
                length += term_freq
        return vec, [math.sqrt(v) for v in norm], length

    def similarity(hyp, ref) -> np.ndarray:
        """Clipped cosine similarity per order, times the Gaussian length penalty."""
        vec_h, norm_h, len_h = hyp
        vec_r, norm_r, len_r = ref
        delta = float(len_h - len_r)
        penalty = np.e ** (-(delta ** 2) / (2 * sigma ** 2))
        val = np.zeros(n)
        for order in range(n):
            for ngram, weight in vec_h[order].items():
                ref_weight = vec_r[order].get(ngram, 0.0)
                # CIDEr-D clipping: a repeated hypothesis n-gram earns at most the ref weight.
                val[order] += min(weight, ref_weight) * ref_weight
            if norm_h[order] != 0 and norm_r[order] != 0:
                val[order] /= norm_h[order] * norm_r[order]
            val[order] *= penalty
        return val

    per_image = []
    for key in ids:
        hyp_vec = to_vec(_ngram_counts(hyps[key].split(), n))
        total = np.zeros(n)
        for counts in ref_counts[key]:
            total += similarity(hyp_vec, to_vec(counts))
        # Mean over n-gram orders, mean over references, times 10.
        per_image.append(float(np.mean(total)) / len(ref_counts[key]) * 10.0)
    return float(np.mean(np.array(per_image))), per_image


# ---------------------------------------------------------------------------
# ROUGE-L
# ---------------------------------------------------------------------------

def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len a * len b))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(hyps: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]],
            beta: float = 1.2):
    """ROUGE-L as pycocoevalcap's ``Rouge()``: mean over ids of the LCS F-measure.

    Returns:
      (score, per_image).
    """
    ids = _check_inputs(hyps, refs)
    per_image = []
    for key in ids:
        # split(" ") rather than split(): matches pycocoevalcap, e.g. "" is one empty token.
        cand = hyps[key].split(" ")
        precisions, recalls = [], []
        for ref in refs[key]:
            ref_tokens = ref.split(" ")
            lcs = _lcs_length(ref_tokens, cand)
            precisions.append(lcs / float(len(cand)))
            recalls.append(lcs / float(len(ref_tokens)))
        prec, rec = max(precisions), max(recalls)
        if prec != 0 and rec != 0:
            per_image.append(((1 + beta ** 2) * prec * rec) / float(rec + beta ** 2 * prec))
        else:
            per_image.append(0.0)
    return float(np.mean(np.array(per_image))), per_image


# ---------------------------------------------------------------------------
# METEOR (optional, Java)
# ---------------------------------------------------------------------------

def meteor_available() -> tuple[bool, str]:
    """Whether METEOR can run here; the second item says why not (empty when it can)."""
    if shutil.which("java") is None:
        return False, "METEOR omitted: no `java` executable on PATH (METEOR 1.5 is a Java jar)."
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401  (only checks that it is installed)
    except ImportError:
        return False, "METEOR omitted: pycocoevalcap is not installed (pip install pycocoevalcap)."
    return True, ""


def meteor(hyps: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]],
           timeout_s: float = 600.0) -> float:
    """Corpus METEOR via pycocoevalcap's METEOR 1.5 jar (needs Java and pycocoevalcap).

    The jar is driven through pycocoevalcap's ``Meteor`` wrapper in a worker thread so a
    jar that dies (its wrapper would then block forever on a read) turns into an error.
    """
    ok, why = meteor_available()
    if not ok:
        raise RuntimeError(why)
    from pycocoevalcap.meteor.meteor import Meteor

    ids = _check_inputs(hyps, refs)
    gts = {i: list(refs[key]) for i, key in enumerate(ids)}
    res = {i: [hyps[key]] for i, key in enumerate(ids)}
    scorer = Meteor()
    result: dict = {}

    def work():
        try:
            result["score"] = scorer.compute_score(gts, res)[0]
        except Exception as exc:  # reported to the caller below
            result["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive() or "error" in result:
        scorer.meteor_p.kill()
        detail = result.get("error", f"no answer within {timeout_s:.0f} s")
        raise RuntimeError(f"METEOR jar failed: {detail}")
    return float(result["score"])


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

def compute_metrics(predictions: Mapping[Hashable, str],
                    references: Mapping[Hashable, Sequence[str]],
                    *, tokenized: bool = False, use_meteor: bool | None = None,
                    notes: list | None = None) -> dict[str, float]:
    """Caption metrics of ``predictions`` against ``references``.

    Args:
      predictions: id -> predicted caption (one per id).
      references: id -> list of reference captions; must hold every id of ``predictions``
        (extra ids are ignored, and do not count towards CIDEr-D's document frequencies).
      tokenized: the captions are already tokenized (tokens joined by spaces); otherwise
        ``tokenize`` is applied to every caption first.
      use_meteor: True: compute METEOR (error if Java/pycocoevalcap are missing);
        False: skip it; None (default): compute it when available, else leave it out.
      notes: if a list is given, human-readable notes (e.g. why METEOR is missing) are
        appended to it.
    Returns:
      {"BLEU-1", ..., "BLEU-4", "CIDEr-D", "ROUGE-L"} -> float, plus "METEOR" when computed.
      Values are on pycocoevalcap's scale (BLEU/ROUGE/METEOR in [0, 1], CIDEr-D x10).
    """
    if not predictions:
        raise ValueError("no predictions to score")
    _check_inputs(predictions, references)
    if tokenized:
        hyps = dict(predictions)
        refs = {k: list(references[k]) for k in predictions}
    else:
        hyps = {k: tokenize(v) for k, v in predictions.items()}
        refs = {k: [tokenize(r) for r in references[k]] for k in predictions}

    metrics: dict[str, float] = {}
    bleu_scores, _ = bleu(hyps, refs, n=4)
    for k, score in enumerate(bleu_scores):
        metrics[f"BLEU-{k + 1}"] = float(score)

    if use_meteor is None:  # auto: compute when possible, otherwise explain in a note
        available, why = meteor_available()
        if available:
            try:
                metrics["METEOR"] = meteor(hyps, refs)
            except RuntimeError as exc:
                why = f"METEOR omitted: {exc}"
        if "METEOR" not in metrics and notes is not None:
            notes.append(why)
    elif use_meteor:
        metrics["METEOR"] = meteor(hyps, refs)
    elif notes is not None:
        notes.append("METEOR skipped (not requested).")

    metrics["ROUGE-L"] = rouge_l(hyps, refs)[0]
    metrics["CIDEr-D"] = cider_d(hyps, refs)[0]
    if notes is not None and not tokenized:
        notes.append("Tokenized with decode.metrics.tokenize (a Java-free imitation of "
                     "pycocoevalcap's PTBTokenizer).")
    return metrics
