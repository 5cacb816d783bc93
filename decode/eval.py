"""Caption metrics for a predictions file: ``python -m decode.eval``.

Usage::

    python -m decode.eval --pred OUT.jsonl --refs REFS [--json METRICS.json]
                          [--meteor auto|on|off] [--tokenizer python|ptb] [--data-dir DIR]

``OUT.jsonl`` is what ``python -m decode.run --out`` writes: one JSON object per line with at
least ``image`` and ``caption`` (other keys are ignored). Lines carrying an ``error`` (not
null) or no caption are skipped and counted; an empty caption is scored as empty.

``REFS`` is one of:

* a JSONL file with lines ``{"image": ..., "captions": [...]}`` or ``{"image": ...,
  "caption": ...}`` (lines for the same image are merged);
* a JSON file holding ``{image: [captions]}`` (or ``{image: caption}``), or a list of the
  JSONL-style objects;
* a COCO-style annotations file ``{"images": [{"id", "file_name"}], "annotations":
  [{"image_id", "caption"}]}`` (keys are the file names; the numeric ids also match);
* ``tfds:NAME:SPLIT``: references read through
  ``fastvlm_jax.data.tfds_builders.iter_tfds_images`` (see ``load_tfds_references``).

A prediction's ``image`` is matched to a reference key exactly, else by basename, else by
stem (basename without extension), else (COCO files only) by the number its stem ends
with. The metrics are those of ``decode.metrics.compute_metrics`` (pycocoevalcap's scorers);
captions are tokenized by ``decode.metrics.tokenize`` (no Java) unless ``--tokenizer ptb``
asks for pycocoevalcap's Java PTBTokenizer. The report's ``tokenizer`` key says which.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable

from decode.metrics import TOKENIZERS, compute_metrics


class EvalError(Exception):
    """A problem with the inputs, reported to the user as one line (no traceback)."""


# ---------------------------------------------------------------------------
# Predictions
# ---------------------------------------------------------------------------


def read_predictions(path: str) -> tuple[dict[str, str], dict[str, int]]:
    """Read a decode.run JSONL file.

    Returns:
      (predictions, counts): image -> caption for the usable lines (first line wins for a
      repeated image), and counters: ``lines``, ``skipped_error``, ``skipped_no_caption``,
      ``skipped_no_image``, ``duplicates``.
    """
    if not os.path.isfile(path):
        raise EvalError(
            f"--pred file not found: {path} (pass the JSONL written by `python -m decode.run --out OUT.jsonl`)"
        )
    predictions: dict[str, str] = {}
    counts = Counter(lines=0, skipped_error=0, skipped_no_caption=0, skipped_no_image=0, duplicates=0)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            counts["lines"] += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvalError(
                    f"--pred {path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(row, dict):
                raise EvalError(f"--pred {path}:{lineno}: expected a JSON object per line")
            if row.get("error") is not None:
                counts["skipped_error"] += 1
                continue
            caption = row.get("caption")
            if not isinstance(caption, str):
                counts["skipped_no_caption"] += 1
                continue
            image = row.get("image")
            if image is None:
                counts["skipped_no_image"] += 1
                continue
            image = str(image)
            if image in predictions:
                counts["duplicates"] += 1  # keep the first caption for an image
                continue
            predictions[image] = caption
    return predictions, dict(counts)


# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------


def _as_text(value) -> str:
    """A caption or id from JSON/TFDS as str (TFDS gives bytes and numpy scalars)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalar / 0-d array
        value = value.item()
        if isinstance(value, bytes):
            return value.decode("utf-8")
    return str(value)


def _caption_list(value) -> list[str]:
    """Normalise one reference entry (a caption or a list/array of captions) to list[str]."""
    if isinstance(value, (str, bytes)):
        return [_as_text(value)]
    if hasattr(value, "tolist"):  # numpy array of captions
        value = value.tolist()
        if isinstance(value, (str, bytes)):
            return [_as_text(value)]
    return [_as_text(v) for v in value]


def _refs_from_rows(rows: Iterable[tuple[int, object]], where: str) -> dict[str, list[str]]:
    """Merge (line number, object) rows of {"image", "captions"|"caption"} into a mapping."""
    refs: dict[str, list[str]] = {}
    for lineno, row in rows:
        if not isinstance(row, dict) or "image" not in row or not ("captions" in row or "caption" in row):
            raise EvalError(
                f'--refs {where}:{lineno}: expected an object with "image" and '
                '"captions" (a list) or "caption" (a string)'
            )
        captions = row["captions"] if "captions" in row else row["caption"]
        refs.setdefault(str(row["image"]), []).extend(_caption_list(captions))
    return refs


def _refs_from_coco(data: dict, where: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """COCO annotations -> (file_name -> captions, str(image id) -> file_name aliases)."""
    names = {}
    for image in data.get("images", []):
        if "id" in image:
            names[image["id"]] = str(image.get("file_name", image["id"]))
    refs: dict[str, list[str]] = {}
    for ann in data["annotations"]:
        if "image_id" not in ann or "caption" not in ann:
            raise EvalError(f'--refs {where}: every COCO annotation needs "image_id" and "caption"')
        key = names.get(ann["image_id"], str(ann["image_id"]))
        refs.setdefault(key, []).append(str(ann["caption"]))
    aliases = {str(i): name for i, name in names.items() if name in refs and str(i) != name}
    return refs, aliases


def load_reference_file(path: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Read a JSON / JSONL / COCO references file.

    Returns:
      (references, aliases): key -> list of captions, and extra names that also identify
      a key (COCO numeric ids), alias -> key.
    """
    if not os.path.isfile(path):
        raise EvalError(
            f"--refs file not found: {path} (pass a JSON/JSONL references file, "
            "a COCO captions_*.json, or tfds:NAME:SPLIT)"
        )
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # not one JSON document: read it as JSONL below
    if isinstance(data, dict) and "annotations" in data:
        refs, aliases = _refs_from_coco(data, path)
    elif isinstance(data, dict):
        refs, aliases = {str(k): _caption_list(v) for k, v in data.items()}, {}
    elif isinstance(data, list):
        refs, aliases = _refs_from_rows(enumerate(data, start=1), path), {}
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise EvalError(
                    f"--refs {path}:{lineno}: not valid JSON ({exc.msg}); expected a "
                    "JSON mapping, COCO annotations or JSONL lines"
                ) from None
        refs, aliases = _refs_from_rows(rows, path), {}
    empty = [k for k, v in refs.items() if not v]
    if empty:
        raise EvalError(f"--refs {path}: image {empty[0]!r} has an empty caption list")
    if not refs:
        raise EvalError(f"--refs {path}: no references found")
    return refs, aliases


def load_tfds_references(spec: str, data_dir: str | None = None) -> dict[str, list[str]]:
    """References from a TFDS dataset, ``spec`` = ``tfds:NAME:SPLIT``.

    Imports ``fastvlm_jax.data.tfds_builders`` only here (it pulls in TFDS) and reads
    ``iter_tfds_images(spec, data_dir, decode=False)``, which yields ``(image_id, image,
    captions)``; the images are ignored (undecoded: only the captions are needed). Keys
    are ``str(image_id)``; ``spec`` is passed on unchanged (tfds:NAME[/CONFIG][:SPLIT]).
    """
    parts = spec.split(":")
    if len(parts) < 2 or parts[0] != "tfds" or not parts[1]:
        raise EvalError(f"--refs {spec}: expected tfds:NAME:SPLIT, e.g. tfds:coco_captions:val")
    # Imported here: it pulls in tensorflow_datasets, which only tfds: references need.
    from fastvlm_jax.data.tfds_builders import iter_tfds_images

    refs: dict[str, list[str]] = {}
    try:
        for image_id, _image, captions in iter_tfds_images(spec, data_dir, decode=False):
            refs.setdefault(_as_text(image_id), []).extend(_caption_list(captions))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise EvalError(f"--refs {spec}: {exc}") from None
    except ImportError as exc:  # TFDS imports some packages only when building/reading
        raise EvalError(f"--refs {spec}: reading the dataset needs a missing package ({exc})") from None
    if not refs:
        raise EvalError(f"--refs {spec}: the dataset yielded no images")
    return refs


def load_references(spec: str, data_dir: str | None = None):
    """Dispatch on ``spec``: ``tfds:...`` or a file. Returns (references, aliases)."""
    if spec.startswith("tfds:"):
        return load_tfds_references(spec, data_dir), {}
    return load_reference_file(spec)


# ---------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------


def _basename(name: str) -> str:
    """Last path component; also splits "tfds:NAME:SPLIT/ID"-style names on '/'."""
    return os.path.basename(name.rstrip("/"))


def _stem(name: str) -> str:
    return os.path.splitext(_basename(name))[0]


def match_predictions(pred_keys: Iterable[str], ref_keys: Iterable[str], aliases: dict[str, str] | None = None):
    """Map prediction image names to reference keys.

    Tried in order: exact name (or alias), basename, stem, and when ``aliases`` are given
    the integer a stem ends with (COCO_val2014_000000391895 -> "391895"). A basename or
    stem shared by several reference keys is ambiguous and not used.

    Returns:
      (matches, how, unmatched): pred -> ref key, Counter of the rule used, and the list
      of prediction names without a reference.
    """
    aliases = dict(aliases or {})
    ref_keys = list(ref_keys)
    exact = {k: k for k in ref_keys}
    exact.update({a: k for a, k in aliases.items() if a not in exact})

    def unique_index(fn):
        index: dict[str, set] = {}
        for k in ref_keys:
            index.setdefault(fn(k), set()).add(k)
        return {name: next(iter(ks)) for name, ks in index.items() if len(ks) == 1}

    by_base, by_stem = unique_index(_basename), unique_index(_stem)
    matches: dict[str, str] = {}
    how: Counter = Counter()
    unmatched: list[str] = []
    for pred in pred_keys:
        base, stem = _basename(pred), _stem(pred)
        digits = re.search(r"(\d+)$", stem)
        if pred in exact:
            matches[pred], rule = exact[pred], "exact"
        elif base in by_base or base in exact:
            matches[pred], rule = by_base.get(base) or exact[base], "basename"
        elif stem in by_stem or stem in exact:
            matches[pred], rule = by_stem.get(stem) or exact[stem], "stem"
        elif aliases and digits and str(int(digits.group(1))) in aliases:
            matches[pred], rule = aliases[str(int(digits.group(1)))], "id"
        else:
            unmatched.append(pred)
            continue
        how[rule] += 1
    return matches, how, unmatched


# ---------------------------------------------------------------------------
# Evaluation and CLI
# ---------------------------------------------------------------------------


def evaluate(
    pred_path: str,
    refs_spec: str,
    data_dir: str | None = None,
    use_meteor: bool | None = None,
    tokenizer: str = "python",
) -> dict:
    """Score a predictions file against references; returns the report dict.

    ``tokenizer`` is "python" or "ptb" (see ``decode.metrics``). The report holds the
    metric values at the top level (``BLEU-1`` ... ``CIDEr-D``, and ``METEOR`` when
    computed) plus ``counts``, ``matched_by``, ``unmatched_examples``, ``notes``,
    ``tokenizer`` (the one used), ``pred`` and ``refs``.
    """
    predictions, counts = read_predictions(pred_path)
    references, aliases = load_references(refs_spec, data_dir)
    matches, how, unmatched = match_predictions(predictions, references, aliases)
    if not matches:
        example_pred = next(iter(predictions), None)
        example_ref = next(iter(references))
        if example_pred is None:
            raise EvalError(
                f"--pred {pred_path}: no usable prediction lines "
                f"({counts['lines']} lines, {counts['skipped_error']} with an error, "
                f"{counts['skipped_no_caption']} without a caption)"
            )
        raise EvalError(
            f"no prediction matched a reference (e.g. prediction {example_pred!r} vs "
            f"reference {example_ref!r}); check that --refs is the right split"
        )
    notes: list[str] = []
    try:
        metrics = compute_metrics(
            {p: predictions[p] for p in matches},
            {p: references[r] for p, r in matches.items()},
            tokenizer=tokenizer,
            use_meteor=use_meteor,
            notes=notes,
        )
    except RuntimeError as exc:  # Java missing or a jar failed (--meteor on, --tokenizer ptb)
        raise EvalError(str(exc)) from None
    used_refs = set(matches.values())
    if len(used_refs) < len(matches):
        notes.append(
            f"{len(matches) - len(used_refs)} predictions share a reference image "
            "with another prediction; each is scored separately."
        )
    counts.update(
        scored=len(matches),
        no_reference=len(unmatched),
        references=len(references),
        references_without_prediction=len(references) - len(used_refs),
    )
    report = dict(metrics)
    report.update(
        counts=counts,
        matched_by=dict(how),
        unmatched_examples=unmatched[:5],
        notes=notes,
        tokenizer=tokenizer,
        pred=pred_path,
        refs=refs_spec,
    )
    return report


def format_report(report: dict) -> str:
    """A small human-readable table of a report from ``evaluate``."""
    c = report["counts"]
    skipped = c["skipped_error"] + c["skipped_no_caption"] + c["skipped_no_image"]
    lines = [
        f"predictions: {c['lines']} lines, {c['scored']} scored, {skipped} skipped "
        f"({c['skipped_error']} error, {c['skipped_no_caption']} no caption, "
        f"{c['skipped_no_image']} no image), {c['duplicates']} duplicate, "
        f"{c['no_reference']} without reference",
        f"references:  {c['references']} images, {c['references_without_prediction']} without prediction",
        "matched by:  " + (", ".join(f"{k} {v}" for k, v in report["matched_by"].items())),
    ]
    if report["unmatched_examples"]:
        lines.append("no reference for e.g.: " + ", ".join(report["unmatched_examples"]))
    lines.append("")
    lines.append(f"{'metric':<9} {'score':>8}")
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"):
        if name in report:
            lines.append(f"{name:<9} {report[name]:>8.4f}")
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m decode.eval",
        description="Caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D, METEOR with Java) of a "
        "decode.run predictions file against reference captions.",
    )
    parser.add_argument(
        "--pred", required=True, metavar="OUT.jsonl", help="predictions JSONL from `python -m decode.run --out`"
    )
    parser.add_argument(
        "--refs",
        required=True,
        metavar="REFS",
        help="references: JSON {image: [captions]}, JSONL {image, captions}, COCO captions_*.json, or tfds:NAME:SPLIT",
    )
    parser.add_argument("--json", metavar="METRICS.json", help="also write the report as JSON")
    parser.add_argument(
        "--meteor",
        choices=("auto", "on", "off"),
        default="auto",
        help="METEOR needs Java; auto: compute it when `java` is on PATH",
    )
    parser.add_argument(
        "--tokenizer",
        choices=TOKENIZERS,
        default="python",
        help="python: decode.metrics.tokenize, no Java, same numbers on every "
        "machine (default); ptb: pycocoevalcap's PTBTokenizer, the official "
        "COCO pipeline, needs Java",
    )
    parser.add_argument("--data-dir", metavar="DIR", help="TFDS data directory for tfds:NAME:SPLIT references")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 with a usage message on unknown/missing flags
    use_meteor = {"auto": None, "on": True, "off": False}[args.meteor]
    if args.json:
        out_dir = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(out_dir):
            print(
                f"decode.eval: error: --json folder does not exist: {out_dir} (create it or choose another path)",
                file=sys.stderr,
            )
            return 2
    try:
        report = evaluate(args.pred, args.refs, data_dir=args.data_dir, use_meteor=use_meteor, tokenizer=args.tokenizer)
    except EvalError as exc:
        print(f"decode.eval: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
