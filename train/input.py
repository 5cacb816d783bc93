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
    """

    def __init__(
        self, tokenizer: Tokenizer, question: str, num_image_tokens: int, seq_len: int, model_type: str = "llava"
    ):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.question = question
        self.model_type = model_type
        self.prompt = prompt_ids_for(model_type, tokenizer, question, num_image_tokens)
        if len(self.prompt) + 2 > seq_len:
            raise ValueError(
                f"seq_len={seq_len} leaves no room for a caption after the {len(self.prompt)}-token prompt"
            )

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    def __call__(self, caption: str) -> dict[str, np.ndarray]:
        """caption -> input_ids, targets [seq_len] int32, loss_mask [seq_len] float32, prompt_len []."""
        answer = answer_ids(self.model_type, self.tokenizer, self.question, caption) + [self.tokenizer.eos_id]
        ids = (self.prompt + answer)[: self.seq_len]  # long captions are cut (EOS lost)
        n = len(ids)
        input_ids = np.full((self.seq_len,), self.tokenizer.pad_id, np.int32)
        input_ids[:n] = ids
        targets = np.full((self.seq_len,), self.tokenizer.pad_id, np.int32)
        targets[: n - 1] = ids[1:]
        loss_mask = np.zeros((self.seq_len,), np.float32)
        loss_mask[self.prompt_len - 1 : n - 1] = 1.0
        return {
            "input_ids": input_ids,
            "targets": targets,
            "loss_mask": loss_mask,
            "prompt_len": np.int32(self.prompt_len),
        }


class CaptionExample(grain.transforms.RandomMap):
    """Record {"image", "captions", ...} -> training example (a grain RandomMap).

    Picklable for grain worker processes: the tokenizer travels as its saved files.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_config: ImageProcessorConfig,
        question: str,
        num_image_tokens: int,
        seq_len: int,
        caption_index: int = -1,
        model_type: str = "llava",
    ):
        self._args = (image_config, question, num_image_tokens, seq_len, caption_index, model_type)
        self._setup(tokenizer)

    def _setup(self, tokenizer: Tokenizer) -> None:
        image_config, question, num_image_tokens, seq_len, self.caption_index, model_type = self._args
        self.tokenizer = tokenizer
        self.image_config = image_config
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

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        captions = record["captions"]
        index = int(rng.integers(len(captions)))  # drawn always, so the rng stream is the same
        caption = captions[self.caption_index if self.caption_index >= 0 else index]
        example = self.text(caption)
        # uint8: normalised on device (train.step.device_pixels), a quarter of the bytes to move.
        example["pixels"] = preprocess_image_uint8(record["image"], self.image_config)
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


def check_loss_window(rows: dict[str, np.ndarray], loss_start: int) -> None:
    """The train step computes its losses on positions [loss_start, seq) only (StepSpec):
    refuse rows whose loss mask reaches before that, which the step would silently drop."""
    early = np.asarray(rows["loss_mask"])[:, :loss_start]
    if early.any():
        row, position = np.argwhere(early)[0]
        raise ValueError(
            f"a row's loss mask starts at position {position}, before the loss window's start "
            f"{loss_start} (the prompt length - 1): the data transform and the prompt "
            f"length disagree (row {row} of this host's batch)"
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
