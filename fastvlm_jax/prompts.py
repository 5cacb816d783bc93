"""Prompt ids per model family, through the family registry's prompt layouts
(`fastvlm_jax.prompt_layouts` describes each layout)."""

from __future__ import annotations

from typing import Any

from fastvlm_jax.families import FAMILIES, family_named
from fastvlm_jax.tokenizer import Tokenizer

MODEL_TYPES = tuple(FAMILIES)

# The question asked when the user gives none, per family.
DEFAULT_QUESTIONS = {name: family.prompts.default_question for name, family in FAMILIES.items()}


def _layout(model_type: str):
    if model_type not in FAMILIES:
        raise ValueError(f"no prompt format for model type {model_type!r}; known: {', '.join(MODEL_TYPES)}")
    return family_named(model_type).prompts


def default_question(model_type: str) -> str:
    return _layout(model_type).default_question


def prompt_ids_for(model_type: str, tokenizer: Tokenizer, question: str,
                   num_image_tokens: int) -> list[int]:
    """Prompt ids for one image and `question` in `model_type`'s layout."""
    return _layout(model_type).prompt_ids(tokenizer, question, num_image_tokens)


def build_prompt_ids(config: Any, tokenizer: Tokenizer, question: str) -> list[int]:
    """Prompt ids for one image and `question`, in the layout of `config.model_type`."""
    return prompt_ids_for(config.model_type, tokenizer, question, config.num_image_tokens)


def answer_ids(model_type: str, tokenizer: Tokenizer, question: str, answer: str) -> list[int]:
    """The ids of `answer` following the prompt for `question` (no EOS), for training targets."""
    return _layout(model_type).answer_ids(tokenizer, question, answer)


def stop_ids(config: Any, tokenizer: Tokenizer) -> tuple[int, ...]:
    """Token ids that end a generation (LLaVA: EOS; BLIP-2 OPT: EOS and "\\n")."""
    return _layout(config.model_type).stop_ids(tokenizer, config)


__all__ = ["DEFAULT_QUESTIONS", "MODEL_TYPES", "answer_ids", "build_prompt_ids", "default_question",
           "prompt_ids_for", "stop_ids"]
