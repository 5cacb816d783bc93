"""Tokenizers: the interface, its two implementations, and loading the one a folder needs.

- `Tokenizer` (fastvlm_jax.text.base): the interface the rest of the code uses.
- `HFTokenizer` (fastvlm_jax.text.hf_tokenizer): Hugging Face's `tokenizers` library, for folders with
  tokenizer.json (what transformers runs, set up as transformers 5.x does) or GPT-2 style
  vocab.json + merges.txt.
- `SentencePieceTokenizer` (fastvlm_jax.text.sp_tokenizer): for folders with only tokenizer.model, and
  for the tokenizers we train ourselves.

`load_tokenizer(dir)` reads our saved folders (CKPT/tokenizer/) and Hugging Face folders;
`from_hf_dir(dir)` reads Hugging Face folders only (the converters use it).

Prompt building (every family's layout) is in `fastvlm_jax.text.prompts`.
"""

from __future__ import annotations

import os

from fastvlm_jax.runtime.paths import as_path
from fastvlm_jax.text.base import CONFIG_FILE, DEFAULT_IMAGE_TOKEN, AddedToken, Tokenizer, read_json
from fastvlm_jax.text.hf_tokenizer import HFTokenizer
from fastvlm_jax.text.sp_tokenizer import SentencePieceTokenizer

# The implementations whose folders `save` writes, found by their format tag.
_SAVED_CLASSES: tuple[type[Tokenizer], ...] = (SentencePieceTokenizer, HFTokenizer)


def from_hf_dir(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face folder, as transformers 5.x would run it.

    tokenizer.json (or vocab.json + merges.txt) -> HFTokenizer, which runs it with the
    `tokenizers` library; only tokenizer.model -> SentencePieceTokenizer.
    """
    folder = as_path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    if (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    ):
        return HFTokenizer.from_hf_dir(folder)
    if (folder / "tokenizer.model").is_file():
        return SentencePieceTokenizer.from_hf_dir(folder)
    raise FileNotFoundError(
        f"{folder}: no tokenizer files (tokenizer.json, vocab.json + merges.txt or tokenizer.model)"
    )


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """The tokenizer in `directory`: one we saved (its format tag names the class), else a
    Hugging Face folder (`from_hf_dir`)."""
    folder = as_path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    tag = read_json(folder / CONFIG_FILE).get("format") if (folder / CONFIG_FILE).is_file() else None
    for cls in _SAVED_CLASSES:
        if tag in cls.FORMAT_TAGS:
            return cls.load(folder)
    return from_hf_dir(folder)


__all__ = [
    "AddedToken",
    "DEFAULT_IMAGE_TOKEN",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "from_hf_dir",
    "load_tokenizer",
]
