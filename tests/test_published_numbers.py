"""Every number in the tables of README.md, BENCHMARKS.md (the current state) and
benchmarks/HISTORY.md (earlier reports) comes from a JSON in benchmarks/.

Each table is preceded (in the prose since the previous table) by one annotation naming
its sources, which may use shell globs and {a,b} alternatives:

    <!-- numbers: benchmarks/stacked_layout/demo_after_run{1,2,3}.json -->

and, for columns computed from other measured values (a ratio of two timings), which
columns those are:

    <!-- numbers: benchmarks/x.json; derived: 32 / 4 -->

A cell number matches when some numeric value in the named JSONs, in one of a few units
(as is, percent, milli, kilo, mega, giga, KiB, MiB, GiB), rounds to it at the cell's precision. A derived
column's numbers must match the ratio of two such values. The first column of a table is
its row label (configuration in words) and is not checked.
"""

from __future__ import annotations

import glob
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "BENCHMARKS.md", "benchmarks/HISTORY.md")

ANNOTATION = re.compile(r"<!--\s*numbers:\s*(.*?)\s*-->", re.S)
# A number not glued to a word on its left (v5e, b32, run3) and followed by at most an 'x'.
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![0-9A-Za-wyz_])")
# as is, percent, milli, kilo, mega, giga, and binary KiB / MiB / GiB
SCALES = (1.0, 100.0, 1e3, 1e-3, 1e-6, 1e-9, 2.0**-10, 2.0**-20, 2.0**-30)


def expand_braces(pattern: str) -> list[str]:
    """'a{1,2}b' -> ['a1b', 'a2b'] (nested groups unsupported: not needed here)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [p for choice in match.group(1).split(",") for p in expand_braces(head + choice + tail)]


def json_numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)] if math.isfinite(value) else []
    if isinstance(value, dict):
        return [x for v in value.values() for x in json_numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in json_numbers(v)]
    return []


def rounding_unit(text: str) -> float:
    """Half the last digit's place of a printed number ('2.42e+15' -> 0.5e13)."""
    mantissa, _, exponent = text.partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def rounds_to(value: float, text: str) -> bool:
    return abs(value - float(text)) <= rounding_unit(text) * (1 + 1e-9) + 1e-12


def tables(markdown: str):
    """Yields (line number, annotation text or None, rows of cells) per table."""
    lines = markdown.splitlines()
    prose_start, index = 0, 0
    while index < len(lines):
        if not lines[index].startswith("|"):
            index += 1
            continue
        start = index
        while index < len(lines) and lines[index].startswith("|"):
            index += 1
        notes = ANNOTATION.findall("\n".join(lines[prose_start:start]))
        rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[start:index]]
        yield start + 1, (notes[-1] if notes else None), rows
        prose_start = index


def parse_annotation(note: str) -> tuple[list[Path], set[str]]:
    sources, _, derived = note.partition(";")
    paths = []
    for pattern in sources.split():
        for expanded in expand_braces(pattern):
            found = sorted(glob.glob(str(ROOT / expanded)))
            assert found, f"annotation names {expanded}, which matches no file"
            paths += [Path(p) for p in found]
    columns = set()
    if derived.strip():
        assert derived.strip().startswith("derived:"), f"unknown annotation part {derived!r}"
        columns = {c.strip() for c in derived.strip()[len("derived:") :].split(",")}
    return paths, columns


def table_cases():
    for name in DOCUMENTS:
        for line, note, rows in tables((ROOT / name).read_text()):
            yield pytest.param(name, line, note, rows, id=f"{name}:{line}")


@pytest.mark.parametrize("document,line,note,rows", list(table_cases()))
def test_table_numbers_come_from_their_json(document, line, note, rows):
    assert note is not None, (
        f"{document}:{line}: table without a '<!-- numbers: benchmarks/... -->' "
        "annotation naming the JSON its numbers come from"
    )
    paths, derived_columns = parse_annotation(note)
    values = sorted(
        {round(x * scale, 12) for path in paths for x in json_numbers(json.loads(path.read_text())) for scale in SCALES}
    )
    header, body = rows[0], [r for r in rows[2:]]
    unknown = derived_columns - set(header)
    assert not unknown, f"{document}:{line}: derived columns {unknown} are not in the header {header}"
    ratios = None
    missing = []
    for row in body:
        for column, cell in itertools.islice(zip(header, row), 1, None):
            for number in NUMBER.findall(cell):
                if column in derived_columns:
                    if ratios is None:
                        raw = np.array(
                            sorted({x for path in paths for x in json_numbers(json.loads(path.read_text())) if x})
                        )
                        ratios = np.unique(raw[:, None] / raw[None, :])
                    pool = ratios
                else:
                    pool = values
                target = float(number)
                if not any(rounds_to(v, number) for v in _near(pool, target, rounding_unit(number))):
                    missing.append(f"{column}={number} (row {row[0]!r})")
    assert not missing, f"{document}:{line}: not in {[p.name for p in paths]}: " + "; ".join(missing)


def _near(pool, target: float, unit: float):
    """The pool's values near target (a superset of those that round to it: a 3-digit
    '2.42e+15' stands for values up to half its last digit's place away)."""
    pool = np.asarray(pool)
    width = 1.0 + 1e-3 * abs(target) + 2 * unit
    lo, hi = np.searchsorted(pool, [target - width, target + width])
    return pool[lo:hi]


# A relative link or image in a document: [text](path) or ![alt](path), without a scheme or anchor.
LINK = re.compile(r"\]\((?![a-z]+:|#)([^)\s#]+)")


@pytest.mark.parametrize("document", DOCUMENTS)
def test_relative_links_resolve(document):
    # The history file lives in benchmarks/: its image paths are relative to that folder.
    path = ROOT / document
    broken = [target for target in LINK.findall(path.read_text()) if not (path.parent / target).exists()]
    assert not broken, f"{document}: links to missing files {broken}"


def test_benchmarks_page_links_the_history_and_both_have_tables():
    current, history = (ROOT / "BENCHMARKS.md").read_text(), (ROOT / "benchmarks/HISTORY.md").read_text()
    assert "](benchmarks/HISTORY.md)" in current
    assert list(tables(current)) and list(tables(history))


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("document", DOCUMENTS)
def test_anchor_links_within_a_document_resolve(document):
    text = (ROOT / document).read_text()
    anchors = {github_anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}
    broken = [a for a in re.findall(r"\]\(#([^)]+)\)", text) if a not in anchors]
    assert not broken, f"{document}: links to missing headings {broken}"
