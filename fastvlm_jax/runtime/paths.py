"""Paths on a local disk or in a bucket (gs://, s3://, az://), through etils.epath.

Checkpoints, training workdirs and exports may live in a bucket on a TPU pod:
`pathlib.Path("gs://b/x").absolute()` would turn such a path into a local "CWD/gs:/b/x",
so every such path goes through `as_path`. Arrays are written by orbax (tensorstore reads
and writes gs:// itself); our own small files (config.json, tokenizer, metrics) go through
epath, whose gs:// backend needs `gcsfs` or TensorFlow installed.
"""

from __future__ import annotations

import os

from etils import epath


def is_url(path: str | os.PathLike) -> bool:
    """A path with a scheme ("gs://bucket/run"), as opposed to a local one."""
    return "://" in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """A local path made absolute, or a bucket path kept as it is."""
    text = os.fspath(path)
    return epath.Path(text if is_url(text) else os.path.abspath(text))
