"""The model families, in one table: config class, Flax module, imitation-network init,
converter, tokenizer kind and prompt layout, keyed by the config's `model_type`.

A family module subclasses `fastvlm_jax.vlm_common.FamilyModule` (the interface:
encode_images, embed, run_layers, logits, imitate); everything above the model library (the
VLM handle, the engine, checkpoints, training) goes through it and this table instead of
asking which family it holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from fastvlm_jax.blip2 import Blip2Config, Blip2Module
from fastvlm_jax.blip2 import init_imitation as blip2_init_imitation
from fastvlm_jax.config import ConfigError, VLMConfig
from fastvlm_jax.llava import VLMModule
from fastvlm_jax.llava import init_imitation as llava_init_imitation
from fastvlm_jax.prompt_layouts import Blip2Prompts, LlavaPrompts, PromptLayout
from fastvlm_jax.vlm_common import FamilyModule

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    converter: the module whose `convert(hf_dir, out_dir, ...)` reads this family's
      Hugging Face folders (named, not imported: converters import the model library).
    tokenizer_kind: 'sentencepiece' (LLaMA) or 'bpe' (GPT-2 byte-level, OPT).
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
    family.name: family for family in (
        Family("llava", VLMConfig, VLMModule, llava_init_imitation, "fastvlm_jax.convert_llava",
               "sentencepiece", LlavaPrompts()),
        Family("blip-2", Blip2Config, Blip2Module, blip2_init_imitation, "fastvlm_jax.convert_blip2",
               "bpe", Blip2Prompts()),
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
