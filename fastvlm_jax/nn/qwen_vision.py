"""The Qwen2.5-VL vision tower on padded batches: patch embedding, 2-D rotary ViT blocks with
windowed and full attention, and the 2x2 patch merger.

The reference is transformers' `Qwen2_5_VisionTransformerPretrainedModel`. It takes one packed
sequence of every image's patches, reorders the merge groups so that each attention window is
contiguous and runs variable-length attention over `cu_seqlens`; the Python-side bookkeeping
(`get_vision_window_index`, `get_vision_position_ids`) reads grid values on the host.

Here a batch row holds one image (its real patches first, in the processor's order, then zero
padding) and everything that depends on the image's size is computed from the grid with jnp
arithmetic, so one compiled program serves every image size that fits `max_patches`:

- rotary positions: patch i of a frame lies in merge group i // merge**2, whose row and column
  on the merged grid follow from the grid width; the (row, col) inside the group from i % merge**2;
- windows: a windowed block is attention restricted to the tokens of one window, the window of
  a token being (its merged row // W, its merged col // W) with W = window_size // merge //
  patch_size (HF's `vit_merger_window_size`; windows at the right and bottom edges are cut
  short, as HF's padded index does). Full-attention blocks (`fullatt_block_indexes`) see every
  token of the frame. Padding is never a key. Both are boolean masks [batch, P, P], built once;
- no reordering: HF's reordering moves whole merge groups and its merger undoes it, and
  attention restricted by a mask does not depend on token order, so the outputs equal HF's up
  to float32 summation order (tests/test_qwen_vision.py checks this numerically, including
  windows that cut the image unevenly).

The mask form costs P**2 logits per block, most of them masked in windowed blocks. It is the
exact reference; a TPU-efficient version would gather each window's tokens into fixed-size
blocks (a [windows, window_tokens] layout) and attend within blocks, reusing these same
window ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fastvlm_jax.nn.config import ConfigError
from fastvlm_jax.nn.layers import INIT_STD, RMSNorm, activation, attend, dense, rope_frequencies
from fastvlm_jax.nn.quant import Dense

Array = jax.Array

# transformers' Qwen2_5_VLVisionConfig defaults: what `from_pretrained` uses for a missing key.
_HF_DEFAULTS: dict[str, Any] = dict(
    depth=32,
    hidden_size=3584,
    hidden_act="silu",
    intermediate_size=3420,
    num_heads=16,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    out_hidden_size=3584,
    fullatt_block_indexes=(7, 15, 23, 31),
)


@dataclass(frozen=True)
class QwenVisionConfig:
    """Qwen2.5-VL's vision transformer (HF `Qwen2_5_VLVisionConfig`).

    Defaults are Qwen2.5-VL-7B-Instruct's vision_config. window_size is in pixels: a window
    spans window_size // patch_size patches, i.e. `window_units` merged tokens, per side.
    """

    hidden_size: int = 1280
    depth: int = 32
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        for name in (
            "hidden_size",
            "depth",
            "num_heads",
            "intermediate_size",
            "out_hidden_size",
            "patch_size",
            "temporal_patch_size",
            "spatial_merge_size",
            "window_size",
            "in_channels",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"QwenVisionConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 4:
            # The 2-D rotary embedding gives a quarter of each head to each of (row, col) x (cos, sin).
            raise ConfigError(f"the head size {self.head_dim} must be a multiple of 4 for the 2-D rotary embedding")
        if self.window_units < 1:
            raise ConfigError(
                f"window_size={self.window_size} pixels is smaller than one merged token "
                f"(patch_size * spatial_merge_size = {self.patch_size * self.spatial_merge_size})"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"fullatt_block_indexes {bad} are outside the {self.depth} blocks")
        try:
            activation(self.hidden_act)
        except ValueError as e:
            raise ConfigError(f"vision hidden_act: {e}") from None

    # What the code above the family modules reads of every vision config
    # (fastvlm_jax.nn.config.VisionTowerConfig).
    @property
    def num_layers(self) -> int:
        return self.depth

    @property
    def num_channels(self) -> int:
        return self.in_channels

    @property
    def image_size(self) -> int:
        raise ConfigError(
            "Qwen2.5-VL's vision tower has no fixed image size: an image becomes as many patches as its size gives"
        )

    @property
    def num_patches(self) -> int:
        raise ConfigError(
            "Qwen2.5-VL's vision tower has no fixed patch count: an image becomes as many patches as its size gives"
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flat input patch: in_channels * temporal_patch_size * patch_size**2."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches per merged token (spatial_merge_size**2)."""
        return self.spatial_merge_size**2

    @property
    def window_units(self) -> int:
        """Side of an attention window in merged tokens (HF's vit_merger_window_size)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> QwenVisionConfig:
        """From the `vision_config` of a Qwen2.5-VL config.json (or the whole config.json).

        Reads the original checkpoints' spellings too (`in_chans`, `spatial_patch_size`);
        missing keys take transformers' class defaults, as `from_pretrained` would.
        """
        if isinstance(d.get("vision_config"), dict):
            d = d["vision_config"]
        model_type = d.get("model_type")
        if model_type not in (None, "qwen2_5_vl", "qwen2_5_vl_vision"):
            raise ConfigError(
                f"vision model_type {model_type!r} is not Qwen2.5-VL's ('qwen2_5_vl'); Qwen2-VL's tower "
                "(LayerNorm, no windows) is a different architecture"
            )

        def get(key: str, *aliases: str) -> Any:
            for name in (key, *aliases):
                if d.get(name) is not None:
                    return d[name]
            return _HF_DEFAULTS[key]

        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if rope.get("rope_type", "axial") not in ("axial", "default"):
            raise ConfigError(f"vision rope_type {rope['rope_type']!r}: only the axial 2-D rotary is supported")
        return cls(
            hidden_size=int(get("hidden_size", "embed_dim")),
            depth=int(get("depth", "num_hidden_layers")),
            num_heads=int(get("num_heads", "num_attention_heads")),
            intermediate_size=int(get("intermediate_size")),
            out_hidden_size=int(get("out_hidden_size")),
            patch_size=int(get("patch_size", "spatial_patch_size")),
            temporal_patch_size=int(get("temporal_patch_size")),
            spatial_merge_size=int(get("spatial_merge_size")),
            window_size=int(get("window_size")),
            fullatt_block_indexes=tuple(int(i) for i in get("fullatt_block_indexes")),
            in_channels=int(get("in_channels", "in_chans")),
            hidden_act=str(get("hidden_act")),
            rope_theta=float(theta),
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["fullatt_block_indexes"] = list(self.fullatt_block_indexes)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QwenVisionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown QwenVisionConfig keys: {unknown}")
        return cls(**d)


# --- where each patch sits, from the traced grid -------------------------------------------


@dataclass(frozen=True)
class PatchLayout:
    """Per-patch geometry of a padded batch, all [batch, max_patches] int32 / bool.

    row, col: the patch's position on the patch grid (the rotary positions);
    frame: which temporal frame it belongs to; window_row, window_col: its attention window;
    valid: a real patch (not padding).
    """

    row: Array
    col: Array
    frame: Array
    window_row: Array
    window_col: Array
    valid: Array

    def full_mask(self) -> Array:
        """[batch, P, P]: query i may attend key j (same frame, both real)."""
        return _same(self.frame) & self.valid[:, :, None] & self.valid[:, None, :]

    def window_mask(self) -> Array:
        """[batch, P, P]: the full mask restricted to keys in the query's window."""
        return self.full_mask() & _same(self.window_row) & _same(self.window_col)


def _same(ids: Array) -> Array:
    return ids[:, :, None] == ids[:, None, :]


def patch_layout(grid: Array, max_patches: int, config: QwenVisionConfig) -> PatchLayout:
    """The layout of rows whose first t*h*w patches are one image in the processor's order.

    grid: [batch, 3] int (t, h, w) in patches, may be traced (an all-zero row is an empty row).
    Within a frame the processor lists merge groups row-major over the merged grid
    (h // merge x w // merge), each group's merge x merge patches row-major inside it.
    """
    m = config.spatial_merge_size
    grid = jnp.asarray(grid, jnp.int32)
    t, h, w = grid[:, 0:1], grid[:, 1:2], grid[:, 2:3]  # [batch, 1] each
    index = jnp.arange(max_patches, dtype=jnp.int32)[None]  # [1, P]
    frame_len = jnp.maximum(h * w, 1)  # guards empty rows against division by zero
    valid = index < t * h * w
    within_frame = index % frame_len
    group, in_group = within_frame // (m * m), within_frame % (m * m)
    groups_per_row = jnp.maximum(w // m, 1)
    group_row, group_col = group // groups_per_row, group % groups_per_row
    units = config.window_units
    return PatchLayout(
        row=group_row * m + in_group // m,
        col=group_col * m + in_group % m,
        frame=index // frame_len,
        window_row=group_row // units,
        window_col=group_col // units,
        valid=valid,
    )


def rotary_tables(layout: PatchLayout, config: QwenVisionConfig) -> tuple[Array, Array]:
    """cos, sin [batch, P, head_dim] float32 of the 2-D rotary embedding.

    HF's axial layout: frequencies over head_dim // 2 (head_dim // 4 of them), angles
    [row * f, col * f] concatenated, then repeated twice for the rotate-half pairing.
    """
    inv_freq = rope_frequencies(config.head_dim // 2, config.rope_theta)  # [head_dim / 4]
    rows = layout.row.astype(jnp.float32)[..., None] * inv_freq
    cols = layout.col.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([rows, cols, rows, cols], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate-half rotary on x [batch, P, heads, head_dim] with cos/sin [batch, P, head_dim], in
    float32 like HF's apply_rotary_pos_emb_vision."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


# --- modules -------------------------------------------------------------------------------


class QwenVisionAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (with bias), the 2-D rotary
    embedding on q and k, and an output projection `proj` (with bias)."""

    config: QwenVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
        """x: [batch, P, hidden]; cos, sin: [batch, P, head_dim]; mask: [batch, P, P] -> [batch, P, hidden]."""
        cfg = self.config
        batch, length, _ = x.shape
        qkv = dense(3 * cfg.hidden_size, ("embed", "heads"), use_bias=True, dtype=self.dtype, name="qkv")(x)
        # HF splits the fused output as (3, heads, head_dim).
        q, k, v = jnp.split(qkv.reshape(batch, length, 3, cfg.num_heads, cfg.head_dim), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = attend(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask)
        out = out.reshape(batch, length, cfg.hidden_size)
        return dense(cfg.hidden_size, ("heads", "embed"), use_bias=True, dtype=self.dtype, name="proj")(out)


class QwenVisionMLP(nn.Module):
    """Gated feed-forward with biases: down(act(gate(x)) * up(x))."""

    config: QwenVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="gate_proj")(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), use_bias=True, dtype=self.dtype, name="up_proj")(x)
        hidden = activation(cfg.hidden_act)(gate) * up
        return dense(cfg.hidden_size, ("mlp", "embed"), use_bias=True, dtype=self.dtype, name="down_proj")(hidden)


class QwenVisionBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    config: QwenVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
        cfg = self.config
        x = x + QwenVisionAttention(cfg, self.dtype, name="attn")(
            RMSNorm(cfg.rms_norm_eps, name="norm1")(x), cos, sin, mask
        )
        return x + QwenVisionMLP(cfg, self.dtype, name="mlp")(RMSNorm(cfg.rms_norm_eps, name="norm2")(x))


class QwenPatchMerger(nn.Module):
    """RMSNorm each patch state (ln_q), concatenate each merge group's merge**2 states, then a
    2-layer GELU MLP (mlp_0, mlp_2: HF's mlp.0 / mlp.2) to the decoder's width."""

    config: QwenVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: [batch, P, hidden] -> [batch, P // merge**2, out_hidden_size]."""
        cfg = self.config
        width = cfg.hidden_size * cfg.merge_unit
        batch, length, _ = x.shape
        # eps fixed at 1e-6 in HF's merger, whatever the blocks use.
        h = RMSNorm(1e-6, name="ln_q")(x).reshape(batch, length // cfg.merge_unit, width)
        h = dense(width, ("vision_embed", "mlp"), use_bias=True, dtype=self.dtype, name="mlp_0")(h)
        h = jax.nn.gelu(h, approximate=False)  # torch nn.GELU(): the exact erf form
        return dense(cfg.out_hidden_size, ("mlp", "embed"), use_bias=True, dtype=self.dtype, name="mlp_2")(h)


class QwenVisionTower(nn.Module):
    """Qwen2.5-VL vision transformer over a padded batch, one image per row.

    Parameters: patch_embed (a dense kernel [patch_dim, hidden]: HF's bias-free Conv3d whose
    kernel equals its stride is a matmul over the flat patch), blocks_{i}, merger.
    """

    config: QwenVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, patches: Array, grid: Array) -> Array:
        """patches: [batch, max_patches, patch_dim], each row's first t*h*w rows one image in the
        processor's order, zeros after; grid: [batch, 3] int32 (t, h, w) per row, may be traced.

        Returns the merged tokens [batch, max_patches // merge**2, out_hidden_size]; row b's
        first t*h*w // merge**2 are the image's tokens (HF's per-image output), the rest zeros.
        The caller keeps t*h*w <= max_patches (`image.qwen_vl.patch_count` gives it before
        loading): a traced grid cannot be checked here, and a longer image would lose its tail.
        """
        cfg = self.config
        batch, max_patches, patch_dim = patches.shape
        if patch_dim != cfg.patch_dim:
            raise ValueError(
                f"patches have {patch_dim} values each, the tower takes in_channels * temporal_patch_size * "
                f"patch_size**2 = {cfg.patch_dim}"
            )
        if max_patches % cfg.merge_unit:
            raise ValueError(f"max_patches={max_patches} must be a multiple of spatial_merge_size**2={cfg.merge_unit}")
        layout = patch_layout(grid, max_patches, cfg)
        cos, sin = rotary_tables(layout, cfg)
        full, windowed = layout.full_mask(), layout.window_mask()

        # The flat patch axis has no logical name of its own (like the conv kernels' spatial axes
        # in vision.py): replicated.
        x = Dense(
            cfg.hidden_size,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD), (None, "embed")),
            bias_init=nn.initializers.zeros,
            name="patch_embed",
        )(patches.astype(self.dtype))
        for i in range(cfg.depth):
            mask = full if i in cfg.fullatt_block_indexes else windowed
            x = QwenVisionBlock(cfg, self.dtype, name=f"blocks_{i}")(x, cos, sin, mask)
        merged = QwenPatchMerger(cfg, self.dtype, name="merger")(x)
        # Padding rows carry finite junk (their attention is uniform over masked keys): zero them,
        # so callers can rely on padded tokens being 0.
        merged_valid = layout.valid[:, :: cfg.merge_unit]
        return jnp.where(merged_valid[..., None], merged, 0).astype(merged.dtype)


# --- Hugging Face weights ------------------------------------------------------------------


def convert_vision_params(
    get: Callable[[str], np.ndarray], config: QwenVisionConfig, prefix: str = "model.visual."
) -> dict[str, Any]:
    """Our QwenVisionTower params (float32 numpy, unboxed) from HF tensors.

    get: HF tensor name -> array (torch layouts); prefix: where the tower sits in the
    checkpoint: 'model.visual.' for transformers 5.x state dicts, 'visual.' for the original
    Qwen2.5-VL files. Every tensor's shape is checked against `config`; a mismatch is a
    ValueError naming the tensor.
    """
    c = config

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        value = np.asarray(get(prefix + name), dtype=np.float32)
        if value.shape != shape:
            raise ValueError(f"{prefix + name}: the checkpoint has shape {value.shape}, the config implies {shape}")
        return value

    def linear(name: str, features_in: int, features_out: int, bias: bool = True) -> dict[str, np.ndarray]:
        # torch Linear [out, in] -> our kernel [in, out]
        out = {"kernel": np.ascontiguousarray(read(f"{name}.weight", (features_out, features_in)).T)}
        if bias:
            out["bias"] = read(f"{name}.bias", (features_out,))
        return out

    def norm(name: str, width: int) -> dict[str, np.ndarray]:
        return {"scale": read(f"{name}.weight", (width,))}

    hidden, inner = c.hidden_size, c.intermediate_size
    conv = read("patch_embed.proj.weight", (hidden, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size))
    # Conv3d with kernel == stride over a patch flattened as (C, T, P, P): a matmul.
    params: dict[str, Any] = {"patch_embed": {"kernel": np.ascontiguousarray(conv.reshape(hidden, -1).T)}}
    for i in range(c.depth):
        block = f"blocks.{i}."
        params[f"blocks_{i}"] = {
            "norm1": norm(block + "norm1", hidden),
            "norm2": norm(block + "norm2", hidden),
            "attn": {
                "qkv": linear(block + "attn.qkv", hidden, 3 * hidden),
                "proj": linear(block + "attn.proj", hidden, hidden),
            },
            "mlp": {
                "gate_proj": linear(block + "mlp.gate_proj", hidden, inner),
                "up_proj": linear(block + "mlp.up_proj", hidden, inner),
                "down_proj": linear(block + "mlp.down_proj", inner, hidden),
            },
        }
    width = hidden * c.merge_unit
    params["merger"] = {
        "ln_q": norm("merger.ln_q", hidden),
        "mlp_0": linear("merger.mlp.0", width, width),
        "mlp_2": linear("merger.mlp.2", width, c.out_hidden_size),
    }
    return params


__all__ = [
    "PatchLayout",
    "QwenVisionConfig",
    "QwenVisionTower",
    "convert_vision_params",
    "patch_layout",
    "rotary_tables",
]
