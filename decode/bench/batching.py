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
from decode.engine.autodraft import AutoDraft, AutoDraftConfig, Choice, is_tree
from decode.engine.captioner import capacity_bucket
from decode.engine.slots import Request, SlotEngine, SlotStats, slot_choices
from decode.engine.tree import TreeShape
from fastvlm_jax.nn.model import VLM

BATCHINGS = ("static", "continuous")


def _static(model: VLM, params, spec: DecodeSpec, prompts: Prompts, batch: int, budget: np.ndarray):
    """Captions every row (row i with budget[i] new tokens at most) in batches of `batch`:
    ({row: tokens}, slot-rounds, busy slot-rounds)."""
    total = prompts.input_ids.shape[0]
    tokens: dict[int, tuple[int, ...]] = {}
    rounds: dict[int, int] = {}
    slot_rounds = busy = 0
    for start in range(0, total, batch):
        rows = list(range(start, min(start + batch, total)))
        pick = np.asarray(rows + [rows[0]] * (batch - len(rows)))
        chunk = jax.tree.map(lambda x: x[pick], prompts)
        budgets = jnp.asarray([int(budget[row]) for row in rows] + [0] * (batch - len(rows)), jnp.int32)
        out = jax.device_get(generate(model, params, chunk, spec, budgets))
        for i, row in enumerate(rows):
            tokens[row] = tuple(int(t) for t in out.tokens[i, : int(out.num_tokens[i])])
            rounds[row] = int(out.stats.rounds[i])
        slot_rounds += batch * int(np.max(out.stats.rounds))
        busy += int(np.sum(out.stats.rounds[: len(rows)]))
    return tokens, slot_rounds, busy, rounds


def _continuous(engine: SlotEngine, prompts: Prompts, budget: np.ndarray):
    """Captions every row (row i with budget[i] new tokens at most) through the slots:
    ({row: tokens}, slot-rounds, busy slot-rounds, SlotStats)."""
    ids, lengths, pixels = jax.device_get((prompts.input_ids, prompts.lengths, prompts.pixels))
    requests = [
        Request(
            tuple(int(t) for t in ids[row, : int(lengths[row])]),
            None if pixels is None else pixels[row],
            jax.random.fold_in(jax.random.key(0), row),
            int(budget[row]),
            tag=row,
        )
        for row in range(ids.shape[0])
    ]
    stats = SlotStats(engine.batch)
    finished = list(engine.stream(requests, stats))
    tokens = {f.request.tag: f.token_ids for f in finished}
    rounds = {f.request.tag: f.rounds for f in finished}
    return tokens, stats.rounds * engine.batch, stats.busy, stats, rounds


def bench_batching(
    bench: BenchModel,
    *,
    num_images: int,
    batch_sizes: list[int],
    modes: tuple[str, ...] = ("ar", "ssd"),
    batchings: tuple[str, ...] = BATCHINGS,
    draft_len: int = 5,
    auto_choices: tuple[Choice, ...] = (),
    max_new_tokens: int = 64,
    length_range: tuple[int, int] | None = None,
    repeats: int = 3,
    images: list[str] | None = None,
    prompt: str | None = None,
    seed: int = 0,
    log=print,
) -> list[dict[str, Any]]:
    """One result per batch size: per (batching, mode) the timed passes' images/s and tokens/s
    (every pass, and their median), slot utilization; the continuous/static and SSD/AR ratios
    of the medians; whether all greedy tokens agree.

    length_range: (shortest, longest): a workload of longer, varied captions instead: prompt
    i's budget is drawn uniformly from that range (seeded) and EOS does not stop it, so each
    caption has exactly its budget's tokens (the model's continuation past its EOS).
    auto_choices: also mode 'auto' (continuous batching only): SSD with `--draft-len auto`
    among these chains (draft lengths >= 1) and trees, each timed pass starting with nothing
    measured, as a decode.run would."""
    prompts = make_prompts(bench, num_images, images or [], prompt, seed)
    model = VLM(bench.config, bench.dtype)
    prompt_len = int(prompts.input_ids.shape[1])
    stops = eos_ids(bench)
    budget = np.full((num_images,), max_new_tokens, np.int32)
    if length_range is not None:
        shortest, longest = length_range
        if not 1 <= shortest <= longest:
            raise ValueError(f"a length range needs 1 <= shortest <= longest, got {length_range}")
        budget = np.random.RandomState(seed).randint(shortest, longest + 1, num_images).astype(np.int32)
        max_new_tokens, stops = longest, ()
    specs = {
        mode: DecodeSpec(
            mode,
            capacity=capacity_bucket(max_new_tokens),
            eos_ids=stops,
            policy=DraftPolicy(draft_len=draft_len),
        )
        for mode in modes
    }
    choice_specs = {
        choice: DecodeSpec(
            "ssd",
            capacity=capacity_bucket(max_new_tokens),
            eos_ids=stops,
            policy=DraftPolicy() if is_tree(choice) else DraftPolicy(draft_len=choice),
            tree=choice if is_tree(choice) else TreeShape(),
        )
        for choice in (slot_choices(auto_choices) if auto_choices else ())
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
        if choice_specs:
            engines["auto"] = SlotEngine(
                model,
                bench.params,
                specs.get("ssd", next(iter(choice_specs.values()))),
                batch,
                prompt_len,
                prompt_bucket=prompt_len,
                auto=AutoDraft(AutoDraftConfig(tuple(choice_specs))),
                choices=choice_specs,
            )

        def run(batching: str, mode: str):
            begin = time.perf_counter()
            if batching == "static":
                tokens, slot_rounds, busy, rounds = _static(model, bench.params, specs[mode], prompts, batch, budget)
                extra: dict[str, Any] = {}
            else:
                engine = engines[mode]
                if engine.auto is not None:  # every pass chooses from scratch
                    engine.auto = AutoDraft(engine.auto.config)
                tokens, slot_rounds, busy, stats, rounds = _continuous(engine, prompts, budget)
                extra = {"inserts": stats.inserts, "prefills": stats.prefills, "prefill_seconds": stats.prefill_seconds}
                if engine.auto is not None:
                    extra["draft_len_rounds"] = {str(label): n for label, n in stats.choice_rounds.items()}
            # Each request's rounds after its prefill: the same in either batching (rows
            # advance on their own), what tpu_predict.py schedules on a TPU's costs.
            extra["request_rounds"] = [rounds[row] for row in range(num_images)]
            return time.perf_counter() - begin, tokens, slot_rounds, busy, extra

        pairs = [(b, m) for b in batchings for m in modes]
        if choice_specs and "continuous" in batchings:
            pairs.append(("continuous", "auto"))
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
        if ("continuous", "auto") in pairs and "ar" in modes:
            continuous = result["continuous"]
            result["auto_over_ar"] = continuous["auto"]["images_per_s_median"] / continuous["ar"]["images_per_s_median"]
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
