"""ViT vision towers (CLIP and SigLIP flavours) that return chosen hidden states."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastvlm_jax.nn.config import VisionConfig
from fastvlm_jax.nn.layers import INIT_STD, LayerNorm, activation, dense, full_attention, split_heads

Array = jax.Array


def vit_embeddings(
    module: nn.Module,
    pixels: Array,
    *,
    patch_size: int,
    hidden_size: int,
    patch_bias: bool,
    class_token: bool,
    num_positions: int,
    dtype,
) -> Array:
    """ViT input embeddings: patch conv, an optional learned CLS token first, + learned positions.

    The CLIP/SigLIP tower and BLIP-2's ViT both build their inputs this way. Call it from the
    tower's `nn.compact` method with the tower as `module`: the parameters (`patch_embedding`,
    `class_embedding`, `position_embedding`) then sit directly in the tower, at the paths
    the Hugging Face converters' rules name. Position row i is added to token i (CLS
    first), as in HF; a table longer than the tokens is cut (BLIP's rule).

    pixels: [batch, height, width, channels] -> [batch, tokens, hidden_size].
    """
    patches = nn.Conv(
        hidden_size,
        (patch_size, patch_size),
        strides=patch_size,
        padding="VALID",
        use_bias=patch_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), (None, None, None, "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name="patch_embedding",
    )(pixels.astype(dtype))
    batch = patches.shape[0]
    x = patches.reshape(batch, -1, hidden_size)
    if class_token:
        cls = module.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("embed",)),
            (hidden_size,),
            unbox=True,
        )  # flax's default; typed as the array
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, hidden_size)), x], 1)
    positions = module.param(
        "position_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), ("positions", "embed")),
        (num_positions, hidden_size),
        unbox=True,
    )  # (as above)
    return x + positions.astype(x.dtype)[None, : x.shape[1]]


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases (CLIP/SigLIP layout)."""

    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dim = x.shape[-1]

        def heads(name):
            proj = dense(dim, ("embed", "heads"), use_bias=True, dtype=self.dtype, name=name)(x)
            return split_heads(proj, cfg.num_heads)

        out = full_attention(heads("q_proj"), heads("k_proj"), heads("v_proj"))
        return dense(dim, ("heads", "embed"), use_bias=True, dtype=self.dtype, name="out_proj")(out)


class VisionLayer(nn.Module):
    config: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        x = x + VisionAttention(cfg, self.dtype, name="self_attn")(LayerNorm(cfg.layer_norm_eps, name="layer_norm1")(x))
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm2")(x)
        h = dense(cfg.intermediate_size, ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="fc1")(h)
        h = dense(cfg.hidden_size, ("mlp", "embed"), use_bias=True, dtype=self.dtype, name="fc2")(
            activation(cfg.hidden_act)(h)
        )
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
        x = vit_embeddings(
            self,
            pixels,
            patch_size=cfg.patch_size,
            hidden_size=cfg.hidden_size,
            patch_bias=cfg.kind == "siglip",
            class_token=cfg.has_class_token,
            num_positions=cfg.num_patches + int(cfg.has_class_token),
            dtype=self.dtype,
        )
        if cfg.has_class_token:
            x = LayerNorm(cfg.layer_norm_eps, name="pre_layrnorm")(x)

        states = {0: x}
        for i in range(max(wanted)):
            x = VisionLayer(cfg, self.dtype, name=f"layers_{i}")(x)
            states[i + 1] = x
        return [states[i] for i in wanted]
