"""Pieces that every VLM family's Flax module shares (LLaVA, BLIP-2).

A family module exposes `encode_images`, `embed`, `run_layers`, `logits` and `imitate`
(the protocol in `fastvlm_jax.families`); these helpers compose them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def merge_image_features(embeds: Array, input_ids: Array, image_features: Array,
                         image_token_id: int) -> Array:
    """Replaces the image placeholder tokens, in order, by the image features.

    embeds: [batch, seq, embed]; input_ids: [batch, seq];
    image_features: [batch, num_image_tokens, embed]. Returns [batch, seq, embed].
    """
    is_image = input_ids == image_token_id
    slot = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_features.shape[1] - 1)
    gathered = jnp.take_along_axis(image_features.astype(embeds.dtype), slot[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered, embeds)


def full_and_draft_logits(module, input_ids: Array, pixels: Array, positions: Array | None = None):
    """Full and draft logits of a family module without a cache (used for init and checks).

    One pass through the whole layer stack also returns the exit-layer states, which feed
    the draft path, as in decoding.
    """
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    hidden = module.embed(input_ids, module.encode_images(pixels), positions)
    exit_layer = module.config.draft.exit_layer
    h_last, _, states = module.run_layers(hidden, positions, 0, module.config.text.num_layers,
                                          collect=(exit_layer,))
    draft_hidden, _ = module.imitate(states[exit_layer], positions)
    return module.logits(h_last), module.logits(draft_hidden)
