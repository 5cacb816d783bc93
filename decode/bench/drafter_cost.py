"""What one draft step costs, per drafter and checkpoint: the pieces of a round a drafter owns.

    python -m decode.bench.drafter_cost --ckpt demo [--ckpt CKPT ...] \
        [--drafter imitation eagle model:demo-draft] [--batch-size 1 8] [--draft-len 5] --json OUT.json

For each (checkpoint, drafter, batch size) it prefills a batch of prompts with the engine's
own prefill, then times, as jitted loops of `--iters` calls on the prefilled state:
  draft_step  drafter.step: feed one drafted token, get the next token's distribution
              (imitation: shallow layers + imitation network + head; eagle: the head's
              layer + head; model: the small model's whole stack + head);
  round_start drafter.start: the round's first call (imitation: as a step; eagle: the
              catch-up pass over draft_len + 1 verified pairs; model: a two-token pass).
It also reports the drafter's own KV cache bytes. Every (checkpoint, drafter, batch)
is timed `--repeats` times, interleaved; medians and ranges are reported. Use it to see what
the EAGLE head's visual compressor saves (a pool-4 head's checkpoint beside a pool-1 one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from decode import engine
from decode.bench.models import load_bench_model, load_drafter, make_prompts
from decode.engine import DecodeSpec, DraftPolicy
from decode.engine.captioner import describe_device
from decode.engine.drafters import RoundContext
from fastvlm_jax.nn.model import VLM


def _cache_bytes(carry) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(carry) if x.ndim >= 4)


def build_timers(bench, drafter, batch: int, draft_len: int, max_new: int, iters: int, images, seed: int):
    """(round_start, draft_step) zero-argument timers and the drafter's cache bytes."""
    model = VLM(bench.config, bench.dtype)
    spec = DecodeSpec(
        "ssd", capacity=max_new, eos_ids=(), policy=DraftPolicy(draft_len=draft_len), drafter=drafter.drafter
    )
    prompts = make_prompts(bench, batch, images, None, seed)
    state = jax.jit(lambda p, d, pr: engine.prefill(model, p, pr, spec, max_new, draft_params=d))(
        bench.params, drafter.params, prompts
    )
    context = lambda p, d: RoundContext(model, p, d, draft_len)  # noqa: E731 (traced inside jit)

    @jax.jit
    def round_start(params, draft_params, state):
        def body(_, carry):
            cache, draft, token = carry
            out = drafter.drafter.start(context(params, draft_params), cache, draft, token, state.cache.pos)
            return out.cache, out.carry, jnp.argmax(out.logits, -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, iters, body, (state.cache, state.draft, state.last_token))

    @jax.jit
    def draft_step(params, draft_params, state):
        def body(i, carry):
            cache, draft, token = carry
            out = drafter.drafter.step(
                context(params, draft_params), cache, draft, token, state.cache.pos + 1 + i % draft_len
            )
            return out.cache, out.carry, jnp.argmax(out.logits, -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, iters, body, (state.cache, state.draft, state.last_token))

    def timer(fn):
        return lambda: jax.block_until_ready(fn(bench.params, drafter.params, state))

    return timer(round_start), timer(draft_step), _cache_bytes(state.draft)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m decode.bench.drafter_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", action="append", required=True, help="checkpoint dir or demo (repeatable)")
    parser.add_argument("--drafter", nargs="+", default=["eagle"])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--draft-len", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--iters", type=int, default=50, help="calls per timed loop")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", nargs="*", default=["synthetic"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)

    timers = {}
    for ckpt in args.ckpt:
        bench = load_bench_model(ckpt)
        for name in args.drafter:
            drafter = load_drafter(bench, name)
            for batch in args.batch_size:
                start, step, cache_bytes = build_timers(
                    bench, drafter, batch, args.draft_len, args.max_new_tokens, args.iters, args.images, args.seed
                )
                key = (ckpt, name, batch)
                timers[key] = {
                    "round_start": start,
                    "draft_step": step,
                    "cache_bytes": cache_bytes,
                    "config": bench.config.draft,
                }
    times = {key: {"round_start": [], "draft_step": []} for key in timers}
    for t in timers.values():  # compile and warm up
        t["round_start"](), t["draft_step"]()
    for _ in range(args.repeats):  # interleaved over every (checkpoint, drafter, batch)
        for key, t in timers.items():
            for piece in ("round_start", "draft_step"):
                begin = time.perf_counter()
                t[piece]()
                times[key][piece].append((time.perf_counter() - begin) / args.iters * 1e3)
    results = []
    for key, t in timers.items():
        ckpt, name, batch = key
        row = {
            "ckpt": ckpt,
            "drafter": name,
            "batch_size": batch,
            "draft_cache_bytes": t["cache_bytes"],
            "eagle_image_pool": t["config"].eagle_image_pool,
            "eagle_compressor": t["config"].eagle_compressor,
        }
        for piece in ("round_start", "draft_step"):
            ms = times[key][piece]
            row[f"{piece}_ms_median"] = statistics.median(ms)
            row[f"{piece}_ms_range"] = [min(ms), max(ms)]
        results.append(row)
        print(
            f"{ckpt} {name:>12s} batch {batch:3d}: draft step {row['draft_step_ms_median']:.3f} ms "
            f"(range {min(times[key]['draft_step']):.3f}-{max(times[key]['draft_step']):.3f}), round start "
            f"{row['round_start_ms_median']:.3f} ms, draft cache {t['cache_bytes'] / 2**10:.1f} KiB"
        )
    report = {
        "device": describe_device(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "iters": args.iters,
        "repeats": args.repeats,
        "draft_len": args.draft_len,
        "max_new_tokens": args.max_new_tokens,
        "results": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
