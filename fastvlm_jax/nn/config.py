"""Typed, frozen configs every model family builds on: the vision tower, the decoder, the
draft path, and what a family's top-level config offers (`FamilyConfig`).

A checkpoint stores its family config's `to_dict()` as JSON; `from_dict` reads it back and
rejects unknown keys, so a mismatched config fails loudly instead of silently building a
different model. The family configs live with their families (`fastvlm_jax.nn.llava.LlavaConfig`,
`fastvlm_jax.nn.blip2.Blip2Config`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Literal, Protocol, TypeVar

VisionKind = Literal["clip", "siglip"]
ImitationKind = Literal["ffn", "layer"]
SelectStrategy = Literal["default", "full"]


class ConfigError(ValueError):
    """A config value is missing, unknown or inconsistent."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A ViT image encoder (CLIP or SigLIP flavour)."""

    kind: VisionKind = "clip"
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_class_token(self) -> bool:
        # CLIP prepends a learned CLS token and normalises before the encoder; SigLIP does neither.
        return self.kind == "clip"


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """A LLaMA-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU."""

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # bias on q, k, v and o (LLaMA's option)
    qkv_bias: bool = False  # bias on q, k, v only (Qwen2-style)
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def position_limit(self) -> None:
        """None: RoPE has no position table to run past (OPT's learned one has a limit)."""
        return None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """The draft path: decoder layers [0, exit_layer) + imitation network + shared head.

    kind="ffn": one gated-FFN residual block (cheap, no cache of its own).
    kind="layer": one full decoder layer with its own KV cache.
    hidden_size: the FFN width of the imitation network (0 -> the decoder's intermediate size).

    The EAGLE-style head (fastvlm_jax.nn.eagle), a second drafter on the same model:
    eagle_layers: 1 gives the model an EAGLE head (params under 'eagle'), 0 none.
    eagle_hidden_size: its FFN width (0 -> the decoder's intermediate size).
    eagle_image_pool: its visual compressor: one cache entry per this many consecutive
      image tokens (1 = every image token), combined by eagle_compressor 'pool' (mean)
      or 'prune' (the first).
    """

    exit_layer: int = 2
    kind: ImitationKind = "ffn"
    hidden_size: int = 0
    eagle_layers: int = 0
    eagle_hidden_size: int = 0
    eagle_image_pool: int = 1
    eagle_compressor: Literal["pool", "prune"] = "pool"

    def __post_init__(self):
        if self.eagle_layers not in (0, 1):
            raise ConfigError(f"draft.eagle_layers={self.eagle_layers}: use 0 (no EAGLE head) or 1")
        if self.eagle_image_pool < 1:
            raise ConfigError(f"draft.eagle_image_pool={self.eagle_image_pool} must be >= 1")
        if self.eagle_compressor not in ("pool", "prune"):
            raise ConfigError(f"draft.eagle_compressor={self.eagle_compressor!r}: use 'pool' or 'prune'")


_ConfigT = TypeVar("_ConfigT", bound="ModelConfigMixin")


class ModelConfigMixin:
    """replace / with_draft / JSON for the top-level model configs (LLaVA, BLIP-2).

    Mixed into frozen dataclasses: the annotations below (no values, so no fields) tell the
    type checker what those dataclasses provide.
    """

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]
    SUB_CONFIGS: ClassVar[dict[str, type]]  # field name -> the config class of that field
    draft: DraftConfig
    text: Any  # the family's decoder config (DecoderConfig)

    def replace(self: _ConfigT, **changes) -> _ConfigT:
        return dataclasses.replace(self, **changes)

    def check_exit_layer(self) -> None:
        """Raises ConfigError unless the draft exits inside the decoder: 1 <= exit_layer < L."""
        num_layers = self.text.num_layers
        if not 1 <= self.draft.exit_layer < num_layers:
            raise ConfigError(
                f"draft.exit_layer={self.draft.exit_layer} must be in [1, {num_layers - 1}] "
                f"for a decoder of {num_layers} layers"
            )

    def with_draft(self: _ConfigT, **changes) -> _ConfigT:
        return dataclasses.replace(self, draft=dataclasses.replace(self.draft, **changes))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[_ConfigT], data: dict[str, Any]) -> _ConfigT:
        """Builds the config, sub-configs included; unknown keys raise ConfigError."""
        data = dict(data)
        for key, sub_cls in cls.SUB_CONFIGS.items():
            if key in data:
                data[key] = _build(sub_cls, data[key], key)
        return _build(cls, data, "model")


class VisionTowerConfig(Protocol):
    """What the code above the family modules reads of a family's vision config
    (VisionConfig, fastvlm_jax.nn.blip2.Blip2VisionConfig, fastvlm_jax.nn.qwen_vision.QwenVisionConfig).

    image_size / num_patches: the fixed square input of the towers that have one; a tower that
    keeps images near their own size (Qwen2.5-VL's) has neither, and says so when asked."""

    @property
    def image_size(self) -> int: ...

    @property
    def patch_size(self) -> int: ...

    @property
    def num_channels(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def intermediate_size(self) -> int: ...

    @property
    def num_layers(self) -> int: ...

    @property
    def num_heads(self) -> int: ...

    @property
    def num_patches(self) -> int: ...


class DecoderConfig(Protocol):
    """What the code above the family modules reads of a family's language model config
    (TextConfig, fastvlm_jax.nn.blip2.OPTConfig)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def intermediate_size(self) -> int: ...

    @property
    def num_layers(self) -> int: ...

    @property
    def num_heads(self) -> int: ...

    @property
    def num_kv_heads(self) -> int: ...

    @property
    def resolved_head_dim(self) -> int: ...

    @property
    def max_position_embeddings(self) -> int: ...

    @property
    def position_limit(self) -> int | None: ...

    @property
    def tie_word_embeddings(self) -> bool: ...

    @property
    def hidden_act(self) -> str: ...


class FamilyConfig(Protocol):
    """What every family's top-level config offers (LlavaConfig, Blip2Config): the code above
    the family modules (the VLM handle, the engine, checkpoints, training) reads only these.
    (Read-only: the configs are frozen dataclasses.)"""

    @property
    def model_type(self) -> str: ...

    @property
    def vision(self) -> VisionTowerConfig: ...

    @property
    def text(self) -> DecoderConfig: ...

    @property
    def draft(self) -> DraftConfig: ...

    @property
    def image_token_id(self) -> int: ...

    @property
    def num_image_tokens(self) -> int: ...

    @property
    def quantization(self) -> str | None: ...

    def replace(self, **changes) -> FamilyConfig: ...

    def with_draft(self, **changes) -> FamilyConfig: ...

    def to_dict(self) -> dict[str, Any]: ...


def _build(cls, data: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {where} config keys {unknown}; known: {sorted(names)}")
    return cls(**data)
