"""Trainable / frozen parameter split, and placing parameters on a Mesh.

The optimizer only ever sees the trainable part, so a draft stage on a 7B model keeps
Adam moments for the imitation network alone (a few hundred MB, not 2 x 28 GB). Both
parts are plain nested dicts with the layout of the full param tree, restricted to their
own leaves; `merge` puts them back together for the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

Params = Any


def path_str(path) -> str:
    """A tree path as 'language_model/layers_0/mlp/up_proj/kernel'."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def trainable_paths(params: Params, patterns: Sequence[str]) -> set[str]:
    """Paths of the leaves that match any regex in `patterns` (full match).

    Every pattern must match something: a typo would otherwise train nothing (or less)
    without a word.
    """
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    compiled = [(p, re.compile(p)) for p in patterns]
    chosen = set()
    for pattern, regex in compiled:
        hits = {path for path in paths if regex.fullmatch(path)}
        if not hits:
            raise ValueError(f"trainable pattern {pattern!r} matches no parameter; params look like {paths[:3]}")
        chosen |= hits
    return chosen


def _select(tree: Params, keep: Callable[[str], bool], prefix: str = "") -> Params:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            sub = _select(value, keep, f"{prefix}{key}/")
            if sub is not None:
                out[key] = sub
        return out or None
    return tree if keep(prefix[:-1]) else None


def split(tree: Params, paths: set[str]) -> tuple[Params, Params]:
    """(leaves in `paths`, the others), each a nested dict ({} when empty)."""
    chosen = _select(tree, lambda p: p in paths) or {}
    rest = _select(tree, lambda p: p not in paths) or {}
    return chosen, rest


def merge(a: Params, b: Params) -> Params:
    """Union of two disjoint nested dicts."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        raise ValueError("cannot merge a parameter leaf with a subtree")
    out = dict(a)
    for key, value in b.items():
        out[key] = merge(out[key], value) if key in out else value
    return out


def count(tree: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))
