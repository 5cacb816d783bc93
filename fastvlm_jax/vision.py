"""ViT vision towers (CLIP and SigLIP flavours) that return chosen hidden states."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastvlm_jax.config import VisionConfig
from fastvlm_jax.layers import INIT_STD, LayerNorm, activation, dense

Array = jax.Array


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases (CLIP/SigLIP layout)."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        batch, seq, dim = x.shape
        head_dim = dim // cfg.num_heads

        def heads(name):
            proj = dense(dim, ("embed", "heads"), use_bias=True, dtype=self.dtype, name=name)(x)
            return proj.reshape(batch, seq, cfg.num_heads, head_dim)

        q, k, v = heads("q_proj"), heads("k_proj"), heads("v_proj")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim ** -0.5
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, dim)
        return dense(dim, ("heads", "embed"), use_bias=True, dtype=self.dtype, name="out_proj")(out)


class VisionLayer(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        x = x + VisionAttention(cfg, self.dtype, name="self_attn")(
            LayerNorm(cfg.layer_norm_eps, name="layer_norm1")(x))
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm2")(x)
        h = dense(cfg.intermediate_size, ("embed", "mlp"), use_bias=True, dtype=self.dtype,
                  name="fc1")(h)
        h = dense(cfg.hidden_size, ("mlp", "embed"), use_bias=True, dtype=self.dtype,
                  name="fc2")(activation(cfg.hidden_act)(h))
        return x + h


class VisionTower(nn.Module):
    """Patch embedding + ViT encoder.

    Hidden state i (HF's `hidden_states[i]`) is the input to encoder layer i: state 0 is
    the embeddings (after CLIP's pre-norm), state num_layers the encoder output before
    any post-norm. Only the layers needed for the requested states are run.
    """

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: Array, state_indices: tuple[int, ...]) -> list[Array]:
        """pixels: [batch, height, width, channels] -> one [batch, tokens, dim] per index."""
        cfg = self.config
        num_states = cfg.num_layers + 1
        wanted = [i % num_states for i in state_indices]
        patches = nn.Conv(
            cfg.hidden_size, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size,
            padding="VALID", use_bias=cfg.kind == "siglip", dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD),
                                                     (None, None, None, "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="patch_embedding")(pixels.astype(self.dtype))
        batch = patches.shape[0]
        x = patches.reshape(batch, -1, cfg.hidden_size)
        if cfg.has_class_token:
            cls = self.param("class_embedding",
                             nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("embed",)),
                             (cfg.hidden_size,))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, cfg.hidden_size)), x], 1)
        positions = self.param(
            "position_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("positions", "embed")),
            (x.shape[1], cfg.hidden_size))
        x = x + positions.astype(x.dtype)[None]
        if cfg.has_class_token:
            x = LayerNorm(cfg.layer_norm_eps, name="pre_layrnorm")(x)

        states = {0: x}
        for i in range(max(wanted)):
            x = VisionLayer(cfg, self.dtype, name=f"layers_{i}")(x)
            states[i + 1] = x
        return [states[i] for i in wanted]
