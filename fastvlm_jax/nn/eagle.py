"""The EAGLE-style draft head (SpecVLM's EagleVLM), and its elastic visual compressor.

The head drafts from the full model's own top features: at position t it reads the
full model's last-layer state f_t (before the final norm) and the embedding of token
t+1, and predicts f_{t+1}; the shared final norm + LM head turn that into the
distribution of token t+2. Drafting further feeds its own predictions back. One
LLaMA-style decoder layer with its own KV cache does the work, after a projection of
[norm(f_t), norm(e_{t+1})] to the model width.

Visual compressor: the head's cache keeps one entry per `image_pool` consecutive image
positions (their mean with "pool", the first with "prune"), so the draft attends to fewer
image slots. Only the draft's attention changes: verification is the full model's, so
output stays exact. `compact_slots` maps positions to the head's cache slots.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastvlm_jax.nn.config import DraftConfig, TextConfig
from fastvlm_jax.nn.kv_cache import KVCache, TreeSlots
from fastvlm_jax.nn.layers import DecoderLayer, RMSNorm, dense

Array = jax.Array


def head_text_config(text, draft: DraftConfig) -> TextConfig:
    """The LLaMA-style layer config of the head, from any family's decoder config: same
    width and heads as the model (so it reads its features), its own FFN width."""
    heads = text.num_heads
    return TextConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=draft.eagle_hidden_size or text.intermediate_size,
        num_layers=1,
        num_heads=heads,
        num_kv_heads=getattr(text, "num_kv_heads", heads),
        head_dim=getattr(text, "head_dim", None),
        rms_norm_eps=getattr(text, "rms_norm_eps", 1e-5),
        rope_theta=getattr(text, "rope_theta", 10000.0),
    )


class EagleHead(nn.Module):
    """features [batch, seq, embed] (f_t) + embeds [batch, seq, embed] (e_{t+1}) at
    positions t [batch, seq] -> (predicted f_{t+1} [batch, seq, embed], cache)."""

    text: TextConfig  # from head_text_config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        features: Array,
        embeds: Array,
        positions: Array,
        cache: KVCache | None = None,
        key_mask: Array | None = None,
        tree: TreeSlots | None = None,
    ):
        eps = self.text.rms_norm_eps
        joined = jnp.concatenate(
            [
                RMSNorm(eps, name="feature_norm")(features.astype(self.dtype)),
                RMSNorm(eps, name="embed_norm")(embeds.astype(self.dtype)),
            ],
            axis=-1,
        )
        x = dense(self.text.hidden_size, ("mlp", "embed"), use_bias=False, dtype=self.dtype, name="fuse")(joined)
        return DecoderLayer(self.text, self.dtype, name="layer")(x, positions, cache, 0, key_mask, tree)


def make_eagle_head(config, dtype) -> EagleHead | None:
    """The config's EAGLE head module (draft.eagle_layers > 0), else None."""
    if not config.draft.eagle_layers:
        return None
    if config.draft.eagle_layers != 1:
        raise ValueError(f"draft.eagle_layers={config.draft.eagle_layers}: the EAGLE head has one layer")
    return EagleHead(head_text_config(config.text, config.draft), dtype)


def init_eagle_params(config, rng: Array, dtype=jnp.float32):
    """Fresh (unboxed) params of the config's EAGLE head alone."""
    head = make_eagle_head(config, dtype)
    if head is None:
        raise ValueError("this config has no EAGLE head (draft.eagle_layers=0)")
    width = config.text.hidden_size
    hidden = jnp.zeros((1, 1, width), dtype)
    return nn.meta.unbox(head.init(rng, hidden, hidden, jnp.zeros((1, 1), jnp.int32))["params"])


def compact_slots(is_image: Array, pool: int) -> Array:
    """The head's cache slot of each position under the visual compressor.

    is_image: [batch, seq] bool (one contiguous image span per row, or none). Every run of
    `pool` consecutive image positions shares one slot; other positions get their own.
    Returns slots [batch, seq] int32, non-decreasing, 0 at position 0.
    """
    if pool <= 1:
        return jnp.broadcast_to(jnp.arange(is_image.shape[1], dtype=jnp.int32), is_image.shape)
    image_index = jnp.cumsum(is_image, axis=1) - 1
    opens_slot = ~is_image | (image_index % pool == 0)
    return (jnp.cumsum(opens_slot, axis=1) - 1).astype(jnp.int32)


def compress(values: Array, positions: Array, slots: Array, is_image: Array, mode: str):
    """Gathers per-position head inputs into their compressed slots.

    values: [batch, seq, dim]; positions, slots: [batch, seq]; is_image: [batch, seq].
    mode 'pool' averages the positions sharing a slot, 'prune' keeps the first of them.
    Returns (values [batch, seq, dim] by slot (unused slots zero), positions [batch, seq]
    by slot: the first position of each slot, for the rotary embedding).
    """
    batch, seq = slots.shape
    rows = jnp.arange(batch)[:, None]
    first = jnp.concatenate([jnp.ones((batch, 1), bool), slots[:, 1:] != slots[:, :-1]], axis=1)
    by_slot_pos = (
        jnp.zeros((batch, seq), positions.dtype).at[rows, jnp.where(first, slots, seq)].set(positions, mode="drop")
    )
    if mode == "prune":
        picked = jnp.where(first, slots, seq)
        return jnp.zeros_like(values).at[rows, picked].set(values, mode="drop"), by_slot_pos
    if mode != "pool":
        raise ValueError(f"unknown visual compressor {mode!r}: use 'pool' or 'prune'")
    total = jnp.zeros(values.shape, jnp.float32).at[rows, slots].add(values.astype(jnp.float32))
    count = jnp.zeros((batch, seq), jnp.float32).at[rows, slots].add(1.0)
    del is_image
    return (total / jnp.maximum(count, 1.0)[..., None]).astype(values.dtype), by_slot_pos
