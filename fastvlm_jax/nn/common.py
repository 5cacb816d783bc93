"""Pieces that every VLM family's Flax module shares (LLaVA, BLIP-2).

`FamilyModule` is the base class of the family modules: it fixes the interface everything
above the model library calls (`encode_images`, `embed`, `run_layers`, `logits`,
`imitate`) and implements the parts that only delegate to the decoder and the imitation
network, so the families differ only where their models do (vision side, embedding).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastvlm_jax.nn.kv_cache import KVCache, TreeSlots

Array = jax.Array


class FamilyModule(nn.Module):
    """The Flax module of a VLM family: vision side + decoder + imitation network.

    A subclass's `setup` creates `language_model` (a decoder with `run_layers` and
    `logits`, its layers stacked) and `imitation` (the draft's imitation network), plus
    its vision side, and `eagle` (`fastvlm_jax.nn.eagle.make_eagle_head`: the EAGLE head or None),
    and defines `encode_images` and `embed`. Callers reach every method
    through `Module.apply(..., method=name)` (see `fastvlm_jax.nn.model.VLM`).

    unroll_layers: run layer ranges as unrolled code instead of a loop (a whole-program
    choice, see `fastvlm_jax.nn.model.VLM`).
    """

    config: Any
    dtype: Any = jnp.float32
    unroll_layers: bool = False

    # The image's tokens attend to each other both ways during the prompt (Gemma 3).
    bidirectional_image: ClassVar[bool] = False

    @classmethod
    def dummy_inputs(cls, config: Any) -> tuple[Array, Any]:
        """(input_ids [1, num_image_tokens + 1], pixels of one image): what `init` traces."""
        ids = jnp.full((1, config.num_image_tokens + 1), config.image_token_id, jnp.int32)
        vision = config.vision
        pixels = jnp.zeros((1, vision.image_size, vision.image_size, vision.num_channels), jnp.float32)
        return ids, pixels

    def encode_images(self, pixels: Array) -> Array:
        """[batch, height, width, channels] -> image tokens [batch, num_image_tokens, embed]."""
        raise NotImplementedError

    def embed(self, input_ids: Array, image_features: Array | None = None, positions: Array | None = None) -> Array:
        """[batch, seq] ids (image placeholders replaced by image tokens) -> state 0
        [batch, seq, embed]. positions: [batch, seq] absolute (default 0..seq-1)."""
        raise NotImplementedError

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
        """Decoder layers [start, stop) over the stacked params -> (state stop, cache,
        {index: state}); see `fastvlm_jax.nn.layers.run_layer_stack`. image_span: only for
        families whose image tokens attend both ways (`image_span` below)."""
        span = {} if image_span is None else {"image_span": image_span}
        return self.language_model.run_layers(
            hidden, positions, start, stop, cache, key_mask, collect, tree, remat, **span
        )

    @classmethod
    def prompt_span(cls, config: Any, input_ids: Array, pixels: Any = None) -> Array | None:
        """Where each row's image lies in its prompt, for families whose layers need it, else
        None: [batch, 2] (first, end) positions of the image tokens when they attend to each
        other both ways (`bidirectional_image`: Gemma 3); a family with image-shaped positions
        (multimodal RoPE: Qwen2.5-VL) adds the image's token grid from `pixels`. Needs no
        parameters: callers compute it outside `apply`. input_ids: [batch, seq]."""
        if not cls.bidirectional_image:
            return None
        return image_token_span(input_ids, config.image_token_id)

    def image_span(self, input_ids: Array, pixels: Any = None) -> Array | None:
        """`prompt_span` of this module's config."""
        return type(self).prompt_span(self.config, input_ids, pixels)

    def logits(self, hidden: Array) -> Array:
        """[batch, seq, embed] -> float32 [batch, seq, vocab] (final norm + LM head)."""
        return self.language_model.logits(hidden)

    def imitate(
        self,
        hidden: Array,
        positions: Array,
        cache: KVCache | None = None,
        key_mask: Array | None = None,
        tree: TreeSlots | None = None,
    ):
        """Exit-layer states -> (draft states, the imitation network's own cache or None)."""
        return self.imitation(hidden, positions, cache, key_mask, tree)

    def eagle_draft(
        self,
        features: Array,
        embeds: Array,
        positions: Array,
        cache: KVCache | None = None,
        key_mask: Array | None = None,
        tree: TreeSlots | None = None,
    ):
        """The EAGLE head (fastvlm_jax.nn.eagle): (f_t, e_{t+1}) at t -> (predicted f_{t+1}, cache)."""
        if self.eagle is None:
            raise ValueError(
                "this model has no EAGLE head (draft.eagle_layers=0): train one with the 'eagle' stage of train.run"
            )
        return self.eagle(features, embeds, positions, cache, key_mask, tree)

    def __call__(self, input_ids: Array, pixels: Array, positions: Array | None = None):
        """(full logits, draft logits) without a cache: what `init` traces."""
        return full_and_draft_logits(self, input_ids, pixels, positions)


def init_imitation_params(network: nn.Module, hidden_size: int, rng: Array, dtype=jnp.float32):
    """Fresh (unboxed) params of an imitation network alone, from a one-token input.

    Building the rest of the model would allocate a random copy of it: converting a 7B
    checkpoint must not.
    """
    hidden = jnp.zeros((1, 1, hidden_size), dtype)
    positions = jnp.zeros((1, 1), jnp.int32)
    return nn.meta.unbox(network.init(rng, hidden, positions)["params"])


def merge_image_features(embeds: Array, input_ids: Array, image_features: Array, image_token_id: int) -> Array:
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
    h_last, _, states = module.run_layers(
        hidden,
        positions,
        0,
        module.config.text.num_layers,
        collect=(exit_layer,),
        image_span=module.image_span(input_ids, pixels),
    )
    draft_hidden, _ = module.imitate(states[exit_layer], positions)
    if getattr(module, "eagle", None) is not None:  # traced so that init creates its params
        module.eagle_draft(h_last, hidden, positions)
    return module.logits(h_last), module.logits(draft_hidden)


def image_token_span(input_ids: Array, image_token_id: int) -> Array:
    """[batch, seq] -> [batch, 2] int32 (first, end): where each row's run of image tokens lies
    (first == end == 0 for a row without one). One image per prompt: its tokens are contiguous."""
    is_image = input_ids == image_token_id
    seq = input_ids.shape[1]
    index = jnp.arange(seq, dtype=jnp.int32)
    first = jnp.min(jnp.where(is_image, index, seq), axis=1)
    end = jnp.max(jnp.where(is_image, index + 1, 0), axis=1)
    first = jnp.where(end > 0, first, 0)
    return jnp.stack([first, end], axis=1).astype(jnp.int32)
