"""BLIP-2 (ViT -> Q-Former -> OPT decoder) with the VLM's functional API.

`Blip2Module` is a `FamilyModule` like the LLaVA-style `LlavaModule` (`encode_images`,
`embed`, `run_layers`, `logits`, `imitate`), so `fastvlm_jax.nn.model.VLM`, the decoding
engine, checkpoints and the training step work on it unchanged:

  pixels [B, H, W, 3] -> ViT (post-LayerNorm) -> Q-Former (num_query_tokens learned
  queries, cross-attention to the image every `cross_attention_frequency` layers)
  -> language projection -> [B, num_query_tokens, text hidden]

The prompt holds the image token `num_query_tokens` times (Blip2Processor puts them
before BOS) and `embed` replaces them, in order, with those features. OPT adds learned
position embeddings at embedding time: position p (absolute, per row) reads row p + 2
of the table (OPT's offset), which is what HF computes from an all-ones attention mask.

Draft path: OPT layers [0, exit_layer) -> `OPTImitationNetwork` -> the shared final
LayerNorm / project_out / tied LM head. Its output projections start at zero, so an
untrained draft is the plain early exit at `exit_layer`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.spmd import with_logical_constraint

from fastvlm_jax.nn.common import FamilyModule, init_imitation_params, merge_image_features
from fastvlm_jax.nn.config import ConfigError, DraftConfig, ModelConfigMixin
from fastvlm_jax.nn.eagle import make_eagle_head
from fastvlm_jax.nn.kv_cache import KVCache, TreeSlots
from fastvlm_jax.nn.layers import (
    INIT_STD,
    activation,
    causal_attention,
    dense,
    full_attention,
    layer_stack_param,
    run_layer_stack,
    split_heads,
)
from fastvlm_jax.nn.quant import Dense
from fastvlm_jax.nn.vision import vit_embeddings

Array = jax.Array
DType = Any

OPT_POSITION_OFFSET = 2  # OPT's learned position table starts at row 2


# --- configs --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Blip2VisionConfig:
    """BLIP-2's ViT (EVA ViT-g for the released models): CLS token, no pre-norm, post-norm."""

    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_layers: int = 39
    num_heads: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    qkv_bias: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """The Q-Former: BERT-style post-norm layers over the learned query tokens."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    cross_attention_frequency: int = 2

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0


@dataclasses.dataclass(frozen=True)
class OPTConfig:
    """An OPT decoder: learned positions, LayerNorm, ReLU FFN, biases, tied LM head.

    word_embed_proj_dim: width of the token embeddings (0 -> hidden_size); when it differs
      from hidden_size, project_in / project_out map between the two (OPT-350m).
    do_layer_norm_before: pre-norm layers and a final LayerNorm (every OPT but 350m).
    """

    vocab_size: int = 50304
    hidden_size: int = 2560
    intermediate_size: int = 10240  # HF's ffn_dim
    num_layers: int = 32
    num_heads: int = 32
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int = 0
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    layer_norm_eps: float = 1e-5
    layer_norm_elementwise_affine: bool = True
    enable_bias: bool = True
    hidden_act: str = "relu"
    tie_word_embeddings: bool = True
    bos_token_id: int = 2
    eos_token_id: int = 2  # the released BLIP-2 OPT models stop at "\n" (50118)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")

    # The engine and the KV cache read these names (shared with the LLaMA TextConfig).
    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def position_limit(self) -> int:
        """Positions the learned table covers: decoding must not run past it."""
        return self.max_position_embeddings

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm


@dataclasses.dataclass(frozen=True)
class Blip2Config(ModelConfigMixin):
    """BLIP-2 with an OPT language model, plus the draft path."""

    vision: Blip2VisionConfig = dataclasses.field(default_factory=Blip2VisionConfig)
    qformer: QFormerConfig = dataclasses.field(default_factory=QFormerConfig)
    text: OPTConfig = dataclasses.field(default_factory=OPTConfig)
    draft: DraftConfig = dataclasses.field(default_factory=DraftConfig)
    num_query_tokens: int = 32
    image_token_id: int = 50265
    model_type: str = "blip-2"
    quantization: str | None = None  # "int8": decoding weights stored int8 (fastvlm_jax.nn.quant)

    SUB_CONFIGS: ClassVar[dict[str, type]] = {
        "vision": Blip2VisionConfig,
        "qformer": QFormerConfig,
        "text": OPTConfig,
        "draft": DraftConfig,
    }

    def __post_init__(self):
        if self.model_type != "blip-2":
            raise ConfigError(f"Blip2Config.model_type must be 'blip-2', got {self.model_type!r}")
        self.check_exit_layer()
        if self.text.embed_dim != self.text.hidden_size:
            # HF's language projection outputs hidden_size features but scatters them into
            # word_embed_proj_dim-wide embeddings: no consistent model exists to match.
            raise ConfigError(
                f"BLIP-2 needs text.word_embed_proj_dim == text.hidden_size (got "
                f"{self.text.word_embed_proj_dim} vs {self.text.hidden_size})"
            )

    @property
    def num_image_tokens(self) -> int:
        return self.num_query_tokens


# --- shared pieces --------------------------------------------------------------------------


def layer_norm(eps: float, name: str, affine: bool = True) -> nn.LayerNorm:
    """torch-style LayerNorm (two-pass variance) with logical axes on its parameters."""
    return nn.LayerNorm(
        epsilon=eps,
        use_bias=affine,
        use_scale=affine,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name,
    )


# --- vision encoder -------------------------------------------------------------------------


class Blip2VisionLayer(nn.Module):
    """Pre-norm ViT layer with a fused qkv projection (q and v biases; k's is zero in HF)."""

    config: Blip2VisionConfig
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [batch, tokens, dim] -> [batch, tokens, dim]."""
        cfg = self.config
        dim = cfg.hidden_size
        h = layer_norm(cfg.layer_norm_eps, "layer_norm1")(x)
        qkv = dense(3 * dim, ("embed", "heads"), use_bias=cfg.qkv_bias, dtype=self.dtype, name="qkv")(h)
        q, k, v = (split_heads(t, cfg.num_heads) for t in jnp.split(qkv, 3, axis=-1))
        h = dense(dim, ("heads", "embed"), use_bias=True, dtype=self.dtype, name="projection")(full_attention(q, k, v))
        x = x + h
        h = layer_norm(cfg.layer_norm_eps, "layer_norm2")(x)
        h = dense(cfg.intermediate_size, ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="fc1")(h)
        h = dense(dim, ("mlp", "embed"), use_bias=True, dtype=self.dtype, name="fc2")(activation(cfg.hidden_act)(h))
        return x + h


class Blip2VisionEncoder(nn.Module):
    """Patch embedding (conv with bias) + CLS + positions -> layers -> post_layernorm."""

    config: Blip2VisionConfig
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        """pixels: [batch, height, width, channels] -> [batch, 1 + num_patches, dim]."""
        cfg = self.config
        x = vit_embeddings(
            self,
            pixels,
            patch_size=cfg.patch_size,
            hidden_size=cfg.hidden_size,
            patch_bias=True,
            class_token=True,
            num_positions=cfg.num_patches + 1,
            dtype=self.dtype,
        )
        for i in range(cfg.num_layers):
            x = Blip2VisionLayer(cfg, self.dtype, name=f"layers_{i}")(x)
        return layer_norm(cfg.layer_norm_eps, "post_layernorm")(x)


# --- Q-Former -------------------------------------------------------------------------------


class QFormerAttention(nn.Module):
    """BERT attention block: attention, output dense, then LayerNorm(out + x)."""

    config: QFormerConfig
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Array) -> Array:
        """x: [batch, queries, dim] attends to context: [batch, keys, context_dim]."""
        cfg = self.config
        dim = cfg.hidden_size

        def proj(name, inputs):
            out = dense(dim, ("embed", "heads"), use_bias=True, dtype=self.dtype, name=name)(inputs)
            return split_heads(out, cfg.num_heads)

        out = full_attention(proj("query", x), proj("key", context), proj("value", context))
        out = dense(dim, ("heads", "embed"), use_bias=True, dtype=self.dtype, name="out")(out)
        return layer_norm(cfg.layer_norm_eps, "norm")(out + x)


class QFormerLayer(nn.Module):
    config: QFormerConfig
    has_cross_attention: bool
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array, image: Array) -> Array:
        """x: [batch, queries, dim]; image: [batch, tokens, vision_dim]."""
        cfg = self.config
        x = QFormerAttention(cfg, self.dtype, name="self_attn")(x, x)
        if self.has_cross_attention:
            x = QFormerAttention(cfg, self.dtype, name="cross_attn")(x, image)
        h = dense(cfg.intermediate_size, ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="fc1")(x)
        h = dense(cfg.hidden_size, ("mlp", "embed"), use_bias=True, dtype=self.dtype, name="fc2")(
            activation(cfg.hidden_act)(h)
        )
        return layer_norm(cfg.layer_norm_eps, "ffn_norm")(h + x)


class QFormer(nn.Module):
    """Learned queries -> LayerNorm -> layers (self-attention, cross-attention to the image)."""

    config: QFormerConfig
    num_query_tokens: int
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, image: Array) -> Array:
        """image: [batch, tokens, vision_dim] -> [batch, num_query_tokens, dim]."""
        cfg = self.config
        queries = self.param(
            "query_tokens",
            nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), (None, "embed")),
            (self.num_query_tokens, cfg.hidden_size),
            unbox=True,
        )  # flax's default; typed as the array
        x = jnp.broadcast_to(queries.astype(self.dtype), (image.shape[0], *queries.shape))
        x = layer_norm(cfg.layer_norm_eps, "layernorm")(x)
        for i in range(cfg.num_layers):
            x = QFormerLayer(cfg, cfg.has_cross_attention(i), self.dtype, name=f"layers_{i}")(x, image)
        return x


# --- OPT decoder ----------------------------------------------------------------------------


class OPTAttention(nn.Module):
    """Causal multi-head self-attention (no RoPE) with an optional external KV cache."""

    config: OPTConfig
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
    ):
        """x: [batch, seq, hidden]; positions: [batch, seq] absolute.

        cache: the stacked KV cache; the new entries are written into its layer `layer` at
        `positions` and queries see every slot of that layer at or before their position.
        key_mask: [batch, seq] valid keys, cache-free path only. Returns (out, cache or None).
        """
        cfg = self.config

        def proj(name):
            out = dense(cfg.hidden_size, ("embed", "heads"), use_bias=cfg.enable_bias, dtype=self.dtype, name=name)(x)
            return split_heads(out, cfg.num_heads)

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        out, cache = causal_attention(q, k, v, positions, cache, layer, key_mask, self.dtype, tree)
        out = out.reshape(*x.shape[:2], cfg.hidden_size)
        out = dense(
            cfg.hidden_size,
            ("heads", "embed"),
            use_bias=cfg.enable_bias,
            dtype=self.dtype,
            name="out_proj",
            zero_init=self.zero_init_out,
        )(out)
        return out, cache


class OPTLayer(nn.Module):
    """OPT decoder layer; pre-norm unless the config says post-norm (OPT-350m).

    pre_norm overrides the config (the imitation network is always pre-norm, so that
    with zero_init_out it starts as the identity).
    """

    config: OPTConfig
    dtype: DType = jnp.float32
    intermediate_size: int | None = None
    zero_init_out: bool = False
    pre_norm: bool | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        cache: KVCache | None = None,
        layer: Array | int = 0,
        key_mask: Array | None = None,
        tree: TreeSlots | None = None,
    ):
        """x: [batch, seq, hidden] -> ([batch, seq, hidden], cache); see OPTAttention."""
        cfg = self.config
        pre = cfg.do_layer_norm_before if self.pre_norm is None else self.pre_norm
        affine = cfg.layer_norm_elementwise_affine
        attn_norm = layer_norm(cfg.layer_norm_eps, "self_attn_layer_norm", affine)
        ffn_norm = layer_norm(cfg.layer_norm_eps, "final_layer_norm", affine)

        h, cache = OPTAttention(cfg, self.dtype, self.zero_init_out, name="self_attn")(
            attn_norm(x) if pre else x, positions, cache, layer, key_mask, tree
        )
        x = x + h
        if not pre:
            x = attn_norm(x)
        h = ffn_norm(x) if pre else x
        h = dense(
            self.intermediate_size or cfg.intermediate_size,
            ("embed", "mlp"),
            use_bias=cfg.enable_bias,
            dtype=self.dtype,
            name="fc1",
        )(h)
        h = dense(
            cfg.hidden_size,
            ("mlp", "embed"),
            use_bias=cfg.enable_bias,
            dtype=self.dtype,
            name="fc2",
            zero_init=self.zero_init_out,
        )(activation(cfg.hidden_act)(h))
        x = x + h
        if not pre:
            x = ffn_norm(x)
        x = with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, cache


class OPTDecoder(nn.Module):
    """Token + learned position embeddings, OPT layers, final norm and the LM head.

    State k (the input of layer k) is hidden_size wide; state 0 is
    project_in(token embeddings) + position embeddings.
    """

    config: OPTConfig
    dtype: DType = jnp.float32
    unroll_layers: bool = False

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.embed_dim,
            dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("vocab", "embed")),
        )
        self.embed_positions = self.param(
            "embed_positions",
            nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("positions", "embed")),
            (cfg.max_position_embeddings + OPT_POSITION_OFFSET, cfg.hidden_size),
            unbox=True,
        )  # (as above)
        if cfg.embed_dim != cfg.hidden_size:
            self.project_in = _setup_dense(cfg.hidden_size, ("embed_out", "embed"), self.dtype)
            self.project_out = _setup_dense(cfg.embed_dim, ("embed", "embed_out"), self.dtype)
        self.layers = layer_stack_param(self, self._layer(), cfg.num_layers, cfg.hidden_size)
        if cfg.has_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(
                epsilon=cfg.layer_norm_eps,
                use_bias=cfg.layer_norm_elementwise_affine,
                use_scale=cfg.layer_norm_elementwise_affine,
                use_fast_variance=False,
                scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
            )
        if not cfg.tie_word_embeddings:
            self.lm_head = _setup_dense(cfg.vocab_size, ("embed", "vocab"), self.dtype)

    def _layer(self) -> OPTLayer:
        # Detached (parent=None): applied to one layer's slice of the stacked params.
        return OPTLayer(self.config, self.dtype, parent=None)

    def token_embeddings(self, input_ids: Array) -> Array:
        """input_ids: [batch, seq] -> [batch, seq, embed_dim]."""
        return self.embed_tokens(input_ids)

    def input_states(self, embeds: Array, positions: Array) -> Array:
        """Token embeddings [batch, seq, embed_dim] + positions [batch, seq] -> state 0.

        Positions past the table are clipped (only never-read cache slots get there).
        """
        if self.config.embed_dim != self.config.hidden_size:
            embeds = self.project_in(embeds)
        rows = jnp.take(self.embed_positions, positions + OPT_POSITION_OFFSET, axis=0, mode="clip")
        return embeds + rows.astype(embeds.dtype)

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
    ):
        """Runs layers [start, stop); see `fastvlm_jax.nn.llava.TextDecoder.run_layers`."""
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
        )

    def logits(self, hidden: Array) -> Array:
        """[batch, seq, hidden] -> [batch, seq, vocab] float32."""
        cfg = self.config
        if cfg.has_final_layer_norm:
            hidden = self.final_layer_norm(hidden)
        if cfg.embed_dim != cfg.hidden_size:
            hidden = self.project_out(hidden)
        out = self.embed_tokens.attend(hidden) if cfg.tie_word_embeddings else self.lm_head(hidden)
        return out.astype(jnp.float32)

    def __call__(self, input_ids: Array, positions: Array) -> Array:
        """Text-only logits: [batch, seq] -> [batch, seq, vocab]."""
        hidden = self.input_states(self.token_embeddings(input_ids), positions)
        hidden, _, _ = self.run_layers(hidden, positions, 0, self.config.num_layers)
        return self.logits(hidden)


def _setup_dense(features: int, axes: tuple[str, str], dtype: DType, use_bias: bool = False) -> Dense:
    """A Dense for `setup` (named by its attribute) with logical axes."""
    return Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
    )


class OPTImitationNetwork(nn.Module):
    """The draft's imitation network for OPT: a residual ReLU FFN ('ffn') or one OPT layer.

    Output projections start at zero: an untrained network is the identity.
    """

    text: OPTConfig
    draft: DraftConfig
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(
        self,
        hidden: Array,
        positions: Array,
        cache: KVCache | None = None,
        key_mask: Array | None = None,
        tree: TreeSlots | None = None,
    ):
        """hidden: [batch, seq, hidden] (state exit_layer) -> ([batch, seq, hidden], cache)."""
        cfg = self.text
        width = self.draft.hidden_size or cfg.intermediate_size
        if self.draft.kind == "ffn":
            h = layer_norm(cfg.layer_norm_eps, "norm")(hidden)
            h = dense(width, ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="fc1")(h)
            h = dense(cfg.hidden_size, ("mlp", "embed"), use_bias=True, dtype=self.dtype, name="fc2", zero_init=True)(
                activation(cfg.hidden_act)(h)
            )
            return hidden + h, cache
        if self.draft.kind == "layer":
            layer = OPTLayer(cfg, self.dtype, intermediate_size=width, zero_init_out=True, pre_norm=True, name="layer")
            return layer(hidden, positions, cache, 0, key_mask, tree)
        raise ValueError(f"unknown imitation network kind {self.draft.kind!r}: use 'ffn' or 'layer'")


def init_imitation(config: Blip2Config, rng: Array, dtype: DType = jnp.float32):
    """Fresh (unboxed) imitation-network params alone (the identity draft)."""
    return init_imitation_params(
        OPTImitationNetwork(config.text, config.draft, dtype), config.text.hidden_size, rng, dtype
    )


# --- the whole model ------------------------------------------------------------------------


class Blip2Module(FamilyModule):
    """Vision encoder + Q-Former + projection + OPT decoder + imitation network.

    Params: {'vision_tower', 'qformer', 'projector', 'language_model', 'imitation'}.
    run_layers / logits / imitate / __call__ come from `FamilyModule`.
    """

    config: Blip2Config

    def setup(self):
        cfg = self.config
        self.vision_tower = Blip2VisionEncoder(cfg.vision, self.dtype)
        self.qformer = QFormer(cfg.qformer, cfg.num_query_tokens, self.dtype)
        self.projector = _setup_dense(cfg.text.hidden_size, ("embed", "embed_out"), self.dtype, use_bias=True)
        self.language_model = OPTDecoder(cfg.text, self.dtype, self.unroll_layers)
        self.imitation = OPTImitationNetwork(cfg.text, cfg.draft, self.dtype)
        self.eagle = make_eagle_head(cfg, self.dtype)

    def encode_images(self, pixels: Array) -> Array:
        """pixels: [batch, height, width, 3] -> [batch, num_query_tokens, text hidden]."""
        return self.projector(self.qformer(self.vision_tower(pixels)))

    def embed(self, input_ids: Array, image_features: Array | None = None, positions: Array | None = None) -> Array:
        """State 0: token embeddings, image tokens replaced in order, + OPT positions.

        input_ids: [batch, seq]; image_features: [batch, num_query_tokens, hidden];
        positions: [batch, seq] absolute (default 0..seq-1).
        """
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        embeds = self.language_model.token_embeddings(input_ids)
        if image_features is not None:
            embeds = merge_image_features(embeds, input_ids, image_features, self.config.image_token_id)
        return self.language_model.input_states(embeds, positions)
