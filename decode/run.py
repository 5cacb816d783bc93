"""Batch captioning CLI: ``python -m decode.run --ckpt CKPT --images PATH... --out OUT.jsonl``.

Writes one JSON line per image as batches finish (flushed per batch), e.g.

    {"image": "photos/cat.jpg", "caption": "A cat on a sofa.", "token_ids": [319, ...],
     "num_tokens": 9, "stop": "eos", "mode": "ssd", "rounds": 4, "drafted": 12, "accepted": 5}

An image that cannot be used (missing, empty, not an image, truncated, corrupt) gets a line
{"image": ..., "error": "..."} instead, a one-line message on stderr, and the run goes on.
See EPILOG (`--help`) for resuming and exit codes.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import os
import re
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import jax
from tqdm import tqdm

from decode import parts
from decode.engine import DraftPolicy
from decode.engine.autodraft import AutoDraftConfig, parse_choice, parse_draft_len
from decode.engine.captioner import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PROMPT,
    BatchStats,
    Captioner,
    GenerationOptions,
    describe_device,
    group_by_size,
    summarize,
)
from decode.engine.sampling import SamplingConfig
from decode.engine.slots import Request, SlotStats, slot_choices
from decode.engine.tree import TreeShape, check_width
from decode.inputs import expand_inputs
from fastvlm_jax import demo
from fastvlm_jax.ckpt.checkpoint import CheckpointError, load_config
from fastvlm_jax.image.processing import ImageLoadError
from fastvlm_jax.nn.model import param_bytes
from fastvlm_jax.nn.quant import QUANTIZATIONS
from fastvlm_jax.runtime.distributed import finish_independent, maybe_initialize, start_heartbeat
from fastvlm_jax.runtime.paths import is_url
from fastvlm_jax.runtime.sharding import make_mesh, parse_mesh

PROG = "python -m decode.run"
EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

EPILOG = """\
PATH may be an image file, a folder (recursive; image extensions, case-insensitive; hidden
files skipped), a glob (quote it: 'imgs/**/*.jpg'), a text file (.txt/.lst/.list) listing one
PATH per line relative to itself (# comments), or tfds:NAME[/CONFIG][:SPLIT] (default split
"test", read from --data-dir).

Output: one JSON line per image, written as batches finish: image, caption, token_ids (the
generated ids, prompt excluded, EOS included if reached), num_tokens, stop ("eos"|"length"),
mode, rounds, drafted, accepted. An unusable image (missing, empty, not an image, truncated,
corrupt) is reported on stderr and gets a line {"image": ..., "error": ...}; the run goes on.

Resuming: rerunning with the same --out skips every image that already has a caption line
(matched by the "image" id: run from the same folder, or pass absolute paths). Error lines
are not "done": their images are tried again (the old error line is removed and a new line
written). A last line cut short by a killed run is dropped (the file is rewritten cleanly
first), so no image is captioned twice and none is lost.

MULTI-PROCESS (several hosts of a TPU slice, or --coordinator/--num-processes/--process-id):
every process expands --images the same way and takes every n-th image (process k: images
k, k+n, ...), with --mesh laying out its own chips; it writes OUT.part-k-of-n.jsonl (and
STATS.part-k-of-n.json) as batches finish and resumes from it. When every image has a line,
the last process to finish writes OUT (each image once, in input order); rerunning the same
command as one process resumes from the parts and merges them too. Part files are kept.
The processes share no work: each loads the checkpoint onto its own chips without waiting
for the others, and one with nothing (left) to do exits at once, except process 0, which
hosts the run's coordinator and so waits until every other process has finished or its
heartbeat has stopped for --peer-timeout seconds (it says whom it waits for). A process
that is killed loses nothing written; if it was process 0, the runtime stops the others
too. After a preemption, run the same command on every host again.

Timing (--stats): seconds and tokens_per_s cover decoding only; each new program shape is
compiled by a warm-up call first, reported as compile_seconds. wall_seconds is the whole run.
compiled_programs counts the decoding programs this run compiled: one per batch shape (models
whose images become as many tokens as their size gives: one per patch bucket), and for
continuous batching one per prefill shape plus the slot state's, insert and rounds (a new
bucket's prefill is compiled when the engine first meets it, inside its seconds).

Exit status:
  0    every image is captioned (this run or an earlier one)
  1    some images failed (see the error lines) but others were captioned
  2    usage error (bad flag or value, unusable --ckpt or --out, no images found), no image
       at all could be captioned, or the device ran out of memory
  130  interrupted (Ctrl-C): finished batches are in --out; rerun to continue
"""


class UsageError(Exception):
    """A problem with the command line, reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see `{PROG} --help`)\n")


# Measured on the demo (benchmarks/batching/, BENCHMARKS.md): continuous batching is at least as
# fast as static batching at every batch size there.
DEFAULT_BATCHING = "continuous"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Caption images with a fastvlm-jax checkpoint (self-speculative or plain autoregressive decoding).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--ckpt",
        required=True,
        metavar="CKPT_DIR|demo",
        help="checkpoint directory (python -m fastvlm_jax.convert / train.run), "
        "or `demo` for the built-in demo model (`demo-draft`: its 3-layer draft model)",
    )
    parser.add_argument(
        "--images",
        required=True,
        nargs="+",
        metavar="PATH",
        help="image files, folders, globs, list files or tfds:NAME[:SPLIT]",
    )
    parser.add_argument("--out", required=True, metavar="OUT.jsonl", help="JSONL output (resumed if present)")
    parser.add_argument(
        "--mode",
        choices=("ssd", "ar"),
        default="ssd",
        help="ssd: self-speculative decoding (default); ar: plain autoregressive",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=DEFAULT_MAX_NEW_TOKENS,
        help=f"caption length limit in tokens (default {DEFAULT_MAX_NEW_TOKENS})",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help=f"the question asked about each image (default: {DEFAULT_PROMPT!r} for "
        "LLaVA; none for BLIP-2, which captions from the image alone)",
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="sampling seed (continuous batching: each image samples from fold_in(seed, hash of its id), the "
        "same caption whatever the batch or host; static: batch i uses fold_in(seed, i))",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="params and compute dtype (default: the checkpoint's own)",
    )
    parser.add_argument(
        "--quantize",
        choices=list(QUANTIZATIONS),
        default=None,
        help="int8: quantize the decoding weights to int8 on load (per-output-channel scales, "
        "fastvlm_jax.nn.quant); a checkpoint stored with `fastvlm_jax.convert --quantize int8` needs no flag",
    )
    parser.add_argument(
        "--draft-len",
        type=parse_draft_len,
        default=5,
        help="SSD: most tokens drafted per round, or 'auto': the setting chosen among --auto-choices "
        "from measured round costs and running acceptance (per batch with static batching, between "
        "calls of the rounds with continuous batching)",
    )
    parser.add_argument(
        "--auto-choices",
        type=parse_choice,
        nargs="+",
        default=None,
        metavar="G|tree:NxK",
        help="--draft-len auto: the settings to choose among: chain draft lengths (0 = "
        "plain AR rounds) and draft trees tree:NODESxWIDTH (default 0 2 4 6)",
    )
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=0.0,
        help="SSD: stop drafting when the draft's top probability is below this",
    )
    parser.add_argument(
        "--draft-schedule",
        choices=("static", "context"),
        default="static",
        help="SSD: fixed draft length, or growing with the caption length",
    )
    parser.add_argument("--draft-start-len", type=int, default=1, help="SSD context schedule: first length")
    parser.add_argument(
        "--draft-grow-every", type=int, default=16, help="SSD context schedule: +1 draft token every this many tokens"
    )
    parser.add_argument(
        "--tree-nodes",
        type=int,
        default=0,
        help="SSD: draft a token tree of this many nodes per round (0 = a chain of --draft-len tokens, the default)",
    )
    parser.add_argument(
        "--tree-width",
        type=int,
        default=2,
        help="SSD tree: nodes added per drafting step and children per node (--tree-nodes must be a multiple of it)",
    )
    parser.add_argument(
        "--drafter",
        default="imitation",
        metavar="imitation|eagle|model:CKPT",
        help="SSD: what drafts: imitation (the checkpoint's draft path, default), eagle (its "
        "EAGLE head), or model:CKPT (a separate small VLM with the same tokenizer, "
        "e.g. model:demo-draft)",
    )
    parser.add_argument("--stats", metavar="STATS.json", help="write run statistics here")
    parser.add_argument("--data-dir", help="TFDS data dir for tfds: inputs (default $TFDS_DATA_DIR)")
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="image loading threads (they prefetch the next batch during decoding)",
    )
    parser.add_argument(
        "--fast-decode",
        action="store_true",
        help="decode very large images at reduced size first (faster, not bit-exact with Hugging Face preprocessing)",
    )
    parser.add_argument(
        "--prompt-bucket",
        type=int,
        default=32,
        help="pad prompts to a multiple of this many tokens (fewer compilations)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--batching",
        choices=["continuous", "static"],
        default=None,
        help="continuous: --batch-size slots, each refilled with the next image as soon as its "
        "caption ends (results are written as they finish, not in input order); static: "
        f"batches decoded in lockstep until their longest caption ends (default {DEFAULT_BATCHING}). "
        "With --draft-len auto, static batching chooses per batch (AR among the choices), continuous "
        "batching between rounds (among draft lengths >= 1 and trees)",
    )
    parser.add_argument(
        "--mesh",
        default=None,
        metavar="AXIS=N,...",
        help="lay the model out over this process's chips, e.g. data=2,tensor=4 "
        "(axes data, fsdp, tensor; -1 takes the remaining chips; default: "
        "one chip). tensor splits heads/MLP/vocab, data and fsdp split the "
        "batch (--batch-size must divide by data x fsdp)",
    )
    parser.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="multi-process: address of process 0 (auto-detected on Cloud TPU "
        "slices, SLURM and MPI; see MULTI-PROCESS below)",
    )
    parser.add_argument("--num-processes", type=int, default=None, help="multi-process: how many")
    parser.add_argument("--process-id", type=int, default=None, help="multi-process: this one's rank")
    parser.add_argument(
        "--peer-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="multi-process: process 0, which hosts the coordinator, waits for the "
        "others before it exits; it gives up on one whose heartbeat has "
        "stopped for this long (default 30)",
    )
    return parser


def _auto_options(args: argparse.Namespace):
    """The AutoDraftConfig of --draft-len auto (None otherwise); raises UsageError."""
    if args.draft_len != "auto":
        if args.auto_choices is not None:
            raise UsageError("--auto-choices needs --draft-len auto")
        return None
    if args.tree_nodes or args.min_confidence > 0 or args.draft_schedule != "static":
        raise UsageError(
            "--draft-len auto chooses among static chains and trees: it does not combine with "
            "--tree-nodes (name trees in --auto-choices, e.g. tree:16x2), --min-confidence or "
            "--draft-schedule"
        )
    try:
        config = AutoDraftConfig(choices=tuple(args.auto_choices)) if args.auto_choices else AutoDraftConfig()
    except ValueError as e:
        raise UsageError(f"--auto-choices: {e}") from None
    if config.trees and args.drafter != "imitation":
        raise UsageError(
            f"--auto-choices: draft trees are built by the imitation drafter only, not by --drafter {args.drafter}"
        )
    return config


def _check_args(args: argparse.Namespace) -> None:
    checks = [
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (args.draft_len == "auto" or args.draft_len >= 1, "--draft-len must be >= 1 or 'auto'"),
        (0 <= args.min_confidence <= 1, "--min-confidence must be in [0, 1]"),
        (args.draft_start_len >= 1, "--draft-start-len must be >= 1"),
        (args.draft_grow_every >= 1, "--draft-grow-every must be >= 1"),
        (args.workers >= 1, "--workers must be >= 1"),
        (args.prompt_bucket >= 1, "--prompt-bucket must be >= 1"),
        (args.prompt is None or bool(args.prompt.strip()), "--prompt must not be empty"),
        (args.num_processes is None or args.num_processes >= 1, "--num-processes must be >= 1"),
        (args.process_id is None or args.process_id >= 0, "--process-id must be >= 0"),
        (args.peer_timeout > 0, "--peer-timeout must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    try:  # the library checks --temperature, --top-k and --top-p (NaN and inf included)
        SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _tree_options(args)
    auto_config = _auto_options(args)
    if args.batching is None:
        args.batching = DEFAULT_BATCHING
    if args.batching == "continuous" and args.mode == "ssd" and auto_config is not None:
        if args.drafter == "eagle":
            raise UsageError(
                "--draft-len auto with --batching continuous: the eagle drafter's state depends on the draft "
                "length; use a fixed --draft-len or --batching static"
            )
        try:
            slot_choices(auto_config.choices)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if os.path.isdir(args.out):
        raise UsageError(
            f"--out {args.out} is a folder; pass a file name such as {args.out.rstrip('/')}/captions.jsonl"
        )
    if args.mesh is not None:
        try:
            parse_mesh(args.mesh)
        except ValueError as e:
            raise UsageError(str(e)) from None


def resolve_drafter(drafter: str) -> str:
    """--drafter, checked: 'imitation', 'eagle' or 'model:CKPT' with CKPT resolved like --ckpt
    (a folder, or demo-draft); raises UsageError."""
    if drafter in ("imitation", "eagle"):
        return drafter
    kind, _, path = drafter.partition(":")
    if kind != "model" or not path:
        raise UsageError(f"--drafter {drafter}: unknown drafter; use imitation, eagle or model:CKPT")
    try:
        return "model:" + resolve_checkpoint(path)
    except UsageError as e:
        raise UsageError(f"--drafter {drafter}: {str(e).split(': ', 1)[-1]}") from None


def _tree_options(args: argparse.Namespace):
    """The TreeShape of --tree-nodes / --tree-width; raises UsageError for a bad one."""
    try:
        tree = TreeShape(nodes=args.tree_nodes, width=args.tree_width)
    except ValueError as e:
        raise UsageError(f"--tree-nodes / --tree-width: {e}") from None
    if tree.enabled and (args.min_confidence > 0 or args.draft_schedule != "static"):
        raise UsageError(
            "--tree-nodes drafts a tree of a static shape: --min-confidence and --draft-schedule apply to chains only"
        )
    if tree.enabled and args.drafter != "imitation":
        raise UsageError(
            f"--tree-nodes: draft trees are built by the imitation drafter only, not by --drafter {args.drafter}"
        )
    return tree


# ------------------------------------------------------------------------------------------
# Checkpoint


def resolve_checkpoint(ckpt: str) -> str:
    """`demo` / `demo-draft` -> the shipped demo / its draft model's folder; a path is checked
    to be a checkpoint folder."""
    if ckpt in demo.DEMO_NAMES:
        try:
            return os.fspath(demo.resolve(ckpt))
        except demo.DemoMissingError as e:
            raise UsageError(f"--ckpt {ckpt}: {e}") from None
    if is_url(ckpt):  # a bucket: only config.json can be checked cheaply
        try:
            load_config(ckpt)
        except (CheckpointError, OSError, ValueError) as e:
            raise UsageError(f"--ckpt {ckpt}: {' '.join(str(e).split())}") from None
        return ckpt
    if not os.path.exists(ckpt):
        raise UsageError(f"--ckpt {ckpt}: no such folder (pass a fastvlm-jax checkpoint folder, or `demo`)")
    if not os.path.isdir(ckpt):
        raise UsageError(f"--ckpt {ckpt}: not a folder (a checkpoint is a folder with config.json and params/)")
    if _looks_like_hf(Path(ckpt)):
        raise UsageError(
            f"--ckpt {ckpt} is a Hugging Face model folder; convert it first: "
            f"python -m fastvlm_jax.convert --hf {ckpt} --out CKPT_DIR, then pass --ckpt CKPT_DIR"
        )
    try:
        load_config(ckpt)  # cheap: fails fast on a Hugging Face folder or a wrong path
    except CheckpointError as e:
        message = str(e)
        if "convert" not in message:  # (a Hugging Face folder already gets the convert hint)
            inner = sorted(
                p.name for p in Path(ckpt).iterdir() if (p / "config.json").is_file() and (p / "params").is_dir()
            )
            hint = (
                f"did you mean {os.path.join(ckpt, inner[0])}?"
                if inner
                else "pass a folder written by fastvlm_jax.convert or train.run, or `demo`"
            )
            message = f"{message} ({hint})"
        raise UsageError(f"--ckpt: {message}") from None
    except ValueError as e:  # e.g. an unknown config key
        raise UsageError(f"--ckpt {ckpt}: bad config.json ({' '.join(str(e).split())})") from None
    return ckpt


def _check_tree_widths(args: argparse.Namespace, ckpt: str) -> None:
    """The draft trees (--tree-width, or trees among --auto-choices) against the checkpoint's
    vocabulary, before anything is loaded; raises UsageError."""
    if args.mode != "ssd":
        return
    auto = _auto_options(args)
    vocab_size = load_config(ckpt).text.vocab_size
    for tree in [_tree_options(args), *(auto.trees if auto else ())]:
        try:
            check_width(tree, vocab_size)
        except ValueError as e:
            raise UsageError(str(e)) from None


def _looks_like_hf(path: Path) -> bool:
    """Weights in Hugging Face layout, or a config.json written by transformers."""
    if (path / "params").is_dir():
        return False
    if (
        any(path.glob("*.safetensors"))
        or (path / "pytorch_model.bin").exists()
        or (path / "model.safetensors.index.json").exists()
    ):
        return True
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and any(k in config for k in ("architectures", "transformers_version"))


# ------------------------------------------------------------------------------------------
# Output file (resume)


@dataclasses.dataclass(frozen=True)
class PreviousOutput:
    """What an earlier run left in --out.

    lines: the parsed JSON lines, in order (unparsable ones left out); done: images with a
    caption line; dropped: line numbers that were not valid JSON (normally just a last line
    cut short by a kill); clean: the file ends with a newline and every line parsed.
    """

    lines: list[Any]
    done: frozenset[str]
    dropped: tuple[int, ...]
    clean: bool


def is_caption_line(line: Any) -> bool:
    return (
        isinstance(line, dict)
        and isinstance(line.get("image"), str)
        and isinstance(line.get("caption"), str)
        and line.get("error") is None
    )


def is_error_line(line: Any) -> bool:
    return isinstance(line, dict) and isinstance(line.get("image"), str) and line.get("error") is not None


def read_previous(path: str) -> PreviousOutput:
    if not os.path.exists(path):
        return PreviousOutput([], frozenset(), (), True)
    with open(path, "rb") as f:
        data = f.read()
    lines, dropped = [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            lines.append(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            dropped.append(number)
    done = frozenset(line["image"] for line in lines if is_caption_line(line))
    clean = not dropped and (not data or data.endswith(b"\n"))
    return PreviousOutput(lines, done, tuple(dropped), clean)


def json_line(record: dict[str, Any]) -> str:
    text = json.dumps(record, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A file name that is not valid UTF-8 (lone surrogates): \u-escape it; JSON readers
        # get the same string back, so resuming still matches it.
        text = json.dumps(record)
    return text + "\n"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# Image loading (threads; overlaps with decoding)


def _reason(item, error: BaseException) -> str:
    """One-line reason without the file name prefix load_image puts first (we add the id)."""
    message = " ".join(str(error).split()) or type(error).__name__
    for prefix in [f"{item.path}: "] if item.path is not None else []:
        if message.startswith(prefix):
            return message[len(prefix) :]
    return re.sub(r"^<\d+ bytes>: ", "", message)


def _load(captioner, item, fast_decode: bool):
    """(pixels [H, W, 3], None) or (None, reason)."""
    try:
        return captioner.preprocess(item.load(), fast_decode=fast_decode), None
    except ImageLoadError as e:
        return None, _reason(item, e)
    except MemoryError:
        return None, "out of memory while decoding (try --fast-decode or fewer --workers)"
    except Exception as e:  # anything else a strange file triggers must not stop the run
        return None, f"cannot load image ({type(e).__name__}: {_reason(item, e)})"


def load_in_background(
    captioner, items: Sequence, workers: int, window: int, fast_decode: bool
) -> Iterator[tuple[Any, Any, str | None]]:
    """Yields (item, pixels or None, error or None) in order, loading up to `window` ahead.

    The threads keep decoding while the caller runs the model (PIL and XLA release the GIL),
    so the next batch is usually ready when the current one finishes.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="load")
    pending: collections.deque = collections.deque()
    upcoming = iter(items)
    try:
        for item in upcoming:
            pending.append((item, pool.submit(_load, captioner, item, fast_decode)))
            if len(pending) >= window:
                break
        while pending:
            item, future = pending.popleft()
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, pool.submit(_load, captioner, following, fast_decode)))
            pixels, error = future.result()
            yield item, pixels, error
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------
# Main


def _say(message: str, progress=None) -> None:
    """A line on stderr that does not break the progress bar."""
    if progress is not None:
        progress.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def _write_stats(path: str, stats: dict[str, Any]) -> None:
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    _write_atomic(path, json.dumps(stats, indent=2) + "\n")


def main(argv: Sequence[str | os.PathLike] | None = None) -> int:
    """Runs the CLI; returns the exit status (see EPILOG) instead of exiting."""
    started = time.perf_counter()
    parser = build_parser()
    if argv is not None:
        argv = [os.fspath(a) for a in argv]  # in-process callers may pass Path objects
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) and argparse errors (2): return, do not exit
        return int(e.code or 0)
    try:
        _check_args(args)
        ckpt = resolve_checkpoint(args.ckpt)
        _check_tree_widths(args, ckpt)
        args.drafter = resolve_drafter(args.drafter)
        return _run(args, ckpt, started)
    except UsageError as e:
        _say(f"{PROG}: error: {e}")
        return EXIT_USAGE


def _run(args: argparse.Namespace, ckpt: str, started: float) -> int:
    try:
        # Each process captions its own share on its own devices: independent processes.
        if maybe_initialize(args.coordinator, args.num_processes, args.process_id, independent=True):
            start_heartbeat()
    except (RuntimeError, ValueError) as e:
        raise UsageError(
            f"cannot join the multi-process run: {' '.join(str(e).split())} "
            "(check --coordinator, --num-processes and --process-id)"
        ) from None
    index, count = jax.process_index(), jax.process_count()
    all_items, input_errors = expand_inputs(args.images, args.data_dir)
    if index > 0:
        input_errors = []  # process 0 reports (and records) problems with the --images specs
    for error in input_errors:
        _say(f"{PROG}: error: {error.spec}: {error.message}")
    if not all_items:
        raise UsageError("no images found in --images" + (" (see the errors above)" if input_errors else ""))
    final_out = args.out
    earlier = _done_elsewhere(final_out, count, index)
    items = all_items
    if count > 1:
        items = parts.share(all_items, index, count)
        args = argparse.Namespace(
            **{
                **vars(args),
                "out": parts.part_path(final_out, index, count),
                "stats": args.stats and parts.part_path(args.stats, index, count),
            }
        )
        _say(f"{PROG}: process {index} of {count}: {len(items)} of {len(all_items)} images -> {args.out}")

    try:
        previous = read_previous(args.out)
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot read the existing file ({e.strerror or e})") from None
    pending = [item for item in items if item.id not in previous.done and item.id not in earlier]
    skipped = len(items) - len(pending)
    # Error lines of this run's images go: they are retried now (or were superseded by a
    # caption line). Error lines of images not named this time stay.
    named = {item.id for item in items} | {error.spec for error in input_errors}
    kept = [line for line in previous.lines if not (is_error_line(line) and line["image"] in named)]
    if previous.dropped:
        _say(
            f"{PROG}: {args.out}: dropping {len(previous.dropped)} unreadable line(s) "
            f"(line {', '.join(map(str, previous.dropped[:5]))}; a run killed while writing)"
        )
    if not previous.clean or len(kept) != len(previous.lines):
        _write_atomic(args.out, "".join(json_line(line) for line in kept))
    modes = collections.Counter(line.get("mode") for line in kept if is_caption_line(line))
    other = {m: n for m, n in modes.items() if m is not None and m != args.mode}
    if other:
        _say(
            f"{PROG}: note: {args.out} already holds captions made with "
            + ", ".join(f"--mode {m} ({n})" for m, n in other.items())
            + "; they are kept and skipped. Use another --out to compare modes."
        )
    if skipped:
        _say(f"{PROG}: {skipped} of {len(items)} images already captioned in {args.out}, skipping them")

    try:
        parent = os.path.dirname(args.out)
        if parent:
            os.makedirs(parent, exist_ok=True)
        out = open(args.out, "a", encoding="utf-8")  # noqa: SIM115 (closed by `with out:` below)
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot write ({e.strerror or e})") from None
    with out:
        for error in input_errors:
            out.write(json_line({"image": error.spec, "error": error.message}))
        out.flush()
        status = _caption_all(args, ckpt, pending, skipped, input_errors, out, started)
    image_ids = [item.id for item in all_items] + [e.spec for e in input_errors]
    if status in (EXIT_OK, EXIT_SOME_FAILED) and (count > 1 or parts.existing_parts(final_out)):
        _merge_parts(final_out, image_ids)
    if count > 1 and status != EXIT_INTERRUPTED:
        died = finish_independent(lambda line: _say(f"{PROG}: {line}"), give_up_seconds=args.peer_timeout)
        if index == 0 and status in (EXIT_OK, EXIT_SOME_FAILED) and not os.path.exists(final_out):
            _merge_parts(final_out, image_ids, quiet_if_missing=bool(died))
            if died and not os.path.exists(final_out):
                _say(
                    f"{PROG}: process(es) {', '.join(map(str, died))} stopped before finishing their "
                    "share; rerun the same command on every host to caption what is left"
                )
    return status


def _done_elsewhere(final_out: str, count: int, index: int) -> frozenset[str]:
    """Images captioned in OUT's other files: OUT itself when this process writes a part, and
    every part when it writes OUT (a one-process rerun after a multi-process run)."""
    own = parts.part_path(final_out, index, count) if count > 1 else final_out
    others = [p for p in [final_out] + parts.existing_parts(final_out) if p != own]
    done: set[str] = set()
    for path in others:
        try:
            done |= read_previous(path).done
        except OSError:
            continue
    return frozenset(done)


def _merge_parts(final_out: str, image_ids: list[str], quiet_if_missing: bool = False) -> None:
    missing = parts.merge(
        final_out, image_ids, lambda path: read_previous(path).lines, _write_atomic, json_line, is_caption_line
    )
    if missing and quiet_if_missing:
        return
    if missing:
        _say(
            f"{PROG}: {len(missing)} image(s) not yet in any part of {final_out} (other processes "
            "still running?); the last one to finish writes it"
        )
    else:
        _say(
            f"{PROG}: wrote {final_out}: {len(dict.fromkeys(image_ids))} images from "
            f"{len(parts.existing_parts(final_out))} part file(s)"
        )


def _local_mesh(args):
    """The --mesh over this process's own devices (None: one device)."""
    if args.mesh is None:
        return None
    try:
        mesh = make_mesh(parse_mesh(args.mesh), jax.local_devices())
    except ValueError as e:
        raise UsageError(f"--mesh {args.mesh}: {e} ({len(jax.local_devices())} devices here)") from None
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if args.batch_size % rows:
        raise UsageError(
            f"--batch-size {args.batch_size} does not divide over --mesh {args.mesh} "
            f"(data x fsdp = {rows}); use a multiple of {rows}"
        )
    return mesh


class _Stopped(Exception):
    """Captioning stopped early (Ctrl-C, or the device ran out of memory); totals: so far."""

    def __init__(self, totals: BatchStats, interrupted: bool):
        super().__init__("stopped")
        self.totals, self.interrupted = totals, interrupted


def _stopping(error: BaseException, totals: BatchStats) -> _Stopped | None:
    if isinstance(error, KeyboardInterrupt):
        return _Stopped(totals, interrupted=True)
    if "RESOURCE_EXHAUSTED" in str(error):
        return _Stopped(totals, interrupted=False)
    return None


def _caption_static(args, captioner, options, prompt, stream, base_rng, record, show, failed_to_load, out):
    """Batches of --batch-size images in lockstep; each batch's lines written when it ends.
    Images that keep their size are batched with others of similar size (a few batches
    ahead: `group_by_size`), so each batch pads less."""
    totals = BatchStats()
    batch_items: list = []
    batch_pixels: list = []
    batches = 0

    def run_batch():
        nonlocal totals, batches
        result = captioner.generate_batch(
            list(batch_pixels),
            [captioner.prompt_ids(prompt, pixels) for pixels in batch_pixels],
            options,
            jax.random.fold_in(base_rng, batches),
        )
        batches += 1
        for item, r in zip(batch_items, result.results):
            record(item, r)
        out.flush()  # a killed run keeps every finished batch
        totals = totals + result.stats
        show(totals, len(batch_items))
        batch_items.clear()
        batch_pixels.clear()

    def loaded():
        for item, pixels, error in stream:
            if error is not None:
                failed_to_load(item, error)
                continue
            yield item, pixels

    try:
        size = captioner.image_size
        for batch in group_by_size(loaded(), args.batch_size, captioner.grouping_window, lambda e: size(e[1])):
            for item, pixels in batch:
                batch_items.append(item)
                batch_pixels.append(pixels)
            run_batch()
    except (KeyboardInterrupt, Exception) as e:
        stopped = _stopping(e, totals)
        if stopped is None:
            raise
        raise stopped from None
    return totals


def request_key(base_rng, image_id: str):
    """An image's own sampling key: fold_in(key(seed), a hash of its id), so its caption does
    not depend on its batch, its slot or the number of hosts."""
    return jax.random.fold_in(base_rng, zlib.crc32(image_id.encode("utf-8")) & 0x7FFFFFFF)


def _caption_continuous(args, captioner, options, prompt, stream, base_rng, record, show, failed_to_load, out):
    """--batch-size slots refilled as captions end; each line written as its caption ends."""
    engine = captioner.slot_engine(options, captioner.longest_prompt(prompt))
    budget = options.max_new_tokens
    # Compile every program (both prefills, insert, rounds) on one dummy image first, so that
    # seconds and tokens/s measure decoding, as in static batching.
    begin = time.perf_counter()
    blank = captioner.dummy_pixels()
    dummy = Request(tuple(captioner.prompt_ids(prompt, blank)), blank, jax.random.key(0), 1)
    for _ in engine.stream([dummy]):
        pass
    compile_seconds = time.perf_counter() - begin

    def requests():
        for item, pixels, error in stream:
            if error is not None:
                failed_to_load(item, error)
                continue
            ids = tuple(captioner.prompt_ids(prompt, pixels))
            yield Request(ids, pixels, request_key(base_rng, item.id), budget, tag=item)

    slot_stats = SlotStats(args.batch_size)
    counts = {"images": 0, "tokens": 0, "first": 0, "rounds": 0, "drafted": 0, "accepted": 0}

    def totals() -> BatchStats:
        seconds = slot_stats.prefill_seconds + slot_stats.round_seconds
        return BatchStats(
            images=counts["images"],
            tokens=counts["tokens"],
            first_tokens=counts["first"],
            rounds=counts["rounds"],
            drafted=counts["drafted"],
            accepted=counts["accepted"],
            seconds=seconds,
            compile_seconds=compile_seconds,
            position_attempts=slot_stats.position_attempts,
            position_accepts=slot_stats.position_accepts,
            verified=slot_stats.verified,
            draft_len_rounds=tuple(slot_stats.choice_rounds.items()),
            slot_rounds=slot_stats.rounds * slot_stats.slots,
            busy_rounds=slot_stats.busy,
            inserts=slot_stats.inserts,
            prefills=slot_stats.prefills,
            prefill_seconds=slot_stats.prefill_seconds,
        )

    try:
        for finished in engine.stream(requests(), slot_stats):
            r = captioner.result_of(finished)
            record(finished.request.tag, r)
            out.flush()  # a killed run keeps every finished caption
            counts["images"] += 1
            counts["tokens"] += r.num_tokens
            counts["first"] += r.num_tokens > 0
            counts["rounds"] += r.rounds
            counts["drafted"] += r.drafted
            counts["accepted"] += r.accepted
            show(totals(), 1)
    except (KeyboardInterrupt, Exception) as e:
        stopped = _stopping(e, totals())
        if stopped is None:
            raise
        raise stopped from None
    return totals()


def _caption_all(args, ckpt: str, pending: list, skipped: int, input_errors: list, out: TextIO, started: float) -> int:
    options = GenerationOptions(
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p),
        policy=DraftPolicy(
            draft_len=5 if args.draft_len == "auto" else args.draft_len,
            min_confidence=args.min_confidence,
            schedule=args.draft_schedule,
            start_len=args.draft_start_len,
            grow_every=args.draft_grow_every,
        ),
        tree=_tree_options(args),
        auto_draft=_auto_options(args),
    )
    failures = [{"image": error.spec, "error": error.message} for error in input_errors]
    totals = BatchStats()
    interrupted = out_of_memory = False
    captioner = None
    prompt = args.prompt  # the question actually asked (the model's default when None)
    if pending:
        try:
            captioner = Captioner(
                ckpt,
                batch_size=args.batch_size,
                prompt_bucket=args.prompt_bucket,
                dtype=args.dtype,
                quantize=args.quantize,
                mesh=_local_mesh(args),
                drafter=args.drafter if args.mode == "ssd" else "imitation",
            )
        except ValueError as e:  # CheckpointError (a ValueError) or a config the loader rejects
            raise UsageError(f"--ckpt {args.ckpt}: {' '.join(str(e).split())}") from None
        try:
            prompt = captioner.default_prompt if args.prompt is None else args.prompt
            captioner.prompt_ids(prompt, captioner.dummy_pixels())  # a bad prompt fails here, once
        except ValueError as e:  # e.g. the prompt contains the image placeholder
            raise UsageError(f"--prompt: {e}") from None

        progress = tqdm(total=len(pending), unit="img", dynamic_ncols=True, disable=True if args.no_progress else None)
        base_rng = jax.random.key(args.seed)

        def record(item, r) -> None:
            out.write(
                json_line(
                    {
                        "image": item.id,
                        "caption": r.caption,
                        "token_ids": list(r.token_ids),
                        "num_tokens": r.num_tokens,
                        "stop": r.stop,
                        "mode": args.mode,
                        "rounds": r.rounds,
                        "drafted": r.drafted,
                        "accepted": r.accepted,
                    }
                )
            )

        def show(summary_of, count: int) -> None:
            summary = summarize(summary_of)
            postfix = {"tok/s": f"{summary['tokens_per_s'] or 0:.1f}"}
            if args.mode == "ssd":
                postfix["acc"] = f"{summary['acceptance_rate'] or 0:.2f}"
                postfix["len"] = f"{summary['mean_accepted_length'] or 0:.2f}"
            if summary["slot_utilization"] is not None:
                postfix["slots"] = f"{summary['slot_utilization']:.2f}"
            progress.set_postfix(postfix, refresh=False)
            progress.update(count)

        def failed_to_load(item, error) -> None:
            _say(f"{PROG}: error: {item.id}: {error} (skipped)", progress)
            failures.append({"image": item.id, "error": error})
            out.write(json_line({"image": item.id, "error": error}))
            out.flush()
            progress.update(1)

        ahead = max(2 * args.batch_size, captioner.grouping_window + args.batch_size)
        stream = load_in_background(captioner, pending, args.workers, ahead, args.fast_decode)
        try:
            if args.batching == "continuous":
                totals = _caption_continuous(
                    args, captioner, options, prompt, stream, base_rng, record, show, failed_to_load, out
                )
            else:
                totals = _caption_static(
                    args, captioner, options, prompt, stream, base_rng, record, show, failed_to_load, out
                )
        except _Stopped as stop:
            totals = stop.totals
            if stop.interrupted:
                interrupted = True
                _say(
                    f"{PROG}: interrupted; finished captions are in {args.out}, rerun the same command to continue",
                    progress,
                )
            else:
                out_of_memory = True
                _say(
                    f"{PROG}: error: the device ran out of memory at --batch-size {args.batch_size}; "
                    f"rerun with a smaller --batch-size (finished captions are kept in {args.out})",
                    progress,
                )
        finally:
            stream.close()
            progress.close()

    failed = len(failures)
    captioned = totals.images
    if args.stats:
        stats = summarize(totals)
        stats.update(
            {
                "mode": args.mode,
                "failed": failed,
                "skipped_done": skipped,
                "images_total": captioned + skipped + failed,
                "interrupted": interrupted,
                "out_of_memory": out_of_memory,
                "wall_seconds": time.perf_counter() - started,
                "timing": (
                    "seconds and tokens_per_s exclude compilation: each new program shape is "
                    "compiled by a warm-up call, timed separately as compile_seconds"
                ),
                "device": describe_device(),
                "mesh": args.mesh,
                "process_index": jax.process_index(),
                "process_count": jax.process_count(),
                "batch_size": args.batch_size,
                "batching": args.batching,
                "max_new_tokens": args.max_new_tokens,
                "prompt": prompt,
                "temperature": args.temperature,
                "top_k": args.top_k,
                "top_p": args.top_p,
                "seed": args.seed,
                "draft_len": args.draft_len if args.mode == "ssd" else None,
                "tree_nodes": args.tree_nodes if args.mode == "ssd" else None,
                "drafter": args.drafter if args.mode == "ssd" else None,
                "tree_width": args.tree_width if args.mode == "ssd" and args.tree_nodes else None,
                "auto_draft": (
                    captioner.auto_draft.report() if captioner and captioner.auto_draft and args.mode == "ssd" else None
                ),
                "min_confidence": args.min_confidence,
                "draft_schedule": args.draft_schedule,
                "checkpoint": os.fspath(ckpt),
                "out": args.out,
                "dtype": captioner.dtype.name if captioner else None,
                "quantization": captioner.config.quantization if captioner else None,
                "param_bytes": param_bytes(captioner.params) if captioner else None,
                "compiled_programs": captioner.programs if captioner else 0,
                "failures": failures,
            }
        )
        _write_stats(args.stats, stats)

    if interrupted:
        return EXIT_INTERRUPTED
    if out_of_memory:
        return EXIT_USAGE
    if failed == 0:
        if not pending and skipped:
            _say(f"{PROG}: nothing to do: every image is already captioned in {args.out}")
        elif not pending:
            _say(f"{PROG}: nothing to do: this process's share of the images is empty")
        return EXIT_OK
    _say(f"{PROG}: {failed} image(s) failed (error lines in {args.out}); {captioned + skipped} captioned")
    return EXIT_SOME_FAILED if captioned + skipped > 0 else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
