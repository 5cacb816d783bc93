"""Trains the offline `demo` checkpoint: base -> deepen -> imitation -> refine, in one process.

    python -m train.recipes.demo --root DIR [--data-dir TFDS_DIR] [--draft-model] [key=value ...]

--draft-model: then also make demo-draft, the demo's separate draft model: its first
configs/demo.py:DRAFT_MODEL_LAYERS layers (train.recipes.make_draft_model, into DIR/draft_init),
fine-tuned by the `draft_model` stage (DIR/draft_model/export).

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

from configs import demo as demo_config
from train.config import apply_overrides, parse_overrides
from train.metrics import read_metrics
from train.recipes.make_draft_model import make_draft_model
from train.run import train

STAGES = ("base", "deepen", "imitation", "refine")


def _first_last(workdir: Path, key: str):
    values = [m[key] for m in read_metrics(workdir) if key in m]
    return (values[0], values[-1]) if values else (None, None)


def run_recipe(
    root: str | Path, overrides: dict[str, str] | None = None, progress: bool = True, draft_model: bool = False
) -> dict:
    root = Path(root).absolute()
    summary = {}
    for stage in STAGES + (("draft_model",) if draft_model else ()):
        if stage == "draft_model" and not (root / "draft_init" / "config.json").is_file():
            make_draft_model(root / "refine" / "export", demo_config.DRAFT_MODEL_LAYERS, root / "draft_init")
        cfg = apply_overrides(demo_config.get_config(f"{stage},{root}"), dict(overrides or {}))
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
    if draft_model:
        summary["draft_model_export"] = summary["draft_model"]["export"]
    if jax.process_index() == 0:
        (root / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.recipes.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="workdirs/demo", help="folder for the stage workdirs")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir (default: TFDS's)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--draft-model", action="store_true", help="also make and fine-tune demo-draft, the demo's separate draft model"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every stage")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    if args.data_dir:
        overrides.setdefault("data.data_dir", args.data_dir)
    summary = run_recipe(args.root, overrides, progress=not args.no_progress, draft_model=args.draft_model)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
