"""The model families, in one table: config class, Flax module, imitation-network init,
converter, tokenizer kind and prompt layout, keyed by the config's `model_type`.

A family module subclasses `fastvlm_jax.nn.common.FamilyModule` (the interface:
encode_images, embed, run_layers, logits, imitate); everything above the model library (the
VLM handle, the engine, checkpoints, training) goes through it and this table instead of
asking which family it holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from fastvlm_jax.nn.blip2 import Blip2Config, Blip2Module
from fastvlm_jax.nn.blip2 import init_imitation as blip2_init_imitation
from fastvlm_jax.nn.common import FamilyModule
from fastvlm_jax.nn.config import ConfigError
from fastvlm_jax.nn.gemma3 import Gemma3Config, Gemma3Module
from fastvlm_jax.nn.gemma3 import init_imitation as gemma3_init_imitation
from fastvlm_jax.nn.llava import LlavaConfig, LlavaModule
from fastvlm_jax.nn.llava import init_imitation as llava_init_imitation
from fastvlm_jax.nn.qwen25vl import Qwen25VLConfig, Qwen25VLModule
from fastvlm_jax.nn.qwen25vl import init_imitation as qwen25vl_init_imitation
from fastvlm_jax.text.base import Tokenizer
from fastvlm_jax.text.prompts import Blip2Prompts, Gemma3Prompts, LlavaPrompts, PromptLayout, QwenPrompts

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    converter: the module whose `convert(hf_dir, out_dir, ...)` reads this family's
      Hugging Face folders (named, not imported: converters import the model library).
    tokenizer_kind: 'sentencepiece' (LLaMA), 'bpe' (GPT-2 byte-level, OPT), 'gemma' (BPE with
      byte fallback, from tokenizer.json) or 'qwen2' (byte-level BPE after Qwen's split).
    prompts: how a one-image prompt is laid out (as the family's HF processor does it).
    """

    name: str
    config_class: type
    module_class: type[FamilyModule]
    init_imitation: Callable[[Any, Array, Any], Any]
    converter: str
    tokenizer_kind: str
    prompts: PromptLayout


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "llava",
            LlavaConfig,
            LlavaModule,
            llava_init_imitation,
            "fastvlm_jax.ckpt.convert.llava",
            "sentencepiece",
            LlavaPrompts(),
        ),
        Family(
            "blip-2",
            Blip2Config,
            Blip2Module,
            blip2_init_imitation,
            "fastvlm_jax.ckpt.convert.blip2",
            "bpe",
            Blip2Prompts(),
        ),
        Family(
            "gemma3",
            Gemma3Config,
            Gemma3Module,
            gemma3_init_imitation,
            "fastvlm_jax.ckpt.convert.gemma3",
            "gemma",
            Gemma3Prompts(),
        ),
        Family(
            "qwen2_5_vl",
            Qwen25VLConfig,
            Qwen25VLModule,
            qwen25vl_init_imitation,
            "fastvlm_jax.ckpt.convert.qwen25vl",
            "qwen2",
            QwenPrompts(),
        ),
    )
}


def family_named(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ConfigError(f"unknown model_type {model_type!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def family_of(config) -> Family:
    return family_named(config.model_type)


def config_from_dict(data: dict[str, Any]):
    """A config.json dict -> the family's config (model_type picks the class; default llava)."""
    return family_named(data.get("model_type", "llava")).config_class.from_dict(data)


# ------------------------------------------------------------------------------------------
# Prompt ids through each family's layout (the layouts themselves: fastvlm_jax.text.prompts)

MODEL_TYPES = tuple(FAMILIES)

# The question asked when the user gives none, per family.
DEFAULT_QUESTIONS = {name: family.prompts.default_question for name, family in FAMILIES.items()}


def _layout(model_type: str):
    if model_type not in FAMILIES:
        raise ValueError(f"no prompt format for model type {model_type!r}; known: {', '.join(MODEL_TYPES)}")
    return family_named(model_type).prompts


def default_question(model_type: str) -> str:
    return _layout(model_type).default_question


def prompt_ids_for(model_type: str, tokenizer: Tokenizer, question: str, num_image_tokens: int) -> list[int]:
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
