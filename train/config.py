"""Typed, frozen training configs and `key=value` overrides.

A config file is Python that defines `get_config(arg: str | None)` and returns a
`TrainConfig`; the named ones are the modules of the configs package (configs/NAME.py).
The CLI applies dotted overrides on top of it, converting each value to the type of the
field it replaces:

    python -m train.run --config configs/demo.py:refine steps=50 optim.learning_rate=3e-4 \
        model.text.num_layers=4 mesh.tensor=2 refine.disagreement_weight=2 trainable=imitation/.*

Unknown keys fail with the list of keys that exist, so a typo never trains a different
model silently.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

from fastvlm_jax.nn.config import ConfigError as LibraryConfigError
from fastvlm_jax.nn.config import DraftConfig
from fastvlm_jax.nn.layers import REMAT_POLICIES
from fastvlm_jax.nn.llava import LlavaConfig
from fastvlm_jax.runtime.sharding import MeshConfig

Stage = Literal["base", "imitation", "refine", "eagle"]
STAGES: tuple[str, ...] = typing.get_args(Stage)
ComputeDtype = Literal["float32", "bfloat16"]
ImagePreset = Literal["clip", "siglip"]  # train.input.default_image_config

# Which parameters each stage trains by default (regexes over '/'-joined param paths).
# The draft stages leave the VLM frozen, so the full model's outputs never change.
DEFAULT_TRAINABLE: dict[str, tuple[str, ...]] = {
    "base": ("vision_tower/.*", "projector/.*", "language_model/.*"),
    "imitation": ("imitation/.*",),
    "refine": ("imitation/.*",),
    "eagle": ("eagle/.*",),
}

# The parameter subtree each draft stage may train (the rest of the VLM stays frozen).
DRAFT_STAGE_PARAMS: dict[str, str] = {"imitation": "imitation", "refine": "imitation", "eagle": "eagle"}

# The configs package: a config file in it is imported as the module configs.NAME.
CONFIGS_PACKAGE = "configs"

# Keys of the flat layout before the stage groups, for a one-line hint in the error.
RENAMED_KEYS = {
    "refine_max_new_tokens": "refine.max_new_tokens",
    "loss.refine_disagreement_weight": "refine.disagreement_weight",
    "eagle_hidden_size": "eagle.hidden_size",
    "eagle_image_pool": "eagle.image_pool",
    "eagle_compressor": "eagle.compressor",
    "eagle_reinit": "eagle.reinit",
    "loss.eagle_ce_weight": "eagle.ce_weight",
    "loss.eagle_feature_weight": "eagle.feature_weight",
    "loss.eagle_unroll_steps": "eagle.unroll_steps",
}


class ConfigError(LibraryConfigError):
    """A training config or override is invalid.

    The model library's ConfigError (bad model configs) is its base, so `except` on the
    library's class catches both; train.run reports this one as a usage error (exit 2).
    """


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they become prompts.

    name: a TFDS dataset of ours, "name[/config][:version]" (see fastvlm_jax.data.tfds_builders).
    synthetic_num_train: for synthetic_captions only: when > 0, generate a build with this many
      training images (if missing) instead of reading a pre-built config.
    question: the user turn of the LLaVA prompt; the caption is the assistant's answer.
    caption_index: -1 trains on a random reference caption per example per epoch; k >= 0
      always on reference k, so the question gets one consistent answer style (the demo
      uses the synthetic set's long multi-sentence description, where SSD pays off most).
    worker_count: grain worker processes (0 reads in the training process).
    read_threads: grain reader threads (record fetching, not transforms).

    For families whose images keep their size (Qwen2.5-VL; fixed-size families ignore both):
    image_patches: the patch rows every image is padded to, one shape for the whole run (0:
      the model's max_image_tokens x merge_size^2, the checkpoint processor's largest image).
      A multiple of merge_size^2; the longest prompt has image_patches / merge_size^2 image
      tokens, and seq_len must hold it plus the caption.
    image_overflow: an image with more patches than image_patches: 'resize' shrinks it by the
      processor's own rule (max_pixels lowered to the budget: aspect ratio kept, as many
      tokens as fit), so one outsized image in a data set of millions does not stop a run;
      'error' stops with the image's id (for runs that must train on exactly decoding's inputs).
    """

    name: str = "synthetic_captions/tiny"
    split: str = "train"
    data_dir: str | None = None
    synthetic_num_train: int = 0
    synthetic_image_size: int = 64
    question: str = "Describe the image."
    caption_index: int = -1
    worker_count: int = 0
    read_threads: int = 4
    image_patches: int = 0
    image_overflow: Literal["resize", "error"] = "resize"

    def __post_init__(self):
        if self.image_patches < 0:
            raise ConfigError(f"data.image_patches={self.image_patches} must be >= 0 (0: the model's largest image)")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """path: a tokenizer folder. Empty: take the init_from checkpoint's; with no checkpoint,
    train a sentencepiece model on the synthetic caption corpus (deterministic), which is
    how the from-scratch demo gets its tokenizer."""

    path: str = ""
    train_vocab_size: int = 512
    train_corpus_size: int = 20000
    byte_fallback: bool = True


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup + cosine decay to `end_lr_factor * learning_rate`."""

    learning_rate: float = 1e-3
    warmup_steps: int = 100
    end_lr_factor: float = 0.1
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 1.0  # 0 disables clipping


@dataclasses.dataclass(frozen=True)
class ImitationLossConfig:
    """The imitation network's loss, in the imitation and refine stages (the base stage
    uses plain cross-entropy, the eagle stage EagleStageConfig's loss).

    cos: weight of 1 - cos(imitation(h_exit), h_last); kd: of T^2 * KL(full/T || draft/T)
    at T = temperature; ce: of the cross-entropy of the draft logits on the labels.
    """

    cos: float = 1.0
    kd: float = 1.0
    ce: float = 0.1
    temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    """The refine stage: the imitation loss on the frozen full model's own greedy sequences
    (generated once before training, train/refine.py).

    max_new_tokens: most tokens the full model generates per example (0: fill seq_len).
    disagreement_weight: positions where the draft's argmax differs from the full model's
      count this many times in the loss (1 disables the reweighting).
    decode_tensor: the pre-pass generates on a (data, tensor=decode_tensor) mesh over the
      same devices, the weights resharded to it once: greedy decoding reads every weight for
      each token, which on an FSDP training mesh means all-gathering them per token. 0:
      generate on the training mesh.
    """

    max_new_tokens: int = 0
    disagreement_weight: float = 4.0
    decode_tensor: int = 0


@dataclasses.dataclass(frozen=True)
class EagleStageConfig:
    """The eagle stage: trains an EAGLE head (fastvlm_jax.nn.eagle) on the frozen VLM.

    The head: the stage adds one of these settings to an `init_from` checkpoint without a
    head. They are the model's draft.eagle_hidden_size / eagle_image_pool / eagle_compressor
    (fastvlm_jax.nn.config.DraftConfig, which validates them): FFN width (0 -> the decoder's),
    image tokens per head cache slot, 'pool' or 'prune'. A checkpoint that has a head
    already must have these settings and its head is trained further, unless `reinit`,
    which replaces it by a fresh head of these settings.

    The loss (SpecVLM's online distillation): soft-label cross-entropy of the head's logits
    against the full model's distribution of the same token (at `temperature`, scaled by
    T^2 like the imitation loss's kd), plus Smooth L1 (delta 1, mean over features) between
    the predicted and the full model's next last-layer feature, at SpecVLM's weights (CE 1,
    L1 0.1). The last-layer features are unnormalised and both consumers of a predicted
    feature (the final norm, the head's own input norm) are scale-free, so a large L1
    weight lets the feature term drive most of the clipped gradient.

    unroll_steps: drafting feeds the head its own predicted features (from the second
    drafted token on, its input is a prediction, not the full model's). With n, the head is
    also trained on n - 1 further passes whose input features are its previous pass's
    predictions (one position back, gradient stopped), each scored like the first (the idea
    of EAGLE-3's training-time test, without its special masks).
    """

    hidden_size: int = 0
    image_pool: int = 1
    compressor: Literal["pool", "prune"] = "pool"
    reinit: bool = False
    ce_weight: float = 1.0
    feature_weight: float = 0.1
    temperature: float = 1.0
    unroll_steps: int = 1

    def __post_init__(self):
        if self.hidden_size < 0:
            raise ConfigError(f"eagle.hidden_size={self.hidden_size} must be >= 0 (0: the decoder's FFN width)")
        try:
            self.head(DraftConfig())
        except LibraryConfigError as err:
            raise ConfigError(
                f"eagle: {err} (eagle.image_pool and eagle.compressor set the head's "
                "draft.eagle_image_pool and draft.eagle_compressor)"
            ) from None

    def head_settings(self) -> dict[str, Any]:
        """The head as DraftConfig fields."""
        return dict(
            eagle_layers=1,
            eagle_hidden_size=self.hidden_size,
            eagle_image_pool=self.image_pool,
            eagle_compressor=self.compressor,
        )

    def head(self, draft: DraftConfig) -> DraftConfig:
        """`draft` with this head (DraftConfig validates it)."""
        return dataclasses.replace(draft, **self.head_settings())


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = 1000  # steps; 0 saves only at the end and on SIGTERM
    save_final: bool = True  # also save at the last step (a finished run then resumes as done)
    keep: int = 3
    async_save: bool = True
    export: bool = True  # write workdir/export in our checkpoint format at the end


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: a stage of the recipe.

    model: the VLM to build from scratch (seeded), or None with `init_from` set.
      model.text.vocab_size == 0 means "the tokenizer's size, rounded up to a multiple of
      128", and then image_token_id is taken from the tokenizer too.
    init_from: a checkpoint in our format (fastvlm_jax.ckpt.checkpoint) to start from. Frozen
      parameters always come from here (or from the seed), never from a training checkpoint.
    architecture: the named architecture (fastvlm_jax.nn.architectures) that `init_from` holds;
      only `--compile-only` reads it, when the checkpoint is not on this machine.
    trainable: regexes over '/'-joined param paths ("language_model/layers_3/.*"); empty ->
      DEFAULT_TRAINABLE[stage].
    image_preset: the image preprocessing of a model built from scratch (a checkpoint
      brings its own): 'clip' or 'siglip'.
    batch_size: global batch (all hosts), split into grad_accum micro-batches per step.
    seq_len: prompt (with image tokens) + caption + EOS, right-padded / truncated.
    compute_dtype: "float32" or "bfloat16" (master weights and optimizer state stay float32).
      With bfloat16 the gradients are bfloat16 until the optimizer: on TPU the compiler
      reduces them across chips in bfloat16 and casts after the collective (as MaxText's
      bf16 runs do; the CPU backend reduces them in float32).
    remat: what each decoder layer keeps for the backward pass: "none", "full" (recompute
      the layer, keep only its input) or "dots" (keep its weight matmuls' outputs too); see
      fastvlm_jax.nn.layers.REMAT_POLICIES. Only the base stage backpropagates through the
      layers: a 7B base stage needs "full" (or "dots") to fit, the draft stages ignore it.

    What only one stage reads:
    deepen_to: base stage from init_from only: first grow the decoder to this many layers
      with new layers that start as the identity (train.deepen), then train (0: off).
    loss: the imitation and refine stages' loss weights.
    refine: the refine stage's generation and reweighting.
    eagle: the eagle stage's head and loss.
    """

    stage: Stage = "base"
    model: LlavaConfig | None = None
    init_from: str | None = None
    architecture: str = ""
    trainable: tuple[str, ...] = ()
    data: DataConfig = DataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    image_preset: ImagePreset = "clip"
    batch_size: int = 32
    grad_accum: int = 1
    seq_len: int = 128
    steps: int = 1000
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    seed: int = 0
    compute_dtype: ComputeDtype = "float32"
    remat: str = "none"
    log_every: int = 10
    workdir: str = ""
    deepen_to: int = 0
    loss: ImitationLossConfig = ImitationLossConfig()
    refine: RefineConfig = RefineConfig()
    eagle: EagleStageConfig = EagleStageConfig()

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"stage={self.stage!r}: use one of {STAGES}")
        if self.model is None and not self.init_from:
            raise ConfigError("set `model` (train from scratch) or `init_from` (a checkpoint)")
        if self.stage != "base" and not self.init_from:
            raise ConfigError(f"stage {self.stage!r} trains the draft of a trained VLM: set init_from")
        if self.deepen_to and (self.stage != "base" or not self.init_from):
            raise ConfigError("deepen_to grows a trained checkpoint in the base stage: set init_from and stage='base'")
        if self.compute_dtype not in typing.get_args(ComputeDtype):
            raise ConfigError(f"compute_dtype={self.compute_dtype!r}: use one of {typing.get_args(ComputeDtype)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size={self.batch_size} is not a multiple of grad_accum={self.grad_accum}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat={self.remat!r}: use one of {tuple(REMAT_POLICIES)}")
        if self.image_preset not in typing.get_args(ImagePreset):
            raise ConfigError(f"image_preset={self.image_preset!r}: use one of {typing.get_args(ImagePreset)}")

    @property
    def trainable_patterns(self) -> tuple[str, ...]:
        return self.trainable or DEFAULT_TRAINABLE[self.stage]

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------
# Config files and overrides
# ---------------------------------------------------------------------------------------


def load_config_file(spec: str) -> TrainConfig:
    """ "path/to/config.py[:arg]" -> get_config(arg) (big_vision's convention)."""
    path, _, arg = spec.partition(":")
    module = config_module(Path(path))
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} does not define get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not TrainConfig")
    return config


def config_module(path: Path) -> types.ModuleType:
    """The module of config file `path`: configs/NAME.py of the importable configs package
    is imported as configs.NAME (once per process, like any module; its sibling imports
    are that package's); any other file is loaded from its path."""
    if not path.is_file():
        raise ConfigError(f"no config file {path}")
    name = f"{CONFIGS_PACKAGE}.{path.stem}"
    if path.parent.name == CONFIGS_PACKAGE and path.stem.isidentifier():
        found = importlib.util.find_spec(name)
        if found is not None and found.origin and Path(found.origin).resolve() == path.resolve():
            return importlib.import_module(name)
    module_spec = importlib.util.spec_from_file_location("_train_config", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def parse_overrides(args: list[str]) -> dict[str, str]:
    out = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {arg!r} is not of the form key=value")
        out[key.strip()] = value
    return out


def apply_overrides(config: Any, overrides: dict[str, str]) -> Any:
    """Returns `config` with dotted `key=value` overrides applied (values are strings).

    All overrides are applied at once, bottom-up, so fields that are validated together
    (num_layers and exit_layer) may change together.
    """
    tree: dict[str, Any] = {}
    for key, value in overrides.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with another override")
        node[parts[-1]] = value
    return _apply(config, tree, "")


def _apply(config: Any, tree: dict[str, Any], prefix: str) -> Any:
    if not dataclasses.is_dataclass(config):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} is {config!r}: it has no fields to override")
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    changes = {}
    for name, value in tree.items():
        if name not in fields:
            if prefix + name in RENAMED_KEYS:
                raise ConfigError(f"config key {prefix + name!r} is now {RENAMED_KEYS[prefix + name]!r}")
            where = f"keys of {prefix.rstrip('.')}" if prefix else "top-level keys"
            raise ConfigError(f"unknown config key {prefix + name!r}; {where} are: {sorted(fields)}")
        current = getattr(config, name)
        if isinstance(value, dict):
            changes[name] = _apply(current, value, f"{prefix}{name}.")
        else:
            if dataclasses.is_dataclass(current):
                raise ConfigError(
                    f"{prefix + name!r} is a group of settings; set its fields, e.g. "
                    f"{prefix + name}.{dataclasses.fields(current)[0].name}=..."
                )
            changes[name] = convert(value, hints[name], prefix + name)
    try:
        return dataclasses.replace(config, **changes)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"overrides of {prefix.rstrip('.') or 'the config'} are invalid: {e}") from None


_NONE = ("none", "null", "")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def convert(text: str, annotation: Any, key: str = "value") -> Any:
    """Parses `text` as a value of type `annotation` (bool/int/float/str, Optional, Union,
    Literal, tuple[X, ...] as comma-separated items)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in _NONE:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(text, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}={text!r} matches none of {annotation}: {'; '.join(errors)}")
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ConfigError(f"{key}={text!r}: choose one of {list(args)}")
    if origin is tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(t, args[0], key) for t in items)
        if len(items) != len(args):
            raise ConfigError(f"{key}={text!r}: expected {len(args)} comma-separated values")
        return tuple(convert(t, a, key) for t, a in zip(items, args))
    if annotation is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{key}={text!r} is not a boolean (true/false)")
    if annotation in (int, float):
        try:
            value = float(text) if annotation is float else int(text, 0)
        except ValueError:
            raise ConfigError(f"{key}={text!r} is not {annotation.__name__}") from None
        return value
    if annotation is str:
        return text
    if annotation is Any:
        return text
    raise ConfigError(f"{key}: cannot parse values of type {annotation}")
