"""The LLaVA-style VLM and its draft path, as Flax modules with a functional API.

Decoder layers are first-class: `run_layers(hidden, positions, start, stop, cache)`
runs layers [start, stop) from given hidden states, optionally with the KV cache, and
can return the hidden states after chosen layers. The full forward, the draft path
(layers [0, exit_layer) -> imitation network -> shared head) and verification (layers
[exit_layer, L) -> head) are all compositions of it.

Hidden-state indexing: state k is the output of layer k-1 (the input of layer k);
state 0 is the token embeddings.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastvlm_jax.config import DraftConfig, TextConfig, VLMConfig
from fastvlm_jax.kv_cache import KVCache
from fastvlm_jax.layers import INIT_STD, DecoderLayer, GatedMLP, RMSNorm, activation, dense
from fastvlm_jax.vision import VisionTower

Array = jax.Array
Params = Any

# Cached decoding scans over the layers while one layer's keys + values take at most this
# many bytes (batch 1-4 of the demo model; never a 7B model's cache): see VLM._scan_layers.
SCAN_MAX_LAYER_CACHE_BYTES = 1 << 20
# Without a stacked copy from VLM.stack_layers, the scan stacks the layers' weights inside
# the program on every call: only done while a layer's weights are this small (the bench's
# random 150m preset: 28 MB; a 7B layer: 800 MB).
SCAN_MAX_LAYER_WEIGHT_BYTES = 32 << 20
# The params entry where VLM.stack_layers keeps stacked copies of decoder layers.
STACKED_LAYERS = "stacked_decoder_layers"


class TextDecoder(nn.Module):
    """Token embedding, decoder layers, final norm and LM head."""

    config: TextConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD),
                                                        ("vocab", "embed")))
        self.layers = [DecoderLayer(cfg, self.dtype) for _ in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), use_bias=False,
                                 dtype=self.dtype, name="lm_head")

    def embed(self, input_ids: Array) -> Array:
        """input_ids: [batch, seq] -> [batch, seq, embed]."""
        return self.embed_tokens(input_ids)

    def run_layers(self, hidden: Array, positions: Array, start: int, stop: int,
                   cache: KVCache | None = None, key_mask: Array | None = None,
                   collect: tuple[int, ...] = ()):
        """Runs layers [start, stop).

        hidden: [batch, seq, embed] (state `start`); positions: [batch, seq] absolute.
        cache: KV cache written at `positions` for these layers (others untouched).
        collect: state indices in (start, stop] to return.
        Returns (state `stop`, cache, {index: [batch, seq, embed]}).
        """
        collected = {}
        for index in range(start, stop):
            kv = cache.layer(index) if cache is not None else None
            hidden, kv = self.layers[index](hidden, positions, kv, key_mask)
            if cache is not None:
                cache = cache.with_layer(index, kv)
            if index + 1 in collect:
                collected[index + 1] = hidden
        return hidden, cache, collected

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
    def __call__(self, hidden: Array, positions: Array, kv=None, key_mask=None):
        """hidden: [batch, seq, embed] (state exit_layer) -> ([batch, seq, embed], kv)."""
        width = self.draft.hidden_size or self.text.intermediate_size
        if self.draft.kind == "ffn":
            mlp = GatedMLP(self.text.hidden_size, width, self.text.hidden_act, self.dtype,
                           zero_init_out=True, name="mlp")
            return hidden + mlp(RMSNorm(self.text.rms_norm_eps, name="norm")(hidden)), kv
        if self.draft.kind == "layer":
            layer = DecoderLayer(self.text, self.dtype, intermediate_size=width,
                                 zero_init_out=True, name="layer")
            return layer(hidden, positions, kv, key_mask)
        raise ValueError(f"unknown imitation network kind {self.draft.kind!r}: use 'ffn' or 'layer'")


class Projector(nn.Module):
    """LLaVA's 2-layer MLP from vision features to text embeddings."""

    config: VLMConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Array) -> Array:
        cfg = self.config
        h = dense(cfg.text.hidden_size, ("vision_embed", "embed"), use_bias=cfg.projector_bias,
                  dtype=self.dtype, name="linear_1")(features)
        h = activation(cfg.projector_hidden_act)(h)
        return dense(cfg.text.hidden_size, ("embed", "embed_out"), use_bias=cfg.projector_bias,
                     dtype=self.dtype, name="linear_2")(h)


class VLMModule(nn.Module):
    """Vision tower + projector + decoder + imitation network."""

    config: VLMConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.vision_tower = VisionTower(cfg.vision, self.dtype)
        self.projector = Projector(cfg, self.dtype)
        self.language_model = TextDecoder(cfg.text, self.dtype)
        self.imitation = ImitationNetwork(cfg.text, cfg.draft, self.dtype)

    def encode_images(self, pixels: Array) -> Array:
        """pixels: [batch, height, width, 3] -> image tokens [batch, num_image_tokens, embed]."""
        states = self.vision_tower(pixels, self.config.feature_layers)
        if self.config.vision_feature_select_strategy == "default":
            states = [s[:, 1:] for s in states]
        return self.projector(jnp.concatenate(states, axis=-1))

    def embed(self, input_ids: Array, image_features: Array | None = None,
              positions: Array | None = None) -> Array:
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

    def run_layers(self, hidden, positions, start, stop, cache=None, key_mask=None, collect=()):
        return self.language_model.run_layers(hidden, positions, start, stop, cache, key_mask, collect)

    def logits(self, hidden: Array) -> Array:
        return self.language_model.logits(hidden)

    def imitate(self, hidden: Array, positions: Array, kv=None, key_mask=None):
        return self.imitation(hidden, positions, kv, key_mask)

    def __call__(self, input_ids: Array, pixels: Array, positions: Array | None = None):
        return full_and_draft_logits(self, input_ids, pixels, positions)


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
    """Full and draft logits of a VLM module without a cache (used for init and checks).

    The shallow layers run once; their exit-layer states feed both paths, as in decoding.
    """
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    hidden = module.embed(input_ids, module.encode_images(pixels), positions)
    exit_layer = module.config.draft.exit_layer
    h_exit, _, _ = module.run_layers(hidden, positions, 0, exit_layer)
    h_last, _, _ = module.run_layers(h_exit, positions, exit_layer, module.config.text.num_layers)
    draft_hidden, _ = module.imitate(h_exit, positions)
    return module.logits(h_last), module.logits(draft_hidden)


def build_module(config, dtype=jnp.float32) -> nn.Module:
    """The Flax module for a config: `VLMModule` (LLaVA) or `Blip2Module` (model_type 'blip-2')."""
    if getattr(config, "model_type", "llava") == "blip-2":
        from fastvlm_jax.blip2 import Blip2Module

        return Blip2Module(config, dtype)
    return VLMModule(config, dtype)


class VLM:
    """Functional handle on a VLM: every method is pure in `params`.

    params is the plain (unboxed) pytree {'vision_tower', 'projector', 'language_model',
    'imitation'} (BLIP-2 adds 'qformer'); pass it explicitly so these calls compose under
    jax.jit. A `Blip2Config` (fastvlm_jax.blip2) builds the BLIP-2 module instead.
    """

    def __init__(self, config: VLMConfig, dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        self.module = build_module(config, dtype)

    # Equal configs give equal handles, so jitted programs that take the model as a static
    # argument are shared between handles instead of compiled once per object.
    def __eq__(self, other):
        return (type(other) is type(self) and other.config == self.config
                and jnp.dtype(other.dtype) == jnp.dtype(self.dtype))

    def __hash__(self):
        return hash((type(self), self.config, jnp.dtype(self.dtype).name))

    # --- parameters -------------------------------------------------------------------
    def _dummy_inputs(self):
        cfg = self.config
        ids = jnp.full((1, cfg.num_image_tokens + 1), cfg.image_token_id, jnp.int32)
        pixels = jnp.zeros((1, cfg.vision.image_size, cfg.vision.image_size,
                            cfg.vision.num_channels), jnp.float32)
        return ids, pixels

    def init_boxed(self, rng: Array) -> Params:
        """Parameters with their logical axis metadata (nn.LogicallyPartitioned leaves)."""
        ids, pixels = self._dummy_inputs()
        return self.module.init(rng, ids, pixels)["params"]

    def init(self, rng: Array) -> Params:
        return nn.meta.unbox(self.init_boxed(rng))

    def init_imitation(self, rng: Array) -> Params:
        """Fresh imitation-network params alone (the identity draft), without building the
        rest of the model: converting a 7B checkpoint must not allocate a random 7B copy."""
        if getattr(self.config, "model_type", "llava") == "blip-2":
            from fastvlm_jax.blip2 import init_imitation

            return init_imitation(self.config, rng, self.dtype)
        text = self.config.text
        hidden = jnp.zeros((1, 1, text.hidden_size), self.dtype)
        positions = jnp.zeros((1, 1), jnp.int32)
        net = ImitationNetwork(text, self.config.draft, self.dtype)
        return nn.meta.unbox(net.init(rng, hidden, positions)["params"])

    def abstract_params(self) -> Params:
        """Shapes and logical axes of the parameters, without allocating them."""
        return jax.eval_shape(self.init_boxed, jax.random.key(0))

    # --- pure pieces --------------------------------------------------------------------
    def _apply(self, params, method: str, *args, **kwargs):
        if STACKED_LAYERS in params:  # a decoding-time copy, not a module parameter
            params = {name: value for name, value in params.items() if name != STACKED_LAYERS}
        # By name: the LLaVA and BLIP-2 modules share these method names.
        return self.module.apply({"params": params}, *args, method=method, **kwargs)

    def stack_layers(self, params, start: int, stop: int) -> Params:
        """params plus a copy of decoder layers [start, stop) stacked into one tree of
        [stop - start, ...] arrays, which cached multi-token calls through exactly those
        layers then scan over (see _scan_layers) instead of stacking the weights inside
        every call; costs the memory of those layers once more. Only for LLaVA models."""
        if getattr(self.config, "model_type", "llava") != "llava":
            return params
        if not 0 <= start < stop <= self.config.text.num_layers:
            raise ValueError(f"cannot stack layers [{start}, {stop}) of a "
                             f"{self.config.text.num_layers}-layer decoder")
        stacked = jax.jit(_stack_decoder_layers, static_argnums=(1, 2))(params["language_model"], start, stop)
        return {**params, STACKED_LAYERS: {**params.get(STACKED_LAYERS, {}), _stacked_key(start, stop): stacked}}

    def encode_images(self, params, pixels):
        return self._apply(params, "encode_images", pixels)

    def embed(self, params, input_ids, image_features=None, positions=None):
        return self._apply(params, "embed", input_ids, image_features, positions)

    def run_layers(self, params, hidden, positions, start, stop, cache=None, key_mask=None,
                   collect=()):
        if self._scan_layers(params, hidden, start, stop, cache, key_mask, collect):
            return self._run_layers_scanned(params, hidden, positions, start, stop, cache)
        return self._apply(params, "run_layers", hidden, positions, start, stop, cache,
                           key_mask, tuple(collect))

    def _scan_layers(self, params, hidden, start, stop, cache, key_mask, collect) -> bool:
        """Whether cached decoding through layers [start, stop) runs as one lax.scan.

        XLA compiles every unrolled layer into its own kernels, and on CPU a step through
        many small layers then costs far more than the sum of its layers (measured on the
        demo model, 2-core CPU, batch 1: 5 tokens through 6 layers 5.6 ms unrolled, 2.5 ms
        scanned). The scan stacks the layers' caches in and out on every call, so it is
        kept to small caches, where that copy is cheap next to the per-kernel cost; the
        weights it takes from `stack_layers` when present, else it stacks them per call too.
        """
        if cache is None or key_mask is not None or collect or stop - start < 2 or hidden.shape[1] < 2:
            return False
        if getattr(self.config, "model_type", "llava") != "llava":
            return False
        cache_bytes = 2 * cache.keys[start].size * cache.keys[start].dtype.itemsize
        if cache_bytes > SCAN_MAX_LAYER_CACHE_BYTES:
            return False
        if _stacked_key(start, stop) in params.get(STACKED_LAYERS, {}):
            return True
        return layer_weight_bytes(params, start) <= SCAN_MAX_LAYER_WEIGHT_BYTES

    def _run_layers_scanned(self, params, hidden, positions, start, stop, cache):
        """run_layers with a cache, as a scan over layers [start, stop): the same layers and
        parameters as the module path, stacked into one [stop - start, ...] tree."""
        layer = DecoderLayer(self.config.text, self.dtype)
        stacked = params.get(STACKED_LAYERS, {}).get(_stacked_key(start, stop))
        if stacked is None:
            stacked = _stack_decoder_layers(params["language_model"], start, stop)

        def one_layer(h, layer_inputs):
            layer_params, keys, values = layer_inputs
            h, kv = layer.apply({"params": layer_params}, h, positions, (keys, values))
            return h, kv

        hidden, (keys, values) = jax.lax.scan(
            one_layer, hidden, (stacked, jnp.stack(cache.keys[start:stop]),
                                jnp.stack(cache.values[start:stop])))
        cache = cache.replace(keys=cache.keys[:start] + tuple(keys) + cache.keys[stop:],
                              values=cache.values[:start] + tuple(values) + cache.values[stop:])
        return hidden, cache, {}

    def logits(self, params, hidden):
        return self._apply(params, "logits", hidden)

    def imitate(self, params, hidden, positions, kv=None, key_mask=None):
        return self._apply(params, "imitate", hidden, positions, kv, key_mask)

    def forward(self, params, input_ids, pixels=None, positions=None, key_mask=None):
        """Full-model logits without a cache: [batch, seq] -> [batch, seq, vocab]."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        features = None if pixels is None else self.encode_images(params, pixels)
        hidden = self.embed(params, input_ids, features, positions)
        hidden, _, _ = self.run_layers(params, hidden, positions, 0, self.config.text.num_layers,
                                       key_mask=key_mask)
        return self.logits(params, hidden)

    # --- caches -------------------------------------------------------------------------
    def init_cache(self, batch: int, capacity: int, dtype=None) -> KVCache:
        text = self.config.text
        return KVCache.zeros(text.num_layers, batch, capacity, text.num_kv_heads,
                             text.resolved_head_dim, dtype or self.dtype)

    def init_draft_cache(self, batch: int, capacity: int, dtype=None) -> KVCache | None:
        """The imitation network's own one-layer cache (kind 'layer'), else None."""
        if self.config.draft.kind != "layer":
            return None
        text = self.config.text
        return KVCache.zeros(1, batch, capacity, text.num_kv_heads, text.resolved_head_dim,
                             dtype or self.dtype)


def _stacked_key(start: int, stop: int) -> str:
    """The key of layers [start, stop) under params[STACKED_LAYERS]."""
    return f"{start}:{stop}"


def _stack_decoder_layers(decoder: Params, start: int, stop: int) -> Params:
    """Decoder layers [start, stop) as one tree of [stop - start, ...] arrays."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *(decoder[f"layers_{index}"] for index in range(start, stop)))


def layer_weight_bytes(params: Params, index: int) -> int:
    """Bytes of decoder layer `index`'s weights."""
    layer = params["language_model"][f"layers_{index}"]
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layer))


def param_count(params: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def param_bytes(params: Params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))

