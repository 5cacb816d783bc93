"""Building blocks shared by the vision tower, the decoder and the imitation network.

Parameters carry logical axis names (see `fastvlm_jax.runtime.sharding`), so the same
modules run on one device or sharded over a Mesh.
"""

from __future__ import annotations

import functools
from typing import Any, cast

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from flax.linen.spmd import with_logical_constraint

from fastvlm_jax.nn.config import TextConfig
from fastvlm_jax.nn.kv_cache import KVCache, TreeSlots
from fastvlm_jax.nn.quant import Dense, is_quantized, quantize_tree

Array = jax.Array
DType = Any

INIT_STD = 0.02


def activation(name: str):
    """Maps a Hugging Face activation name to a JAX function."""
    table = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "silu": jax.nn.silu,
        "swish": jax.nn.silu,
        "relu": jax.nn.relu,
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(table)}")
    return table[name]


def dense(
    features: int, axes: tuple[str, str], *, use_bias: bool, dtype: DType, name: str, zero_init: bool = False
) -> Dense:
    """A Dense layer whose kernel and bias carry logical axis names (float or int8 kernels,
    see `fastvlm_jax.nn.quant`)."""
    kernel_init = nn.initializers.zeros if zero_init else nn.initializers.normal(INIT_STD)
    return Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)),
        name=name,
    )


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in float32, scale in the input dtype (as HF does)."""

    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return jnp.asarray(scale, x.dtype) * normed.astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with logical axis names on its parameters."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.LayerNorm(
            epsilon=self.eps,
            dtype=x.dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
            name="norm",
        )(x)


def rope_frequencies(head_dim: int, theta: float, scaling_factor: float = 1.0) -> Array:
    """RoPE inverse frequencies [head_dim / 2] (float32); linear scaling divides them by the factor."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    return inv_freq / scaling_factor


def apply_rope(x: Array, positions: Array, theta: float | None = None, inv_freq: Array | None = None) -> Array:
    """Rotary embedding in HF's half-split layout.

    x: [batch, seq, heads, head_dim]; positions: [batch, seq] absolute positions, or
    [batch, seq, head_dim / 2] a position per frequency (multimodal RoPE, where each frequency
    band follows one of an image token's (time, row, column) coordinates).
    theta: the base (default frequencies), or inv_freq [head_dim / 2] given directly (scaled or
    chosen per layer, e.g. Gemma 3's local and global layers).
    """
    head_dim = x.shape[-1]
    if inv_freq is None:
        if theta is None:
            raise ValueError("apply_rope needs theta or inv_freq")
        inv_freq = rope_frequencies(head_dim, theta)
    per_frequency = positions if positions.ndim == 3 else positions[..., None]
    angles = per_frequency.astype(jnp.float32) * inv_freq  # [batch, seq, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    half = head_dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def projections_apart(*projected: Array) -> tuple[Array, ...]:
    """The attention's q/k/v projections, kept apart from what follows them (RoPE, the cache
    write): returns its arguments unchanged, behind `jax.lax.optimization_barrier`.

    Why: otherwise the TPU compiler for v5p, laying out each projection together with its
    consumers, asks for the layer's kernel slice in the transposed layout ({1,2,0} of the
    stacked [layers, embed, heads x head_dim]) and makes that copy through HBM before every
    matmul once more than one row is projected, so the q/k/v weights are read about three
    times per decoding step (issue 28; the v5e compiler keeps its copy on chip). Behind the
    barrier the projections read the kernels as stored; what goes through HBM instead is
    their outputs, [batch, seq, heads x head_dim] each, a few hundred KB at decode sizes.
    benchmarks/tpu_compile/qkv_probe.py compares this with other forms (BENCHMARKS.md).
    """
    return jax.lax.optimization_barrier(projected)


def split_heads(x: Array, num_heads: int) -> Array:
    """[batch, seq, dim] -> [batch, seq, heads, dim // heads]."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def full_attention(q: Array, k: Array, v: Array) -> Array:
    """Unmasked (bidirectional) softmax attention, as in the ViTs and the Q-Former.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, k_len, heads, head_dim].
    Returns [batch, q_len, heads * head_dim]. Logits and softmax in float32.
    """
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(*out.shape[:2], -1)


def attend(query: Array, keys: Array, values: Array, mask: Array, scale: float | None = None) -> Array:
    """Grouped-query softmax attention.

    query: [batch, q_len, heads, head_dim]; keys/values: [batch, kv_heads, k_len, head_dim]
    (heads-major, so both einsums are plain batched matmuls over (batch, kv_head));
    mask: [batch, q_len, k_len] (True = may attend); scale: the logit scale (default
    head_dim ** -0.5). Returns [batch, q_len, heads, head_dim].
    """
    batch, q_len, heads, head_dim = query.shape
    kv_heads = keys.shape[1]
    with jax.named_scope("attend"):
        query = query.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
        logits = jnp.einsum("bqkgd,bktd->bkgqt", query, keys).astype(jnp.float32)
        logits = logits * (head_dim**-0.5 if scale is None else scale)
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
        out = jnp.einsum("bkgqt,bktd->bqkgd", probs, values)
        return out.reshape(batch, q_len, heads, head_dim)


@flax.struct.dataclass
class MaskRules:
    """What a decoder's attention adds to plain causal masking (Gemma 3 needs both).

    window: keys more than `window - 1` positions behind the query are hidden (a sliding
      window; a scalar, may be traced, so one scanned stack mixes local and global layers;
      None = no window).
    image_span: [batch, 2] int32 (first, end) positions of each row's image tokens, which
      attend to each other in both directions (an empty span, first == end, for rows
      without an image); None = causal everywhere.
    scale: the attention logit scale (None = head_dim ** -0.5).
    """

    window: Array | int | None = None
    image_span: Array | None = None
    scale: float | None = flax.struct.field(pytree_node=False, default=None)


def _apply_rules(mask: Array, query_pos: Array, key_pos: Array, rules: MaskRules | None) -> Array:
    """mask [batch, q_len, k_len] with the image block opened and the window applied.
    query_pos: [batch, q_len]; key_pos: [batch or 1, k_len] positions of the keys."""
    if rules is None:
        return mask
    if rules.image_span is not None:
        first, end = rules.image_span[:, 0, None], rules.image_span[:, 1, None]
        query_in = (query_pos >= first) & (query_pos < end)
        key_in = (key_pos >= first) & (key_pos < end)
        mask = mask | (query_in[:, :, None] & key_in[:, None, :])
    if rules.window is not None:
        mask = mask & (key_pos[:, None, :] > query_pos[:, :, None] - rules.window)
    return mask


def causal_attention(
    q: Array,
    k: Array,
    v: Array,
    positions: Array,
    cache: KVCache | None = None,
    layer: Array | int = 0,
    key_mask: Array | None = None,
    dtype: DType = jnp.float32,
    tree: TreeSlots | None = None,
    rules: MaskRules | None = None,
):
    """Causal attention by absolute position, with or without the stacked KV cache.

    q: [batch, seq, heads, head_dim]; k, v: [batch, seq, kv_heads, head_dim];
    positions: [batch, seq]. Without a cache the queries attend to these keys (key_mask
    [batch, seq] drops padding). With one, the new entries are written into layer `layer`
    of the cache at `positions`, and each query attends to every slot of that layer at or
    before its own position. With `tree` (a cache is then required), the entries go to
    tree.slots instead and each query sees tree.visible. rules: a sliding window, an image
    block and the logit scale (MaskRules). Returns (out [batch, seq, heads, head_dim], cache).

    A window is measured on cache slots, which are positions for committed tokens; a token
    tree's nodes sit past the committed slots at most `depth` positions ahead, so they stay
    inside any window wider than the tree is deep (the tree drafter checks that).
    """
    scale = None if rules is None else rules.scale
    if tree is not None:
        if cache is None:
            raise ValueError("attention over a token tree needs a KV cache")
        with jax.named_scope("kv_write"):
            cache = cache.write(layer, k, v, tree.slots)
        keys, values = cache.layer(layer)
        slots = jnp.arange(keys.shape[2])[None]
        mask = _apply_rules(tree.visible, positions, slots, rules)
        return attend(q, keys.astype(dtype), values.astype(dtype), mask, scale), cache
    if cache is None:
        mask = positions[:, None, :] <= positions[:, :, None]
        mask = _apply_rules(mask, positions, positions, rules)
        if key_mask is not None:
            mask = mask & key_mask[:, None, :].astype(bool)
        return attend(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, scale), None
    with jax.named_scope("kv_write"):
        cache = cache.write(layer, k, v, positions)
    keys, values = cache.layer(layer)
    slots = jnp.arange(keys.shape[2])[None]
    # Every slot at or before the query's own position holds a committed token; stale
    # slots (rejected drafts, prompt padding) lie beyond it and stay hidden. (An image
    # block opened by the rules lies inside the prompt, so it never reaches stale slots.)
    mask = slots[:, None, :] <= positions[:, :, None]
    mask = _apply_rules(mask, positions, slots, rules)
    return attend(q, keys.astype(dtype), values.astype(dtype), mask, scale), cache


class TextAttention(nn.Module):
    """Causal GQA self-attention with RoPE and an optional external KV cache."""

    config: TextConfig
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
        rope_positions: Array | None = None,
    ):
        """x: [batch, seq, embed]; positions: [batch, seq]; tree: see causal_attention.
        rope_positions: what RoPE rotates by when it is not the cache position (`apply_rope`'s
        positions: [batch, seq] or per frequency [batch, seq, head_dim / 2]); default positions.

        With a cache, the new keys/values are written into its layer `layer` at
        `positions` and the queries attend to every slot of that layer at or before their
        own position. Returns (out, cache or None).
        key_mask: [batch, seq] valid keys, only for the cache-free path.
        """
        cfg = self.config
        head_dim = cfg.resolved_head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        batch, seq, _ = x.shape
        q = dense(cfg.num_heads * head_dim, ("embed", "heads"), use_bias=qkv_bias, dtype=self.dtype, name="q_proj")(x)
        k = dense(
            cfg.num_kv_heads * head_dim, ("embed", "kv_heads"), use_bias=qkv_bias, dtype=self.dtype, name="k_proj"
        )(x)
        v = dense(
            cfg.num_kv_heads * head_dim, ("embed", "kv_heads"), use_bias=qkv_bias, dtype=self.dtype, name="v_proj"
        )(x)
        q, k, v = projections_apart(q, k, v)
        rotate_by = positions if rope_positions is None else rope_positions
        q = apply_rope(q.reshape(batch, seq, cfg.num_heads, head_dim), rotate_by, cfg.rope_theta)
        k = apply_rope(k.reshape(batch, seq, cfg.num_kv_heads, head_dim), rotate_by, cfg.rope_theta)
        v = v.reshape(batch, seq, cfg.num_kv_heads, head_dim)

        out, cache = causal_attention(q, k, v, positions, cache, layer, key_mask, self.dtype, tree)
        out = out.reshape(batch, seq, cfg.num_heads * head_dim)
        out = dense(
            cfg.hidden_size,
            ("heads", "embed"),
            use_bias=cfg.attention_bias,
            dtype=self.dtype,
            name="o_proj",
            zero_init=self.zero_init_out,
        )(out)
        return out, cache


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    hidden_size: int
    intermediate_size: int
    act: str = "silu"
    dtype: DType = jnp.float32
    zero_init_out: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        gate = dense(self.intermediate_size, ("embed", "mlp"), use_bias=False, dtype=self.dtype, name="gate_proj")(x)
        up = dense(self.intermediate_size, ("embed", "mlp"), use_bias=False, dtype=self.dtype, name="up_proj")(x)
        return dense(
            self.hidden_size,
            ("mlp", "embed"),
            use_bias=False,
            dtype=self.dtype,
            name="down_proj",
            zero_init=self.zero_init_out,
        )(activation(self.act)(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm LLaMA decoder layer.

    zero_init_out zero-initialises the two output projections, so that a fresh layer is
    the identity map (used by the imitation network).
    """

    config: TextConfig
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
        rope_positions: Array | None = None,
    ):
        """x: [batch, seq, embed] -> ([batch, seq, embed], cache); see TextAttention."""
        cfg = self.config
        attn_out, cache = TextAttention(cfg, self.dtype, self.zero_init_out, name="self_attn")(
            RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x),
            positions,
            cache,
            layer,
            key_mask,
            tree,
            rope_positions,
        )
        x = x + attn_out
        mlp = GatedMLP(
            cfg.hidden_size,
            self.intermediate_size or cfg.intermediate_size,
            cfg.hidden_act,
            self.dtype,
            self.zero_init_out,
            name="mlp",
        )
        x = x + mlp(RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x))
        x = with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, cache


# --- a stack of identical layers --------------------------------------------------------------

# The logical name of the leading axis of stacked decoder-layer params.
LAYERS_AXIS = "layers"

# What one layer of a scanned stack saves for its backward pass (run_layer_stack's remat).
REMAT_POLICIES = {
    "none": None,  # everything (no recomputation)
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def init_layer_stack(layer: nn.Module, num_layers: int, width: int, rng: Array):
    """Params of `num_layers` independently initialised copies of `layer`, stacked.

    Every leaf gets a leading [num_layers] axis, and its logical axis names a leading
    LAYERS_AXIS, so the stack shards like one layer (MaxText's param_scan_axis 0).
    """
    hidden = jnp.zeros((1, 1, width), layer.dtype)
    positions = jnp.zeros((1, 1), jnp.int32)
    stacked = jax.vmap(lambda key: layer.init(key, hidden, positions)["params"])(jax.random.split(rng, num_layers))
    return jax.tree.map(
        lambda leaf: (
            leaf.replace(names=(LAYERS_AXIS,) + tuple(leaf.names))
            if isinstance(leaf, nn.LogicallyPartitioned)
            else leaf
        ),
        stacked,
        is_leaf=lambda leaf: isinstance(leaf, nn.LogicallyPartitioned),
    )


def layer_stack_param(module: nn.Module, layer: nn.Module, num_layers: int, width: int):
    """module's 'layers' param: the stacked params of `layer` (init_layer_stack).

    Call in `setup`. An int8 stack (fastvlm_jax.nn.quant) holds a kernel_scale next to each
    kernel; its shapes are checked against the quantized form of the init instead.
    """
    init = functools.partial(init_layer_stack, layer, num_layers, width)
    if module.has_variable("params", "layers") and is_quantized(module.get_variable("params", "layers")):
        return module.param("layers", lambda rng: quantize_tree(init(rng)))
    return module.param("layers", init)


def run_layer_stack(
    layer: nn.Module,
    stacked,
    hidden: Array,
    positions: Array,
    start: int,
    stop: int,
    cache: KVCache | None = None,
    key_mask: Array | None = None,
    collect: tuple[int, ...] = (),
    unroll: bool = False,
    tree: TreeSlots | None = None,
    remat: str = "none",
    image_span: Array | None = None,
    rope_positions: Array | None = None,
):
    """Runs layers [start, stop) of a stack as one lax.scan, reading the weights in place.

    layer: the (unbound) layer module; stacked: its params with a leading [num_layers]
    axis; hidden: [batch, seq, embed] (state `start`); positions: [batch, seq].
    cache: the stacked KV cache; each layer writes its own slice in place (the scan
    carries the whole cache, so no layer's entries are copied in or out).
    collect: state indices in [start, stop] to return (state k is the output of layer k-1).
    unroll: unroll the loop (the same weights and cache, as straight-line code).
    tree: the cache slots and visibility of a token tree's nodes (see causal_attention).
    remat: what a layer keeps for the backward pass (REMAT_POLICIES): "none" keeps every
      intermediate, "full" only the layer's input state (the layer is recomputed in the
      backward pass), "dots" also the outputs of its weight matmuls. Training the whole
      stack needs "full" or "dots" at 7B scale; a stack without gradients ignores it.
    image_span: [batch, 2] (first, end) positions of each row's image tokens, for layers
      whose image tokens attend to each other both ways (Gemma 3); passed to the layer only
      when given, so a causal-only layer refuses it.
    rope_positions: what RoPE rotates by, when it differs from the cache positions (multimodal
      RoPE, `apply_rope`); passed to the layer only when given, like image_span.
    Returns (state `stop`, cache, {index: [batch, seq, embed]}).

    The whole stack is scanned over its arrays directly; a sub-range indexes layer i
    out of the full arrays inside the loop, since slicing [start, stop) first would copy
    those layers' weights on every call. (The whole-stack form also keeps gradients
    cheap: training runs the full range.)
    """
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    if not 0 <= start <= stop <= num_layers:
        raise ValueError(f"layer range [{start}, {stop}) is outside a stack of {num_layers} layers")
    bad = [index for index in collect if not start <= index <= stop]
    if bad:
        raise ValueError(f"cannot collect states {bad} from layers [{start}, {stop})")
    targets = tuple(sorted(set(collect) - {start}))
    collected = {start: hidden} if start in collect else {}
    if start == stop:
        return hidden, cache, collected
    whole = start == 0 and stop == num_layers
    span: dict[str, Any] = {} if image_span is None else {"image_span": image_span}
    if rope_positions is not None:
        span["rope_positions"] = rope_positions

    def body(carry, inputs):
        h, cache, saved = carry
        if whole:
            index, layer_params = inputs
        else:
            index = inputs
            layer_params = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, index, 0, keepdims=False), stacked)
        # apply without `mutable` returns the layer's output alone: (state, cache)
        h, cache = cast(
            "tuple[Array, KVCache | None]",
            layer.apply({"params": layer_params}, h, positions, cache, index, key_mask, tree, **span),
        )
        saved = tuple(jnp.where(index + 1 == target, h, kept) for target, kept in zip(targets, saved))
        return (h, cache, saved), None

    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: use one of {sorted(REMAT_POLICIES)}")
    if remat != "none":
        # prevent_cse=False: inside a scan the recomputation cannot be merged away, and
        # the CSE barrier would only cost speed (JAX's advice for checkpoint under scan).
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    indices = jnp.arange(start, stop, dtype=jnp.int32)
    saved = tuple(jnp.zeros_like(hidden) for _ in targets)
    (hidden, cache, saved), _ = jax.lax.scan(
        body, (hidden, cache, saved), (indices, stacked) if whole else indices, unroll=(stop - start) if unroll else 1
    )
    collected.update(zip(targets, saved))
    return hidden, cache, collected
