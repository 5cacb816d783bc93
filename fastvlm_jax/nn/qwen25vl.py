"""Qwen2.5-VL (image + text) as Flax modules, with the VLM's functional API.

`Qwen25VLModule` is a `FamilyModule` like the others, so the VLM handle, the engine,
checkpoints and training run on it unchanged:

  PatchImages (patches [B, max_patches, 3 * 2 * 14 * 14], grid [B, 3]) -> the windowed ViT with
  2-D RoPE and its 2x2 patch merger (fastvlm_jax.nn.qwen_vision) -> [B, max_patches / 4, hidden]

An image becomes as many tokens as its resized size gives, so a batch holds images of several
sizes, each row padded to one patch count and carrying its own grid.

The decoder is Qwen2's (a LLaMA-style decoder with q/k/v bias, `fastvlm_jax.nn.llava.TextDecoder`)
with multimodal RoPE (M-RoPE): every token has a (time, row, column) position; RoPE's frequency
bands are split by `mrope_section` and each band rotates by one of the three. Text tokens have
three equal coordinates (plain RoPE); the image's tokens sit at (s, s + row, s + column) after
the s tokens before it; everything after the image continues from s + max(rows, columns), that
is its slot shifted by the row's `rope offset` max(rows, columns) - rows * columns. The prompt's
layout is `image_span` ([batch, 4]: first, end, rows, columns), from which any position's
coordinates follow, so training sequences and prefills need nothing else; a prefill stores
each row's offset in the KV cache (`KVCache.rope_offset`), and every later pass (drafts,
verification, tree nodes) shifts its positions by it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from fastvlm_jax.image.patches import PatchImages
from fastvlm_jax.nn.common import FamilyModule, image_token_span, init_imitation_params, merge_image_features
from fastvlm_jax.nn.config import ConfigError, DraftConfig, ModelConfigMixin, TextConfig
from fastvlm_jax.nn.eagle import make_eagle_head
from fastvlm_jax.nn.kv_cache import KVCache, TreeSlots
from fastvlm_jax.nn.llava import ImitationNetwork, TextDecoder
from fastvlm_jax.nn.qwen_vision import QwenVisionConfig, QwenVisionTower

Array = jax.Array


def _qwen2_text() -> TextConfig:
    # Qwen2.5-VL-7B's decoder.
    return TextConfig(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=128000,
        qkv_bias=True,
    )


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig(ModelConfigMixin):
    """Qwen2.5-VL: the windowed ViT + patch merger -> a Qwen2 decoder with M-RoPE, plus the draft path.

    mrope_section: how many of RoPE's head_dim / 2 frequencies follow time, row and column.
    max_image_tokens: the most tokens one image may become (its processor's max_pixels over
      (patch_size * spatial_merge_size)^2): what plans size a prompt by.
    """

    vision: QwenVisionConfig = dataclasses.field(default_factory=QwenVisionConfig)
    text: TextConfig = dataclasses.field(default_factory=_qwen2_text)
    draft: DraftConfig = dataclasses.field(default_factory=DraftConfig)
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_image_tokens: int = 1280
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    model_type: str = "qwen2_5_vl"
    quantization: str | None = None  # "int8": decoding weights stored int8 (fastvlm_jax.nn.quant)

    SUB_CONFIGS: ClassVar[dict[str, type]] = {"vision": QwenVisionConfig, "text": TextConfig, "draft": DraftConfig}

    def __post_init__(self):
        if isinstance(self.mrope_section, list):
            object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        self.check_exit_layer()
        half = self.text.resolved_head_dim // 2
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != half:
            raise ConfigError(
                f"mrope_section={list(self.mrope_section)} must be three sizes adding up to head_dim / 2 = {half}"
            )
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"vision.out_hidden_size={self.vision.out_hidden_size} must equal the decoder's "
                f"hidden_size={self.text.hidden_size}"
            )
        if self.max_image_tokens < 1:
            raise ConfigError(f"max_image_tokens={self.max_image_tokens} must be positive")

    @property
    def num_image_tokens(self) -> int:
        """The most tokens one image may become (images vary: each prompt counts its own)."""
        return self.max_image_tokens

    @property
    def merge_size(self) -> int:
        return self.vision.spatial_merge_size


# --- multimodal RoPE -----------------------------------------------------------------------


def mrope_span(input_ids: Array, grid: Array, image_token_id: int, merge_size: int) -> Array:
    """[batch, seq] ids and [batch, 3] patch grids (t, h, w) -> [batch, 4] int32 (first, end,
    rows, columns): where each row's image tokens lie and their token grid (h and w over
    merge_size). A row without an image has first == end == 0. One image per prompt."""
    rows_and_columns = jnp.stack([grid[:, 1] // merge_size, grid[:, 2] // merge_size], axis=1)
    return jnp.concatenate([image_token_span(input_ids, image_token_id), rows_and_columns.astype(jnp.int32)], axis=1)


def rope_offset(span: Array) -> Array:
    """[batch, 4] spans -> [batch] what RoPE adds to every position after the image:
    max(rows, columns) - (end - first); zero for a row without an image."""
    first, end, rows, columns = (span[:, i] for i in range(4))
    return jnp.where(end > first, jnp.maximum(rows, columns) - (end - first), 0).astype(jnp.int32)


def mrope_coordinates(positions: Array, span: Array) -> Array:
    """positions [batch, seq] (slots, counted from the prompt's first token) -> [batch, seq, 3]
    (time, row, column) RoPE coordinates, as transformers' `get_rope_index` lays them out."""
    first, end, _, columns = (span[:, i, None] for i in range(4))
    inside = (positions >= first) & (positions < end)
    within = positions - first
    columns = jnp.maximum(columns, 1)
    text = jnp.where(positions >= end, positions + rope_offset(span)[:, None], positions)
    time = jnp.where(inside, first, text)
    row = jnp.where(inside, first + within // columns, text)
    column = jnp.where(inside, first + within % columns, text)
    return jnp.stack([time, row, column], axis=-1).astype(jnp.int32)


def per_frequency(coordinates: Array, section: tuple[int, ...]) -> Array:
    """[batch, seq, 3] coordinates -> [batch, seq, sum(section)]: the position each RoPE
    frequency rotates by (the first section[0] follow time, then rows, then columns)."""
    which = np.repeat(np.arange(3), section)
    return coordinates[..., which]


# --- the family module ---------------------------------------------------------------------


class Qwen25VLModule(FamilyModule):
    """Windowed ViT + merger + Qwen2 decoder (M-RoPE) + imitation network (Qwen2.5-VL)."""

    config: Qwen25VLConfig

    def setup(self):
        cfg = self.config
        self.vision_tower = QwenVisionTower(cfg.vision, self.dtype)
        self.language_model = TextDecoder(cfg.text, self.dtype, self.unroll_layers)
        self.imitation = ImitationNetwork(cfg.text, cfg.draft, self.dtype)
        self.eagle = make_eagle_head(cfg, self.dtype)

    @classmethod
    def dummy_inputs(cls, config: Qwen25VLConfig) -> tuple[Array, Any]:
        vision = config.vision
        merge = vision.spatial_merge_size
        dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        ids = jnp.full((1, 2), config.image_token_id, jnp.int32)
        images = PatchImages(
            patches=jnp.zeros((1, 2 * merge * merge, dim), jnp.float32),
            grid=jnp.asarray([[1, merge, 2 * merge]], jnp.int32),
        )
        return ids, images

    @classmethod
    def prompt_span(cls, config: Qwen25VLConfig, input_ids: Array, pixels: Any = None) -> Array | None:
        """[batch, 4] (first, end, rows, columns) of each row's image (`mrope_span`); without
        images, every row's span is empty (plain RoPE)."""
        batch = input_ids.shape[0]
        grid = jnp.zeros((batch, 3), jnp.int32) if pixels is None else jnp.asarray(pixels.grid)
        return mrope_span(input_ids, grid, config.image_token_id, config.merge_size)

    def encode_images(self, pixels: PatchImages) -> Array:
        """PatchImages -> image tokens [batch, max_patches / merge_size^2, hidden] (each row's
        first h * w / merge_size^2 are its image's; the rest come from padding)."""
        return self.vision_tower(pixels.patches, pixels.grid)

    def embed(self, input_ids: Array, image_features: Array | None = None, positions: Array | None = None) -> Array:
        """Token embeddings with the image placeholders replaced, in order, by image tokens."""
        del positions
        embeds = self.language_model.embed(input_ids)
        if image_features is None:
            return embeds
        return merge_image_features(embeds, input_ids, image_features, self.config.image_token_id)

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
        """Decoder layers [start, stop) with M-RoPE. image_span ([batch, 4], `prompt_span`):
        the states include the prompt (a prefill, a training sequence); the positions' RoPE
        coordinates follow from it, and a cache given with it stores each row's offset. Without
        it the states come after the prompt: a cache's offset shifts them (plain RoPE)."""
        if image_span is not None:
            rope = per_frequency(mrope_coordinates(positions, image_span), self.config.mrope_section)
            if cache is not None:
                cache = cache.replace(rope_offset=rope_offset(image_span))
        elif cache is not None:
            rope = positions + cache.rope_offset[:, None]
        else:
            rope = positions
        return self.language_model.run_layers(
            hidden, positions, start, stop, cache, key_mask, collect, tree, remat, rope_positions=rope
        )


def init_imitation(config: Qwen25VLConfig, rng: Array, dtype=jnp.float32):
    """Fresh (unboxed) imitation-network params alone (the identity draft)."""
    return init_imitation_params(
        ImitationNetwork(config.text, config.draft, dtype), config.text.hidden_size, rng, dtype
    )
