"""Trains the offline `demo` checkpoint: base -> deepen -> imitation -> refine, in one process.

    python -m train.demo_recipe --root DIR [--data-dir TFDS_DIR] [key=value ...]

Each stage is `configs/demo.py:STAGE,DIR` (overrides apply to every stage) and resumes
from its own workdir, so an interrupted recipe picks up where it stopped. The final
model is DIR/refine/export; a summary with per-stage timings and the draft's top-1
agreement before and after the draft stages is written to DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax

from train.config import apply_overrides, load_config_file, parse_overrides
from train.metrics import read_metrics
from train.run import train

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.py")
STAGES = ("base", "deepen", "imitation", "refine")


def _first_last(workdir: Path, key: str):
    values = [m[key] for m in read_metrics(workdir) if key in m]
    return (values[0], values[-1]) if values else (None, None)


def run_recipe(root: str | Path, overrides: dict[str, str] | None = None, progress: bool = True) -> dict:
    root = Path(root).absolute()
    summary = {}
    for stage in STAGES:
        cfg = apply_overrides(load_config_file(f"{CONFIG}:{stage},{root}"), dict(overrides or {}))
        start = time.perf_counter()
        result = train(cfg, progress=progress)
        if result.status != "done":
            raise SystemExit(f"stage {stage} stopped ({result.status}) at step {result.step}")
        workdir = Path(cfg.workdir)
        summary[stage] = {
            "seconds": round(time.perf_counter() - start, 1),
            "steps": result.step,
            "export": str(result.export_dir),
            "loss_first_last": _first_last(workdir, "loss"),
            "draft_agreement_first_last": _first_last(workdir, "draft_agreement"),
            "full_acc_first_last": _first_last(workdir, "full_acc"),
            "step_time_s_last": _first_last(workdir, "step_time_s")[1],
        }
    summary["export"] = summary["refine"]["export"]
    if jax.process_index() == 0:
        (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.demo_recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="workdirs/demo", help="folder for the stage workdirs")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every stage")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    if args.data_dir:
        overrides.setdefault("data.data_dir", args.data_dir)
    summary = run_recipe(args.root, overrides, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
