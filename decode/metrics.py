"""Caption metrics: BLEU-1..4, CIDEr-D, ROUGE-L, and METEOR where Java exists.

The scores are computed by pycocoevalcap (the COCO caption evaluation toolkit), by calling
its scorers: ``Bleu(4)``, ``Rouge()``, ``Cider()`` (which computes CIDEr-D: clipped
n-gram counts and a Gaussian length penalty, sigma 6, x10) and ``Meteor()`` (the METEOR
1.5 jar, so only when a ``java`` executable is on PATH). This module adds only what the
toolkit lacks: a tokenizer that needs no Java, input checks with readable errors, and a
time limit around the METEOR jar.

Tokenizers. pycocoevalcap's pipeline first runs the Stanford PTBTokenizer (a Java jar)
with ``-lowerCase`` and drops the punctuation tokens in its ``PUNCTUATIONS`` list. Two
tokenizers give that input to the scorers:

* ``"python"`` (the default, wherever the code runs): ``tokenize``, our regular
  expression imitation of that pipeline. It is the default even where Java exists so
  that a set of captions gets the same numbers on every machine (CI machines and laptops
  often have no Java) and the numbers stay those of earlier reports.
* ``"ptb"`` (opt in, needs Java): pycocoevalcap's ``PTBTokenizer``, i.e. the official
  COCO pipeline. Use it to quote numbers next to published COCO results.

``tokenize`` agrees with the Java tool on ordinary captions (lower-casing, splitting off
and dropping . , ; : ! ? quotes and dashes, splitting clitics such as ``'s`` and
``n't``, keeping abbreviations such as ``mr.`` or ``u.s.``, and even the tool's quirk of
keeping brackets as ``-lrb-`` / ``-rrb-`` tokens, because ``-lowerCase`` lower-cases them
before the filter, which only lists upper-case ``-LRB-``). Known differences, all rare in
captions: PTB's heuristics for sentence-final periods after unknown abbreviations and for
an abbreviation followed by more periods (``in the U.S..`` or ``etc...`` keep ``u.s.`` /
``etc.`` in PTB, we drop the period), multi-part contractions (``rock'n'roll``,
``'tis``, ``she'd've``), ``&`` inside upper-case abbreviations (``AT&T`` stays whole in
PTB, we split it), a quote between digits (``5'10"``), and Unicode beyond the common
quotes, dashes and ellipsis. Where the tokens agree the scores are the official ones
exactly; tests/test_metrics.py checks both agreements.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Hashable, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

__all__ = [
    "PTB_PUNCTUATIONS",
    "TOKENIZERS",
    "tokenize",
    "tokenize_captions",
    "tokenize_ptb",
    "meteor",
    "meteor_available",
    "compute_metrics",
    "METRIC_NAMES",
]

# The punctuation tokens pycocoevalcap's PTBTokenizer wrapper removes after tokenization.
PTB_PUNCTUATIONS = frozenset(PUNCTUATIONS)

# Names of the keys compute_metrics returns (METEOR only when it could be computed).
METRIC_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D")

# Tokenizers compute_metrics can run on raw captions (see the module docstring).
TOKENIZERS = ("python", "ptb")

# The note compute_metrics adds to say which tokenizer produced the scored tokens.
TOKENIZER_NOTES = {
    "python": "Tokenized with decode.metrics.tokenize (a Java-free imitation of pycocoevalcap's PTBTokenizer).",
    "ptb": "Tokenized with pycocoevalcap's PTBTokenizer (Stanford CoreNLP jar, Java).",
}

# ---------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------

# Unicode punctuation PTBTokenizer normalises to its ASCII forms (which are then dropped).
_UNICODE_MAP = {
    "\u2018": "'",
    "\u2019": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u2026": " ... ",
    "\u2014": " -- ",
    "\u2013": " -- ",
}
# Brackets become these tokens. They survive the punctuation filter because PTB's
# -lowerCase turns -LRB- into -lrb- before pycocoevalcap compares against "-LRB-".
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Abbreviations whose final period PTB keeps (a small list covering caption-like text).
_ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "st",
        "jr",
        "sr",
        "vs",
        "etc",
        "prof",
        "mt",
        "ft",
        "inc",
        "co",
        "corp",
        "ltd",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
        "ave",
        "blvd",
        "gen",
        "gov",
        "sen",
        "rep",
        "capt",
        "lt",
        "sgt",
    ]
)
# Whole words PTB splits in two.
_BRACKET_TOKENS = frozenset(_BRACKETS.values())
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"]}
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
        keep = not is_number and ("." in stem or _ABBREV_LETTERS_RE.match(chunk) or stem in _ABBREVIATIONS)
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


def tokenize_ptb(captions: Sequence[str]) -> list[str]:
    """Tokenize captions with pycocoevalcap's PTBTokenizer (the Stanford jar; needs Java).

    Args:
      captions: raw captions, any number.
    Returns:
      One string per caption, in order: its tokens (lower-cased, punctuation dropped)
      joined by single spaces, exactly what pycocoevalcap feeds its scorers.
    Raises:
      RuntimeError: no ``java`` on PATH, or the jar could not run.
    """
    if shutil.which("java") is None:
        raise RuntimeError(
            "the ptb tokenizer needs a `java` executable on PATH (Stanford "
            "PTBTokenizer is a Java jar); install Java or use the python tokenizer"
        )
    # The wrapper sends the jar one caption per line and pairs the output lines with the
    # captions by position, so a line break inside a caption (\r, \f, \u2028, ...) would
    # shift every later caption: make each caption one line (PTB splits on any whitespace).
    lines = {i: [{"caption": " ".join(c.splitlines())}] for i, c in enumerate(captions)}
    try:
        tokens = PTBTokenizer().tokenize(lines)
    except OSError as exc:  # e.g. it writes its input file next to the jar, in site-packages
        raise RuntimeError(f"pycocoevalcap's PTBTokenizer could not run: {exc}") from None
    if len(tokens) != len(lines):  # a jar that died early: the wrapper would drop captions
        raise RuntimeError(f"pycocoevalcap's PTBTokenizer returned {len(tokens)} lines for {len(lines)} captions")
    return [tokens[i][0] for i in range(len(lines))]


def _check_inputs(hyps: Mapping, refs: Mapping) -> list:
    """Validate the inputs with readable errors (pycocoevalcap only asserts); returns the ids.

    Returns the ids of ``hyps``, in their order: the order the scorers see them in.
    """
    missing = [k for k in hyps if k not in refs]
    if missing:
        raise KeyError(f"{len(missing)} prediction id(s) have no references, e.g. {missing[0]!r}")
    for key in hyps:
        if not isinstance(hyps[key], str):
            raise TypeError(f"hypothesis for {key!r} must be a str, got {type(hyps[key]).__name__}")
        if isinstance(refs[key], str) or len(refs[key]) == 0 or not all(isinstance(r, str) for r in refs[key]):
            raise ValueError(f"references for {key!r} must be a non-empty list of str")
    return list(hyps)


# ---------------------------------------------------------------------------
# METEOR (Java)
# ---------------------------------------------------------------------------


def meteor_available() -> tuple[bool, str]:
    """Whether METEOR can run here; the second item says why not (empty when it can)."""
    if shutil.which("java") is None:
        return False, "METEOR omitted: no `java` executable on PATH (METEOR 1.5 is a Java jar)."
    return True, ""


def meteor(hyps: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]], timeout_s: float = 600.0) -> float:
    """Corpus METEOR of tokenized captions via pycocoevalcap's ``Meteor`` (the 1.5 jar).

    Args:
      hyps: id -> tokenized hypothesis; refs: id -> list of tokenized references.
      timeout_s: longest wait for the jar's answer.
    Returns:
      The corpus score pycocoevalcap reports, in [0, 1].

    The wrapper runs in a worker thread: when the jar dies, the wrapper would block
    forever on a read, so a jar without an answer in ``timeout_s`` becomes an error.
    """
    ok, why = meteor_available()
    if not ok:
        raise RuntimeError(why)
    ids = _check_inputs(hyps, refs)
    gts = {key: list(refs[key]) for key in ids}
    res = {key: [hyps[key]] for key in ids}
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
        # compute_score takes scorer.lock and, on an error, never releases it, while the
        # wrapper's __del__ waits for that lock: without this the process hangs when the
        # scorer is collected (at the latest at exit).
        if scorer.lock.locked():
            scorer.lock.release()
        detail = result.get("error", f"no answer within {timeout_s:.0f} s")
        raise RuntimeError(f"METEOR jar failed: {detail}")
    return float(result["score"])


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def compute_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    tokenized: bool = False,
    tokenizer: str = "python",
    use_meteor: bool | None = None,
    notes: list | None = None,
) -> dict[str, float]:
    """Caption metrics of ``predictions`` against ``references``, by pycocoevalcap's scorers.

    Args:
      predictions: id -> predicted caption (one per id).
      references: id -> list of reference captions; must hold every id of ``predictions``
        (extra ids are ignored, and do not count towards CIDEr-D's document frequencies).
      tokenized: the captions are already tokenized (tokens joined by spaces) and are
        scored as they are; otherwise ``tokenizer`` is applied to every caption first.
      tokenizer: "python" (``tokenize``, no Java; the default) or "ptb" (pycocoevalcap's
        PTBTokenizer, needs Java). See the module docstring for when to use which.
      use_meteor: True: compute METEOR (error if Java is missing); False: skip it;
        None (default): compute it when Java is there, else leave it out.
      notes: if a list is given, human-readable notes (e.g. why METEOR is missing and
        which tokenizer was used) are appended to it.
    Returns:
      {"BLEU-1", ..., "BLEU-4", "ROUGE-L", "CIDEr-D"} -> float, plus "METEOR" when computed.
      Values are on pycocoevalcap's scale (BLEU/ROUGE/METEOR in [0, 1], CIDEr-D x10).
    """
    if not predictions:
        raise ValueError("no predictions to score")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {tokenizer!r}")
    ids = _check_inputs(predictions, references)
    # pycocoevalcap's format: id -> [hypothesis] and id -> [references], in the same order.
    res = {key: [predictions[key]] for key in ids}
    gts = {key: list(references[key]) for key in ids}
    if not tokenized:
        if tokenizer == "ptb":
            # One jar run for all captions (each run starts a JVM): predictions, then refs.
            texts = [predictions[key] for key in ids] + [r for key in ids for r in gts[key]]
            tokens = iter(tokenize_ptb(texts))
            res = {key: [next(tokens)] for key in ids}
            gts = {key: [next(tokens) for _ in gts[key]] for key in ids}
        else:
            res = tokenize_captions(res)
            gts = tokenize_captions(gts)

    metrics: dict[str, float] = {}
    bleu_scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, score in enumerate(bleu_scores):
        metrics[f"BLEU-{n + 1}"] = float(score)

    hyps = {key: res[key][0] for key in ids}
    if use_meteor is None:  # auto: compute when possible, otherwise explain in a note
        available, why = meteor_available()
        if available:
            try:
                metrics["METEOR"] = meteor(hyps, gts)
            except RuntimeError as exc:
                why = f"METEOR omitted: {exc}"
        if "METEOR" not in metrics and notes is not None:
            notes.append(why)
    elif use_meteor:
        metrics["METEOR"] = meteor(hyps, gts)
    elif notes is not None:
        notes.append("METEOR skipped (not requested).")

    metrics["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    metrics["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    if notes is not None and not tokenized:
        notes.append(TOKENIZER_NOTES[tokenizer])
    return metrics
