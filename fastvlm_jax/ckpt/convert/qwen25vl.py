"""Hugging Face Qwen2.5-VL checkpoint (a local `Qwen2_5_VLForConditionalGeneration` folder) ->
fastvlm-jax checkpoint.

`python -m fastvlm_jax.convert` comes here for config.json model_type 'qwen2_5_vl'. Both key
layouts are read: transformers 5's (`model.language_model.*`, `model.visual.*`, `lm_head.*`)
and the one the released checkpoints were saved with (`model.*` for the decoder, `visual.*`).
Both config layouts too: transformers 5's `text_config` with `rope_parameters`, and the flat
one with `rope_scaling: {type: mrope, mrope_section}`. Sharded or single safetensors; the
tokenizer from tokenizer.json (Qwen2Tokenizer's pipeline) with the chat template; image
preprocessing (min/max pixels, patch and merge sizes) from preprocessor_config.json. Never
touches the network.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from fastvlm_jax.ckpt.checkpoint import save_checkpoint
from fastvlm_jax.ckpt.convert import common as convert_common
from fastvlm_jax.ckpt.convert.common import ConversionError, fill_param_tree
from fastvlm_jax.ckpt.convert.llava import TEXT_RULES, hf_source_for
from fastvlm_jax.image.qwen_vl import QwenImageProcessorConfig
from fastvlm_jax.nn.config import ConfigError, DraftConfig, ImitationKind, TextConfig
from fastvlm_jax.nn.model import VLM
from fastvlm_jax.nn.quant import quantize_model
from fastvlm_jax.nn.qwen25vl import Qwen25VLConfig
from fastvlm_jax.nn.qwen_vision import QwenVisionConfig, convert_vision_params
from fastvlm_jax.text.prompts import check_image_token_id
from fastvlm_jax.text.tokenizer import from_hf_dir

# transformers' Qwen2_5_VLTextConfig defaults (config.json may leave any of them out).
_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=152_064,
    hidden_size=8192,
    intermediate_size=29_568,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    hidden_act="silu",
    max_position_embeddings=32_768,
    rms_norm_eps=1e-5,
)
# Keys of a flat (released) config.json that belong to the decoder.
_FLAT_TEXT_KEYS = (
    *_TEXT_DEFAULTS,
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "use_sliding_window",
    "sliding_window",
    "tie_word_embeddings",
)


def text_config_from_hf(hf: dict) -> tuple[TextConfig, tuple[int, ...]]:
    """(decoder config, mrope_section) from a Qwen2.5-VL config.json dict (either layout)."""
    text_hf = hf.get("text_config")
    if not isinstance(text_hf, dict):
        text_hf = {key: hf[key] for key in _FLAT_TEXT_KEYS if key in hf}
    c = {**_TEXT_DEFAULTS, **{k: v for k, v in text_hf.items() if v is not None}}
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConversionError(f"rope type {rope_type!r} is not supported (Qwen2.5-VL uses plain M-RoPE)")
    section = rope.get("mrope_section")
    if not section:
        raise ConversionError("config.json names no mrope_section (in rope_parameters or rope_scaling)")
    if c.get("use_sliding_window"):
        raise ConversionError("use_sliding_window=true is not supported (the released Qwen2.5-VL models use none)")
    tied = hf.get("tie_word_embeddings", c.get("tie_word_embeddings", False))
    text = TextConfig(
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=int(c["num_attention_heads"]),
        num_kv_heads=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
        rms_norm_eps=float(c["rms_norm_eps"]),
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 1_000_000.0))),
        max_position_embeddings=int(c["max_position_embeddings"]),
        qkv_bias=True,
        tie_word_embeddings=bool(tied),
        hidden_act=str(c["hidden_act"]),
    )
    return text, tuple(int(x) for x in section)


def config_from_hf(
    hf: dict,
    image_config: QwenImageProcessorConfig,
    exit_layer: int | None = None,
    draft_kind: ImitationKind = "ffn",
    draft_hidden: int = 0,
) -> Qwen25VLConfig:
    """Builds our config from a HF Qwen2.5-VL config.json dict and its image processor."""
    if hf.get("model_type") != "qwen2_5_vl":
        raise ConversionError(
            f"model type {hf.get('model_type')!r} is not Qwen2.5-VL: this converter reads "
            "Qwen2_5_VLForConditionalGeneration folders (model_type 'qwen2_5_vl')"
        )
    text, section = text_config_from_hf(hf)
    try:
        vision = QwenVisionConfig.from_hf(hf.get("vision_config") or {})
    except ConfigError as error:
        raise ConversionError(f"vision_config: {error}") from None
    if (image_config.patch_size, image_config.merge_size, image_config.temporal_patch_size) != (
        vision.patch_size,
        vision.spatial_merge_size,
        vision.temporal_patch_size,
    ):
        raise ConversionError(
            f"the image processor cuts {image_config.patch_size}-pixel patches merged {image_config.merge_size}x"
            f"{image_config.merge_size} (temporal {image_config.temporal_patch_size}) but the vision tower takes "
            f"{vision.patch_size}, {vision.spatial_merge_size}x{vision.spatial_merge_size} "
            f"(temporal {vision.temporal_patch_size}): fix preprocessor_config.json"
        )
    if exit_layer is None:
        exit_layer = max(1, text.num_layers // 4)
    try:
        return Qwen25VLConfig(
            vision=vision,
            text=text,
            draft=DraftConfig(exit_layer=exit_layer, kind=draft_kind, hidden_size=draft_hidden),
            mrope_section=section,
            max_image_tokens=image_config.max_pixels // image_config.factor**2,
            image_token_id=int(hf.get("image_token_id", 151_655)),
            vision_start_token_id=int(hf.get("vision_start_token_id", 151_652)),
            vision_end_token_id=int(hf.get("vision_end_token_id", 151_653)),
        )
    except ConfigError as error:
        raise ConversionError(str(error)) from None


# --- tensor names -------------------------------------------------------------------------

_PREFIXES = (  # (HF prefix, canonical prefix); the first match wins
    ("model.language_model.", "text."),
    ("model.visual.", "vision."),
    ("visual.", "vision."),
    ("lm_head.", "text.lm_head."),
    ("model.", "text."),  # the released files: the decoder directly under model.
)


def canonical_name(hf_name: str) -> str | None:
    """HF Qwen2.5-VL tensor name -> our canonical name ('text.', 'vision.'), or None if unused."""
    return convert_common.canonical_name(hf_name, _PREFIXES)


def _source_for(path: str) -> tuple[str, Callable]:
    return hf_source_for(path, TEXT_RULES)


def open_safetensors(folder: str | Path) -> convert_common.SafetensorsFolder:
    """The folder's safetensors, addressed by Qwen2.5-VL canonical names."""
    return convert_common.SafetensorsFolder(Path(folder), canonical=canonical_name)


def state_dict_source(state_dict) -> convert_common.StateDictSource:
    """An in-memory HF Qwen2.5-VL state dict, addressed by canonical names."""
    return convert_common.StateDictSource(state_dict, canonical=canonical_name)


def convert_params(source, config: Qwen25VLConfig, rng, dtype=jnp.float32, progress: bool = True):
    """Reads every parameter our model needs; the imitation network gets a fresh init."""
    model = VLM(config)
    abstract = dict(jax.eval_shape(model.init, rng))
    vision_abstract = abstract.pop("vision_tower")
    params = fill_param_tree(
        source,
        abstract,
        _source_for,
        tied=config.text.tie_word_embeddings,
        dtype=dtype,
        progress=progress,
        fresh_imitation=model.init_imitation(rng),
    )
    try:
        vision = convert_vision_params(lambda name: np.asarray(source.get(name)), config.vision, prefix="vision.")
    except ValueError as error:
        raise ConversionError(str(error)) from None
    expected = jax.tree.map(lambda leaf: leaf.shape, vision_abstract)
    if jax.tree.map(np.shape, vision) != expected:
        raise ConversionError("the vision tower's converted parameters do not match the model's structure")
    params["vision_tower"] = jax.tree.map(lambda value: jnp.asarray(value, dtype), vision)
    return params


def convert(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    exit_layer: int | None = None,
    draft_kind: ImitationKind = "ffn",
    draft_hidden: int = 0,
    dtype: str = "float32",
    seed: int = 0,
    progress: bool = True,
    quantize: str | None = None,
) -> epath.Path:
    """Converts a HF Qwen2.5-VL folder into our checkpoint directory; returns its path."""
    hf_dir = Path(hf_dir)
    try:
        image_config = QwenImageProcessorConfig.from_hf(convert_common.read_image_processor_settings(hf_dir))
    except ValueError as error:
        raise ConversionError(f"{hf_dir / 'preprocessor_config.json'}: {error}") from None
    hf = json.loads((hf_dir / "config.json").read_text())
    config = config_from_hf(hf, image_config, exit_layer, draft_kind, draft_hidden)
    tokenizer = from_hf_dir(hf_dir)
    check_image_token_id(tokenizer, config.image_token_id, ConversionError, "config.json's image_token_id")
    folder = open_safetensors(hf_dir)
    params = convert_params(folder, config, jax.random.key(seed), jnp.dtype(dtype), progress)
    if quantize is not None:  # weight-only int8 decoding weights (fastvlm_jax.nn.quant)
        config, params = quantize_model(config, params, quantize)
    return save_checkpoint(out_dir, config, params, tokenizer, image_config)


__all__ = ["config_from_hf", "convert", "convert_params", "open_safetensors", "state_dict_source"]
