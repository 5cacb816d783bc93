"""Tokenizers: the interface, its two implementations, and loading the one a folder needs.

- `Tokenizer` (fastvlm_jax.tokenizer_base): the interface the rest of the code uses.
- `HFTokenizer` (fastvlm_jax.hf_tokenizer): Hugging Face's `tokenizers` library, for folders with
  tokenizer.json (what transformers runs, set up as transformers 5.x does) or GPT-2 style
  vocab.json + merges.txt.
- `SentencePieceTokenizer` (fastvlm_jax.sp_tokenizer): for folders with only tokenizer.model, and
  for the tokenizers we train ourselves.

`load_tokenizer(dir)` reads our saved folders (CKPT/tokenizer/) and Hugging Face folders;
`from_hf_dir(dir)` reads Hugging Face folders only (the converters use it).

Also the LLaVA prompt helpers (the prompt text, the image token count, the prompt ids).
"""

from __future__ import annotations

import os

from fastvlm_jax.hf_tokenizer import HFTokenizer
from fastvlm_jax.sp_tokenizer import SentencePieceTokenizer
from fastvlm_jax.paths import as_path
from fastvlm_jax.tokenizer_base import CONFIG_FILE, DEFAULT_IMAGE_TOKEN, AddedToken, Tokenizer, read_json

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
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        return HFTokenizer.from_hf_dir(folder)
    if (folder / "tokenizer.model").is_file():
        return SentencePieceTokenizer.from_hf_dir(folder)
    raise FileNotFoundError(f"{folder}: no tokenizer files (tokenizer.json, vocab.json + merges.txt or "
                            "tokenizer.model)")


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


# ------------------------------------------------------------------------------------------
# LLaVA prompts


def format_llava_prompt(question: str, image_token: str = DEFAULT_IMAGE_TOKEN) -> str:
    """LLaVA-1.5's single-turn prompt: "USER: <image>\\n{question} ASSISTANT:"."""
    return f"USER: {image_token}\n{question} ASSISTANT:"


def num_image_tokens(
    image_size: int | tuple[int, int],
    patch_size: int,
    num_additional_image_tokens: int = 0,
    select_strategy: str = "default",
) -> int:
    """How many `<image>` ids one image takes, as HF's LlavaProcessor counts them.

    (H // patch) * (W // patch) + num_additional_image_tokens, minus 1 for the "default"
    strategy (which drops the CLS feature). llava-hf checkpoints store
    num_additional_image_tokens=1 (the CLS token) in processor_config.json: 576 for 336 / 14.
    """
    if select_strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {select_strategy!r}")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    count = (height // patch_size) * (width // patch_size) + num_additional_image_tokens
    if select_strategy == "default":
        count -= 1
    if count <= 0:
        raise ValueError(f"image of {height}x{width} with patch {patch_size} gives {count} image tokens")
    return count


def image_prompt_token(tokenizer: Tokenizer, question: str, num_image_tokens: int) -> str:
    """The tokenizer's image token, after checking that a one-image prompt can hold it
    `num_image_tokens` times around `question` (every family's prompt builder asks this)."""
    image_token = tokenizer.image_token
    if image_token is None:
        raise ValueError("the tokenizer has no image token")
    if image_token in question:
        raise ValueError(f"the question must not contain the image token {image_token!r}")
    if num_image_tokens <= 0:
        raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
    return image_token


def check_image_token_id(tokenizer: Tokenizer, image_token_id: int, error: type[Exception],
                         model_side: str = "the model's image_token_id") -> None:
    """Raises `error` unless the tokenizer's image token has the id the model replaces by
    image features (`model_side` names where that id comes from, for the message).

    A mismatch would leave the image out of every prompt without any other error.
    """
    got = tokenizer.image_token_id if tokenizer.image_token is not None else None
    if got != image_token_id:
        raise error(f"the tokenizer's image token id ({got}) differs from {model_side} ({image_token_id})")


def build_llava_input_ids(tokenizer: Tokenizer, question: str, num_image_tokens: int) -> list[int]:
    """Prompt ids for one image and one question, with the image placeholder expanded.

    Like HF's LlavaProcessor, the placeholder is repeated `num_image_tokens` times in the text
    before tokenizing (each copy is an added token, so each becomes one id), and the tokenizer
    adds its special tokens (BOS for llava-hf checkpoints).
    """
    image_token = image_prompt_token(tokenizer, question, num_image_tokens)
    prompt = format_llava_prompt(question, image_token)
    return tokenizer.encode(prompt.replace(image_token, image_token * num_image_tokens))


__all__ = [
    "AddedToken",
    "DEFAULT_IMAGE_TOKEN",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_llava_input_ids",
    "check_image_token_id",
    "format_llava_prompt",
    "from_hf_dir",
    "image_prompt_token",
    "load_tokenizer",
    "num_image_tokens",
]
