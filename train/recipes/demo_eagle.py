"""Trains the demo's EAGLE head (configs/demo.py:eagle or :eagle_pool4) and records its cost.

    python -m train.recipes.demo_eagle [--variant eagle|eagle_pool4] [--root DIR] [--json OUT.json] [key=value ...]

Runs the stage like `python -m train.run --config configs/demo.py:VARIANT,DIR` (resuming
from DIR/VARIANT if it holds a checkpoint) and writes a JSON with the exact command, the
steps, batch, wall seconds, seconds per step and the final loss parts and top-1 agreement
(the acceptance proxy), read from the run's metrics. The export is DIR/VARIANT/export;
`python -m fastvlm_jax.demo --package DIR/eagle/export` makes it the shipped demo.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import jax

from configs import demo as demo_config
from train.config import apply_overrides, parse_overrides
from train.metrics import read_metrics
from train.run import train

PARTS = (
    "loss",
    "eagle_ce",
    "eagle_feature_l1",
    "eagle_agreement",
    "eagle_acc",
    "full_acc",
    "eagle_agreement_unrolled1",
    "eagle_agreement_unrolled2",
)


def summarize(workdir: Path, tail: int = 3) -> dict:
    """Loss parts at the first and last logged step, and their mean over the last `tail`
    logged steps (one logged step is one batch of 32: noisy)."""
    records = [m for m in read_metrics(workdir) if "loss" in m]
    last = records[-tail:]
    steady = [m["step_time_s"] for m in records[1:] if "step_time_s" in m]
    return {
        "first": {k: records[0][k] for k in PARTS if k in records[0]} | {"step": records[0]["step"]},
        "last": {k: records[-1][k] for k in PARTS if k in records[-1]} | {"step": records[-1]["step"]},
        f"mean_last_{len(last)}_logged": {
            k: sum(m[k] for m in last) / len(last) for k in PARTS if all(k in m for m in last)
        },
        "compile_and_first_step_s": records[0].get("compile_and_first_step_s"),
        "steady_step_time_s": sum(steady) / len(steady) if steady else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.recipes.demo_eagle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="eagle", choices=("eagle", "eagle_pool4"))
    parser.add_argument("--root", default="workdirs/demo")
    parser.add_argument("--json", default=None, help="write the cost record here")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    cfg = apply_overrides(demo_config.get_config(f"{args.variant},{args.root}"), parse_overrides(args.overrides))
    start = time.perf_counter()
    result = train(cfg, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    if result.status != "done":
        print(f"stopped ({result.status}) at step {result.step}", file=sys.stderr)
        return 1
    record = {
        "command": "python -m train.recipes.demo_eagle " + shlex.join(sys.argv[1:] if argv is None else argv),
        "config": f"configs/demo.py:{args.variant}",
        "init_from": cfg.init_from,
        "export": str(result.export_dir),
        "stage": cfg.stage,
        # The record's keys are those of the earlier records in benchmarks/eagle_train/.
        "eagle": {
            "hidden_size": cfg.eagle.hidden_size,
            "image_pool": cfg.eagle.image_pool,
            "compressor": cfg.eagle.compressor,
        },
        "loss_weights": {
            "eagle_ce_weight": cfg.eagle.ce_weight,
            "eagle_feature_weight": cfg.eagle.feature_weight,
            "eagle_unroll_steps": cfg.eagle.unroll_steps,
            "temperature": cfg.eagle.temperature,
        },
        "steps": result.step,
        "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len,
        "compute_dtype": cfg.compute_dtype,
        "learning_rate": cfg.optim.learning_rate,
        # Whole call: data setup, compilation, training, checkpoints and export.
        "wall_s": round(seconds, 1),
        "seconds_per_step": round(seconds / max(result.step, 1), 3),
        **summarize(Path(cfg.workdir)),
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.machine()})",
    }
    text = json.dumps(record, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
