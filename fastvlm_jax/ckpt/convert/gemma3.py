"""Hugging Face Gemma 3 checkpoint (a local `Gemma3ForConditionalGeneration` folder) ->
fastvlm-jax checkpoint.

`python -m fastvlm_jax.convert` comes here for config.json model_type 'gemma3'. Both key
layouts are read: transformers 5's (`model.language_model.*`, `model.vision_tower.*`,
`model.multi_modal_projector.*`) and the one the original release was saved with
(`language_model.model.*`, `vision_tower.*`, `multi_modal_projector.*`). Sharded or single
safetensors; the tokenizer from tokenizer.json (GemmaTokenizer's pipeline), the chat template
with it; image preprocessing from preprocessor_config.json. Never touches the network.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from fastvlm_jax.ckpt.checkpoint import save_checkpoint
from fastvlm_jax.ckpt.convert import common as convert_common
from fastvlm_jax.ckpt.convert.common import ConversionError, fill_param_tree, identity
from fastvlm_jax.ckpt.convert.llava import TEXT_RULES, VISION_RULES, hf_source_for, vision_config_from_hf
from fastvlm_jax.nn.config import DraftConfig, ImitationKind
from fastvlm_jax.nn.gemma3 import FULL, SLIDING, Gemma3Config, Gemma3TextConfig
from fastvlm_jax.nn.model import VLM
from fastvlm_jax.nn.quant import quantize_model
from fastvlm_jax.text.prompts import check_image_token_id
from fastvlm_jax.text.tokenizer import from_hf_dir

# transformers' Gemma3TextConfig defaults (config.json may leave any of them out).
_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=262_208,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=131_072,
    rms_norm_eps=1e-6,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    attention_bias=False,
    tie_word_embeddings=True,
)
_GLOBAL_THETA, _LOCAL_THETA = 1_000_000.0, 10_000.0
_SUPPORTED_ROPE = ("default", "linear")


def _rope(params: dict | None, what: str, theta: float) -> tuple[float, float]:
    """(theta, linear scaling factor) of one layer type's RoPE parameters."""
    params = params or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _SUPPORTED_ROPE:
        raise ConversionError(f"{what} layers use rope type {rope_type!r}; supported: {', '.join(_SUPPORTED_ROPE)}")
    factor = float(params.get("factor", 1.0)) if rope_type == "linear" else 1.0
    return float(params.get("rope_theta", theta)), factor


def text_config_from_hf(hf: dict) -> Gemma3TextConfig:
    c = {**_TEXT_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    if c.get("use_bidirectional_attention"):
        raise ConversionError("use_bidirectional_attention=true (an embedding model) is not a decoder we can run")
    num_layers = int(c["num_hidden_layers"])
    layer_types = c.get("layer_types")
    if not layer_types:  # older folders: every `sliding_window_pattern`-th layer is global
        pattern = int(c.get("sliding_window_pattern", 6))
        layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(num_layers)]
    rope = c.get("rope_parameters")
    if isinstance(rope, dict) and (SLIDING in rope or FULL in rope):
        global_theta, global_factor = _rope(rope.get(FULL), "global", _GLOBAL_THETA)
        local_theta, local_factor = _rope(rope.get(SLIDING), "sliding", _LOCAL_THETA)
    else:  # transformers 4.x: rope_theta + rope_scaling for global layers, rope_local_base_freq
        scaling = c.get("rope_scaling") or rope or {}
        global_theta, global_factor = _rope(
            {**scaling, "rope_theta": c.get("rope_theta", _GLOBAL_THETA)}, "global", _GLOBAL_THETA
        )
        local_theta, local_factor = float(c.get("rope_local_base_freq", _LOCAL_THETA)), 1.0
    return Gemma3TextConfig(
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=num_layers,
        num_heads=int(c["num_attention_heads"]),
        num_kv_heads=int(c.get("num_key_value_heads") or c["num_attention_heads"]),
        head_dim=int(c["head_dim"]),
        rms_norm_eps=float(c["rms_norm_eps"]),
        query_pre_attn_scalar=float(c["query_pre_attn_scalar"]),
        sliding_window=None if c.get("sliding_window") is None else int(c["sliding_window"]),
        layer_types=tuple(layer_types),
        rope_theta=global_theta,
        rope_scaling_factor=global_factor,
        rope_local_theta=local_theta,
        rope_local_scaling_factor=local_factor,
        max_position_embeddings=int(c["max_position_embeddings"]),
        attention_bias=bool(c.get("attention_bias", False)),
        hidden_act=str(c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", True)),
    )


def config_from_hf(
    hf: dict, exit_layer: int | None = None, draft_kind: ImitationKind = "ffn", draft_hidden: int = 0
) -> Gemma3Config:
    """Builds our config from a HF Gemma 3 config.json dict."""
    if hf.get("model_type") != "gemma3":
        raise ConversionError(
            f"model type {hf.get('model_type')!r} is not Gemma 3: this converter reads "
            "Gemma3ForConditionalGeneration folders (model_type 'gemma3')"
        )
    text = text_config_from_hf(hf.get("text_config") or {})
    vision_hf = hf.get("vision_config") or {}
    if vision_hf.get("vision_use_head"):
        raise ConversionError("vision_config.vision_use_head=true: Gemma 3 reads the patch states, not a pooled head")
    vision = vision_config_from_hf({"model_type": "siglip_vision_model", **vision_hf})
    if exit_layer is None:
        exit_layer = max(1, text.num_layers // 4)
    tied = hf.get("tie_word_embeddings")
    if tied is not None and bool(tied) != text.tie_word_embeddings:
        text = dataclasses.replace(text, tie_word_embeddings=bool(tied))
    return Gemma3Config(
        vision=vision,
        text=text,
        draft=DraftConfig(exit_layer=exit_layer, kind=draft_kind, hidden_size=draft_hidden),
        mm_tokens_per_image=int(hf.get("mm_tokens_per_image", 256)),
        image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 262_144))),
        boi_token_id=int(hf.get("boi_token_index", hf.get("boi_token_id", 255_999))),
        eoi_token_id=int(hf.get("eoi_token_index", hf.get("eoi_token_id", 256_000))),
    )


# --- tensor names -------------------------------------------------------------------------

_PREFIXES = (  # (HF prefix, canonical prefix); the first match wins
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("language_model.lm_head.", "text.lm_head."),
    ("lm_head.", "text.lm_head."),
    ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
)


def canonical_name(hf_name: str) -> str | None:
    """HF Gemma 3 tensor name -> our canonical name ('text.', 'vision.', ...), or None if unused."""
    return convert_common.canonical_name(hf_name, _PREFIXES)


PARAM_RULES: list[tuple[str, str, Callable]] = [
    (r"language_model/layers_(\d+)/self_attn/(q_norm|k_norm)/scale", r"text.layers.\1.self_attn.\2.weight", identity),
    *TEXT_RULES,
    *VISION_RULES,
    (r"vision_post_layernorm/norm/scale", "vision.post_layernorm.weight", identity),
    (r"vision_post_layernorm/norm/bias", "vision.post_layernorm.bias", identity),
    (r"projector/mm_input_projection_weight", "projector.mm_input_projection_weight", identity),
    (r"projector/mm_soft_emb_norm/scale", "projector.mm_soft_emb_norm.weight", identity),
]


def _source_for(path: str):
    return hf_source_for(path, PARAM_RULES)


def open_safetensors(folder: str | Path) -> convert_common.SafetensorsFolder:
    """The folder's safetensors, addressed by Gemma 3 canonical names."""
    return convert_common.SafetensorsFolder(Path(folder), canonical=canonical_name)


def state_dict_source(state_dict) -> convert_common.StateDictSource:
    """An in-memory HF Gemma 3 state dict, addressed by canonical names."""
    return convert_common.StateDictSource(state_dict, canonical=canonical_name)


def convert_params(source, config: Gemma3Config, rng, dtype=jnp.float32, progress: bool = True):
    """Reads every parameter our model needs; the imitation network gets a fresh init."""
    model = VLM(config)
    abstract = jax.eval_shape(model.init, rng)
    return fill_param_tree(
        source,
        abstract,
        _source_for,
        tied=config.text.tie_word_embeddings,
        dtype=dtype,
        progress=progress,
        fresh_imitation=model.init_imitation(rng),
    )


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
    """Converts a HF Gemma 3 folder into our checkpoint directory; returns its path."""
    hf_dir = Path(hf_dir)
    config = config_from_hf(json.loads((hf_dir / "config.json").read_text()), exit_layer, draft_kind, draft_hidden)
    image_config = convert_common.read_image_processor(hf_dir)
    if image_config.output_size != (config.vision.image_size, config.vision.image_size):
        raise ConversionError(
            f"the image processor makes {image_config.output_size} images but the vision tower takes "
            f"{config.vision.image_size}x{config.vision.image_size}: fix preprocessor_config.json's size"
        )
    tokenizer = from_hf_dir(hf_dir)
    check_image_token_id(tokenizer, config.image_token_id, ConversionError, "config.json's image_token_index")
    folder = open_safetensors(hf_dir)
    params = convert_params(folder, config, jax.random.key(seed), jnp.dtype(dtype), progress)
    if quantize is not None:  # weight-only int8 decoding weights (fastvlm_jax.nn.quant)
        config, params = quantize_model(config, params, quantize)
    return save_checkpoint(out_dir, config, params, tokenizer, image_config)


__all__ = ["config_from_hf", "convert", "convert_params", "open_safetensors", "state_dict_source"]
