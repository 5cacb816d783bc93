"""The demo refine stage before (per-step generation, main) and after (one pre-pass, this branch).

    python benchmarks/refine_once/compare.py --old-repo /work/main --new-repo . \
        --root /tmp/refine_bench --out benchmarks/refine_once/demo_refine_20_steps.json [--run]

--run trains both, one after the other (old first), with the same command in each checkout;
without it the workdirs ROOT/old and ROOT/new of an earlier --run (or of the printed commands
run by hand) are compared. Reported: the per-step time of each (the mean of the logged
`step_time_s` windows after the first step, which holds the compilation), the training
loop's time (compilation included), the pre-pass time (its generate loop, compilation
included, from refine_sequences/complete.json), wall times (with --run), and the largest
absolute difference between the two loss curves at the logged steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

OVERRIDES = (
    "steps={steps}",
    "log_every=5",
    "init_from=fastvlm_jax/assets/demo",
    "data.data_dir={root}/data",
    "checkpoint.export=false",
    "checkpoint.save_every=0",
    "checkpoint.save_final=false",
)


def command(python: str, root: Path, name: str, steps: int) -> list[str]:
    return [
        python,
        "-m",
        "train.run",
        "--config",
        "configs/demo.py:refine",
        "--workdir",
        str(root / name),
        "--no-progress",
        *(o.format(steps=steps, root=root) for o in OVERRIDES),
    ]


def read_metrics(workdir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row for row in rows}


def mean_step_time(metrics: dict[int, dict], log_every: int = 5) -> float:
    """Seconds per step over the windows after step 1 (step 1's window is compilation + a step)."""
    steps = sorted(s for s in metrics if s > 1)
    windows = [(s - max(p for p in [1, *steps] if p < s), metrics[s]["step_time_s"]) for s in steps]
    return sum(n * t for n, t in windows) / sum(n for n, _ in windows)


def loop_seconds(metrics: dict[int, dict]) -> float:
    """The training loop's time: the first window (compilation + step 1) and every later one."""
    steps = sorted(metrics)
    later = sum((s - p) * metrics[s]["step_time_s"] for p, s in zip(steps, steps[1:]))
    return metrics[steps[0]]["compile_and_first_step_s"] + later


def compare(old: Path, new: Path) -> dict:
    a, b = read_metrics(old), read_metrics(new)
    if sorted(a) != sorted(b):
        raise SystemExit(f"logged steps differ: {sorted(a)} vs {sorted(b)}")
    diffs = {s: abs(a[s]["loss"] - b[s]["loss"]) for s in sorted(a)}
    complete = json.loads((new / "refine_sequences" / "complete.json").read_text())
    return {
        "logged_steps": sorted(a),
        "loss_old": [a[s]["loss"] for s in sorted(a)],
        "loss_new": [b[s]["loss"] for s in sorted(b)],
        "loss_max_abs_diff": max(diffs.values()),
        "draft_agreement_max_abs_diff": max(abs(a[s]["draft_agreement"] - b[s]["draft_agreement"]) for s in a),
        "step_time_s_old": mean_step_time(a),
        "step_time_s_new": mean_step_time(b),
        "step_time_s_logged_old": {s: a[s]["step_time_s"] for s in sorted(a)},
        "step_time_s_logged_new": {s: b[s]["step_time_s"] for s in sorted(b)},
        "compile_and_first_step_s_old": a[1]["compile_and_first_step_s"],
        "compile_and_first_step_s_new": b[1]["compile_and_first_step_s"],
        "train_loop_s_old": loop_seconds(a),
        "train_loop_s_new": loop_seconds(b),
        "stage_s_new": complete["stats"]["generate_seconds"] + loop_seconds(b),
        "prepass_s": complete["stats"]["generate_seconds"],
        "prepass": complete["stats"],
        "prepass_records": complete["identity"]["records"]["count"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-repo", type=Path, required=True, help="a checkout of main (per-step generation)")
    parser.add_argument("--new-repo", type=Path, required=True, help="a checkout of this branch (pre-pass)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/refine_bench"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--run", action="store_true", help="train both first (old, then new)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--note", default="", help="free text stored with the numbers (load, caveats)")
    args = parser.parse_args(argv)

    commands = {name: command(args.python, args.root, name, args.steps) for name in ("old", "new")}
    repos = {"old": args.old_repo.resolve(), "new": args.new_repo.resolve()}
    wall, commits = {}, {}
    if args.run:
        for name in ("old", "new"):  # one at a time: they share the CPU
            commits[name] = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=repos[name], check=True, capture_output=True, text=True
            ).stdout.strip()
            start = time.perf_counter()
            subprocess.run(commands[name], cwd=repos[name], check=True)
            wall[name] = time.perf_counter() - start
    result = compare(args.root / "old", args.root / "new")
    result.update(
        commands={name: f"cd {repos[name]} && {shlex.join(cmd)}" for name, cmd in commands.items()},
        wall_s=wall or None,
        commits=commits or None,  # what each checkout held when its run started
        compare_command=shlex.join(["python", Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
        machine=f"{platform.machine()}, {platform.processor() or 'cpu'}",
        note=args.note or None,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "loss_max_abs_diff",
                    "step_time_s_old",
                    "step_time_s_new",
                    "prepass_s",
                    "prepass_records",
                    "train_loop_s_old",
                    "stage_s_new",
                )
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
