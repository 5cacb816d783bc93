"""The layer loop against unrolled layers (`VLM(..., unroll_layers=True)`), AR and SSD.

    python benchmarks/scripts/unroll_layers.py --ckpt demo --batch-size 1 8 --json OUT.json

Both variants read the same stacked params and cache; only how XLA compiles a layer
range differs. The four programs (loop/unrolled x AR/SSD) run interleaved, medians of
--repeats, on the same prompts (the example images, six per repeat).
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))

from decode.bench.machine import machine_info
from decode.bench.models import decode_sets, eos_ids, load_bench_model, make_prompts
from decode.bench.timing import time_interleaved
from decode.engine import DecodeSpec, DraftPolicy
from fastvlm_jax.nn.model import VLM


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", default="demo")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--draft-len", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    bench = load_bench_model(args.ckpt)
    images = sorted(glob.glob("examples/*.png"))
    specs = {
        "ar": DecodeSpec("ar", capacity=args.max_new_tokens, eos_ids=eos_ids(bench)),
        "ssd": DecodeSpec(
            "ssd", capacity=args.max_new_tokens, eos_ids=eos_ids(bench), policy=DraftPolicy(draft_len=args.draft_len)
        ),
    }
    runs = []
    for batch in args.batch_size:
        sets = [
            make_prompts(bench, batch, images, None, 0, offset=s * batch) for s in range(max(1, len(images) // batch))
        ]
        calls = {}
        for unroll in (False, True):
            model = VLM(bench.config, bench.dtype, unroll_layers=unroll)
            for mode, spec in specs.items():
                calls[f"{mode}_{'unrolled' if unroll else 'loop'}"] = lambda m=model, s=spec: decode_sets(
                    m, bench.params, sets, s, args.max_new_tokens
                )
        timed = time_interleaved(calls, args.repeats)
        row = {"batch_size": batch, "prompt_sets": len(sets)}
        for name, (out, times, first) in timed.items():
            row[name] = {
                "seconds_median": statistics.median(times),
                "seconds": times,
                "first_call_seconds": first,
                "tokens": int(out.num_tokens.sum()),
            }
        for mode in specs:
            row[f"{mode}_unrolled_over_loop"] = (
                row[f"{mode}_unrolled"]["seconds_median"] / row[f"{mode}_loop"]["seconds_median"]
            )
        runs.append(row)
        print(
            f"batch {batch}: "
            + ", ".join(f"{k} {row[k]['seconds_median']:.3f} s" for k in calls)
            + f"; unrolled/loop AR {row['ar_unrolled_over_loop']:.2f}, SSD {row['ssd_unrolled_over_loop']:.2f}",
            flush=True,
        )
    report = {
        "model": bench.source,
        "machine": machine_info(),
        "argv": sys.argv[1:] if argv is None else argv,
        "runs": runs,
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
