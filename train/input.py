"""Training input: caption records -> LLaVA prompts + captions -> global batches.

Pipeline (per host):
  TFDS array_record split --(CaptionSource, random access)--> grain DataLoader
    GlobalBatchSampler: which record (and rng) fills which row of which global batch
    HostBatches: grain's items are whole batches, this host's rows of global batch b,
                 so grain's worker processes cannot change what a batch holds
    CaptionBatch: CaptionExample per row (one caption chosen by the row's rng, image
                  pixels, token ids, loss mask), stacked
  --> jax.make_array_from_process_local_data --> global arrays on the mesh.

Determinism: the global order is a pure function of (seed, dataset size): epoch e is a
seeded permutation of the records, and global position g = step * global_batch + row
takes record perm_e[g mod N]. The caption of position g is drawn from an rng seeded by
(seed, g), so each example gets one random reference caption per epoch. Every host
computes the same global order and reads only the rows it feeds, so the batches (and
the losses) do not depend on the number of hosts. (grain's own IndexSampler with
ShardOptions shards *records* by host instead, which would make the global batch depend
on the host count; hence our own sampler over the data source.)
"""

from __future__ import annotations

import dataclasses
import functools
import io
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import sentencepiece as spm
from absl import flags

from fastvlm_jax.image.processing import ImageProcessorConfig, preprocess_image_uint8
from fastvlm_jax.image.qwen_vl import QwenImageProcessorConfig
from fastvlm_jax.image.qwen_vl import preprocess as qwen_preprocess
from fastvlm_jax.nn.families import answer_ids, prompt_ids_for
from fastvlm_jax.text.prompts import format_llava_prompt
from fastvlm_jax.text.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer

# Large enough to never run out; grain needs a length for its sampler dataset.
_ENDLESS = 2**62


# ---------------------------------------------------------------------------------------
# Tokenizer recipe (the from-scratch demo trains its own)
# ---------------------------------------------------------------------------------------


def train_caption_tokenizer(
    corpus: Sequence[str], vocab_size: int = 512, byte_fallback: bool = True, prompt_lines: Sequence[str] = ()
) -> Tokenizer:
    """A LLaMA-style sentencepiece BPE tokenizer trained in memory (deterministic).

    Ids: unk=0, bos=1, eos=2, then the pieces; "<image>" and "<pad>" are added right after
    the sentencepiece vocabulary, as in llava-hf checkpoints. `prompt_lines` (the chat
    template text) are mixed into the corpus so prompts tokenize into few pieces.
    """
    model = io.BytesIO()
    sentences = list(corpus) + [line for line in prompt_lines for _ in range(100)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=byte_fallback,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        pad_id=-1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        num_threads=1,
        minloglevel=2,
    )
    size = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    return SentencePieceTokenizer(
        model.getvalue(), added_tokens={"<image>": size, "<pad>": size + 1}, pad_id=size + 1, image_token="<image>"
    )


# ---------------------------------------------------------------------------------------
# One example
# ---------------------------------------------------------------------------------------


class TextFormat:
    """Prompt + caption -> fixed-length ids, targets and loss mask.

    The prompt is the model family's (fastvlm_jax.nn.families): LLaVA-1.5's
    "USER: <image>*N\\n{question} ASSISTANT:" (with BOS), or BLIP-2's "<image>*N" + BOS +
    question; the caption follows as the answer, then EOS. Loss positions are those whose
    *target* (next token) is a caption token or the EOS.

    num_image_tokens: the image tokens of `prompt` (fixed-size families: every image's;
    families whose images vary: the most an image of the run may have, so `prompt` is the
    longest prompt). A call may give its own image's count (at most this one): that row's
    prompt is then shorter, and its answer is cut to `answer_budget` tokens (EOS included),
    so that every row's loss positions lie in the window [its prompt_len - 1, that +
    answer_budget), which is the longest prompt's [prompt_len - 1, seq_len).
    """

    def __init__(
        self, tokenizer: Tokenizer, question: str, num_image_tokens: int, seq_len: int, model_type: str = "llava"
    ):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.question = question
        self.model_type = model_type
        self.num_image_tokens = num_image_tokens
        self.prompt = prompt_ids_for(model_type, tokenizer, question, num_image_tokens)
        self._prompts = {num_image_tokens: self.prompt}
        if len(self.prompt) + 2 > seq_len:
            raise ValueError(
                f"seq_len={seq_len} leaves no room for a caption after the {len(self.prompt)}-token prompt"
            )

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def answer_budget(self) -> int:
        """Most answer tokens (EOS included) a row trains on: the loss window's width."""
        return self.seq_len - self.prompt_len + 1

    def prompt_for(self, num_image_tokens: int) -> list[int]:
        """The prompt of an image of `num_image_tokens` tokens (cached per count)."""
        if num_image_tokens not in self._prompts:
            if not 0 < num_image_tokens <= self.num_image_tokens:
                raise ValueError(f"an image of {num_image_tokens} tokens: this run allows 1 to {self.num_image_tokens}")
            self._prompts[num_image_tokens] = prompt_ids_for(
                self.model_type, self.tokenizer, self.question, num_image_tokens
            )
        return self._prompts[num_image_tokens]

    def __call__(self, caption: str, num_image_tokens: int | None = None) -> dict[str, np.ndarray]:
        """caption -> input_ids, targets [seq_len] int32, loss_mask [seq_len] float32, prompt_len []."""
        prompt = self.prompt if num_image_tokens is None else self.prompt_for(num_image_tokens)
        answer = answer_ids(self.model_type, self.tokenizer, self.question, caption) + [self.tokenizer.eos_id]
        ids = (prompt + answer[: self.answer_budget])[: self.seq_len]  # long captions are cut (EOS lost)
        n = len(ids)
        input_ids = np.full((self.seq_len,), self.tokenizer.pad_id, np.int32)
        input_ids[:n] = ids
        targets = np.full((self.seq_len,), self.tokenizer.pad_id, np.int32)
        targets[: n - 1] = ids[1:]
        loss_mask = np.zeros((self.seq_len,), np.float32)
        loss_mask[len(prompt) - 1 : n - 1] = 1.0
        return {
            "input_ids": input_ids,
            "targets": targets,
            "loss_mask": loss_mask,
            "prompt_len": np.int32(len(prompt)),
        }


class ImageOverflowError(ValueError):
    """A training image has more patches than the run's data.image_patches (image_overflow='error')."""


@dataclasses.dataclass(frozen=True)
class PatchInput:
    """How an image of any size becomes a training row for a family whose images keep their
    size (Qwen2.5-VL): the checkpoint's processor, then zero-padded to `image_patches` patch
    rows, the one patch count of the run (one compiled step for every image size).

    The patches travel as uint8 (the resized image's values, a quarter of float32's bytes; the
    step looks them up in the processor's value table on device, `train.step.model_pixels`,
    which gives `preprocess`'s float32 patches bit for bit) with the image's grid (t, h, w).

    overflow: what an image larger than `image_patches` patches does. 'resize': it is resized
    down by the processor's own rule (smart_resize with max_pixels lowered to the budget, so
    its aspect ratio is kept and it becomes as many tokens as fit); images within the budget
    are untouched (exactly decoding's input). 'error': ImageOverflowError naming the image.
    """

    config: QwenImageProcessorConfig
    image_patches: int
    overflow: str = "resize"

    def __post_init__(self):
        per_token = self.config.merge_size**2
        if self.image_patches < per_token or self.image_patches % per_token:
            raise ValueError(
                f"image_patches={self.image_patches} must be a positive multiple of merge_size^2 = {per_token}"
            )
        if self.overflow not in ("resize", "error"):
            raise ValueError(f"image_overflow={self.overflow!r}: use 'resize' or 'error'")

    @property
    def max_tokens(self) -> int:
        return self.image_patches // self.config.merge_size**2

    @functools.cached_property
    def budget_config(self) -> QwenImageProcessorConfig:
        """The processor with max_pixels lowered to the budget (only where it is larger)."""
        most = self.image_patches * self.config.patch_size**2
        if self.config.max_pixels <= most:
            return self.config
        return dataclasses.replace(self.config, max_pixels=most, min_pixels=min(self.config.min_pixels, most))

    def __call__(self, image, name: str = "") -> tuple[np.ndarray, np.ndarray, int]:
        """image -> (patches [image_patches, patch_dim] uint8 (zero rows after the image's),
        grid [3] int32, the image's token count)."""
        # The processor without rescale/normalize: float32 copies of the resized uint8 values.
        raw = dataclasses.replace(self.budget_config, do_rescale=False, do_normalize=False)
        if self.overflow == "error" and self.budget_config is not self.config:
            full, grid = qwen_preprocess(image, dataclasses.replace(self.config, do_rescale=False, do_normalize=False))
            if full.shape[0] > self.image_patches:
                raise ImageOverflowError(
                    f"image {name or '?'} becomes {full.shape[0]} patches ({full.shape[0] // self.config.merge_size**2}"
                    f" tokens) at the checkpoint's max_pixels={self.config.max_pixels}, more than "
                    f"data.image_patches={self.image_patches}: raise data.image_patches (and seq_len), or set "
                    "data.image_overflow=resize to shrink such images within the budget"
                )
            patches = full
        else:
            patches, grid = qwen_preprocess(image, raw)
        out = np.zeros((self.image_patches, patches.shape[1]), np.uint8)
        out[: patches.shape[0]] = patches.astype(np.uint8)
        return out, np.asarray(grid, np.int32), patches.shape[0] // self.config.merge_size**2


class CaptionExample(grain.transforms.RandomMap):
    """Record {"image", "captions", ...} -> training example (a grain RandomMap).

    Fixed-size images (an ImageProcessorConfig): "pixels" [size, size, 3] uint8. Images that
    keep their size (a QwenImageProcessorConfig): "pixels" [image_patches, patch_dim] uint8
    and "image_grid" [3] int32 (PatchInput), the prompt built with the image's own token
    count (num_image_tokens is then the most an image of the run has: image_patches over
    merge_size^2).

    Picklable for grain worker processes: the tokenizer travels as its saved files.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_config: ImageProcessorConfig | QwenImageProcessorConfig,
        question: str,
        num_image_tokens: int,
        seq_len: int,
        caption_index: int = -1,
        model_type: str = "llava",
        image_patches: int = 0,
        image_overflow: str = "resize",
    ):
        self._args = (
            image_config,
            question,
            num_image_tokens,
            seq_len,
            caption_index,
            model_type,
            image_patches,
            image_overflow,
        )
        self._setup(tokenizer)

    def _setup(self, tokenizer: Tokenizer) -> None:
        image_config, question, num_image_tokens, seq_len, self.caption_index, model_type, patches, overflow = (
            self._args
        )
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.patches = None
        if isinstance(image_config, QwenImageProcessorConfig):
            self.patches = PatchInput(image_config, patches or num_image_tokens * image_config.merge_size**2, overflow)
            num_image_tokens = self.patches.max_tokens
        self.text = TextFormat(tokenizer, question, num_image_tokens, seq_len, model_type)

    def __getstate__(self):
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save(tmp)
            files = {p.name: p.read_bytes() for p in Path(tmp).iterdir()}
        return {"args": self._args, "tokenizer_files": files}

    def __setstate__(self, state):
        self._args = state["args"]
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in state["tokenizer_files"].items():
                (Path(tmp) / name).write_bytes(data)
            tokenizer = load_tokenizer(tmp)
        self._setup(tokenizer)

    def image_fields(self, record: dict[str, Any]) -> tuple[dict[str, np.ndarray], int | None]:
        """The record's image as batch fields, and its token count (None: the run's fixed one)."""
        if self.patches is None:
            # uint8: normalised on device (train.step.model_pixels), a quarter of the bytes to move.
            return {"pixels": preprocess_image_uint8(record["image"], self.image_config)}, None
        name = record.get("image_id", "")
        patches, grid, tokens = self.patches(record["image"], name.decode() if isinstance(name, bytes) else str(name))
        return {"pixels": patches, "image_grid": grid}, tokens

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        captions = record["captions"]
        index = int(rng.integers(len(captions)))  # drawn always, so the rng stream is the same
        caption = captions[self.caption_index if self.caption_index >= 0 else index]
        image, tokens = self.image_fields(record)
        example = self.text(caption, tokens)
        example.update(image)
        return example


def collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# ---------------------------------------------------------------------------------------
# Order: which record goes where
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_records: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_records)


class GlobalBatchSampler:
    """A grain sampler over the rows [start, stop) of every global batch.

    Local index j (this host's j-th example) is row start + j % rows of global batch
    j // rows, i.e. global position g = (j // rows) * global_batch + start + j % rows,
    which reads record perm_epoch[g mod N] with epoch = g // N.
    """

    def __init__(self, num_records: int, global_batch: int, rows: tuple[int, int], seed: int):
        start, stop = rows
        if not 0 <= start < stop <= global_batch:
            raise ValueError(f"rows {rows} are not inside a global batch of {global_batch}")
        if num_records <= 0:
            raise ValueError("the dataset split is empty")
        self.num_records = num_records
        self.global_batch = global_batch
        self.rows = (start, stop)
        self.seed = seed

    def __len__(self) -> int:
        return _ENDLESS

    def global_position(self, index: int) -> int:
        start, stop = self.rows
        per_host = stop - start
        return (index // per_host) * self.global_batch + start + index % per_host

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < _ENDLESS:
            raise IndexError(index)
        position = self.global_position(index)
        epoch, offset = divmod(position, self.num_records)
        record = int(_epoch_permutation(self.seed, epoch, self.num_records)[offset])
        return grain.RecordMetadata(index=index, record_key=record, rng=np.random.default_rng([self.seed, position]))

    def __repr__(self) -> str:
        # grain checks repr(sampler) when restoring an iterator state: it must be stable.
        return (
            f"GlobalBatchSampler(num_records={self.num_records}, global_batch={self.global_batch}, "
            f"rows={self.rows}, seed={self.seed})"
        )


def host_rows(batch_sharding: jax.sharding.Sharding, global_batch: int) -> tuple[int, int]:
    """The contiguous rows of a global batch whose data this process must provide."""
    shape = (global_batch,)
    indices = batch_sharding.addressable_devices_indices_map(shape).values()
    starts, stops = [], []
    for index in indices:
        sl = index[0]
        starts.append(sl.start or 0)
        stops.append(global_batch if sl.stop is None else sl.stop)
    start, stop = min(starts), max(stops)
    covered = set()
    for a, b in zip(starts, stops):
        covered.update(range(a, b))
    if covered != set(range(start, stop)):
        raise ValueError("this process's batch rows are not contiguous; reorder the mesh devices")
    return start, stop


class HostBatches:
    """A grain data source whose item b is this host's rows of global batch b, as
    (record, rng) pairs in row order (see GlobalBatchSampler).

    Whole batches are the unit grain hands to its worker processes, so a batch is built
    from the same records in the same order whatever the worker count (grain gives each
    worker every worker_count-th item, which would otherwise be every worker_count-th
    *example*).
    """

    def __init__(self, source, order: GlobalBatchSampler):
        self.source = source
        self.order = order

    def __len__(self) -> int:
        return _ENDLESS // (self.order.rows[1] - self.order.rows[0])

    def __getitem__(self, batch: int) -> list[tuple[Any, np.random.Generator]]:
        rows = self.order.rows[1] - self.order.rows[0]
        metas = [self.order[batch * rows + row] for row in range(rows)]
        return [(self.source[meta.record_key], meta.rng) for meta in metas]

    def __repr__(self) -> str:
        # grain compares repr(data_source) when it restores an iterator state.
        return f"HostBatches({self.source!r}, {self.order!r})"


class BatchIndices:
    """A grain sampler over batch numbers start, start + 1, ...; its repr names the global
    order and the start, which grain compares when it restores an iterator state (a changed
    order fails loudly)."""

    def __init__(self, order: GlobalBatchSampler, start: int = 0):
        self.order = order
        self.start = start

    def __len__(self) -> int:
        return _ENDLESS // (self.order.rows[1] - self.order.rows[0]) - self.start

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return grain.RecordMetadata(index=index, record_key=self.start + index)

    def __repr__(self) -> str:
        return f"BatchIndices({self.order!r}, start={self.start})"


class CaptionBatch(grain.transforms.Map):
    """[(record, rng)] of one batch -> the collated training examples (CaptionExample per row)."""

    def __init__(self, example: CaptionExample):
        self.example = example

    def map(self, items):
        return collate([self.example.random_map(record, rng) for record, rng in items])


def make_loader(
    source,
    transform: CaptionExample,
    global_batch: int,
    rows: tuple[int, int],
    seed: int,
    worker_count: int = 0,
    read_threads: int = 4,
    start_batch: int = 0,
) -> grain.DataLoader:
    """A grain DataLoader yielding this host's rows of each global batch from global batch
    `start_batch` on, endlessly; the same batches for any worker_count and any split of the
    rows between hosts (GlobalBatchSampler), so a run resumes at step s with start_batch=s
    on any number of hosts."""
    order = GlobalBatchSampler(len(source), global_batch, rows, seed)
    if worker_count > 0 and not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
        flags.FLAGS.mark_as_parsed()
    return grain.DataLoader(
        data_source=HostBatches(source, order),
        sampler=BatchIndices(order, start_batch),
        operations=[CaptionBatch(transform)],
        worker_count=worker_count,
        shard_options=grain.sharding.NoSharding(),
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4),
    )


def to_global(
    local: dict[str, np.ndarray], shardings: dict[str, jax.sharding.Sharding], global_batch: int
) -> dict[str, jax.Array]:
    """This host's rows -> global arrays (each process passes only its own slice)."""
    out = {}
    for key, value in local.items():
        global_shape = (global_batch,) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(shardings[key], value, global_shape)
    return out


def check_loss_window(rows: dict[str, np.ndarray], loss_start: int, per_row: bool = False) -> None:
    """The train step computes its losses on positions [loss_start, seq) only (StepSpec), or
    with `per_row` on each row's [prompt_len - 1, prompt_len - 1 + seq - loss_start): refuse
    rows whose loss mask reaches outside, which the step would silently drop."""
    mask = np.asarray(rows["loss_mask"])
    seq = mask.shape[1]
    starts = np.asarray(rows["prompt_len"]) - 1 if per_row else np.full((mask.shape[0],), loss_start)
    index = np.arange(seq)[None, :]
    outside = mask.astype(bool) & ((index < starts[:, None]) | (index >= starts[:, None] + seq - loss_start))
    if outside.any():
        row, position = np.argwhere(outside)[0]
        raise ValueError(
            f"a row's loss mask holds position {position}, outside the loss window "
            f"[{starts[row]}, {starts[row] + seq - loss_start}) (the prompt length - 1 on): the data "
            f"transform and the prompt length disagree (row {row} of this host's batch)"
        )


def default_image_config(preset: str, image_size: int) -> ImageProcessorConfig:
    if preset == "siglip":
        return ImageProcessorConfig.siglip(image_size)
    return ImageProcessorConfig.clip(image_size)


def prompt_text(question: str) -> str:
    """The chat template around the image, for tokenizer training (keeps its newline, so
    that a tokenizer without byte fallback still has a piece for it)."""
    return format_llava_prompt(question, image_token="")


__all__ = [
    "CaptionExample",
    "GlobalBatchSampler",
    "ImageOverflowError",
    "PatchInput",
    "TextFormat",
    "check_loss_window",
    "collate",
    "default_image_config",
    "host_rows",
    "make_loader",
    "prompt_text",
    "to_global",
    "train_caption_tokenizer",
]
