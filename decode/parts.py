"""Several processes captioning one image list: each writes its own part of the output.

Process k of n takes images k, k + n, k + 2n, ... of the (identically expanded) input list
and writes `OUT.part-k-of-n.jsonl` as its batches finish, resuming from it like a
single-process run resumes from OUT. When every image has a line in some part, whoever
notices first (the last process to finish, or a later one-process rerun of the same command)
writes OUT: every image once, in input order, a caption line preferred over an error line.
Part files are kept (merging again gives the same OUT).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any


def part_path(out: str, index: int, count: int) -> str:
    """'run/captions.jsonl', 1, 4 -> 'run/captions.part-1-of-4.jsonl'."""
    stem, ext = os.path.splitext(out)
    return f"{stem}.part-{index}-of-{count}{ext or '.jsonl'}"


def existing_parts(out: str) -> list[str]:
    """Part files of OUT left by any multi-process run (any count), sorted."""
    folder = os.path.dirname(out) or "."
    stem, ext = os.path.splitext(os.path.basename(out))
    prefix, suffix = f"{stem}.part-", ext or ".jsonl"
    if not os.path.isdir(folder):
        return []
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if name.startswith(prefix) and name.endswith(suffix) and "-of-" in name
    )


def share(items: Sequence, index: int, count: int) -> list:
    """This process's images: every count-th one from `index` (balanced, order kept)."""
    return list(items[index::count])


def merge(
    out: str,
    image_ids: Sequence[str],
    read_lines: Callable[[str], list[Any]],
    write: Callable[[str, str], None],
    json_line: Callable[[dict], str],
    is_caption: Callable[[Any], bool],
) -> list[str]:
    """Writes OUT from OUT itself and its parts if every id has a line; returns the ids
    still missing (nothing is written then).

    Lines of OUT for images not in `image_ids` (earlier runs over other images) stay first.
    """
    sources = ([out] if os.path.exists(out) else []) + existing_parts(out)
    best: dict[str, dict] = {}
    others: list[dict] = []
    wanted = set(image_ids)
    for source in sources:
        for line in read_lines(source):
            if not isinstance(line, dict) or not isinstance(line.get("image"), str):
                continue
            image = line["image"]
            if image not in wanted:
                if source == out:
                    others.append(line)
                continue
            if image not in best or (is_caption(line) and not is_caption(best[image])):
                best[image] = line
    missing = [image for image in image_ids if image not in best]
    if missing:
        return missing
    ordered = others + [best[image] for image in dict.fromkeys(image_ids)]
    write(out, "".join(json_line(line) for line in ordered))
    return []
