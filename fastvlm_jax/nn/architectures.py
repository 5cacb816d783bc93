"""Named model architectures: the configs of released checkpoints, without their weights.

    config = architecture("llava15_7b")

For work that needs a model's shapes but not its values: abstract params
(`VLM(config).abstract_params()`), sharding plans, compile-only runs for a TPU topology
(`decode.bench --ckpt shapes:NAME --compile-only ...`, `train.run --compile-only` of a
config whose checkpoint is not on this machine). The sizes are those of the Hugging Face
checkpoints; the draft path (exit layer, imitation network) is the one our configs/ train.
The drafter-comparison architectures (`llava15_7b_eagle*`, `llava_draft_*`) add draft
sizes of our own choosing, modelled on the papers' drafters: not released checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastvlm_jax.nn.blip2 import Blip2Config, Blip2VisionConfig, OPTConfig, QFormerConfig
from fastvlm_jax.nn.config import ConfigError, DraftConfig, ImitationKind, TextConfig, VisionConfig
from fastvlm_jax.nn.gemma3 import Gemma3Config, Gemma3TextConfig
from fastvlm_jax.nn.llava import LlavaConfig
from fastvlm_jax.nn.qwen25vl import Qwen25VLConfig
from fastvlm_jax.nn.qwen_vision import QwenVisionConfig

# BLIP-2 OPT captions end at "\n" (text_config.eos_token_id of the released models).
BLIP2_OPT_EOS_NEWLINE_ID = 50118


def llava15_7b(exit_layer: int = 8, kind: ImitationKind = "ffn", draft_hidden: int = 0) -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (576 image tokens), Vicuna-7B
    (32 layers, width 4096, FFN 11008, 32 heads, vocab 32064 with <image> at 32000)."""
    return LlavaConfig(
        vision=VisionConfig(
            kind="clip",
            image_size=336,
            patch_size=14,
            hidden_size=1024,
            intermediate_size=4096,
            num_layers=24,
            num_heads=16,
        ),
        text=TextConfig(
            vocab_size=32064,
            hidden_size=4096,
            intermediate_size=11008,
            num_layers=32,
            num_heads=32,
            num_kv_heads=32,
            max_position_embeddings=4096,
        ),
        draft=DraftConfig(exit_layer=exit_layer, kind=kind, hidden_size=draft_hidden),
        vision_feature_layer=-2,
        image_token_id=32000,
    )


def llava15_13b(exit_layer: int = 10, kind: ImitationKind = "ffn", draft_hidden: int = 0) -> LlavaConfig:
    """llava-hf/llava-1.5-13b-hf: the 7B's vision tower, Vicuna-13B (40 layers, width 5120,
    FFN 13824, 40 heads)."""
    base = llava15_7b(exit_layer=1)
    return base.replace(
        text=TextConfig(
            vocab_size=32064,
            hidden_size=5120,
            intermediate_size=13824,
            num_layers=40,
            num_heads=40,
            num_kv_heads=40,
            max_position_embeddings=4096,
        ),
        draft=DraftConfig(exit_layer=exit_layer, kind=kind, hidden_size=draft_hidden),
    )


def blip2_opt_2_7b(exit_layer: int = 8, kind: ImitationKind = "ffn", draft_hidden: int = 0) -> Blip2Config:
    """Salesforce/blip2-opt-2.7b (3,744,761,856 parameters without the imitation network):
    EVA ViT-g/14 at 224 px (39 layers, width 1408), a 12-layer Q-Former (width 768,
    cross-attention every 2nd layer, 32 queries), OPT-2.7b (32 layers, width 2560, FFN
    10240, vocab 50304 with the image token at 50265)."""
    return Blip2Config(
        vision=Blip2VisionConfig(
            image_size=224,
            patch_size=14,
            hidden_size=1408,
            intermediate_size=6144,
            num_layers=39,
            num_heads=16,
            layer_norm_eps=1e-6,
            hidden_act="gelu",
            qkv_bias=True,
        ),
        qformer=QFormerConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_layers=12,
            num_heads=12,
            layer_norm_eps=1e-12,
            hidden_act="gelu",
            cross_attention_frequency=2,
        ),
        text=OPTConfig(
            vocab_size=50304,
            hidden_size=2560,
            intermediate_size=10240,
            num_layers=32,
            num_heads=32,
            max_position_embeddings=2048,
            do_layer_norm_before=True,
            hidden_act="relu",
            tie_word_embeddings=True,
            bos_token_id=2,
            eos_token_id=BLIP2_OPT_EOS_NEWLINE_ID,
        ),
        draft=DraftConfig(exit_layer=exit_layer, kind=kind, hidden_size=draft_hidden),
        num_query_tokens=32,
        image_token_id=50265,
    )


def llava15_7b_eagle(image_pool: int = 1) -> LlavaConfig:
    """LLaVA-1.5-7B with an EAGLE head (SpecVLM's EagleVLM): one LLaMA-style decoder layer
    of the model's width with FFN 11008 (one Vicuna-7B layer's shape, 202M params; 236M
    with the [f, e] -> width fuse projection), its visual compressor keeping one cache entry per
    `image_pool` image tokens. The head's sizes are our choice, following EAGLE's
    one-layer head; no released checkpoint."""
    return llava15_7b().with_draft(eagle_layers=1, eagle_hidden_size=11008, eagle_image_pool=image_pool)


def llava_draft(num_layers: int) -> LlavaConfig:
    """A small LLaMA-style draft VLM for LLaVA-1.5-7B (a separate model, Spec-LLaVA style):
    the 7B's CLIP ViT-L/14-336 tower (576 image tokens) and a projector to width 768, a
    decoder of `num_layers` layers (width 768, 12 heads, FFN 3072) over the 7B's vocab of
    32064 (same tokenizer, <image> at 32000). The sizes are our choice, modelled on the
    LLaMA-68M / LLaMA-160M drafts Spec-LLaVA starts from; not a released checkpoint."""
    base = llava15_7b(exit_layer=1)
    return base.replace(
        text=TextConfig(
            vocab_size=32064,
            hidden_size=768,
            intermediate_size=3072,
            num_layers=num_layers,
            num_heads=12,
            num_kv_heads=12,
            max_position_embeddings=4096,
        ),
        draft=DraftConfig(exit_layer=1),
    )


# Gemma 3 (google/gemma-3-{4b,12b,27b}-it): one SigLIP tower (So400m/14 at 896 px, 256 soft
# tokens after 4x4 pooling), decoders in the 5:1 local:global pattern with a 1024-token window,
# RoPE 10k locally and 1M x linear 8 globally, vocab 262208 (<image_soft_token> = 262144).
_GEMMA3_TEXT = {
    "gemma3_4b": dict(hidden_size=2560, intermediate_size=10240, num_layers=34, num_heads=8, num_kv_heads=4),
    "gemma3_12b": dict(hidden_size=3840, intermediate_size=15360, num_layers=48, num_heads=16, num_kv_heads=8),
    "gemma3_27b": dict(
        hidden_size=5376,
        intermediate_size=21504,
        num_layers=62,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        query_pre_attn_scalar=168.0,
    ),
}
# The draft exits after about a quarter of the layers, as for LLaVA-1.5 (8 of 32).
GEMMA3_EXIT_LAYERS = {"gemma3_4b": 9, "gemma3_12b": 12, "gemma3_27b": 16}


def gemma3(
    name: str, exit_layer: int | None = None, kind: ImitationKind = "ffn", draft_hidden: int = 0
) -> Gemma3Config:
    """google/gemma-3-4b-it, -12b-it, -27b-it by `name` ('gemma3_4b', ...)."""
    shared = dict(
        vocab_size=262_208,
        head_dim=256,
        query_pre_attn_scalar=256.0,
        sliding_window=1024,
        rope_theta=1_000_000.0,
        rope_scaling_factor=8.0,
        rope_local_theta=10_000.0,
    )
    text = Gemma3TextConfig(**{**shared, **_GEMMA3_TEXT[name]})
    vision = VisionConfig(
        kind="siglip",
        image_size=896,
        patch_size=14,
        hidden_size=1152,
        intermediate_size=4304,
        num_layers=27,
        num_heads=16,
        layer_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
    )
    draft = DraftConfig(exit_layer=exit_layer or GEMMA3_EXIT_LAYERS[name], kind=kind, hidden_size=draft_hidden)
    return Gemma3Config(vision=vision, text=text, draft=draft, mm_tokens_per_image=256, image_token_id=262_144)


# Qwen2.5-VL (Qwen/Qwen2.5-VL-{3B,7B,32B}-Instruct): one windowed ViT (32 blocks of width 1280,
# full attention in 7, 15, 23, 31, 112-pixel windows, 2x2 merger to the decoder's width), Qwen2
# decoders with M-RoPE sections (16, 24, 24) and RoPE base 1M, vocab 151936 (3B, tied) or 152064.
_QWEN25VL_TEXT: dict[str, dict[str, Any]] = {
    "qwen25vl_3b": dict(
        vocab_size=151_936,
        hidden_size=2048,
        intermediate_size=11_008,
        num_layers=36,
        num_heads=16,
        num_kv_heads=2,
        tie_word_embeddings=True,
    ),
    "qwen25vl_7b": dict(
        vocab_size=152_064, hidden_size=3584, intermediate_size=18_944, num_layers=28, num_heads=28, num_kv_heads=4
    ),
    "qwen25vl_32b": dict(
        vocab_size=152_064, hidden_size=5120, intermediate_size=27_648, num_layers=64, num_heads=40, num_kv_heads=8
    ),
}
_QWEN25VL_VISION_FFN = {"qwen25vl_3b": 3420, "qwen25vl_7b": 3420, "qwen25vl_32b": 3456}
# The draft exits after about a quarter of the layers.
QWEN25VL_EXIT_LAYERS = {"qwen25vl_3b": 9, "qwen25vl_7b": 7, "qwen25vl_32b": 16}


def qwen25vl(
    name: str,
    exit_layer: int | None = None,
    kind: ImitationKind = "ffn",
    draft_hidden: int = 0,
    max_image_tokens: int = 1280,
) -> Qwen25VLConfig:
    """Qwen/Qwen2.5-VL-3B-Instruct, -7B-, -32B- by `name` ('qwen25vl_7b', ...). max_image_tokens:
    the processor's max_pixels / 28^2 (1280: the setting Qwen recommends for captioning at scale;
    the released processor allows 16384)."""
    text = TextConfig(
        **_QWEN25VL_TEXT[name],
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=128_000,
        qkv_bias=True,
    )
    vision = QwenVisionConfig(intermediate_size=_QWEN25VL_VISION_FFN[name], out_hidden_size=text.hidden_size)
    draft = DraftConfig(exit_layer=exit_layer or QWEN25VL_EXIT_LAYERS[name], kind=kind, hidden_size=draft_hidden)
    return Qwen25VLConfig(vision=vision, text=text, draft=draft, max_image_tokens=max_image_tokens)


ARCHITECTURES: dict[str, Callable[[], object]] = {
    "llava15_7b": llava15_7b,
    # EAGLE head without and with its visual compressor (4 image tokens per cache entry).
    "llava15_7b_eagle": llava15_7b_eagle,
    "llava15_7b_eagle_pool4": lambda: llava15_7b_eagle(image_pool=4),
    # Draft VLMs of 68M (2 layers) and 163M (12 layers) language-model params, embeddings
    # and LM head included (plus the 291M CLIP tower, the 7B's in shape).
    "llava_draft_68m": lambda: llava_draft(2),
    "llava_draft_160m": lambda: llava_draft(12),
    "llava15_13b": llava15_13b,
    "blip2_opt_2_7b": blip2_opt_2_7b,
    "gemma3_4b": lambda: gemma3("gemma3_4b"),
    "gemma3_12b": lambda: gemma3("gemma3_12b"),
    "gemma3_27b": lambda: gemma3("gemma3_27b"),
    "qwen25vl_3b": lambda: qwen25vl("qwen25vl_3b"),
    "qwen25vl_7b": lambda: qwen25vl("qwen25vl_7b"),
    "qwen25vl_32b": lambda: qwen25vl("qwen25vl_32b"),
}


def architecture(name: str):
    """The config of the named architecture; ConfigError (one line) for an unknown name."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[name]()
