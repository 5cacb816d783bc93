"""Batch captioning on top of the decoding engine: checkpoint in, captions and statistics out.

    captioner = Captioner("/path/to/ckpt", batch_size=8)
    results = captioner.caption(["a.jpg", "b.png"], max_new_tokens=64, mode="ssd")
    results[0].caption, results[0].token_ids

Shapes are kept to a few so that a long run compiles a handful of programs:
- every batch has exactly `batch_size` rows: a short batch is filled with dummy rows whose
  token budget is 0 (they finish at prefill, add nothing to the statistics, and are dropped);
- prompts are right-padded to a multiple of `prompt_bucket` tokens;
- the engine's token capacity is `max_new_tokens` rounded up to a power of two (at least
  16), so different budgets share programs (the budget itself is a traced value).

Timing: the first batch of each new program shape is preceded by a warm-up call with every
token budget 0 (it compiles and runs a prefill); its time is reported as `compile_seconds`,
never in `seconds`, so tokens/s measures decoding, not XLA.

Statistics (`BatchStats`, `summarize`): tokens counts every generated id (EOS included);
a "round" is one full-model call after the prefill (AR: one token; SSD: one verification
of up to draft_len drafted tokens, emitting accepted + 1 tokens).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate
from decode.engine.autodraft import AutoDraft, AutoDraftConfig, Choice, choice_label, is_tree
from decode.engine.drafters import EagleDrafter, ImitationDrafter, ModelDrafter
from decode.engine.loop import Mode
from decode.engine.sampling import SamplingConfig
from decode.engine.slots import Finished, Request, SlotEngine, default_prefill_rows, slot_choices
from decode.engine.tree import TreeShape
from fastvlm_jax import demo
from fastvlm_jax.ckpt.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from fastvlm_jax.image.patches import PatchImages, batch_pixels, padded_image, patch_buckets
from fastvlm_jax.image.processing import ImageSource, preprocess_image
from fastvlm_jax.image.qwen_vl import QwenImageProcessorConfig
from fastvlm_jax.image.qwen_vl import preprocess as preprocess_patches
from fastvlm_jax.nn.families import DEFAULT_QUESTIONS, default_question, prompt_ids_for, stop_ids
from fastvlm_jax.nn.model import VLM, cast_params, params_dtype
from fastvlm_jax.nn.quant import quantize_model
from fastvlm_jax.runtime.sharding import data_sharding, shard_params
from fastvlm_jax.text.prompts import check_image_token_id

# LLaVA's question for a caption: the same one the training recipe uses (train.config's
# default `question`), so a model trained here answers with a caption. A prompt of None means
# the model family's default (fastvlm_jax.nn.families: this for LLaVA, no question for BLIP-2).
DEFAULT_PROMPT = DEFAULT_QUESTIONS["llava"]
DEFAULT_MAX_NEW_TOKENS = 64
MIN_CAPACITY = 16


def round_up(value: int, multiple: int) -> int:
    return -(-int(value) // int(multiple)) * int(multiple)


def capacity_bucket(max_new_tokens: int) -> int:
    """Engine capacity for a token budget: the next power of two, at least MIN_CAPACITY."""
    return max(MIN_CAPACITY, 1 << max(int(max_new_tokens) - 1, 0).bit_length())


@functools.lru_cache(maxsize=8)
def shared_model(config, dtype=jnp.float32) -> VLM:
    """One VLM object per (config, dtype).

    The engine's jit takes the model as a static argument, hashed by identity: reusing the
    object lets a second Captioner of the same model (e.g. decode.run called again in one
    process) reuse the compiled programs instead of compiling them again.
    """
    return VLM(config, dtype)


@dataclasses.dataclass(frozen=True)
class CaptionResult:
    """One image's caption.

    token_ids: the generated ids (prompt excluded, EOS included when reached).
    stop: "eos" (the model ended the caption) or "length" (max_new_tokens reached).
    rounds: full-model calls after the prefill; drafted / accepted: SSD draft tokens proposed
      and accepted by the full model (0 in AR mode).
    seconds: wall time of the whole batch this image was decoded in (compilation excluded).
    """

    caption: str
    token_ids: tuple[int, ...]
    num_tokens: int
    stop: str
    rounds: int
    drafted: int
    accepted: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """Counts of one or more batches (real rows only); add them with `+`.

    first_tokens: rows that got at least one token (each image's first token comes from the
      prefill, not from a round).
    position_attempts[j] / position_accepts[j]: SSD draft tokens proposed at draft position j
      and accepted there (with a draft tree: at depth j + 1).
    verified: positions the full model scored in the rounds (a round scores draft_len + 1,
      or tree nodes + 1, whatever it accepts; 1 in AR).
    """

    images: int = 0
    tokens: int = 0
    first_tokens: int = 0
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0
    position_attempts: tuple[int, ...] = ()
    position_accepts: tuple[int, ...] = ()
    verified: int = 0
    # With auto draft lengths: each batch's choice (a chain's length, or 'tree:NODESxWIDTH').
    draft_lens: tuple[int | str, ...] = ()
    # Continuous batching with auto draft lengths: (choice, rounds run with it) pairs.
    draft_len_rounds: tuple[tuple[int | str, int], ...] = ()
    # Slot-rounds the programs ran (batch rows x rounds), and those of a row still decoding a
    # real image (each emits at least one token): slot utilization = busy / slot_rounds.
    slot_rounds: int = 0
    busy_rounds: int = 0
    # Continuous batching: requests inserted into slots, prefill calls, and the seconds of
    # prefill + insert (inside `seconds`).
    inserts: int = 0
    prefills: int = 0
    prefill_seconds: float = 0.0

    def __add__(self, other: BatchStats) -> BatchStats:
        def add_lists(a, b):
            width = max(len(a), len(b))
            a, b = list(a) + [0] * (width - len(a)), list(b) + [0] * (width - len(b))
            return tuple(x + y for x, y in zip(a, b))

        return BatchStats(
            images=self.images + other.images,
            tokens=self.tokens + other.tokens,
            first_tokens=self.first_tokens + other.first_tokens,
            rounds=self.rounds + other.rounds,
            drafted=self.drafted + other.drafted,
            accepted=self.accepted + other.accepted,
            seconds=self.seconds + other.seconds,
            compile_seconds=self.compile_seconds + other.compile_seconds,
            position_attempts=add_lists(self.position_attempts, other.position_attempts),
            position_accepts=add_lists(self.position_accepts, other.position_accepts),
            verified=self.verified + other.verified,
            draft_lens=self.draft_lens + other.draft_lens,
            draft_len_rounds=_merge_counts(self.draft_len_rounds, other.draft_len_rounds),
            slot_rounds=self.slot_rounds + other.slot_rounds,
            busy_rounds=self.busy_rounds + other.busy_rounds,
            inserts=self.inserts + other.inserts,
            prefills=self.prefills + other.prefills,
            prefill_seconds=self.prefill_seconds + other.prefill_seconds,
        )


def _merge_counts(a: tuple[tuple[Any, int], ...], b: tuple[tuple[Any, int], ...]) -> tuple[tuple[Any, int], ...]:
    merged = dict(a)
    for key, count in b:
        merged[key] = merged.get(key, 0) + count
    return tuple(merged.items())


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator) / float(denominator) if denominator else None


def accepted_depth_histogram(rounds: int, position_accepts: Sequence[int]) -> list[int]:
    """Rounds by the number of drafted tokens they accepted (and emitted), 0..len(position_accepts).

    A round that accepts a draft of depth a counts once at each position 0..a-1, so the
    rounds accepting at least j + 1 are position_accepts[j]."""
    at_least = [rounds] + [int(x) for x in position_accepts] + [0]
    return [at_least[d] - at_least[d + 1] for d in range(len(at_least) - 1)]


def summarize(stats: BatchStats | Iterable[BatchStats]) -> dict[str, Any]:
    """Derived statistics (JSON-ready; None where undefined, e.g. acceptance in AR mode).

    tokens_per_s: tokens / seconds (seconds exclude compilation).
    mean_accepted_length: tokens per full-model call including the full model's own (bonus /
      correction) token: (tokens - first tokens) / rounds. 1.0 for AR.
    mean_accepted_length_no_bonus: accepted draft tokens per round (the other convention).
    acceptance_rate: accepted / drafted.
    full_model_calls: rounds + one prefill per image.
    tokens_per_full_model_call: tokens / full_model_calls (the prefill's calls included).
    nodes_verified_per_call: positions the full model scored per round (draft_len + 1 for a
      chain, tree nodes + 1 for a tree, 1 for AR).
    acceptance_per_position[j]: acceptance rate of the j-th drafted token of a round (trees:
      of a node at depth j + 1 on the accepted path, given the tree reached that depth).
    accepted_depth_histogram[a]: rounds that accepted exactly a drafted tokens.
    draft_len_per_batch / draft_len_rounds: auto draft lengths' choice per static batch / the
      rounds run with each choice under continuous batching.
    slot_utilization: slot-rounds that decoded a real image (and so emitted a token) over all
      slot-rounds run; inserts / prefills / prefill_share: continuous batching's refills, its
      prefill calls, and their share of `seconds`.
    """
    if not isinstance(stats, BatchStats):
        stats = sum(stats, BatchStats())
    return {
        "images": stats.images,
        "tokens": stats.tokens,
        "seconds": stats.seconds,
        "compile_seconds": stats.compile_seconds,
        "tokens_per_s": _ratio(stats.tokens, stats.seconds),
        "images_per_s": _ratio(stats.images, stats.seconds),
        "mean_tokens_per_image": _ratio(stats.tokens, stats.images),
        "mean_accepted_length": _ratio(stats.tokens - stats.first_tokens, stats.rounds),
        "mean_accepted_length_no_bonus": _ratio(stats.accepted, stats.rounds),
        "acceptance_rate": _ratio(stats.accepted, stats.drafted),
        "full_model_calls": stats.rounds + stats.images,
        "tokens_per_full_model_call": _ratio(stats.tokens, stats.rounds + stats.images),
        "nodes_verified_per_call": _ratio(stats.verified, stats.rounds),
        "rounds": stats.rounds,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "acceptance_per_position": [_ratio(a, n) for a, n in zip(stats.position_accepts, stats.position_attempts)],
        "position_attempts": list(stats.position_attempts),
        "position_accepts": list(stats.position_accepts),
        "accepted_depth_histogram": accepted_depth_histogram(stats.rounds, stats.position_accepts),
        "draft_len_per_batch": list(stats.draft_lens),
        "draft_len_rounds": {str(choice): rounds for choice, rounds in stats.draft_len_rounds},
        "slot_utilization": _ratio(stats.busy_rounds, stats.slot_rounds),
        "inserts": stats.inserts,
        "prefills": stats.prefills,
        "prefill_share": _ratio(stats.prefill_seconds, stats.seconds),
    }


@dataclasses.dataclass(frozen=True)
class BatchResult:
    results: list[CaptionResult]
    stats: BatchStats


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """How to decode: everything but the images and prompts.

    mode: 'ssd' (self-speculative) or 'ar' (plain autoregressive with the full model).
    sampling: temperature 0 (default) is greedy; SSD output then equals AR output exactly.
    policy: SSD draft length and early stopping (ignored in AR mode).
    tree: SSD draft tree (nodes 0, the default, drafts a chain by `policy`).
    auto_draft: SSD chooses each batch's setting among auto_draft.choices (chain lengths,
      0 for AR rounds, and draft trees) from measured costs and running acceptance
      (decode.engine.autodraft); `policy` and `tree` are then not used.
    """

    mode: Mode = "ssd"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: SamplingConfig = SamplingConfig()
    policy: DraftPolicy = DraftPolicy()
    tree: TreeShape = TreeShape()
    auto_draft: AutoDraftConfig | None = None

    def __post_init__(self):
        if self.mode not in ("ssd", "ar"):
            raise ValueError(f"unknown mode {self.mode!r}: use 'ssd' or 'ar'")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def check_same_tokenizer(tokenizer, other, where) -> None:
    """Raises CheckpointError unless `other` maps every id to the same piece as `tokenizer`
    (a draft model's tokens are verified by id)."""
    if other is None:
        raise CheckpointError(f"draft model {where} has no tokenizer/ folder")
    if other.vocab_size != tokenizer.vocab_size or any(
        other.id_to_piece(i) != tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)
    ):
        raise CheckpointError(
            f"draft model {where} has a different tokenizer from the checkpoint: a draft "
            "model must share its tokenizer (same ids for the same pieces)"
        )


def describe_device() -> str:
    """e.g. "cpu (cpu) x8" or "gpu (NVIDIA H100 80GB HBM3) x1"."""
    devices = jax.devices()
    return f"{devices[0].platform} ({devices[0].device_kind}) x{len(devices)}"


class Captioner:
    """A loaded checkpoint that captions images in fixed-shape batches.

    Args:
      checkpoint: a checkpoint directory or an already loaded `Checkpoint`.
      batch_size: rows per engine call (short batches are padded with dummy rows).
      prompt_bucket: prompts are right-padded to a multiple of this many tokens.
      mesh: a ('data', 'fsdp', 'tensor') Mesh: params are laid out by their logical axes
        (an already loaded checkpoint is resharded) and each batch's rows are split over
        data x fsdp, which must divide batch_size.
      dtype: the params' and compute dtype (e.g. 'bfloat16'); None: the checkpoint's own.
        Activations and the KV cache follow it; logits and acceptance stay float32.
      drafter: what drafts SSD rounds (decode.engine.drafters): 'imitation' (the draft path of the
        checkpoint), 'eagle' (its EAGLE head), or 'model:CKPT' (a separate small VLM with the
        same tokenizer and image preprocessing; CKPT a folder or `demo-draft`).
      quantize: 'int8' quantizes the checkpoint's decoding weights after loading
        (fastvlm_jax.nn.quant; a separate draft model stays as it is).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike | Checkpoint,
        *,
        batch_size: int = 8,
        prompt_bucket: int = 32,
        mesh=None,
        dtype=None,
        drafter: str = "imitation",
        quantize: str | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mesh is not None and batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
            raise ValueError(
                f"batch_size {batch_size} does not divide over the mesh's data x fsdp "
                f"= {mesh.shape['data'] * mesh.shape['fsdp']} devices"
            )
        if not isinstance(checkpoint, Checkpoint):
            checkpoint = load_checkpoint(checkpoint, mesh=mesh, dtype=dtype)
        else:
            if dtype is not None:
                checkpoint = checkpoint._replace(params=cast_params(checkpoint.params, dtype))
            if mesh is not None:
                checkpoint = checkpoint._replace(
                    params=shard_params(VLM(checkpoint.config).abstract_params(), checkpoint.params, mesh)
                )
        if quantize is not None:
            config, params = quantize_model(checkpoint.config, checkpoint.params, quantize)
            if mesh is not None:
                params = shard_params(VLM(config).abstract_params(), params, mesh)
            checkpoint = checkpoint._replace(config=config, params=params)
        config = checkpoint.config
        if checkpoint.tokenizer is None:
            raise CheckpointError("the checkpoint has no tokenizer/ folder: captioning needs one")
        if checkpoint.image_config is None:
            raise CheckpointError("the checkpoint has no preprocessor.json: captioning needs it")
        tokenizer = checkpoint.tokenizer
        check_image_token_id(tokenizer, config.image_token_id, CheckpointError)
        # Images kept near their own size (Qwen2.5-VL) become as many tokens as their size gives.
        self.sized_images = isinstance(checkpoint.image_config, QwenImageProcessorConfig)
        _check_image_config(config, checkpoint.image_config)
        self.checkpoint = checkpoint
        self.config = config
        self.params = checkpoint.params
        self.tokenizer = tokenizer
        self.image_config = checkpoint.image_config
        self.dtype = params_dtype(self.params)
        self.model = shared_model(config, self.dtype)
        self.drafter, self.draft_params = self._load_drafter(drafter, mesh)
        self.mesh = mesh
        self.batch_size = int(batch_size)
        self.prompt_bucket = int(prompt_bucket)
        self._warm: set[tuple] = set()  # program shapes already compiled (see _warm_up)
        self._prompt_ids: dict[tuple[str, int], tuple[int, ...]] = {}  # (question, image tokens) -> ids
        self._engine: SlotEngine | None = None  # the last continuous-batching engine
        self.auto_draft: AutoDraft | None = None  # the state of auto draft lengths, once used

    def _load_drafter(self, drafter: str, mesh):
        """'imitation' | 'eagle' | 'model:CKPT' -> (decode.engine.drafters drafter, its own params or None)."""
        if drafter == "imitation":
            return ImitationDrafter(), None
        if drafter == "eagle":
            if not self.config.draft.eagle_layers:
                raise CheckpointError(
                    "the eagle drafter needs an EAGLE head and this checkpoint has none; "
                    "train one with the 'eagle' stage of train.run (or use the imitation drafter)"
                )
            return EagleDrafter(), None
        kind, _, path = drafter.partition(":")
        if kind != "model" or not path:
            raise ValueError(f"unknown drafter {drafter!r}: use imitation, eagle or model:CKPT")
        path = demo.resolve(path)
        small = load_checkpoint(path, mesh=mesh, dtype=self.dtype)
        check_same_tokenizer(self.tokenizer, small.tokenizer, path)
        if small.image_config != self.image_config:
            raise CheckpointError(
                f"draft model {path} preprocesses images differently from the checkpoint "
                "(preprocessor.json): a draft model must read the same pixels"
            )
        if small.config.image_token_id != self.config.image_token_id:
            raise CheckpointError(
                f"draft model {path} has image token id {small.config.image_token_id}, "
                f"the checkpoint {self.config.image_token_id}: they must share the tokenizer"
            )
        model_drafter = ModelDrafter(shared_model(small.config, self.dtype))
        try:
            model_drafter.check(self.model)
        except ValueError as e:
            raise CheckpointError(f"draft model {path}: {e}") from None
        return model_drafter, small.params

    # -- inputs ------------------------------------------------------------------------------

    @property
    def default_prompt(self) -> str:
        """The question asked when none is given ("" for BLIP-2: plain captioning)."""
        return default_question(self.config.model_type)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids that end a caption (fastvlm_jax.nn.families.stop_ids)."""
        return stop_ids(self.config, self.tokenizer)

    def prompt_ids(self, prompt: str | None = None, pixels: Any = None) -> list[int]:
        """Prompt ids for one image and `prompt` (the user's question; None: `default_prompt`),
        in the model family's layout (fastvlm_jax.nn.families). pixels: the image (`preprocess`),
        needed when its size sets its token count (`sized_images`)."""
        question = self.default_prompt if prompt is None else prompt
        key = (question, self.image_tokens(pixels))
        if key not in self._prompt_ids:  # one tokenization per question and image size, not per image
            self._prompt_ids[key] = tuple(prompt_ids_for(self.config.model_type, self.tokenizer, *key))
        return list(self._prompt_ids[key])

    def image_tokens(self, pixels: Any = None) -> int:
        """How many tokens an image becomes: the config's count, or, for `sized_images`, its
        own grid's (t * h * w / merge^2; `pixels` from `preprocess`)."""
        if not self.sized_images:
            return self.config.num_image_tokens
        if not isinstance(pixels, PatchImages):
            raise ValueError("this model's images become as many tokens as their size gives: pass the image's pixels")
        return int(np.prod(np.asarray(pixels.grid))) // self.config.vision.spatial_merge_size**2

    def _bucket_length(self, prompt_ids: Sequence[Sequence[int]], images: Any) -> int:
        """The prompt length a batch pads to (before rounding to prompt_bucket): its longest
        prompt, or, for `sized_images`, its longest question with as many image tokens as the
        batch's patch rows hold, so that the width follows the patch bucket (a program per
        bucket, not per image size). images: the batch (`batch_pixels`)."""
        if not isinstance(images, PatchImages):
            return max(len(p) for p in prompt_ids)
        merge = self.config.vision.spatial_merge_size**2
        tokens = np.prod(np.asarray(images.grid)[: len(prompt_ids)], axis=1) // merge
        text = max(len(p) - int(n) for p, n in zip(prompt_ids, tokens))
        return text + images.patches.shape[1] // merge

    def longest_prompt(self, prompt: str | None = None) -> int:
        """The most tokens a prompt for `prompt` can take (the largest image, for `sized_images`)."""
        if not self.sized_images:
            return len(self.prompt_ids(prompt))
        one_token = len(self.prompt_ids(prompt, self.dummy_pixels()))
        return one_token - 1 + self.config.num_image_tokens

    @functools.cached_property
    def patch_buckets(self) -> tuple[int, ...]:
        """The patch counts images are padded to (`sized_images`; fastvlm_jax.image.patches)."""
        cfg = self.image_config
        assert isinstance(cfg, QwenImageProcessorConfig)
        largest = cfg.max_pixels // cfg.patch_size**2 // cfg.merge_size**2 * cfg.merge_size**2
        return patch_buckets(largest, smallest=64 * cfg.merge_size**2)

    def preprocess(self, image: ImageSource, *, fast_decode: bool = False) -> np.ndarray | PatchImages:
        """One image (path, bytes, PIL, array) -> float32 pixels [H, W, 3], or, for
        `sized_images`, its patches padded to their bucket (an unbatched PatchImages); raises
        ImageLoadError."""
        if self.sized_images:
            assert isinstance(self.image_config, QwenImageProcessorConfig)
            patches, grid = preprocess_patches(image, self.image_config)
            return padded_image(patches, grid, self.patch_buckets)
        return preprocess_image(image, self.image_config, fast_decode=fast_decode)

    @property
    def grouping_window(self) -> int:
        """How many loaded images static batching groups by size (`group_by_size`): four
        batches' worth for images that keep their size, one batch (arrival order) otherwise."""
        return 4 * self.batch_size if self.sized_images else self.batch_size

    @staticmethod
    def image_size(pixels: Any) -> int:
        """What `group_by_size` sorts by: an image's own patch count (0 for a fixed size)."""
        return int(np.prod(np.asarray(pixels.grid))) if isinstance(pixels, PatchImages) else 0

    def dummy_pixels(self) -> np.ndarray | PatchImages:
        """A blank image of the smallest shape (warm-up calls, dummy rows)."""
        if self.sized_images:
            merge = self.config.vision.spatial_merge_size
            patches = np.zeros((merge * merge, self.config.vision.patch_dim), np.float32)
            return padded_image(patches, (1, merge, merge), self.patch_buckets)
        size = self.config.vision.image_size
        return np.zeros((size, size, self.config.vision.num_channels), np.float32)

    # -- decoding ----------------------------------------------------------------------------

    def spec(self, options: GenerationOptions) -> DecodeSpec:
        # AR ignores the draft policy: keep it at the default so AR runs with different SSD
        # settings share one program.
        policy = options.policy if options.mode == "ssd" else DraftPolicy()
        tree = options.tree if options.mode == "ssd" else TreeShape()
        return DecodeSpec(
            mode=options.mode,
            capacity=capacity_bucket(options.max_new_tokens),
            sampling=options.sampling,
            policy=policy,
            eos_ids=self.eos_ids,
            tree=tree,
            drafter=self.drafter if options.mode == "ssd" else ImitationDrafter(),
        )

    def _prompts(self, pixels: np.ndarray | Sequence[Any], prompt_ids: Sequence[Sequence[int]]) -> tuple[Prompts, int]:
        """Pads n rows to batch_size rows and prompts to the bucket: returns (Prompts, n)."""
        n = len(prompt_ids)
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"a batch holds 1..{self.batch_size} images, got {n}")
        if len(pixels) != n:
            raise ValueError(f"{len(pixels)} images but {n} prompts")
        full = batch_pixels(list(pixels), self.batch_size)
        width = round_up(self._bucket_length(prompt_ids, full), self.prompt_bucket)
        ids = np.full((self.batch_size, width), self.tokenizer.pad_id, np.int32)
        lengths = np.zeros((self.batch_size,), np.int32)
        for row in range(self.batch_size):
            # Dummy rows repeat the first prompt: any valid prompt works, their budget is 0.
            p = prompt_ids[row] if row < n else prompt_ids[0]
            ids[row, : len(p)] = p
            lengths[row] = len(p)
        return Prompts(*self._place((ids, lengths, full))), n

    def _place(self, tree):
        """Host arrays -> device arrays, rows split over the mesh's data x fsdp devices."""
        mesh = self.mesh
        if mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return jax.tree.map(lambda x: jax.device_put(x, data_sharding(mesh, np.ndim(x))), tree)

    def _spec_with_draft_len(self, options: GenerationOptions, choice: Choice) -> DecodeSpec:
        """The program of one auto choice: a draft tree (TreeShape), a static chain of that
        length, or AR rounds for 0."""
        if is_tree(choice):
            return self.spec(dataclasses.replace(options, policy=DraftPolicy(), tree=choice, auto_draft=None))
        if choice == 0:
            return self.spec(dataclasses.replace(options, mode="ar", auto_draft=None))
        return self.spec(
            dataclasses.replace(options, policy=DraftPolicy(draft_len=choice), tree=TreeShape(), auto_draft=None)
        )

    def _auto_draft_len(
        self, prompts: Prompts, options: GenerationOptions, budget: np.ndarray, rng: jax.Array
    ) -> tuple[Choice, float]:
        """This batch's choice (a draft length or a TreeShape); the first batch of a shape
        measures every choice on it (compiling each program once). Returns (choice, seconds
        spent measuring)."""
        assert options.auto_draft is not None  # called for --draft-len auto only
        if self.auto_draft is None or self.auto_draft.config != options.auto_draft:
            self.auto_draft = AutoDraft(options.auto_draft)
        auto = self.auto_draft
        shape = (self.batch_size, prompts.input_ids.shape[1], capacity_bucket(options.max_new_tokens))
        if shape not in auto.round_seconds:
            start = time.perf_counter()

            def run(choice, full, key):
                spec = self._spec_with_draft_len(options, choice)
                begin = time.perf_counter()
                out = jax.device_get(
                    generate(
                        self.model,
                        self.params,
                        prompts,
                        spec,
                        jnp.asarray(budget if full else np.minimum(budget, 1)),
                        key,
                        draft_params=self.draft_params,
                    )
                )
                return time.perf_counter() - begin, out

            auto.calibrate(shape, run, rng)
            return auto.choose(shape), time.perf_counter() - start
        return auto.choose(shape), 0.0

    def _warm_up(self, prompts: Prompts, spec: DecodeSpec) -> float:
        """Compiles the program for these shapes (if new) with every budget 0; returns seconds."""
        key = (spec, prompts.input_ids.shape, None if prompts.pixels is None else prompts.pixels.shape)
        if key in self._warm:
            return 0.0
        start = time.perf_counter()
        out = generate(
            self.model,
            self.params,
            prompts,
            spec,
            self._place(np.zeros((self.batch_size,), np.int32)),
            jax.random.key(0),
            draft_params=self.draft_params,
        )
        jax.block_until_ready(out)
        self._warm.add(key)
        return time.perf_counter() - start

    def generate_batch(
        self,
        pixels: np.ndarray | Sequence[Any],
        prompt_ids: Sequence[Sequence[int]],
        options: GenerationOptions = GenerationOptions(),
        rng: jax.Array | None = None,
    ) -> BatchResult:
        """Captions up to batch_size preprocessed images.

        pixels: [n, H, W, 3] float32, or n images, each from `preprocess`; prompt_ids: n prompts
        (`prompt_ids`). rng: sampling key (unused when greedy).
        """
        prompts, n = self._prompts(pixels, prompt_ids)
        # Per-row budgets: the real rows get max_new_tokens, dummy rows 0 (done at prefill).
        budget = np.where(np.arange(self.batch_size) < n, options.max_new_tokens, 0).astype(np.int32)
        if rng is None:
            rng = jax.random.key(0)
        chosen = None
        if options.mode == "ssd" and options.auto_draft is not None:
            chosen, measure_seconds = self._auto_draft_len(prompts, options, budget, rng)
            spec = self._spec_with_draft_len(options, chosen)
        else:
            spec, measure_seconds = self.spec(options), 0.0
        compile_seconds = self._warm_up(prompts, spec) + measure_seconds
        start = time.perf_counter()
        out = generate(self.model, self.params, prompts, spec, self._place(budget), rng, draft_params=self.draft_params)
        out = jax.device_get(out)  # waits for the device, one transfer
        seconds = time.perf_counter() - start

        results = []
        eos = set(spec.eos_ids)
        for row in range(n):
            count = int(out.num_tokens[row])
            token_ids = tuple(int(t) for t in out.tokens[row, :count])
            results.append(
                CaptionResult(
                    caption=self.tokenizer.decode(token_ids).strip(),
                    token_ids=token_ids,
                    num_tokens=count,
                    stop="eos" if token_ids and token_ids[-1] in eos else "length",
                    rounds=int(out.rounds[row]),
                    drafted=int(out.drafted[row]),
                    accepted=int(out.accepted[row]),
                    seconds=seconds,
                )
            )
        stats = BatchStats(
            images=n,
            tokens=sum(r.num_tokens for r in results),
            first_tokens=sum(r.num_tokens > 0 for r in results),
            rounds=sum(r.rounds for r in results),
            drafted=sum(r.drafted for r in results),
            accepted=sum(r.accepted for r in results),
            seconds=seconds,
            compile_seconds=compile_seconds,
            # Dummy rows are done from the start, so these engine-wide sums count real rows only.
            position_attempts=tuple(int(x) for x in out.position_attempts),
            position_accepts=tuple(int(x) for x in out.position_accepts),
            verified=sum(r.rounds for r in results) * spec.lookahead,
            draft_lens=() if chosen is None else (choice_label(chosen),),
            # The loop runs until its slowest row is done: every row pays for those rounds.
            slot_rounds=self.batch_size * int(np.max(out.rounds)),
            busy_rounds=sum(r.rounds for r in results),
        )
        if chosen is not None:
            assert self.auto_draft is not None  # _auto_draft_len set it
            self.auto_draft.observe(chosen, out.position_attempts, out.position_accepts)
        return BatchResult(results, stats)

    def slot_engine(self, options: GenerationOptions, prompt_len: int, prefill_rows: int | None = None) -> SlotEngine:
        """Continuous batching over batch_size slots (decode.engine.slots) for prompts of up to
        prompt_len tokens. Auto draft lengths choose among the chains (draft length >= 1) and
        trees of `options.auto_draft` between calls of the rounds: AR rounds (choice 0) would
        leave the drafter's cache behind, so they are not among them."""
        auto, choices = None, None
        if options.mode == "ssd" and options.auto_draft is not None:
            kept = slot_choices(options.auto_draft.choices)
            config = dataclasses.replace(options.auto_draft, choices=kept)
            if self.auto_draft is None or self.auto_draft.config != config:
                self.auto_draft = AutoDraft(config)
            auto = self.auto_draft
            choices = {choice: self._spec_with_draft_len(options, choice) for choice in kept}
        # Prefilled rows are split over the mesh's data x fsdp devices like the slots.
        multiple = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        prefill_rows = default_prefill_rows(self.batch_size, multiple, prefill_rows)
        widths: tuple[int, ...] = ()
        if self.sized_images:  # prefills pad to one width per patch bucket, as static batches do
            merge = self.config.vision.spatial_merge_size**2
            text = prompt_len - self.config.num_image_tokens
            widths = tuple(round_up(text + bucket // merge, self.prompt_bucket) for bucket in self.patch_buckets)
        self._engine = SlotEngine(
            self.model,
            self.params,
            self.spec(options),
            self.batch_size,
            prompt_len,
            pad_id=self.tokenizer.pad_id,
            prompt_bucket=self.prompt_bucket,
            prompt_widths=widths,
            prefill_rows=prefill_rows,
            draft_params=self.draft_params,
            place=self._place,
            auto=auto,
            choices=choices,
        )
        return self._engine

    @property
    def programs(self) -> int:
        """How many decoding programs this captioner has run: one per batch shape (static
        batching) and, for continuous batching, per prefill shape and slot layout."""
        return len(self._warm) + (0 if self._engine is None else len(self._engine.programs))

    def result_of(self, finished: Finished, seconds: float = 0.0) -> CaptionResult:
        """A finished slot request as a CaptionResult (seconds: what the caller attributes to it)."""
        token_ids = finished.token_ids
        eos = set(self.eos_ids)
        return CaptionResult(
            caption=self.tokenizer.decode(token_ids).strip(),
            token_ids=token_ids,
            num_tokens=len(token_ids),
            stop="eos" if token_ids and token_ids[-1] in eos else "length",
            rounds=finished.rounds,
            drafted=finished.drafted,
            accepted=finished.accepted,
            seconds=seconds,
        )

    def _caption_continuous(self, images, prompt, options, seed, fast_decode) -> list[CaptionResult]:
        prompts = [prompt] * len(images) if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        engine = self.slot_engine(options, max(self.longest_prompt(p) for p in set(prompts)))
        base = jax.random.key(seed)

        def request(i: int, image: ImageSource) -> Request:
            pixels = self.preprocess(image, fast_decode=fast_decode)
            ids = tuple(self.prompt_ids(prompts[i], pixels))
            return Request(ids, pixels, jax.random.fold_in(base, i), options.max_new_tokens, tag=i)

        requests = (request(i, image) for i, image in enumerate(images))
        results: list[CaptionResult | None] = [None] * len(images)
        for finished in engine.stream(requests):
            results[finished.request.tag] = self.result_of(finished)
        return [r for r in results if r is not None]

    def caption_batches(
        self,
        images: Sequence[ImageSource],
        prompt: str | Sequence[str] | None = None,
        options: GenerationOptions = GenerationOptions(),
        *,
        seed: int = 0,
        fast_decode: bool = False,
    ) -> Iterator[BatchResult]:
        """Captions `images` batch by batch (in order); raises ImageLoadError on a bad image.

        prompt: one question for all images, or one per image (None: `default_prompt`). Batch i
        samples with fold_in(key(seed), i).
        """
        prompts = [prompt] * len(images) if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        base = jax.random.key(seed)
        for index, start in enumerate(range(0, len(images), self.batch_size)):
            chunk = slice(start, start + self.batch_size)
            pixels = [self.preprocess(im, fast_decode=fast_decode) for im in images[chunk]]
            ids = [self.prompt_ids(p, x) for p, x in zip(prompts[chunk], pixels)]
            yield self.generate_batch(pixels, ids, options, jax.random.fold_in(base, index))

    def caption(
        self,
        images: Sequence[ImageSource],
        prompt: str | Sequence[str] | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        mode: Mode = "ssd",
        *,
        sampling: SamplingConfig = SamplingConfig(),
        policy: DraftPolicy = DraftPolicy(),
        tree: TreeShape = TreeShape(),
        seed: int = 0,
        fast_decode: bool = False,
        batching: str = "static",
    ) -> list[CaptionResult]:
        """Captions for `images` (paths, bytes, PIL images, uint8 arrays), in order.

        batching: 'static' (batches in lockstep; batch i samples with fold_in(key(seed), i)) or
        'continuous' (batch_size slots refilled as captions end; image i samples with
        fold_in(key(seed), i), whatever its slot)."""
        options = GenerationOptions(
            mode=mode, max_new_tokens=max_new_tokens, sampling=sampling, policy=policy, tree=tree
        )
        if batching == "continuous":
            return self._caption_continuous(images, prompt, options, seed, fast_decode)
        if batching != "static":
            raise ValueError(f"unknown batching {batching!r}: use 'static' or 'continuous'")
        return [
            result
            for batch in self.caption_batches(images, prompt, options, seed=seed, fast_decode=fast_decode)
            for result in batch.results
        ]


def _check_image_config(config, image_config) -> None:
    """Raises CheckpointError unless preprocessor.json makes the images the vision tower takes."""
    if isinstance(image_config, QwenImageProcessorConfig):
        vision = config.vision
        ours = (image_config.patch_size, image_config.merge_size, image_config.temporal_patch_size)
        tower = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        if ours != tower:
            raise CheckpointError(
                f"preprocessor.json cuts (patch, merge, temporal) = {ours} but the vision tower takes {tower}"
            )
        return
    size = (config.vision.image_size, config.vision.image_size)
    if image_config.output_size != size:
        raise CheckpointError(
            f"preprocessor.json makes {image_config.output_size} images but the vision tower takes {size}"
        )


def group_by_size(entries: Iterable[Any], batch_size: int, window: int, size: Callable[[Any], int]) -> Iterator[list]:
    """Batches of `batch_size` entries, each batch of entries of similar `size`: up to `window`
    entries are held, sorted largest first, and all but the smallest batch's worth go out in
    batches (the rest wait for later entries); the last entries go out sorted. A fixed-shape
    batch pads every row to its largest image, so batching similar sizes pads less. A window no
    larger than a batch keeps arrival order."""
    held: list = []
    for entry in entries:
        held.append(entry)
        if window <= batch_size:
            if len(held) == batch_size:
                yield held
                held = []
            continue
        if len(held) >= window:
            held.sort(key=size, reverse=True)
            ready, held = held[: len(held) - batch_size], held[len(held) - batch_size :]
            for start in range(0, len(ready), batch_size):
                yield ready[start : start + batch_size]
    if window > batch_size:
        held.sort(key=size, reverse=True)
    for start in range(0, len(held), batch_size):
        yield held[start : start + batch_size]
