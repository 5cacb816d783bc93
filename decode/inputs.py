"""Turns the `--images PATH...` of decode.run into a list of images to caption.

Each PATH may be:

* an image file: taken as is, whatever its extension (loading decides whether it is one);
* a folder: every image file below it, recursively, sorted by path; an image file is one
  whose extension (case-insensitive) is in IMAGE_EXTENSIONS; hidden files and folders
  (name starting with ".") are skipped;
* a glob (`*`, `?`, `[...]`, `**` recursive), expanded with the folder rules: matched
  folders are walked, matched files must have an image extension, hidden names skipped,
  a file reached by several paths (links) taken once;
* a text file listing paths (extension in LIST_EXTENSIONS): one PATH per line, relative
  paths relative to the list file's folder, blank lines and `#` comments skipped; each line
  follows these same rules (folders, globs, even other lists);
* `tfds:NAME[/CONFIG][:SPLIT]`: the images of a TFDS split written by
  `fastvlm_jax.data.tfds_builders` (SPLIT defaults to "test"; `--data-dir` says where).

Each image gets a stable id, used as the `image` field of the output and to resume a run:
the normalized path (`os.path.normpath`, relative paths stay relative: "./a//b.png" ->
"a/b.png"; folder and list entries are joined to the folder / list location as given),
or `tfds:NAME:SPLIT/IMAGE_ID`. The same id met twice is kept once (first occurrence).

A PATH that does not exist, a glob or folder without images, a list file that cannot be read,
a missing list entry or a TFDS split that cannot be opened becomes an `InputError` (reported
and recorded by the caller), never an exception.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".apng",
        ".gif",
        ".bmp",
        ".dib",
        ".webp",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
        ".ico",
        ".jp2",
        ".j2k",
        ".sgi",
        ".im",
        ".pcx",
        ".dds",
    }
)
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})
TFDS_PREFIX = "tfds:"
_GLOB_CHARS = ("*", "?", "[")


@dataclasses.dataclass(frozen=True)
class InputItem:
    """One image to caption.

    id: stable name (see the module docstring); `image` of the output line.
    path: the file to read, or None for images that come from elsewhere (TFDS).
    loader: returns what `fastvlm_jax.image.processing.load_image` accepts (bytes) when
      there is no path.
    """

    id: str
    path: str | None = None
    loader: Callable[[], Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    def load(self) -> Any:
        """The image source: the path itself (load_image reads it) or the loader's result."""
        if self.path is not None:
            return self.path
        assert self.loader is not None
        return self.loader()


@dataclasses.dataclass(frozen=True)
class InputError:
    """A PATH (or a list file's entry) that gave no image: `spec` names it, `message` says why."""

    spec: str
    message: str


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def has_image_extension(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _walk_images(folder: str) -> list[str]:
    """Image files below `folder`, recursively, sorted; hidden files and folders skipped."""
    found = []
    visited = {os.path.realpath(folder)}
    for root, dirs, files in os.walk(folder, followlinks=True):
        # Follow links to folders, but never into one already walked (a link cycle).
        kept = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(root, d))
            if not _is_hidden(d) and real not in visited:
                visited.add(real)
                kept.append(d)
        dirs[:] = kept
        found.extend(os.path.join(root, f) for f in files if not _is_hidden(f) and has_image_extension(f))
    return sorted(found)


def _read_list(path: str) -> list[tuple[int, str]]:
    """(line number, entry) of a list file; entries relative to the file's folder are joined."""
    base = os.path.dirname(path)
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, start=1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if not entry.startswith(TFDS_PREFIX):
                entry = os.path.normpath(os.path.join(base, entry))
            entries.append((number, entry))
    return entries


class _LockedSource:
    """Serializes reads of a TFDS data source (its readers are not documented thread-safe)."""

    def __init__(self, source):
        self._source = source
        self._lock = threading.Lock()

    def image(self, index: int) -> bytes:
        with self._lock:
            return self._source[index]["image"]


def _tfds_items(spec: str, data_dir: str | None) -> list[InputItem]:
    # Imported here: tensorflow_datasets and grain take seconds to import, and most runs
    # caption files.
    from fastvlm_jax.data import tfds_builders

    name, split = tfds_builders.parse_tfds_spec(spec)
    # decode=False: records hold the encoded bytes; load_image decodes them in the loader
    # threads with its own error handling.
    source = tfds_builders.open_split(name, split, data_dir, decode=False, build_if_missing=True)
    locked = _LockedSource(source)
    items = []
    # One pass over the records to learn the image ids (needed up front to skip images a
    # previous run captioned); the images are read again, lazily, when captioned.
    for index in range(len(source)):
        image_id = source[index]["image_id"]
        items.append(InputItem(id=f"tfds:{name}:{split}/{image_id}", loader=lambda i=index: locked.image(i)))
    return items


def _expand_one(spec: str, data_dir: str | None, seen_lists: set[str]) -> Iterator[InputItem | InputError]:
    if spec.startswith(TFDS_PREFIX):
        try:
            yield from _tfds_items(spec, data_dir)
        except Exception as e:  # a missing dataset / bad split: report, keep going
            message = " ".join(str(e).split()) or type(e).__name__
            yield InputError(spec, f"cannot read TFDS images ({message})")
        return

    if os.path.isdir(spec):
        paths = _walk_images(spec)
        if not paths:
            yield InputError(
                spec,
                "folder contains no image files (extensions: " + ", ".join(sorted(IMAGE_EXTENSIONS)[:6]) + ", ...)",
            )
        for path in paths:
            yield InputItem(id=os.path.normpath(path), path=path)
        return

    if os.path.isfile(spec):
        if os.path.splitext(spec)[1].lower() in LIST_EXTENSIONS:
            real = os.path.realpath(spec)
            if real in seen_lists:
                yield InputError(spec, "list file includes itself (directly or through another list)")
                return
            try:
                entries = _read_list(spec)
            except OSError as e:
                yield InputError(spec, f"cannot read list file ({e.strerror or e})")
                return
            if not entries:
                yield InputError(spec, "list file names no images")
            for number, entry in entries:
                for result in _expand_one(entry, data_dir, seen_lists | {real}):
                    if isinstance(result, InputError) and result.spec == entry:
                        # Name the line too: that is where the user fixes it.
                        result = InputError(entry, f"{result.message} (listed in {spec}:{number})")
                    yield result
            return
        yield InputItem(id=os.path.normpath(spec), path=spec)
        return

    if any(c in spec for c in _GLOB_CHARS):
        matches = sorted(glob.glob(spec, recursive=True))
        paths = []
        for match in matches:
            if _is_hidden(os.path.basename(os.path.normpath(match))):
                continue
            if os.path.isdir(match):
                paths.extend(_walk_images(match))
            elif has_image_extension(match):
                paths.append(match)
        # `**` follows links to folders, so a link cycle repeats files under ever longer
        # paths: take each real file once, by its shortest path.
        shortest: dict[str, str] = {}
        for path in paths:
            real = os.path.realpath(path)
            if real not in shortest or path.count(os.sep) < shortest[real].count(os.sep):
                shortest[real] = path
        paths = sorted(shortest.values())
        if not paths:
            yield InputError(spec, "no image files match this pattern")
        for path in paths:
            yield InputItem(id=os.path.normpath(path), path=path)
        return

    yield InputError(spec, "no such file or folder")


def expand_inputs(specs: Sequence[str], data_dir: str | None = None) -> tuple[list[InputItem], list[InputError]]:
    """All images named by `specs`, in order, each id once; plus the specs that gave none."""
    items: list[InputItem] = []
    errors: list[InputError] = []
    seen_ids: set[str] = set()
    seen_errors: set[str] = set()
    for spec in specs:
        for result in _expand_one(os.fspath(spec), data_dir, set()):
            if isinstance(result, InputError):
                if result.spec not in seen_errors:
                    seen_errors.add(result.spec)
                    errors.append(result)
            elif result.id not in seen_ids:
                seen_ids.add(result.id)
                items.append(result)
    return items, errors
