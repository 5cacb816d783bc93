"""The functional handle on a VLM of any family: every method is pure in `params`.

The family modules (`fastvlm_jax.nn.llava`, `fastvlm_jax.nn.blip2`) hold the Flax code;
`fastvlm_jax.nn.families` maps a config to its module. `VLM` wraps one so that callers
pass params explicitly and compose the pieces under jax.jit: `encode_images`, `embed`,
`run_layers(start, stop)` (any layer range, over the stacked layers, with or without the
stacked KV cache), `logits`, `imitate`, `eagle_draft` and the caches.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastvlm_jax.nn.common import full_and_draft_logits, image_token_span, merge_image_features  # noqa: F401
from fastvlm_jax.nn.config import FamilyConfig
from fastvlm_jax.nn.eagle import head_text_config, init_eagle_params
from fastvlm_jax.nn.families import family_of
from fastvlm_jax.nn.kv_cache import KVCache
from fastvlm_jax.nn.llava import ImitationNetwork, LlavaModule, TextDecoder  # noqa: F401 (re-exported)
from fastvlm_jax.nn.quant import check_quantization, quantize_params, quantize_tree

Array = jax.Array
Params = Any


def build_module(config: FamilyConfig, dtype=jnp.float32, unroll_layers: bool = False) -> nn.Module:
    """The Flax module of the config's family."""
    return family_of(config).module_class(config, dtype, unroll_layers)


class VLM:
    """Functional handle on a VLM: every method is pure in `params`.

    params is the plain (unboxed) pytree {'vision_tower', 'projector', 'language_model',
    'imitation'} (BLIP-2 adds 'qformer'), decoder layers stacked under
    'language_model/layers' with a leading [num_layers] axis. With config.quantization
    ('int8') the decoding weights are int8 kernels + per-channel scales (fastvlm_jax.nn.quant);
    init and abstract_params then give that form.
    dtype: the compute dtype (activations and KV cache); params keep their own dtype.
    unroll_layers: compile layer ranges as unrolled code rather than a loop; the same
      for every call of a program (see `fastvlm_jax.nn.layers.run_layer_stack`).
    """

    def __init__(self, config: FamilyConfig, dtype=jnp.float32, unroll_layers: bool = False):
        check_quantization(config.quantization)
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.unroll_layers = unroll_layers
        self.family = family_of(config)
        self.module = build_module(config, self.dtype, unroll_layers)

    # Equal configs give equal handles, so jitted programs that take the model as a static
    # argument are shared between handles instead of compiled once per object.
    def _key(self):
        return (type(self), self.config, self.dtype.name, self.unroll_layers)

    def __eq__(self, other):
        return type(other) is type(self) and other._key() == self._key()

    def __hash__(self):
        return hash(self._key())

    # --- parameters -------------------------------------------------------------------
    def _dummy_inputs(self):
        return self.family.module_class.dummy_inputs(self.config)

    def init_boxed(self, rng: Array) -> Params:
        """Parameters with their logical axis metadata (nn.LogicallyPartitioned leaves)."""
        ids, pixels = self._dummy_inputs()
        params = self.module.init(rng, ids, pixels)["params"]
        return quantize_params(params, self.config.quantization) if self.config.quantization else params

    def init(self, rng: Array) -> Params:
        return nn.meta.unbox(self.init_boxed(rng))

    def init_imitation(self, rng: Array) -> Params:
        """Fresh imitation-network params alone (the identity draft), without building the
        rest of the model: converting a 7B checkpoint must not allocate a random 7B copy."""
        params = self.family.init_imitation(self.config, rng, self.dtype)
        return quantize_tree(params) if self.config.quantization else params

    def abstract_params(self) -> Params:
        """Shapes and logical axes of the parameters, without allocating them."""
        return jax.eval_shape(self.init_boxed, jax.random.key(0))

    # --- pure pieces --------------------------------------------------------------------
    def _apply(self, params, method: str, *args, **kwargs) -> Any:
        # By name: every family module has these methods (fastvlm_jax.nn.common.FamilyModule);
        # without `mutable`, apply returns the method's own result.
        return self.module.apply({"params": params}, *args, method=method, **kwargs)

    def encode_images(self, params, pixels):
        return self._apply(params, "encode_images", pixels)

    def embed(self, params, input_ids, image_features=None, positions=None):
        return self._apply(params, "embed", input_ids, image_features, positions)

    def run_layers(
        self,
        params,
        hidden,
        positions,
        start,
        stop,
        cache=None,
        key_mask=None,
        collect=(),
        tree=None,
        remat="none",
        image_span=None,
    ):
        """Layers [start, stop): (state stop [batch, seq, embed], cache, {index: state}).
        tree: a `fastvlm_jax.nn.kv_cache.TreeSlots` for a token tree's nodes (with a cache).
        remat: what each layer keeps for a backward pass (fastvlm_jax.nn.layers.REMAT_POLICIES).
        image_span: `image_span(input_ids)` of the prompt these states come from, when they
          include the prompt's image tokens (None is right for every later token)."""
        return self._apply(
            params,
            "run_layers",
            hidden,
            positions,
            start,
            stop,
            cache,
            key_mask,
            tuple(collect),
            tree,
            remat,
            image_span,
        )

    def image_span(self, input_ids, pixels=None):
        """Where each row's image lies in its prompt, when this family's layers need it (Gemma
        3: [batch, 2] (first, end) of its image tokens, which attend to each other both ways;
        Qwen2.5-VL: [batch, 4], with the image's token grid from `pixels`, for its multimodal
        RoPE), else None (`FamilyModule.prompt_span`). Pass it to every `run_layers` over a
        prompt (or a training sequence that starts with one); later tokens need none."""
        return self.family.module_class.prompt_span(self.config, jnp.asarray(input_ids), pixels)

    def logits(self, params, hidden):
        return self._apply(params, "logits", hidden)

    def imitate(self, params, hidden, positions, cache=None, key_mask=None, tree=None):
        return self._apply(params, "imitate", hidden, positions, cache, key_mask, tree)

    def eagle_draft(self, params, features, embeds, positions, cache=None, key_mask=None, tree=None):
        """The EAGLE head: (f_t [batch, seq, embed], e_{t+1}) at t -> (predicted f_{t+1}, cache)."""
        return self._apply(params, "eagle_draft", features, embeds, positions, cache, key_mask, tree)

    def forward(self, params, input_ids, pixels=None, positions=None, key_mask=None):
        """Full-model logits without a cache: [batch, seq] -> [batch, seq, vocab]."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        features = None if pixels is None else self.encode_images(params, pixels)
        hidden = self.embed(params, input_ids, features, positions)
        hidden, _, _ = self.run_layers(
            params,
            hidden,
            positions,
            0,
            self.config.text.num_layers,
            key_mask=key_mask,
            image_span=self.image_span(input_ids, pixels),
        )
        return self.logits(params, hidden)

    # --- caches -------------------------------------------------------------------------
    def init_cache(self, batch: int, slots: int, dtype=None) -> KVCache:
        """The decoder's stacked KV cache: [num_layers, batch, kv_heads, slots, head_dim]."""
        text = self.config.text
        return KVCache.zeros(
            text.num_layers, batch, slots, text.num_kv_heads, text.resolved_head_dim, dtype or self.dtype
        )

    def init_draft_cache(self, batch: int, slots: int, dtype=None) -> KVCache | None:
        """The imitation network's own one-layer cache (kind 'layer'), else None."""
        if self.config.draft.kind != "layer":
            return None
        text = self.config.text
        return KVCache.zeros(1, batch, slots, text.num_kv_heads, text.resolved_head_dim, dtype or self.dtype)

    def init_eagle_cache(self, batch: int, slots: int, dtype=None) -> KVCache:
        """The EAGLE head's own one-layer cache: [1, batch, kv_heads, slots, head_dim]."""

        text = head_text_config(self.config.text, self.config.draft)
        return KVCache.zeros(1, batch, slots, text.num_kv_heads, text.resolved_head_dim, dtype or self.dtype)

    def init_eagle(self, rng: Array) -> Params:
        """Fresh EAGLE-head params alone (for a model trained without one)."""

        params = init_eagle_params(self.config, rng, self.dtype)
        return quantize_tree(params) if self.config.quantization else params


def param_count(params: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def param_bytes(params: Params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def params_dtype(params: Params):
    """The dtype of the floating params (the widest, if they are mixed); int8 kernels do not count."""
    floats = {jnp.dtype(x.dtype) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)}
    if not floats:
        return jnp.dtype(jnp.float32)
    return max(floats, key=lambda d: d.itemsize)


def cast_params(params: Params, dtype) -> Params:
    """Floating params cast to `dtype` (integer leaves, if any, kept)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
