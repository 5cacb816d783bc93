"""The LLaVA family as Flax modules: vision tower -> projector -> LLaMA-style decoder,
plus the draft path's imitation network.

Decoder layers are first-class and stacked: `run_layers(hidden, positions, start, stop,
cache)` runs layers [start, stop) from given hidden states over params stored as one
[num_layers, ...] tree, with or without the stacked KV cache, and can return the hidden
states after chosen layers. The full forward, the draft path (layers [0, exit_layer) ->
imitation network -> shared head) and verification (layers [exit_layer, L) -> head) are
all compositions of it.

Hidden-state indexing: state k is the output of layer k-1 (the input of layer k);
state 0 is the token embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastvlm_jax.nn.common import FamilyModule, init_imitation_params, merge_image_features
from fastvlm_jax.nn.config import ConfigError, DraftConfig, ModelConfigMixin, SelectStrategy, TextConfig, VisionConfig
from fastvlm_jax.nn.eagle import make_eagle_head
from fastvlm_jax.nn.kv_cache import KVCache, TreeSlots
from fastvlm_jax.nn.layers import (
    INIT_STD,
    DecoderLayer,
    GatedMLP,
    RMSNorm,
    activation,
    dense,
    layer_stack_param,
    run_layer_stack,
)
from fastvlm_jax.nn.vision import VisionTower

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LlavaConfig(ModelConfigMixin):
    """A LLaVA-style VLM: vision tower -> 2-layer projector -> decoder, plus the draft path."""

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    draft: DraftConfig = dataclasses.field(default_factory=DraftConfig)
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: SelectStrategy = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    image_token_id: int = 32000
    model_type: str = "llava"
    quantization: str | None = None  # "int8": decoding weights stored int8 (fastvlm_jax.nn.quant)

    SUB_CONFIGS: ClassVar[dict[str, type]] = {"vision": VisionConfig, "text": TextConfig, "draft": DraftConfig}

    def __post_init__(self):
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))
        self.check_exit_layer()
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ConfigError(
                f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}: use 'default' or 'full'"
            )

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layers = self.vision_feature_layer
        return (layers,) if isinstance(layers, int) else tuple(layers)

    @property
    def num_image_tokens(self) -> int:
        tokens = self.vision.num_patches + (1 if self.vision.has_class_token else 0)
        if self.vision_feature_select_strategy == "default":
            tokens -= 1  # HF drops the first token (CLS for CLIP) under 'default'
        return tokens


class TextDecoder(nn.Module):
    """Token embedding, the stacked decoder layers, final norm and LM head.

    unroll_layers: run layer ranges as unrolled straight-line code instead of a loop
    (same weights and cache; a whole-program choice, see `fastvlm_jax.nn.model.VLM`).
    """

    config: TextConfig
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
        self.norm = RMSNorm(cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype, name="lm_head")

    def _layer(self) -> DecoderLayer:
        # Detached (parent=None): the layer loop applies it to one layer's slice of the
        # stacked params; as an attribute Flax would adopt it as a submodule.
        return DecoderLayer(self.config, self.dtype, parent=None)

    def embed(self, input_ids: Array) -> Array:
        """input_ids: [batch, seq] -> [batch, seq, embed]."""
        return self.embed_tokens(input_ids)

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
        rope_positions: Array | None = None,
    ):
        """Runs layers [start, stop).

        hidden: [batch, seq, embed] (state `start`); positions: [batch, seq] absolute.
        cache: KV cache written at `positions` for these layers (others untouched).
        collect: state indices in [start, stop] to return.
        rope_positions: what RoPE rotates by, when not `positions` (multimodal RoPE).
        Returns (state `stop`, cache, {index: [batch, seq, embed]}).
        """
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
            rope_positions=rope_positions,
        )

    def logits(self, hidden: Array) -> Array:
        """Final norm + LM head: [batch, seq, embed] -> [batch, seq, vocab] (float32)."""
        normed = self.norm(hidden)
        if self.config.tie_word_embeddings:
            out = self.embed_tokens.attend(normed)
        else:
            out = self.lm_head(normed)
        return out.astype(jnp.float32)

    def __call__(self, input_ids: Array, positions: Array) -> Array:
        hidden, _, _ = self.run_layers(self.embed(input_ids), positions, 0, self.config.num_layers)
        return self.logits(hidden)


class ImitationNetwork(nn.Module):
    """Maps exit-layer states to what the deep layers would produce.

    Its output projections start at zero, so an untrained network is the identity and
    the untrained draft path is exactly the plain early exit at `exit_layer`.
    """

    text: TextConfig
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
        """hidden: [batch, seq, embed] (state exit_layer) -> ([batch, seq, embed], cache).

        cache: the network's own one-layer KV cache (kind 'layer'), else None.
        """
        width = self.draft.hidden_size or self.text.intermediate_size
        if self.draft.kind == "ffn":
            mlp = GatedMLP(
                self.text.hidden_size, width, self.text.hidden_act, self.dtype, zero_init_out=True, name="mlp"
            )
            return hidden + mlp(RMSNorm(self.text.rms_norm_eps, name="norm")(hidden)), cache
        if self.draft.kind == "layer":
            layer = DecoderLayer(self.text, self.dtype, intermediate_size=width, zero_init_out=True, name="layer")
            return layer(hidden, positions, cache, 0, key_mask, tree)
        raise ValueError(f"unknown imitation network kind {self.draft.kind!r}: use 'ffn' or 'layer'")


class Projector(nn.Module):
    """LLaVA's 2-layer MLP from vision features to text embeddings."""

    config: LlavaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Array) -> Array:
        cfg = self.config
        h = dense(
            cfg.text.hidden_size,
            ("vision_embed", "embed"),
            use_bias=cfg.projector_bias,
            dtype=self.dtype,
            name="linear_1",
        )(features)
        h = activation(cfg.projector_hidden_act)(h)
        return dense(
            cfg.text.hidden_size, ("embed", "embed_out"), use_bias=cfg.projector_bias, dtype=self.dtype, name="linear_2"
        )(h)


class LlavaModule(FamilyModule):
    """Vision tower + projector + decoder + imitation network (the LLaVA family).

    run_layers / logits / imitate / __call__ come from `FamilyModule`.
    """

    config: LlavaConfig

    def setup(self):
        cfg = self.config
        self.vision_tower = VisionTower(cfg.vision, self.dtype)
        self.projector = Projector(cfg, self.dtype)
        self.language_model = TextDecoder(cfg.text, self.dtype, self.unroll_layers)
        self.imitation = ImitationNetwork(cfg.text, cfg.draft, self.dtype)
        self.eagle = make_eagle_head(cfg, self.dtype)

    def encode_images(self, pixels: Array) -> Array:
        """pixels: [batch, height, width, 3] -> image tokens [batch, num_image_tokens, embed]."""
        states = self.vision_tower(pixels, self.config.feature_layers)
        if self.config.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]
        return self.projector(jnp.concatenate(states, axis=-1))

    def embed(self, input_ids: Array, image_features: Array | None = None, positions: Array | None = None) -> Array:
        """Token embeddings with image placeholder tokens replaced, in order, by image tokens.

        input_ids: [batch, seq]; image_features: [batch, num_image_tokens, embed];
        positions: [batch, seq], unused here (RoPE acts inside attention) but part of the
        shared interface: decoders with learned positions (OPT) add them at embedding time.
        """
        del positions
        embeds = self.language_model.embed(input_ids)
        if image_features is None:
            return embeds
        return merge_image_features(embeds, input_ids, image_features, self.config.image_token_id)


def init_imitation(config: LlavaConfig, rng: Array, dtype=jnp.float32):
    """Fresh (unboxed) imitation-network params alone (the identity draft)."""
    return init_imitation_params(
        ImitationNetwork(config.text, config.draft, dtype), config.text.hidden_size, rng, dtype
    )
