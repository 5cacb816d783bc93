"""Gemma 3 (image + text) as Flax modules, with the VLM's functional API.

`Gemma3Module` is a `FamilyModule` like `LlavaModule` and `Blip2Module`, so the VLM handle,
the decoding engine, checkpoints and training run on it unchanged:

  pixels [B, 896, 896, 3] -> SigLIP (post-LayerNorm) -> 4x4 average pooling to
  mm_tokens_per_image soft tokens -> RMS norm -> projection -> [B, 256, text hidden]

The decoder is Gemma 3's as transformers 5.x defines it: token embeddings scaled by
sqrt(hidden) (in the weights' dtype), grouped-query attention with RMS-normed queries and keys
and the logit scale query_pre_attn_scalar ** -0.5, the four "sandwich" norms around attention
and MLP, GeGLU (tanh GELU), Gemma's RMS norm (x * (1 + w), in float32), tied embeddings.
Local layers attend within a sliding window and use their own RoPE base; global layers see
everything with theirs (optionally linearly scaled). The layers keep one parameter structure,
so they stay one stacked scan: a layer reads its kind from its index. The image's soft tokens
attend to each other in both directions (the prompt's image span, `image_span`); everything
else is causal.

Not applied, as in transformers' Gemma3ForConditionalGeneration (the model its folders hold):
final_logit_softcapping and attn_logit_softcapping (the conditional model's forward never reads
them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.spmd import with_logical_constraint

from fastvlm_jax.nn.common import FamilyModule, init_imitation_params, merge_image_features
from fastvlm_jax.nn.config import ConfigError, DraftConfig, ModelConfigMixin, VisionConfig
from fastvlm_jax.nn.eagle import make_eagle_head
from fastvlm_jax.nn.kv_cache import KVCache, TreeSlots
from fastvlm_jax.nn.layers import (
    INIT_STD,
    GatedMLP,
    LayerNorm,
    MaskRules,
    apply_rope,
    causal_attention,
    dense,
    layer_stack_param,
    projections_apart,
    rope_frequencies,
    run_layer_stack,
)
from fastvlm_jax.nn.vision import VisionTower

Array = jax.Array
DType = Any

SLIDING = "sliding_attention"
FULL = "full_attention"
# A window no prompt reaches: global layers share the local layers' masking code.
_NO_WINDOW = 2**30


# --- configs --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Gemma3TextConfig:
    """The Gemma 3 decoder (transformers' Gemma3TextConfig, the fields that shape the model).

    layer_types: one of "sliding_attention" / "full_attention" per layer (empty: Gemma's
      pattern, every 6th layer global).
    rope_theta / rope_scaling_factor: the global layers' RoPE base and linear scaling factor;
    rope_local_theta / rope_local_scaling_factor: the sliding layers'.
    """

    vocab_size: int = 262208
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_layers: int = 34
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0
    sliding_window: int | None = 1024
    layer_types: tuple[str, ...] = ()
    rope_theta: float = 1_000_000.0
    rope_scaling_factor: float = 1.0
    rope_local_theta: float = 10_000.0
    rope_local_scaling_factor: float = 1.0
    max_position_embeddings: int = 131072
    attention_bias: bool = False
    hidden_act: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if not self.layer_types:
            pattern = tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_layers))
            object.__setattr__(self, "layer_types", pattern)
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        unknown = sorted(set(self.layer_types) - {SLIDING, FULL})
        if unknown:
            raise ConfigError(f"unknown layer types {unknown}: use {SLIDING!r} or {FULL!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding_attention layers need a sliding_window")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim

    @property
    def position_limit(self) -> None:
        """None: RoPE has no position table to run past."""
        return None

    @property
    def sliding_flags(self) -> tuple[bool, ...]:
        return tuple(kind == SLIDING for kind in self.layer_types)

    @property
    def attention_window(self) -> int | None:
        """The narrowest window any layer attends within (None: every layer is global)."""
        return self.sliding_window if SLIDING in self.layer_types else None


def _siglip_896() -> VisionConfig:
    return VisionConfig(
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


@dataclasses.dataclass(frozen=True)
class Gemma3Config(ModelConfigMixin):
    """Gemma 3 image + text: SigLIP -> pooled, normed projection -> Gemma 3 decoder, plus the draft path.

    mm_tokens_per_image: soft tokens per image (a square number; the SigLIP patch grid is
      average-pooled down to it). image_token_id: the soft-token placeholder in prompts.
    """

    vision: VisionConfig = dataclasses.field(default_factory=_siglip_896)
    text: Gemma3TextConfig = dataclasses.field(default_factory=Gemma3TextConfig)
    draft: DraftConfig = dataclasses.field(default_factory=DraftConfig)
    mm_tokens_per_image: int = 256
    image_token_id: int = 262144
    boi_token_id: int = 255999
    eoi_token_id: int = 256000
    model_type: str = "gemma3"
    quantization: str | None = None  # "int8": decoding weights stored int8 (fastvlm_jax.nn.quant)

    SUB_CONFIGS: ClassVar[dict[str, type]] = {"vision": VisionConfig, "text": Gemma3TextConfig, "draft": DraftConfig}

    def __post_init__(self):
        self.check_exit_layer()
        if self.vision.kind != "siglip":
            raise ConfigError(f"Gemma 3's vision tower is SigLIP, got kind {self.vision.kind!r}")
        side = self.tokens_per_side
        patches = self.vision.image_size // self.vision.patch_size
        if side * side != self.mm_tokens_per_image or patches % side:
            raise ConfigError(
                f"mm_tokens_per_image={self.mm_tokens_per_image} must be a square whose side divides the "
                f"{patches}x{patches} patch grid"
            )

    @property
    def tokens_per_side(self) -> int:
        return int(round(self.mm_tokens_per_image**0.5))

    @property
    def num_image_tokens(self) -> int:
        return self.mm_tokens_per_image


# --- layers ---------------------------------------------------------------------------------


class GemmaRMSNorm(nn.Module):
    """Gemma's RMS norm: x * (1 + w), all in float32, then the input dtype (w starts at 0)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + jnp.asarray(scale, jnp.float32))).astype(x.dtype)


class Gemma3Attention(nn.Module):
    """GQA self-attention with QK-norm, a per-layer RoPE base and an optional sliding window."""

    config: Gemma3TextConfig
    dtype: DType = jnp.float32
    zero_init_out: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        cache: KVCache | None = None,
        layer: Array | int = 0,
        key_mask: Array | None = None,
        tree: TreeSlots | None = None,
        image_span: Array | None = None,
    ):
        """x: [batch, seq, embed]; positions: [batch, seq]; layer: this layer's index in the
        stack (picks local or global); see `fastvlm_jax.nn.layers.causal_attention`."""
        cfg = self.config
        head_dim = cfg.head_dim
        batch, seq, _ = x.shape

        def project(features, axes, name):
            return dense(features, axes, use_bias=cfg.attention_bias, dtype=self.dtype, name=name)(x)

        q = project(cfg.num_heads * head_dim, ("embed", "heads"), "q_proj")
        k = project(cfg.num_kv_heads * head_dim, ("embed", "kv_heads"), "k_proj")
        v = project(cfg.num_kv_heads * head_dim, ("embed", "kv_heads"), "v_proj")
        q, k, v = projections_apart(q, k, v)
        q = q.reshape(batch, seq, cfg.num_heads, head_dim)
        k = k.reshape(batch, seq, cfg.num_kv_heads, head_dim)
        v = v.reshape(batch, seq, cfg.num_kv_heads, head_dim)
        q = GemmaRMSNorm(cfg.rms_norm_eps, name="q_norm")(q)
        k = GemmaRMSNorm(cfg.rms_norm_eps, name="k_norm")(k)

        sliding = jnp.asarray(cfg.sliding_flags)[layer]
        inv_freq = jnp.where(
            sliding,
            rope_frequencies(head_dim, cfg.rope_local_theta, cfg.rope_local_scaling_factor),
            rope_frequencies(head_dim, cfg.rope_theta, cfg.rope_scaling_factor),
        )
        q = apply_rope(q, positions, inv_freq=inv_freq)
        k = apply_rope(k, positions, inv_freq=inv_freq)
        window = None
        if cfg.attention_window is not None:
            window = jnp.where(sliding, cfg.attention_window, _NO_WINDOW)
        rules = MaskRules(window=window, image_span=image_span, scale=float(cfg.query_pre_attn_scalar) ** -0.5)
        out, cache = causal_attention(q, k, v, positions, cache, layer, key_mask, self.dtype, tree, rules)
        out = dense(
            cfg.hidden_size,
            ("heads", "embed"),
            use_bias=cfg.attention_bias,
            dtype=self.dtype,
            name="o_proj",
            zero_init=self.zero_init_out,
        )(out.reshape(batch, seq, cfg.num_heads * head_dim))
        return out, cache


class Gemma3Layer(nn.Module):
    """Gemma 3 decoder layer: norms before and after both attention and MLP.

    zero_init_out zero-initialises the two output projections: the post-norms of zeros are
    zeros, so a fresh layer is the identity map (the imitation network's start).
    """

    config: Gemma3TextConfig
    dtype: DType = jnp.float32
    intermediate_size: int | None = None
    zero_init_out: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        cache: KVCache | None = None,
        layer: Array | int = 0,
        key_mask: Array | None = None,
        tree: TreeSlots | None = None,
        image_span: Array | None = None,
    ):
        """x: [batch, seq, embed] -> ([batch, seq, embed], cache); see Gemma3Attention."""
        cfg = self.config
        eps = cfg.rms_norm_eps
        attn_out, cache = Gemma3Attention(cfg, self.dtype, self.zero_init_out, name="self_attn")(
            GemmaRMSNorm(eps, name="input_layernorm")(x), positions, cache, layer, key_mask, tree, image_span
        )
        x = x + GemmaRMSNorm(eps, name="post_attention_layernorm")(attn_out)
        mlp = GatedMLP(
            cfg.hidden_size,
            self.intermediate_size or cfg.intermediate_size,
            cfg.hidden_act,
            self.dtype,
            self.zero_init_out,
            name="mlp",
        )
        x = x + GemmaRMSNorm(eps, name="post_feedforward_layernorm")(
            mlp(GemmaRMSNorm(eps, name="pre_feedforward_layernorm")(x))
        )
        x = with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, cache


class Gemma3Decoder(nn.Module):
    """Scaled token embedding, the stacked Gemma 3 layers, final norm and (tied) LM head."""

    config: Gemma3TextConfig
    dtype: Any = jnp.float32
    unroll_layers: bool = False

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("vocab", "embed")),
        )
        self.layers = layer_stack_param(self, self._layer(), cfg.num_layers, cfg.hidden_size)
        self.norm = GemmaRMSNorm(cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype, name="lm_head")

    def _layer(self) -> Gemma3Layer:
        # Detached (parent=None): the layer loop applies it to one layer's slice of the stack.
        return Gemma3Layer(self.config, self.dtype, parent=None)

    def embed(self, input_ids: Array) -> Array:
        """input_ids: [batch, seq] -> [batch, seq, embed], times sqrt(hidden) rounded to the
        embedding's dtype (as transformers does: 55.4256 becomes 55.5 in bfloat16)."""
        embeds = self.embed_tokens(input_ids)
        return embeds * jnp.asarray(self.config.hidden_size**0.5, self.embed_tokens.embedding.dtype).astype(
            embeds.dtype
        )

    def run_layers(
        self,
        hidden: Array,
        positions: Array,
        start: int,
        stop: int,
        cache: KVCache | None = None,
        key_mask: Array | None = None,
        collect: tuple[int, ...] = (),
        tree: TreeSlots | None = None,
        remat: str = "none",
        image_span: Array | None = None,
    ):
        """Runs layers [start, stop); see `fastvlm_jax.nn.layers.run_layer_stack`."""
        return run_layer_stack(
            self._layer(),
            self.layers,
            hidden,
            positions,
            start,
            stop,
            cache,
            key_mask,
            collect,
            self.unroll_layers,
            tree,
            remat,
            image_span,
        )

    def logits(self, hidden: Array) -> Array:
        """Final norm + LM head: [batch, seq, embed] -> [batch, seq, vocab] (float32)."""
        normed = self.norm(hidden)
        out = self.embed_tokens.attend(normed) if self.config.tie_word_embeddings else self.lm_head(normed)
        return out.astype(jnp.float32)


class Gemma3Projector(nn.Module):
    """SigLIP states -> average pooling to the soft-token grid -> RMS norm -> projection."""

    config: Gemma3Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, states: Array) -> Array:
        """states: [batch, patches, vision_embed] (post-LayerNorm) -> [batch, mm_tokens_per_image, embed]."""
        cfg = self.config
        batch, patches, width = states.shape
        side = int(round(patches**0.5))
        tokens = cfg.tokens_per_side
        pool = side // tokens
        grid = states.astype(jnp.float32).reshape(batch, tokens, pool, tokens, pool, width)
        pooled = grid.mean(axis=(2, 4)).reshape(batch, tokens * tokens, width).astype(states.dtype)
        normed = GemmaRMSNorm(cfg.vision.layer_norm_eps, name="mm_soft_emb_norm")(pooled)
        weight = self.param(
            "mm_input_projection_weight",
            nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("vision_embed", "embed")),
            (width, cfg.text.hidden_size),
            unbox=True,
        )
        return jnp.matmul(normed, jnp.asarray(weight, normed.dtype)).astype(states.dtype)


def _imitation_layer_config(text: Gemma3TextConfig) -> Gemma3TextConfig:
    # The imitation layer stands in for the deep layers as a whole: one global layer.
    return dataclasses.replace(text, num_layers=1, layer_types=(FULL,))


class Gemma3ImitationNetwork(nn.Module):
    """Maps exit-layer states to what the deep layers would produce (Gemma 3 building blocks).

    Its output projections start at zero, so an untrained network is the identity and the
    untrained draft path is the plain early exit at `exit_layer`.
    """

    text: Gemma3TextConfig
    draft: DraftConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        hidden: Array,
        positions: Array,
        cache: KVCache | None = None,
        key_mask: Array | None = None,
        tree: TreeSlots | None = None,
    ):
        """hidden: [batch, seq, embed] (state exit_layer) -> ([batch, seq, embed], cache)."""
        width = self.draft.hidden_size or self.text.intermediate_size
        if self.draft.kind == "ffn":
            mlp = GatedMLP(
                self.text.hidden_size, width, self.text.hidden_act, self.dtype, zero_init_out=True, name="mlp"
            )
            return hidden + mlp(GemmaRMSNorm(self.text.rms_norm_eps, name="norm")(hidden)), cache
        if self.draft.kind == "layer":
            layer = Gemma3Layer(
                _imitation_layer_config(self.text),
                self.dtype,
                intermediate_size=width,
                zero_init_out=True,
                name="layer",
            )
            return layer(hidden, positions, cache, 0, key_mask, tree)
        raise ValueError(f"unknown imitation network kind {self.draft.kind!r}: use 'ffn' or 'layer'")


class Gemma3Module(FamilyModule):
    """SigLIP + projector + Gemma 3 decoder + imitation network (the Gemma 3 family)."""

    config: Gemma3Config
    bidirectional_image: ClassVar[bool] = True

    def setup(self):
        cfg = self.config
        self.vision_tower = VisionTower(cfg.vision, self.dtype)
        self.vision_post_layernorm = LayerNorm(cfg.vision.layer_norm_eps)
        self.projector = Gemma3Projector(cfg, self.dtype)
        self.language_model = Gemma3Decoder(cfg.text, self.dtype, self.unroll_layers)
        self.imitation = Gemma3ImitationNetwork(cfg.text, cfg.draft, self.dtype)
        self.eagle = make_eagle_head(cfg, self.dtype)

    def encode_images(self, pixels: Array) -> Array:
        """pixels: [batch, height, width, 3] -> soft tokens [batch, mm_tokens_per_image, embed]."""
        (states,) = self.vision_tower(pixels, (self.config.vision.num_layers,))
        return self.projector(self.vision_post_layernorm(states))

    def embed(self, input_ids: Array, image_features: Array | None = None, positions: Array | None = None) -> Array:
        """Scaled token embeddings with the image's soft-token placeholders replaced, in order,
        by image_features [batch, mm_tokens_per_image, embed] (not scaled, as in transformers)."""
        del positions
        cfg = self.config
        # The placeholder id may lie past the vocabulary (transformers reads row 0 for it).
        ids = jnp.where(input_ids >= cfg.text.vocab_size, 0, input_ids)
        embeds = self.language_model.embed(ids)
        if image_features is None:
            return embeds
        return merge_image_features(embeds, input_ids, image_features, cfg.image_token_id)


def init_imitation(config: Gemma3Config, rng: Array, dtype=jnp.float32):
    """Fresh (unboxed) imitation-network params alone (the identity draft)."""
    return init_imitation_params(
        Gemma3ImitationNetwork(config.text, config.draft, dtype), config.text.hidden_size, rng, dtype
    )
