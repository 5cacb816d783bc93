"""Refine stage input: the full model's own greedy captions, generated once, then trained on.

Imitation learning in the DAgger sense: the draft is trained on the sequences that
verification will actually see at decode time (the full model's own greedy outputs),
not on human captions. The prompt and image of each example are kept; everything after
the prompt is replaced by the generated tokens (up to and including EOS).

The full model is frozen in this stage and the prompt is image + a fixed question, so a
record's greedy sequence is the same at every step: it is generated once, in a pre-pass
at the start of the stage (`pregenerate`), and stored in WORKDIR/refine_sequences/:

    manifest.json      what the set was generated with (model, max_new_tokens, eos, prompt,
                       source, which records): written first, so that a resumed pre-pass
                       cannot mix two models' outputs
    part-*.npz         one file per chunk of global batches and process: the positions
                       (indexes into the record list) it covers, tokens, lengths
    sequences.npz      the finished set: record_ids [n] (sorted), tokens [n, max_new] int32
                       (-1 padded), lengths [n] int32
    complete.json      the manifest's identity + timings: the set is complete and reusable

Which records: those the run's data order reads (`records_to_generate`: all of them once
the run covers an epoch; otherwise the first steps * batch_size of the first epoch's
permutation), one generation per record however often it is read.

Multi-host: the record list is cut into global batches of `batch_size`; each process
reads and feeds the rows of every global batch that it feeds in training
(input_lib.host_rows of the batch sharding, input_lib.to_global), and writes the tokens
of those rows to its own part files. Which batches are still to do is decided by process
0 (from the part files present) and broadcast, so every process runs the same sequence
of collective generate calls. A barrier (sync_global_devices) then lets process 0 merge
the parts into sequences.npz and write complete.json; a second barrier, and every process
reads the complete set before training. The workdir must be shared by the processes (a
bucket on a pod), as the training checkpoints already require.

The training input is then composed on the host (`RefineExample`): the example of the
caption pipeline (same records, same order, same pixels) with prompt + the stored tokens
(`compose_sequences`), which is what the per-step generation used to produce.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from decode.engine import DecodeSpec, Prompts, generate
from fastvlm_jax.nn.model import VLM
from fastvlm_jax.runtime import sharding
from train import input as input_lib
from train import params as param_lib
from train.config import ConfigError
from train.step import Shardings, batch_shardings, model_pixels

Array = jax.Array

SEQUENCES_DIR = "refine_sequences"
MANIFEST = "manifest.json"
COMPLETE = "complete.json"
MERGED = "sequences.npz"
# Global batches per part file: a killed pre-pass loses at most this many batches of work,
# and a large set is still only a few hundred files.
CHUNK_BATCHES = 8
PROMPT_KEYS = ("input_ids", "prompt_len", "pixels", "image_grid")  # image_grid: patch images only


# ---------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------


def compose_sequences(
    input_ids: np.ndarray, prompt_len: np.ndarray, generated: np.ndarray, num_generated: np.ndarray, pad_id: int
) -> dict[str, np.ndarray]:
    """Prompt + generated tokens -> input_ids, targets, loss_mask of the same length.

    input_ids: [batch, seq]; prompt_len: [batch]; generated: [batch, capacity] (-1 padded);
    num_generated: [batch]. Tokens that do not fit in seq are dropped.
    """
    seq = input_ids.shape[1]
    capacity = generated.shape[1]
    t = np.arange(seq)[None, :]
    rel = t - np.asarray(prompt_len)[:, None]
    from_gen = (rel >= 0) & (rel < np.asarray(num_generated)[:, None])
    gen_tok = np.take_along_axis(np.asarray(generated), np.clip(rel, 0, capacity - 1), axis=1)
    ids = np.where(t < np.asarray(prompt_len)[:, None], input_ids, np.where(from_gen, gen_tok, pad_id))
    ids = ids.astype(np.int32)
    pad_col = np.full((ids.shape[0], 1), pad_id, np.int32)
    targets = np.concatenate([ids[:, 1:], pad_col], axis=1)
    # Position t is trained iff its target (token t + 1) was generated.
    mask = np.concatenate([from_gen[:, 1:], np.zeros_like(from_gen[:, :1])], axis=1)
    return {"input_ids": ids, "targets": targets, "loss_mask": mask.astype(np.float32)}


def records_to_generate(num_records: int, global_batch: int, steps: int, seed: int) -> np.ndarray:
    """[n] int64, sorted: the records a run of `steps` global batches reads (input_lib's
    global order), each once. Positions [0, steps * global_batch) of that order cover the
    first epoch's permutation from its start, so the whole set once they reach an epoch."""
    positions = steps * global_batch
    if positions >= num_records:
        return np.arange(num_records, dtype=np.int64)
    order = input_lib.GlobalBatchSampler(num_records, global_batch, (0, global_batch), seed)
    return np.sort(np.asarray([order[g].record_key for g in range(positions)], np.int64))


def batch_positions(batch: int, global_batch: int, count: int) -> np.ndarray:
    """[global_batch] indexes into the record list (of `count`) of global batch `batch`; the
    last batch is filled up by repeating its last position (those rows are not stored)."""
    return np.minimum(np.arange(batch * global_batch, (batch + 1) * global_batch), count - 1)


def identity(
    *,
    init_from: str | None,
    compute_dtype: str,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    prompt_ids: Sequence[int],
    image_config: Any,
    source: Any,
    record_ids: np.ndarray,
) -> dict:
    """What a stored set depends on (JSON-ready): a set made with anything else is not this
    run's. The prompt's ids stand for the tokenizer, question and prompt layout."""

    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    image = dataclasses.asdict(image_config) if dataclasses.is_dataclass(image_config) else repr(image_config)
    return {
        "format": 1,
        "init_from": str(init_from),
        "compute_dtype": compute_dtype,
        "max_new_tokens": int(max_new_tokens),
        "eos_ids": [int(i) for i in eos_ids],
        "prompt_sha256": digest(np.asarray(prompt_ids, np.int64).tobytes()),
        "image_config": json.loads(json.dumps(image, default=str)),
        "source": {"repr": repr(source), "num_records": len(source)},
        "records": {"count": int(len(record_ids)), "sha256": digest(np.asarray(record_ids, np.int64).tobytes())},
    }


def identity_mismatch(directory, stored: dict, wanted: dict) -> ConfigError | None:
    """A ConfigError naming the first differing field, the directory and the fix; None if equal."""
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key) != wanted.get(key):
            return ConfigError(
                f"{directory} holds refine sequences generated with {key}={stored.get(key)!r}, this "
                f"run needs {key}={wanted.get(key)!r}: delete {directory} to generate them again for "
                "this run (or use a fresh workdir)"
            )
    return None


# ---------------------------------------------------------------------------------------
# The generation program (the pre-pass's, one global batch)
# ---------------------------------------------------------------------------------------


def decode_placement(model: VLM, training: Shardings, mesh: Mesh, trainable: set[str], tensor: int):
    """(decode mesh, its Shardings) for the pre-pass: a (data, tensor) mesh over `mesh`'s
    devices with the params placed by their logical axes (heads / mlp / vocab over tensor,
    the rest replicated), the batch over data. Only the params and the batch of the
    returned Shardings are meant to be read (generate_program); the rest is `training`'s.
    ConfigError where `tensor` does not divide the devices."""
    devices = list(mesh.devices.flat)
    if tensor < 1 or len(devices) % tensor:
        raise ConfigError(f"refine.decode_tensor={tensor} does not divide the {len(devices)} devices")
    decode_mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=1, tensor=tensor), devices)
    trainable_sh, frozen_sh = param_lib.split(sharding.param_shardings(model.abstract_params(), decode_mesh), trainable)
    placed = dataclasses.replace(
        training,
        state=training.state.replace(params=trainable_sh),
        frozen=frozen_sh,
        batch=batch_shardings(decode_mesh, patch_images="image_grid" in training.batch),
    )
    return decode_mesh, placed


def generate_program(
    model: VLM,
    shardings: Shardings,
    max_new_tokens: int,
    eos_ids: tuple[int, ...],
    pixel_table: tuple[tuple[float, float, float], ...] = (),
):
    """jit of `(trainable, frozen, prompts) -> (tokens [batch, max_new] int32 (-1 padded),
    num_tokens [batch] int32)`: greedy AR decoding with the full model, to trace inside
    `jax.set_mesh(mesh)` (train.compile_only lowers it for a TPU topology).

    prompts: {"input_ids": [batch, prompt_len] (right-padded), "prompt_len": [batch],
    "pixels": [batch, size, size, 3] uint8, looked up in pixel_table on device (float32 where
    it is empty), or uint8 patches with "image_grid" (train.step.model_pixels)}, sharded like
    the training batch. The trainable params (the draft's) are not read by AR decoding; they
    complete the params tree.
    """
    spec = DecodeSpec(mode="ar", capacity=max_new_tokens, eos_ids=tuple(eos_ids))

    def run(trainable, frozen, prompts):
        params = param_lib.merge(trainable, frozen)
        out = generate(
            model,
            params,
            Prompts(
                input_ids=prompts["input_ids"],
                lengths=prompts["prompt_len"],
                pixels=model_pixels(prompts, pixel_table),
            ),
            spec,
            max_new_tokens,
            jax.random.key(0),
        )
        return out.tokens, out.num_tokens

    prompt_shardings = {k: shardings.batch[k] for k in PROMPT_KEYS if k in shardings.batch}
    return jax.jit(
        run,
        in_shardings=(shardings.state.params, shardings.frozen, prompt_shardings),
        out_shardings=(shardings.batch["input_ids"], shardings.batch["prompt_len"]),
    )


# ---------------------------------------------------------------------------------------
# Host side: prompts in, part files out
# ---------------------------------------------------------------------------------------


def prompt_example(transform: input_lib.CaptionExample, record: dict) -> dict[str, np.ndarray]:
    """Record -> the prompt half of its training example: input_ids [prompt_len] int32 (the
    longest prompt's width, right-padded where the image has fewer tokens), prompt_len [] int32,
    and the image fields (pixels [size, size, 3] uint8, or patches + image_grid); no caption
    is read."""
    image, tokens = transform.image_fields(record)
    prompt = transform.text.prompt if tokens is None else transform.text.prompt_for(tokens)
    ids = np.full((transform.text.prompt_len,), transform.tokenizer.pad_id, np.int32)
    ids[: len(prompt)] = prompt
    return {"input_ids": ids, "prompt_len": np.int32(len(prompt)), **image}


def local_rows(array: Array, rows: tuple[int, int]) -> np.ndarray:
    """Rows [start, stop) of a batch-sharded global array, from this process's shards."""
    start, stop = rows
    out = [None] * (stop - start)
    for shard in array.addressable_shards:
        sl = shard.index[0]
        first = sl.start or 0
        data = np.asarray(shard.data)
        for i in range(data.shape[0]):
            if start <= first + i < stop:
                out[first + i - start] = data[i]
    if any(row is None for row in out):
        raise ValueError(f"rows {rows} are not all on this process")
    return np.stack(out)


def _save_npz(path, **arrays) -> None:
    """Writes via a temporary name and a rename: a killed process leaves no half file."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.rename(path)


def _load_npz(path) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(path.read_bytes())) as data:
        return {k: data[k] for k in data.files}


def _write_json(path, value: dict) -> None:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
    tmp.rename(path)


def part_files(directory) -> list:
    return sorted(directory.glob("part-*.npz"))


def covered_positions(directory, count: int) -> np.ndarray:
    """[count] bool: positions of the record list that some part file holds."""
    covered = np.zeros((count,), bool)
    for path in part_files(directory):
        covered[_load_npz(path)["positions"]] = True
    return covered


def merge_parts(directory, count: int, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """The part files -> (tokens [count, max_new] int32, lengths [count] int32); every
    position must be held (overlapping parts hold the same greedy tokens)."""
    tokens = np.full((count, max_new_tokens), -1, np.int32)
    lengths = np.full((count,), -1, np.int32)
    for path in part_files(directory):
        part = _load_npz(path)
        tokens[part["positions"]] = part["tokens"]
        lengths[part["positions"]] = part["lengths"]
    missing = np.flatnonzero(lengths < 0)
    if missing.size:
        raise RuntimeError(f"{directory}: {missing.size} of {count} records have no generated tokens")
    return tokens, lengths


@dataclasses.dataclass(frozen=True)
class Sequences:
    """A finished set: record_ids [n] int64 (sorted), tokens [n, max_new] int32 (-1 padded),
    lengths [n] int32; stats: what complete.json recorded (timings)."""

    record_ids: np.ndarray
    tokens: np.ndarray
    lengths: np.ndarray
    stats: dict


def load_sequences(directory) -> Sequences:
    merged = _load_npz(directory / MERGED)
    stats = json.loads((directory / COMPLETE).read_text()).get("stats", {})
    return Sequences(merged["record_ids"], merged["tokens"], merged["lengths"], stats)


# ---------------------------------------------------------------------------------------
# The pre-pass
# ---------------------------------------------------------------------------------------


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _agree(mask: np.ndarray) -> np.ndarray:
    """Process 0's `mask` on every process (so all run the same collective calls)."""
    if jax.process_count() == 1:
        return mask
    return np.asarray(multihost_utils.broadcast_one_to_all(mask.astype(np.int32))).astype(bool)


def check_stored(directory, wanted: dict) -> bool:
    """True if `directory` holds a complete set of `wanted`; False if none or an unfinished
    one of `wanted`; ConfigError if it holds another run's."""
    for name in (COMPLETE, MANIFEST):
        path = directory / name
        if path.exists():
            stored = json.loads(path.read_text())
            stored = stored.get("identity", stored)
            error = identity_mismatch(directory, stored, wanted)
            if error is not None:
                raise error
            if name == COMPLETE:
                return True
    return False


def pregenerate(
    directory,
    wanted: dict,
    source,
    transform: input_lib.CaptionExample,
    record_ids: np.ndarray,
    generate_fn: Callable[[dict], tuple[Array, Array]],
    batch_shardings: dict,
    global_batch: int,
    max_new_tokens: int,
    *,
    progress: bool = False,
    read_threads: int = 4,
) -> Sequences:
    """Generates (or resumes, or reuses) the set of `record_ids` in `directory`.

    generate_fn: global prompt batch (PROMPT_KEYS, [global_batch, ...]) -> (tokens
      [global_batch, max_new_tokens], num_tokens [global_batch]), batch-sharded like the
      inputs (generate_program under the mesh).
    wanted: `identity(...)` of this run: a set of another identity is refused.
    """
    primary = jax.process_index() == 0
    if primary:
        directory.mkdir(parents=True, exist_ok=True)
    _barrier("refine sequences: directory")
    if check_stored(directory, wanted):
        return load_sequences(directory)
    _barrier("refine sequences: checked")  # nobody writes the manifest before all have read it
    if primary and not (directory / MANIFEST).exists():
        _write_json(directory / MANIFEST, wanted)

    count = len(record_ids)
    num_batches = -(-count // global_batch)
    rows = input_lib.host_rows(batch_shardings["input_ids"], global_batch)
    covered = covered_positions(directory, count) if primary else np.zeros((count,), bool)
    batch_done = np.asarray(
        [covered[b * global_batch : (b + 1) * global_batch].all() for b in range(num_batches)], bool
    )
    todo = np.flatnonzero(~_agree(batch_done))

    start = time.perf_counter()
    bar = None
    if progress and primary:
        bar = tqdm(
            total=num_batches,
            initial=num_batches - len(todo),
            desc="refine: generating",
            unit="batch",
            dynamic_ncols=True,
        )
    with concurrent.futures.ThreadPoolExecutor(max(1, read_threads)) as pool:

        def feed(batch: int):
            positions = batch_positions(batch, global_batch, count)[rows[0] : rows[1]]
            examples = list(pool.map(lambda p: prompt_example(transform, source[int(record_ids[p])]), positions))
            local = input_lib.collate(examples)
            return positions, generate_fn(input_lib.to_global(local, batch_shardings, global_batch))

        for first in range(0, len(todo), CHUNK_BATCHES):
            chunk = todo[first : first + CHUNK_BATCHES]
            # Dispatch is asynchronous: the next batch's records are read while this one generates.
            pending = feed(int(chunk[0]))
            parts = []
            for i in range(len(chunk)):
                positions, (tokens, lengths) = pending
                if i + 1 < len(chunk):
                    pending = feed(int(chunk[i + 1]))
                keep = (np.arange(rows[0], rows[1]) + int(chunk[i]) * global_batch) < count
                parts.append((positions[keep], local_rows(tokens, rows)[keep], local_rows(lengths, rows)[keep]))
                if bar is not None:
                    bar.update(1)
            name = f"part-{int(chunk[0]):07d}-{int(chunk[-1]):07d}-p{jax.process_index():05d}.npz"
            _save_npz(
                directory / name,
                positions=np.concatenate([p[0] for p in parts]),
                tokens=np.concatenate([p[1] for p in parts]).astype(np.int32),
                lengths=np.concatenate([p[2] for p in parts]).astype(np.int32),
            )
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start

    _barrier("refine sequences: parts written")
    if primary:
        tokens, lengths = merge_parts(directory, count, max_new_tokens)
        _save_npz(directory / MERGED, record_ids=np.asarray(record_ids, np.int64), tokens=tokens, lengths=lengths)
        stats = {
            "generate_seconds": seconds,
            "batches_generated": int(len(todo)),
            "batches": int(num_batches),
            "mean_length": float(lengths.mean()),
        }
        _write_json(directory / COMPLETE, {"identity": wanted, "stats": stats})
        for path in part_files(directory):  # merged: the parts are no longer read
            path.unlink()
    _barrier("refine sequences: complete")
    return load_sequences(directory)


# ---------------------------------------------------------------------------------------
# The training input
# ---------------------------------------------------------------------------------------


class WithSequences:
    """A data source: the records of `source`, each with its stored generation added
    ("refine_tokens" [max_new] int32, "refine_length" [] int32). Picklable (grain workers)."""

    def __init__(self, source, sequences: Sequences):
        self.source = source
        self.record_ids = sequences.record_ids
        self.tokens = sequences.tokens
        self.lengths = sequences.lengths

    def __len__(self) -> int:
        return len(self.source)  # the global order is the source's (input_lib.GlobalBatchSampler)

    def __getitem__(self, key: int) -> dict:
        at = int(np.searchsorted(self.record_ids, key))
        if at >= len(self.record_ids) or self.record_ids[at] != key:
            raise KeyError(f"record {key} has no stored refine sequence")
        return dict(self.source[key], refine_tokens=self.tokens[at], refine_length=self.lengths[at])

    def __repr__(self) -> str:
        # grain compares repr(data source) when it restores an iterator: the records and their
        # order are the inner source's.
        return repr(self.source)


class RefineExample(input_lib.CaptionExample):
    """CaptionExample whose text after the prompt is the record's stored generation
    (compose_sequences): the same pixels, prompt_len and rng draws as the caption example."""

    def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        example = super().random_map(record, rng)
        new = compose_sequences(
            example["input_ids"][None],
            np.asarray([example["prompt_len"]]),
            record["refine_tokens"][None],
            np.asarray([record["refine_length"]]),
            self.tokenizer.pad_id,
        )
        example.update({k: v[0] for k, v in new.items()})
        return example


__all__ = [
    "RefineExample",
    "Sequences",
    "WithSequences",
    "compose_sequences",
    "generate_program",
    "identity",
    "load_sequences",
    "pregenerate",
    "records_to_generate",
]
