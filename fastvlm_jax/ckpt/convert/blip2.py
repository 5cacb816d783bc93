"""Hugging Face BLIP-2 (OPT) checkpoint (a local folder) -> fastvlm-jax checkpoint.

`python -m fastvlm_jax.convert --hf DIR --out CKPT` comes here when config.json says
model_type 'blip-2'. Only OPT language models convert; Flan-T5 (encoder-decoder)
BLIP-2 checkpoints are refused with a one-line error.

Key layout: transformers 5.x writes the same names on disk (`save_pretrained`) as its
in-memory `state_dict()` for Blip2ForConditionalGeneration: `vision_model.*`,
`query_tokens`, `qformer.*`, `language_projection.*`, `language_model.model.decoder.*`
and `language_model.lm_head.weight` (left out of the file when tied). Older hub files
(transformers 4.x) use the same names.

The map is declarative: our module path -> HF module name, plus a generic rule for the
leaf (kernel <- weight transposed, scale <- weight, bias <- bias, embedding <- weight)
and a few whole-tensor rules with their own transform.

Tokenizer: BLIP-2 OPT uses a GPT-2 byte-level BPE tokenizer (tokenizer.json, or vocab.json +
merges.txt, with "<image>" added after the vocabulary); it is saved as a
`fastvlm_jax.text.hf_tokenizer.HFTokenizer`. A folder without tokenizer files converts without
one (a note says so; decode.run then refuses the checkpoint). processor_config.json's
num_query_tokens, when present, must equal the model's.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from etils import epath

from fastvlm_jax.ckpt.checkpoint import save_checkpoint
from fastvlm_jax.ckpt.convert import common as convert_common
from fastvlm_jax.ckpt.convert.common import ConversionError, fill_param_tree
from fastvlm_jax.ckpt.convert.common import conv as _conv
from fastvlm_jax.ckpt.convert.common import identity as _identity
from fastvlm_jax.ckpt.convert.common import linear as _linear
from fastvlm_jax.nn.blip2 import Blip2Config, Blip2VisionConfig, OPTConfig, OPTDecoder, QFormerConfig, init_imitation
from fastvlm_jax.nn.config import ConfigError, DraftConfig, ImitationKind
from fastvlm_jax.nn.model import VLM
from fastvlm_jax.nn.quant import quantize_model
from fastvlm_jax.text.prompts import check_image_token_id
from fastvlm_jax.text.tokenizer import from_hf_dir

# --- HF config -> Blip2Config ---------------------------------------------------------------

# HF leaves keys equal to its class defaults out of config.json (the hub's blip2-opt-2.7b
# vision_config is nearly empty), so we must know those defaults (transformers 5.x).
_VISION_DEFAULTS = dict(
    hidden_size=1408,
    intermediate_size=6144,
    num_hidden_layers=39,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    qkv_bias=True,
    num_channels=3,
)
_QFORMER_DEFAULTS = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    cross_attention_frequency=2,
    use_qformer_text_input=False,
)
_OPT_DEFAULTS = dict(
    vocab_size=50272,
    hidden_size=768,
    num_hidden_layers=12,
    ffn_dim=3072,
    max_position_embeddings=2048,
    do_layer_norm_before=True,
    _remove_final_layer_norm=False,
    word_embed_proj_dim=None,
    num_attention_heads=12,
    activation_function="relu",
    enable_bias=True,
    layer_norm_elementwise_affine=True,
    tie_word_embeddings=True,
    bos_token_id=2,
    eos_token_id=2,
)


def _with_defaults(defaults: dict, hf: dict) -> dict:
    return {**defaults, **{k: v for k, v in hf.items() if v is not None}}


def _image_size(value) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"non-square image_size {value} is not supported")
        return int(value[0])
    return int(value)


def opt_config_from_hf(hf: dict) -> OPTConfig:
    """Our OPTConfig from a HF OPTConfig dict (BLIP-2's text_config, or an OPT config.json)."""
    c = _with_defaults(_OPT_DEFAULTS, hf)
    hidden = c["hidden_size"]
    return OPTConfig(
        vocab_size=c["vocab_size"],
        hidden_size=hidden,
        intermediate_size=c["ffn_dim"],
        num_layers=c["num_hidden_layers"],
        num_heads=c["num_attention_heads"],
        max_position_embeddings=c["max_position_embeddings"],
        word_embed_proj_dim=0 if c["word_embed_proj_dim"] in (None, hidden) else c["word_embed_proj_dim"],
        do_layer_norm_before=bool(c["do_layer_norm_before"]),
        remove_final_layer_norm=bool(c["_remove_final_layer_norm"]),
        layer_norm_elementwise_affine=bool(c["layer_norm_elementwise_affine"]),
        enable_bias=bool(c["enable_bias"]),
        hidden_act=c["activation_function"],
        tie_word_embeddings=bool(c["tie_word_embeddings"]),
        bos_token_id=int(c["bos_token_id"]),
        eos_token_id=_first(c["eos_token_id"]),
    )


def _first(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def config_from_hf(
    hf: dict, exit_layer: int | None = None, draft_kind: ImitationKind = "ffn", draft_hidden: int = 0
) -> Blip2Config:
    """Builds our config from a HF Blip2ForConditionalGeneration config.json dict."""
    if hf.get("model_type") != "blip-2":
        raise ConversionError(f"model type {hf.get('model_type')!r} is not BLIP-2 ('blip-2')")
    text_hf = hf.get("text_config")
    if not text_hf:
        raise ConversionError(
            "BLIP-2 config.json without a text_config is not supported: the language model must be named explicitly"
        )
    text_type = text_hf.get("model_type", "opt")
    if text_type == "t5":
        raise ConversionError(
            "BLIP-2 with a Flan-T5 (encoder-decoder) language model is not "
            "supported yet: only BLIP-2 OPT checkpoints convert"
        )
    if text_type != "opt":
        raise ConversionError(f"BLIP-2 text model type {text_type!r} is not supported: only 'opt'")
    if hf.get("image_token_index", hf.get("image_token_id")) is None:
        raise ConversionError(
            "BLIP-2 config.json without image_token_index (the pre-2024 "
            "layout, no image tokens in the prompt) is not supported"
        )
    qformer_hf = _with_defaults(_QFORMER_DEFAULTS, hf.get("qformer_config") or {})
    if qformer_hf["use_qformer_text_input"]:
        raise ConversionError("Q-Former text input (use_qformer_text_input, InstructBLIP-style) is not supported")
    vision_hf = _with_defaults(_VISION_DEFAULTS, hf.get("vision_config") or {})
    text = opt_config_from_hf(text_hf)
    vision = Blip2VisionConfig(
        image_size=_image_size(vision_hf["image_size"]),
        patch_size=_image_size(vision_hf["patch_size"]),
        num_channels=vision_hf["num_channels"],
        hidden_size=vision_hf["hidden_size"],
        intermediate_size=vision_hf["intermediate_size"],
        num_layers=vision_hf["num_hidden_layers"],
        num_heads=vision_hf["num_attention_heads"],
        layer_norm_eps=vision_hf["layer_norm_eps"],
        hidden_act=vision_hf["hidden_act"],
        qkv_bias=bool(vision_hf["qkv_bias"]),
    )
    qformer = QFormerConfig(
        hidden_size=qformer_hf["hidden_size"],
        intermediate_size=qformer_hf["intermediate_size"],
        num_layers=qformer_hf["num_hidden_layers"],
        num_heads=qformer_hf["num_attention_heads"],
        layer_norm_eps=qformer_hf["layer_norm_eps"],
        hidden_act=qformer_hf["hidden_act"],
        cross_attention_frequency=qformer_hf["cross_attention_frequency"],
    )
    if exit_layer is None:
        exit_layer = max(1, text.num_layers // 4)
    image_token_id = hf.get("image_token_index", hf.get("image_token_id"))
    if image_token_id is None:
        raise ConversionError(
            "config.json has no image_token_index: the model needs the id of the image token its prompts carry"
        )
    try:
        return Blip2Config(
            vision=vision,
            qformer=qformer,
            text=text,
            draft=DraftConfig(exit_layer=exit_layer, kind=draft_kind, hidden_size=draft_hidden),
            num_query_tokens=hf.get("num_query_tokens", 32),
            image_token_id=image_token_id,
        )
    except ConfigError as err:
        raise ConversionError(str(err)) from None


# --- tensor names ---------------------------------------------------------------------------

_PREFIXES = (  # (HF prefix, canonical prefix); the first match wins
    ("vision_model.", "vision."),
    ("qformer.", "qformer."),
    ("query_tokens", "query_tokens"),
    ("language_projection.", "projector."),
    ("language_model.model.decoder.", "text."),
    ("language_model.lm_head.", "text.lm_head."),
)


def canonical_name(hf_name: str) -> str | None:
    """HF BLIP-2 tensor name -> our canonical name, or None if unused."""
    return convert_common.canonical_name(hf_name, _PREFIXES)


def _drop_leading_ones(x):  # [1, 1, D] / [1, N, D] -> [D] / [N, D]
    while x.ndim > 1 and x.shape[0] == 1:
        x = x[0]
    return x


# Whole tensors with their own transform: (regex on our param path, HF name, transform).
TENSOR_RULES: list[tuple[str, str, Callable]] = [
    (r"vision_tower/patch_embedding/kernel", "vision.embeddings.patch_embedding.weight", _conv),
    (r"vision_tower/patch_embedding/bias", "vision.embeddings.patch_embedding.bias", _identity),
    (r"vision_tower/class_embedding", "vision.embeddings.class_embedding", _drop_leading_ones),
    (r"vision_tower/position_embedding", "vision.embeddings.position_embedding", _drop_leading_ones),
    (r"qformer/query_tokens", "query_tokens", _drop_leading_ones),
    (r"language_model/embed_positions", "text.embed_positions.weight", _identity),
]

# Modules: (regex on our module path, HF module name template); the leaf rule does the rest.
MODULE_RULES: list[tuple[str, str]] = [
    (r"vision_tower/layers_(\d+)/(layer_norm[12])", r"vision.encoder.layers.\1.\2"),
    (r"vision_tower/layers_(\d+)/(qkv|projection)", r"vision.encoder.layers.\1.self_attn.\2"),
    (r"vision_tower/layers_(\d+)/(fc[12])", r"vision.encoder.layers.\1.mlp.\2"),
    (r"vision_tower/post_layernorm", "vision.post_layernorm"),
    (r"qformer/layernorm", "qformer.layernorm"),
    (r"qformer/layers_(\d+)/self_attn/(query|key|value)", r"qformer.encoder.layer.\1.attention.attention.\2"),
    (r"qformer/layers_(\d+)/self_attn/out", r"qformer.encoder.layer.\1.attention.output.dense"),
    (r"qformer/layers_(\d+)/self_attn/norm", r"qformer.encoder.layer.\1.attention.output.LayerNorm"),
    (r"qformer/layers_(\d+)/cross_attn/(query|key|value)", r"qformer.encoder.layer.\1.crossattention.attention.\2"),
    (r"qformer/layers_(\d+)/cross_attn/out", r"qformer.encoder.layer.\1.crossattention.output.dense"),
    (r"qformer/layers_(\d+)/cross_attn/norm", r"qformer.encoder.layer.\1.crossattention.output.LayerNorm"),
    (r"qformer/layers_(\d+)/fc1", r"qformer.encoder.layer.\1.intermediate_query.dense"),
    (r"qformer/layers_(\d+)/fc2", r"qformer.encoder.layer.\1.output_query.dense"),
    (r"qformer/layers_(\d+)/ffn_norm", r"qformer.encoder.layer.\1.output_query.LayerNorm"),
    (r"projector", "projector"),
    (r"language_model/embed_tokens", "text.embed_tokens"),
    (r"language_model/(project_in|project_out|final_layer_norm|lm_head)", r"text.\1"),
    (r"language_model/layers_(\d+)/self_attn/(q_proj|k_proj|v_proj|out_proj)", r"text.layers.\1.self_attn.\2"),
    (r"language_model/layers_(\d+)/(fc[12]|self_attn_layer_norm|final_layer_norm)", r"text.layers.\1.\2"),
]

# Our leaf name -> (HF tensor name within the module, transform).
LEAF_RULES: dict[str, tuple[str, Callable]] = {
    "kernel": ("weight", _linear),
    "bias": ("bias", _identity),
    "scale": ("weight", _identity),
    "embedding": ("weight", _identity),
}


def hf_source_for(path: str) -> tuple[str, Callable]:
    """Our param path ('a/b/c') -> (HF canonical tensor name, transform)."""
    for pattern, name, transform in TENSOR_RULES:
        if re.fullmatch(pattern, path):
            return name, transform
    module, _, leaf = path.rpartition("/")
    if leaf in LEAF_RULES:
        for pattern, template in MODULE_RULES:
            match = re.fullmatch(pattern, module)
            if match:
                hf_leaf, transform = LEAF_RULES[leaf]
                return f"{match.expand(template)}.{hf_leaf}", transform
    raise ConversionError(f"no conversion rule for parameter {path}")


# --- tensor sources -------------------------------------------------------------------------


def open_safetensors(folder: str | Path) -> convert_common.SafetensorsFolder:
    """The folder's safetensors, addressed by BLIP-2 canonical names."""
    return convert_common.SafetensorsFolder(Path(folder), canonical=canonical_name)


def state_dict_source(state_dict: dict[str, Any]) -> convert_common.StateDictSource:
    """An in-memory HF BLIP-2 state dict (torch tensors or arrays), addressed by canonical names."""
    return convert_common.StateDictSource(state_dict, canonical=canonical_name)


def convert_params(source, config: Blip2Config, rng, dtype=jnp.float32, progress: bool = True):
    """Reads every parameter the model needs; the imitation network gets a fresh init.

    source: anything with `get(canonical_name) -> array` (open_safetensors, state_dict_source).
    """
    abstract = jax.eval_shape(VLM(config).init, rng)
    return fill_param_tree(
        source,
        abstract,
        hf_source_for,
        tied=config.text.tie_word_embeddings,
        dtype=dtype,
        progress=progress,
        fresh_imitation=init_imitation(config, rng),
    )


def convert_opt_params(source, text: OPTConfig, dtype=jnp.float32) -> dict:
    """The `OPTDecoder` params alone, from `language_model.model.decoder.*` tensors.

    For standalone OPT checks (e.g. OPT-350m's project_in/out and post-norm layers, which
    BLIP-2 never uses): prefix an OPTForCausalLM state dict's keys with 'language_model.'.
    """
    ids = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(OPTDecoder(text).init, jax.random.key(0), ids, ids)["params"]
    abstract = {"language_model": nn.meta.unbox(abstract)}
    return fill_param_tree(source, abstract, hf_source_for, tied=text.tie_word_embeddings, dtype=dtype, progress=False)[
        "language_model"
    ]


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
    """Converts a HF BLIP-2 OPT folder into our checkpoint directory; returns its path."""

    hf_dir = Path(hf_dir)
    config = config_from_hf(json.loads((hf_dir / "config.json").read_text()), exit_layer, draft_kind, draft_hidden)
    image_config = convert_common.read_image_processor(hf_dir)
    if image_config.output_size != (config.vision.image_size, config.vision.image_size):
        raise ConversionError(
            f"the image processor makes {image_config.output_size} images but the "
            f"vision model wants {config.vision.image_size}px"
        )
    tokenizer = load_hf_tokenizer(hf_dir, config)
    params = convert_params(open_safetensors(hf_dir), config, jax.random.key(seed), jnp.dtype(dtype), progress)
    if tokenizer is None:
        print(
            f"note: {hf_dir} has no tokenizer files (tokenizer.json or vocab.json + merges.txt): the "
            "checkpoint has no tokenizer/ (decode.run needs one)",
            file=sys.stderr,
        )
    if quantize is not None:  # weight-only int8 decoding weights (fastvlm_jax.nn.quant)
        config, params = quantize_model(config, params, quantize)
    return save_checkpoint(out_dir, config, params, tokenizer, image_config)


def load_hf_tokenizer(hf_dir: str | Path, config: Blip2Config):
    """The folder's GPT-2 BPE tokenizer checked against `config`, or None when it has none."""

    hf_dir = Path(hf_dir)
    has_files = (hf_dir / "tokenizer.json").is_file() or (
        (hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file()
    )
    if not has_files:
        return None
    try:
        tokenizer = from_hf_dir(hf_dir)
    except (ValueError, KeyError) as err:
        raise ConversionError(f"{hf_dir}: cannot read the tokenizer: {err}") from None
    check_image_token_id(tokenizer, config.image_token_id, ConversionError, "config.json's image_token_index")
    if tokenizer.vocab_size > config.text.vocab_size:
        raise ConversionError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the language model only {config.text.vocab_size}"
        )
    processor_file = hf_dir / "processor_config.json"
    if processor_file.is_file():
        queries = json.loads(processor_file.read_text()).get("num_query_tokens")
        if queries is not None and int(queries) != config.num_query_tokens:
            raise ConversionError(
                f"processor_config.json puts {queries} image tokens in a prompt but "
                f"the model has {config.num_query_tokens} queries"
            )
    return tokenizer
