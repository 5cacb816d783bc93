"""Timing AR against SSD at one sweep point (batch size, exit layer, draft policy).

Both modes decode the same prompt sets with the same model. Every program is compiled by
a first call (its time is reported apart, as `first_call_seconds`); then `repeats` runs of
each are timed, interleaved (AR, SSD, AR, SSD, ...) so that load from other processes hits
both alike, and the median and the min are reported. Tokens/s counts generated tokens only.
The same programs run with a budget of one token time the prefill alone (the budget is a
traced scalar), so the decode phase's own tokens/s can be told apart.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import numpy as np

from decode.bench.cost import CostModel
from decode.bench.models import BenchDrafter, BenchModel, decode_sets, eos_ids, with_exit_layer
from decode.bench.replay import replay_report
from decode.engine import DecodeOutput, DecodeSpec, DraftPolicy, Prompts
from decode.engine.autodraft import AutoDraft, Choice, is_tree
from decode.engine.captioner import accepted_depth_histogram
from decode.engine.drafters import EagleDrafter, ImitationDrafter, ModelDrafter
from decode.engine.sampling import SamplingConfig
from decode.engine.tree import TreeShape
from fastvlm_jax.nn.model import VLM, param_bytes


def time_interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, log: Callable[[str], None] | None = None
) -> dict[str, tuple[object, list[float], float]]:
    """Calls each zero-argument function once (compile + first run), then `repeats` times
    each, interleaved. Returns {name: (last output, [seconds per repeat], first-call seconds)}.
    log: called with a line after each first call and each repeat (progress of long runs)."""
    results = {}
    for name, call in calls.items():
        start = time.perf_counter()
        out = call()
        results[name] = [out, [], time.perf_counter() - start]
        if log:
            log(f"{name}: first call {results[name][2]:.2f} s")
    for repeat in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            results[name][0] = call()
            results[name][1].append(time.perf_counter() - start)
        if log:
            log(f"repeat {repeat + 1}/{repeats}: " + ", ".join(f"{k} {v[1][-1]:.2f} s" for k, v in results.items()))
    return {name: tuple(v) for name, v in results.items()}


def speed_report(tokens: int, rows: int, times: list[float], sets: int = 1) -> dict:
    """Throughput of `tokens` generated tokens over `rows` rows in `sets` prompt sets,
    decoded once per entry of `times` (seconds)."""
    median = statistics.median(times)
    return {
        "tokens": tokens,
        "seconds_median": median,
        "seconds_min": min(times),
        "seconds_all": times,
        "tokens_per_s": tokens / median,
        "tokens_per_s_best": tokens / min(times),
        # Wall time per generated token of one row (rows decode in lockstep; with several
        # prompt sets the time is theirs together): batch / tokens_per_s.
        "latency_ms_per_token": 1000 * median / max(tokens / rows, 1) / sets,
    }


def acceptance_report(out: DecodeOutput, verified_per_round: int | None = None) -> dict:
    """The SSD counters of a DecodeOutput, per verification round and per draft position.
    verified_per_round: positions a round's verification scores (spec.lookahead)."""
    tokens = int(np.sum(out.num_tokens))
    rows = len(out.num_tokens)
    rounds = int(np.sum(out.rounds))
    drafted = int(np.sum(out.drafted))
    accepted = int(np.sum(out.accepted))
    attempts = np.asarray(out.position_attempts)
    accepts = np.asarray(out.position_accepts)
    return {
        # Tokens per full-model call (verification round), bonus token included; the
        # prefill's first token is not a round's output, so it is left out.
        "mean_accepted_length": (tokens - rows) / max(rounds, 1),
        "mean_accepted_drafts": accepted / max(rounds, 1),
        "mean_drafted": drafted / max(rounds, 1),
        "acceptance_rate": accepted / max(drafted, 1),
        "drafted": drafted,
        "accepted": accepted,
        "rounds": rounds,
        # Per draft position j: of the rounds that proposed a j-th token, the share
        # whose j-th token was accepted (so P(accepted >= j+1) under a static policy).
        "acceptance_per_position": [float(a / max(n, 1)) for a, n in zip(accepts, attempts)],
        "attempts_per_position": [int(n) for n in attempts],
        "accepted_depth_histogram": accepted_depth_histogram(rounds, accepts),
        "nodes_verified_per_call": verified_per_round,
    }


def mode_report(
    out: DecodeOutput,
    times: list[float],
    first_call: float,
    mode: str,
    sets: int = 1,
    verified_per_round: int | None = None,
) -> dict:
    """One mode's timed runs: speed, full-model calls, and (SSD) acceptance."""
    rows = len(out.num_tokens)
    tokens = int(np.sum(out.num_tokens))
    report = speed_report(tokens, rows, times, sets)
    calls = int(np.sum(out.rounds)) + rows
    report.update(
        {
            "full_model_calls": calls,
            "tokens_per_full_model_call": tokens / max(calls, 1),
            "first_call_seconds": first_call,
        }
    )
    if mode == "ssd":
        report.update(acceptance_report(out, verified_per_round))
    return report


def choose_auto_draft(
    bench: BenchModel,
    prompts: Prompts,
    exit_layer: int,
    auto: AutoDraft,
    max_new: int,
    sampling: SamplingConfig,
    drafter: BenchDrafter = BenchDrafter(ImitationDrafter()),
) -> Choice:
    """--draft-len auto: measures every choice's round cost on `prompts` (as decode.run does
    on the first batch of a shape; decode.engine.autodraft) and returns the chosen one (a draft
    length, 0 for AR rounds, or a TreeShape)."""
    config, params, _ = with_exit_layer(bench, exit_layer)
    model, ar_model = VLM(config, bench.dtype), VLM(bench.config, bench.dtype)
    eos = eos_ids(bench)

    def run(choice, full, key):
        if choice == 0:
            use, spec = (ar_model, bench.params), DecodeSpec("ar", capacity=max_new, sampling=sampling, eos_ids=eos)
        else:
            policy, tree = (DraftPolicy(), choice) if is_tree(choice) else (DraftPolicy(draft_len=choice), TreeShape())
            use, spec = (
                (model, params),
                DecodeSpec(
                    "ssd",
                    capacity=max_new,
                    sampling=sampling,
                    eos_ids=eos,
                    policy=policy,
                    tree=tree,
                    drafter=drafter.drafter,
                ),
            )
        start = time.perf_counter()
        out = decode_sets(*use, [prompts], spec, max_new if full else 1, drafter.params, rng=key)
        return time.perf_counter() - start, out

    shape = (prompts.input_ids.shape[0], prompts.input_ids.shape[1], max_new)
    auto.calibrate(shape, run, jax.random.key(0))  # the key the timed runs decode with
    return auto.choose(shape)


def bench_one(
    bench: BenchModel,
    prompt_sets: list[Prompts],
    exit_layer: int,
    policy_name: str,
    policy: DraftPolicy | None,
    max_new: int,
    repeats: int,
    sampling: SamplingConfig,
    cost: CostModel | None = None,
    replay_rounds: bool = False,
    bucket: int = 8,
    tree: TreeShape = TreeShape(),
    drafter: BenchDrafter = BenchDrafter(ImitationDrafter()),
) -> dict:
    """AR vs SSD at one sweep point: speed, acceptance, memory; with `cost`, the cost
    model's prediction; with `replay_rounds` (greedy only, and only when SSD reproduced AR),
    the replayed rounds by context length (decode.bench.replay), `bucket` tokens a bucket.
    tree: SSD drafts this token tree instead of the policy's chain (the cost model and the
    replay model chains only, and are skipped for trees). policy None: the 'SSD' program is
    AR's own (what --draft-len auto runs when it chooses 0). drafter: what drafts SSD rounds
    (decode.engine.drafters; the cost model and the replay model the imitation drafter only)."""
    config, params, reset = with_exit_layer(bench, exit_layer)
    model = VLM(config, bench.dtype)
    # AR does not depend on the exit layer: one program (compiled once per batch shape)
    # on the checkpoint's own config serves every sweep point.
    ar_model = VLM(bench.config, bench.dtype)
    eos = eos_ids(bench)
    ar_spec = DecodeSpec("ar", capacity=max_new, sampling=sampling, eos_ids=eos)
    if policy is None:
        model, params, ssd_spec = ar_model, bench.params, ar_spec
    else:
        ssd_spec = DecodeSpec(
            "ssd", capacity=max_new, sampling=sampling, eos_ids=eos, policy=policy, tree=tree, drafter=drafter.drafter
        )

    def runner(model, params, spec, budget, draft_params=None):
        return lambda: decode_sets(model, params, prompt_sets, spec, budget, draft_params)

    timed = time_interleaved(
        {
            "ar": runner(ar_model, bench.params, ar_spec, max_new),
            "ssd": runner(model, params, ssd_spec, max_new, drafter.params),
            # The same compiled programs with max_new_tokens=1: the prefill alone.
            "ar_prefill": runner(ar_model, bench.params, ar_spec, 1),
            "ssd_prefill": runner(model, params, ssd_spec, 1, drafter.params),
        },
        repeats,
    )
    ar_out, ssd_out = timed["ar"][0], timed["ssd"][0]
    ar = mode_report(*timed["ar"], "ar", len(prompt_sets))
    ssd = mode_report(
        *timed["ssd"], "ssd", len(prompt_sets), verified_per_round=ssd_spec.lookahead if policy is not None else 1
    )
    rows_total = len(ar_out.num_tokens)
    for report, name in ((ar, "ar"), (ssd, "ssd")):
        prefill = statistics.median(timed[f"{name}_prefill"][1])
        report["prefill_seconds_median"] = prefill
        decode_seconds = report["seconds_median"] - prefill
        # After the prefill's first token: tokens/s of the decoding loop alone (None when
        # the decode phase is too short to tell apart from timing noise).
        report["decode_tokens_per_s"] = (
            (report["tokens"] - rows_total) / decode_seconds
            if decode_seconds > 0.2 * report["seconds_median"]
            else None
        )
    batch, prompt_len = prompt_sets[0].input_ids.shape
    identical = bool(np.array_equal(ar_out.tokens, ssd_out.tokens))
    result = {
        "batch_size": batch,
        "exit_layer": exit_layer,
        "drafter": drafter.name,
        "draft_len": 0 if policy is None else ssd_spec.draft_depth if tree.enabled else policy.draft_len,
        "tree_nodes": tree.nodes,
        "tree_width": tree.width if tree.enabled else None,
        "policy": {"name": policy_name, **(dataclasses.asdict(policy) if policy else {})},
        "prompt_sets": len(prompt_sets),
        "imitation": "reset to identity (exit layer differs from checkpoint)" if reset else "as loaded",
        "ar": ar,
        "ssd": ssd,
        "speedup": ssd["tokens_per_s"] / ar["tokens_per_s"],
        "speedup_best": ssd["tokens_per_s_best"] / ar["tokens_per_s_best"],
        "speedup_decode": (
            ssd["decode_tokens_per_s"] / ar["decode_tokens_per_s"]
            if ssd["decode_tokens_per_s"] and ar["decode_tokens_per_s"]
            else None
        ),
        "identical": identical if sampling.greedy else None,
        "mean_accepted_length": ssd["mean_accepted_length"],
        "acceptance_rate": ssd["acceptance_rate"],
        "acceptance_per_position": ssd["acceptance_per_position"],
        "tokens_per_full_model_call": ssd["tokens_per_full_model_call"],
        "nodes_verified_per_call": ssd["nodes_verified_per_call"],
        "accepted_depth_histogram": ssd["accepted_depth_histogram"],
        "memory": memory_report(model, params, ar_spec, ssd_spec, batch, prompt_len, drafter),
    }
    imitation = isinstance(drafter.drafter, ImitationDrafter)
    if cost is not None and not tree.enabled and policy is not None and imitation:
        result["cost"] = cost.predict(
            batch,
            exit_layer,
            policy.draft_len,
            ssd["mean_accepted_length"],
            ssd["mean_drafted"],
            result["speedup_decode"],
        )
    if replay_rounds and sampling.greedy and identical and not tree.enabled and policy is not None and imitation:
        result.update(replay_report(bench, prompt_sets, ar_out, exit_layer, policy, ssd["rounds"], bucket))
    return result


def memory_report(
    model: VLM,
    params,
    ar_spec: DecodeSpec,
    ssd_spec: DecodeSpec,
    batch: int,
    prompt_len: int,
    drafter: BenchDrafter = BenchDrafter(ImitationDrafter()),
) -> dict:
    """Bytes of the params (base model, the drafter's own) and of each mode's caches."""
    base = {k: v for k, v in params.items() if k not in ("imitation", "eagle")}
    slots = ssd_spec.cache_slots(prompt_len)
    if isinstance(drafter.drafter, EagleDrafter):
        draft_params_bytes = param_bytes(params["eagle"])
        draft_cache = model.init_eagle_cache(batch, drafter.drafter.cache_slots(model, slots))
    elif isinstance(drafter.drafter, ModelDrafter):
        draft_params_bytes = param_bytes(drafter.params)
        draft_cache = drafter.drafter.draft_model.init_cache(batch, slots)
    else:
        draft_params_bytes = param_bytes(params["imitation"])
        draft_cache = model.init_draft_cache(batch, slots)
    return {
        "base_params_bytes": param_bytes(base),
        "imitation_params_bytes": param_bytes(params["imitation"]),
        "draft_params_bytes": draft_params_bytes,
        "ar_kv_cache_bytes": model.init_cache(batch, ar_spec.cache_slots(prompt_len)).nbytes(),
        # The shallow layers share the full model's cache: SSD only adds the lookahead
        # slots and, for the one-layer imitation network, its own one-layer cache.
        "ssd_kv_cache_bytes": model.init_cache(batch, ssd_spec.cache_slots(prompt_len)).nbytes(),
        "ssd_draft_cache_bytes": draft_cache.nbytes() if draft_cache is not None else 0,
    }
