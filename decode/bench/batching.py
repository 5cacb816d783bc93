"""Static vs continuous batching on the same model and images: `decode.bench --batching static
continuous`.

A workload of --num-images prompts (synthetic test scenes by default) is captioned at each
--batch-size with each batching and each mode (AR, SSD):
- static: batches of B prompts, each one `generate` call that runs until its longest caption
  ends (the last batch padded with budget-0 rows, as decode.run pads);
- continuous: B slots (decode.engine.slots.SlotEngine), refilled as captions end.
Every program is compiled by an untimed warm-up; then `repeats` timed passes over the whole
workload, the four (batching, mode) pairs interleaved within each pass, so that a noisy
machine slows them alike. Greedy tokens must be the same in all four (`identical`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from decode.bench.models import BenchModel, eos_ids, make_prompts
from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate
from decode.engine.captioner import capacity_bucket
from decode.engine.slots import Request, SlotEngine, SlotStats
from fastvlm_jax.nn.model import VLM

BATCHINGS = ("static", "continuous")


def _static(model: VLM, params, spec: DecodeSpec, prompts: Prompts, batch: int, budget: int):
    """Captions every row in batches of `batch`: ({row: tokens}, slot-rounds, busy slot-rounds)."""
    total = prompts.input_ids.shape[0]
    tokens: dict[int, tuple[int, ...]] = {}
    slot_rounds = busy = 0
    for start in range(0, total, batch):
        rows = list(range(start, min(start + batch, total)))
        pick = np.asarray(rows + [rows[0]] * (batch - len(rows)))
        chunk = jax.tree.map(lambda x: x[pick], prompts)
        budgets = jnp.asarray([budget] * len(rows) + [0] * (batch - len(rows)), jnp.int32)
        out = jax.device_get(generate(model, params, chunk, spec, budgets))
        for i, row in enumerate(rows):
            tokens[row] = tuple(int(t) for t in out.tokens[i, : int(out.num_tokens[i])])
        slot_rounds += batch * int(np.max(out.stats.rounds))
        busy += int(np.sum(out.stats.rounds[: len(rows)]))
    return tokens, slot_rounds, busy


def _continuous(engine: SlotEngine, prompts: Prompts, budget: int):
    """Captions every row through the slots: ({row: tokens}, slot-rounds, busy slot-rounds)."""
    ids, lengths, pixels = jax.device_get((prompts.input_ids, prompts.lengths, prompts.pixels))
    requests = [
        Request(
            tuple(int(t) for t in ids[row, : int(lengths[row])]),
            None if pixels is None else pixels[row],
            jax.random.fold_in(jax.random.key(0), row),
            budget,
            tag=row,
        )
        for row in range(ids.shape[0])
    ]
    stats = SlotStats(engine.batch)
    tokens = {f.request.tag: f.token_ids for f in engine.stream(requests, stats)}
    return tokens, stats.rounds * engine.batch, stats.busy, stats


def bench_batching(
    bench: BenchModel,
    *,
    num_images: int,
    batch_sizes: list[int],
    modes: tuple[str, ...] = ("ar", "ssd"),
    batchings: tuple[str, ...] = BATCHINGS,
    draft_len: int = 5,
    max_new_tokens: int = 64,
    repeats: int = 3,
    images: list[str] | None = None,
    prompt: str | None = None,
    seed: int = 0,
    log=print,
) -> list[dict[str, Any]]:
    """One result per batch size: per (batching, mode) the timed passes' images/s and tokens/s
    (every pass, and their median), slot utilization; the continuous/static and SSD/AR ratios
    of the medians; whether all greedy tokens agree."""
    prompts = make_prompts(bench, num_images, images or [], prompt, seed)
    model = VLM(bench.config, bench.dtype)
    prompt_len = int(prompts.input_ids.shape[1])
    specs = {
        mode: DecodeSpec(
            mode,
            capacity=capacity_bucket(max_new_tokens),
            eos_ids=eos_ids(bench),
            policy=DraftPolicy(draft_len=draft_len),
        )
        for mode in modes
    }
    results = []
    for batch in batch_sizes:
        # Prompts of the same width as the static batches' (the workload's longest), not the
        # engine's default bucket of 32 tokens: both batchings prefill and attend over the same
        # positions, and differ only in how rows are scheduled.
        engines = {
            mode: SlotEngine(model, bench.params, specs[mode], batch, prompt_len, prompt_bucket=prompt_len)
            for mode in modes
        }

        def run(batching: str, mode: str):
            begin = time.perf_counter()
            if batching == "static":
                tokens, slot_rounds, busy = _static(model, bench.params, specs[mode], prompts, batch, max_new_tokens)
                extra: dict[str, Any] = {}
            else:
                tokens, slot_rounds, busy, stats = _continuous(engines[mode], prompts, max_new_tokens)
                extra = {"inserts": stats.inserts, "prefills": stats.prefills, "prefill_seconds": stats.prefill_seconds}
            return time.perf_counter() - begin, tokens, slot_rounds, busy, extra

        pairs = [(b, m) for b in batchings for m in modes]
        warm = {}
        for batching, mode in pairs:  # compile every program: untimed
            warm[batching, mode] = run(batching, mode)
        timed: dict[tuple[str, str], list] = {pair: [] for pair in pairs}
        for _ in range(repeats):
            for pair in pairs:
                timed[pair].append(run(*pair))
        reference = warm[pairs[0]][1]
        identical = all(r[1] == reference for runs in timed.values() for r in runs)
        result: dict[str, Any] = {"batch_size": batch, "num_images": num_images, "identical": identical}
        for batching, mode in pairs:
            runs = timed[batching, mode]
            tokens = sum(len(t) for t in runs[0][1].values())
            seconds = [r[0] for r in runs]
            entry = {
                "seconds": seconds,
                "images_per_s": [num_images / s for s in seconds],
                "tokens_per_s": [tokens / s for s in seconds],
                "tokens": tokens,
                "slot_utilization": runs[0][3] / runs[0][2] if runs[0][2] else None,
                **runs[0][4],
            }
            entry["images_per_s_median"] = statistics.median(entry["images_per_s"])
            entry["tokens_per_s_median"] = statistics.median(entry["tokens_per_s"])
            result.setdefault(batching, {})[mode] = entry
        if set(BATCHINGS) <= set(batchings):
            result["continuous_over_static"] = {
                mode: result["continuous"][mode]["images_per_s_median"] / result["static"][mode]["images_per_s_median"]
                for mode in modes
            }
        if {"ar", "ssd"} <= set(modes):
            result["ssd_over_ar"] = {
                b: result[b]["ssd"]["images_per_s_median"] / result[b]["ar"]["images_per_s_median"] for b in batchings
            }
        log(
            f"batch {batch:3d}: "
            + "  ".join(
                f"{b} {m} {result[b][m]['images_per_s_median']:.2f} img/s "
                f"(slots {result[b][m]['slot_utilization']:.2f})"
                for b, m in pairs
            )
            + f"  identical {identical}"
        )
        results.append(result)
    return results
