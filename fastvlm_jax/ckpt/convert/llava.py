"""Hugging Face LLaVA checkpoint (a local folder) -> fastvlm-jax checkpoint.

`python -m fastvlm_jax.convert` comes here for config.json model_type 'llava'. The mapping is declarative: each rule matches one of our parameter paths and names
the HF tensor it comes from plus a small transform (transpose a Linear, reorder a
conv kernel). Both HF key layouts are accepted: the on-disk one
(`language_model.model.*`, `vision_tower.vision_model.*`) and the one newer
transformers use in memory (`model.language_model.*`, `model.vision_tower.*`).
Decoder layers are read one HF tensor per layer and stacked
(`fastvlm_jax.ckpt.convert.common.fill_param_tree`). Never touches the network.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from etils import epath

from fastvlm_jax.ckpt.checkpoint import save_checkpoint
from fastvlm_jax.ckpt.convert import common as convert_common
from fastvlm_jax.ckpt.convert.common import ConversionError, conv, fill_param_tree, identity, linear
from fastvlm_jax.nn.config import DraftConfig, ImitationKind, TextConfig, VisionConfig
from fastvlm_jax.nn.llava import LlavaConfig
from fastvlm_jax.nn.model import VLM
from fastvlm_jax.nn.quant import quantize_model
from fastvlm_jax.text.tokenizer import from_hf_dir

# --- HF config -> LlavaConfig ---------------------------------------------------------------

# HF omits keys that equal its class defaults (llava-1.5-7b-hf's text_config has only a
# handful of keys), so we must know those defaults. Values from transformers' configs.
_TEXT_DEFAULTS = {
    "llama": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        attention_bias=False,
        tie_word_embeddings=False,
    ),
    "mistral": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_act="silu",
        max_position_embeddings=4096 * 32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}
_VISION_DEFAULTS = {
    "clip_vision_model": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
    "siglip_vision_model": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=224,
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    ),
}


def text_config_from_hf(hf: dict) -> TextConfig:
    model_type = hf.get("model_type", "llama")
    if model_type not in _TEXT_DEFAULTS:
        raise ConversionError(f"text model type {model_type!r} is not supported; supported: {sorted(_TEXT_DEFAULTS)}")
    c = {**_TEXT_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(f"rope type {rope_type!r} is not supported yet (only 'default' RoPE)")
    if c.get("mlp_bias"):
        raise ConversionError("mlp_bias=True text models are not supported yet")
    if c.get("sliding_window") and c.get("use_sliding_window", model_type == "mistral"):
        print(
            f"note: sliding_window={c['sliding_window']} is ignored (full attention is used); "
            "outputs differ only past that many tokens",
            file=sys.stderr,
        )
    return TextConfig(
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
        head_dim=c.get("head_dim"),
        rms_norm_eps=c["rms_norm_eps"],
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        max_position_embeddings=c["max_position_embeddings"],
        attention_bias=bool(c.get("attention_bias", False)),
        qkv_bias=model_type == "qwen2",
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        hidden_act=c["hidden_act"],
    )


def vision_config_from_hf(hf: dict) -> VisionConfig:
    model_type = hf.get("model_type", "clip_vision_model")
    if model_type not in _VISION_DEFAULTS:
        raise ConversionError(
            f"vision model type {model_type!r} is not supported; supported: {sorted(_VISION_DEFAULTS)}"
        )
    c = {**_VISION_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    return VisionConfig(
        kind="clip" if model_type == "clip_vision_model" else "siglip",
        image_size=c["image_size"],
        patch_size=c["patch_size"],
        num_channels=c["num_channels"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        layer_norm_eps=c["layer_norm_eps"],
        hidden_act=c["hidden_act"],
    )


def config_from_hf(
    hf: dict, exit_layer: int | None = None, draft_kind: ImitationKind = "ffn", draft_hidden: int = 0
) -> LlavaConfig:
    """Builds our config from a HF LLaVA config.json dict."""
    model_type = hf.get("model_type")
    if model_type != "llava":
        hint = " (BLIP-2: use fastvlm_jax.ckpt.convert.blip2)" if model_type == "blip-2" else ""
        raise ConversionError(
            f"model type {model_type!r} is not supported: this converter reads "
            f"LLaVA checkpoints (model_type 'llava'){hint}"
        )
    text = text_config_from_hf(hf.get("text_config") or {})
    vision = vision_config_from_hf(hf.get("vision_config") or {})
    feature_layer = hf.get("vision_feature_layer", -2)
    if isinstance(feature_layer, list):
        feature_layer = tuple(feature_layer)
    if exit_layer is None:
        exit_layer = max(1, text.num_layers // 4)
    image_token = hf.get("image_token_index", hf.get("image_token_id", 32000))
    return LlavaConfig(
        vision=vision,
        text=text,
        draft=DraftConfig(exit_layer=exit_layer, kind=draft_kind, hidden_size=draft_hidden),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
        projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
        projector_bias=hf.get("multimodal_projector_bias", True),
        image_token_id=image_token,
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
    """HF LLaVA tensor name -> our canonical name ('text.', 'vision.', ...), or None if unused."""
    return convert_common.canonical_name(hf_name, _PREFIXES)


_identity, _linear, _conv = identity, linear, conv


_NORM_FIELD = {"scale": "weight", "bias": "bias"}

# (regex on our param path, HF canonical name template, transform)
# The CLIP / SigLIP tower (`fastvlm_jax.nn.vision.VisionTower`), also Gemma 3's.
VISION_RULES: list[tuple[str, str, Callable]] = [
    (r"vision_tower/patch_embedding/kernel", "vision.embeddings.patch_embedding.weight", _conv),
    (r"vision_tower/patch_embedding/bias", "vision.embeddings.patch_embedding.bias", _identity),
    (r"vision_tower/class_embedding", "vision.embeddings.class_embedding", _identity),
    (r"vision_tower/position_embedding", "vision.embeddings.position_embedding.weight", _identity),
    (r"vision_tower/pre_layrnorm/norm/(scale|bias)", "vision.pre_layrnorm.{norm}", _identity),
    (r"vision_tower/layers_(\d+)/(layer_norm[12])/norm/(scale|bias)", r"vision.encoder.layers.\1.\2.{norm}", _identity),
    (r"vision_tower/layers_(\d+)/self_attn/(\w+)/kernel", r"vision.encoder.layers.\1.self_attn.\2.weight", _linear),
    (r"vision_tower/layers_(\d+)/self_attn/(\w+)/bias", r"vision.encoder.layers.\1.self_attn.\2.bias", _identity),
    (r"vision_tower/layers_(\d+)/(fc[12])/kernel", r"vision.encoder.layers.\1.mlp.\2.weight", _linear),
    (r"vision_tower/layers_(\d+)/(fc[12])/bias", r"vision.encoder.layers.\1.mlp.\2.bias", _identity),
]
# The LLaMA-style decoder (`fastvlm_jax.nn.llava.TextDecoder`); Gemma 3's names are a superset.
TEXT_RULES: list[tuple[str, str, Callable]] = [
    (r"language_model/embed_tokens/embedding", "text.embed_tokens.weight", _identity),
    (r"language_model/layers_(\d+)/(self_attn|mlp)/(\w+)/kernel", r"text.layers.\1.\2.\3.weight", _linear),
    (r"language_model/layers_(\d+)/self_attn/(\w+)/bias", r"text.layers.\1.self_attn.\2.bias", _identity),
    (r"language_model/layers_(\d+)/(\w+_layernorm)/scale", r"text.layers.\1.\2.weight", _identity),
    (r"language_model/norm/scale", "text.norm.weight", _identity),
    (r"language_model/lm_head/kernel", "text.lm_head.weight", _linear),
]
PARAM_RULES: list[tuple[str, str, Callable]] = [
    *TEXT_RULES,
    *VISION_RULES,
    (r"projector/(linear_[12])/kernel", r"projector.\1.weight", _linear),
    (r"projector/(linear_[12])/bias", r"projector.\1.bias", _identity),
]


def hf_source_for(path: str, rules=None) -> tuple[str, Callable]:
    """Our param path ('a/b/c') -> (HF canonical tensor name, transform), by `rules`
    (default: LLaVA's PARAM_RULES)."""
    for pattern, template, transform in PARAM_RULES if rules is None else rules:
        match = re.fullmatch(pattern, path)
        if match:
            name = match.expand(template)
            if "{norm}" in name:
                name = name.replace("{norm}", _NORM_FIELD[path.rsplit("/", 1)[1]])
            return name, transform
    raise ConversionError(f"no conversion rule for parameter {path}")


def open_safetensors(folder: str | Path) -> convert_common.SafetensorsFolder:
    """The folder's safetensors, addressed by LLaVA canonical names."""
    return convert_common.SafetensorsFolder(Path(folder), canonical=canonical_name)


def state_dict_source(state_dict) -> convert_common.StateDictSource:
    """An in-memory HF LLaVA state dict, addressed by LLaVA canonical names."""
    return convert_common.StateDictSource(state_dict, canonical=canonical_name)


def convert_params(source, config: LlavaConfig, rng, dtype=jnp.float32, progress: bool = True):
    """Reads every parameter our model needs; the imitation network gets a fresh init.

    source: anything with `get(canonical_name) -> array` (open_safetensors, state_dict_source).
    """
    model = VLM(config)
    abstract = jax.eval_shape(model.init, rng)
    return fill_param_tree(
        source,
        abstract,
        hf_source_for,
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
    """Converts a HF LLaVA folder into our checkpoint directory; returns its path."""

    hf_dir = Path(hf_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    config = config_from_hf(hf_config, exit_layer, draft_kind, draft_hidden)
    image_config = convert_common.read_image_processor(hf_dir)
    tokenizer = from_hf_dir(hf_dir)
    folder = open_safetensors(hf_dir)
    params = convert_params(folder, config, jax.random.key(seed), jnp.dtype(dtype), progress)
    if quantize is not None:  # weight-only int8 decoding weights (fastvlm_jax.nn.quant)
        config, params = quantize_model(config, params, quantize)
    return save_checkpoint(out_dir, config, params, tokenizer, image_config)
