"""The refine pre-pass across processes: 1 process x 8 CPU devices vs 2 processes x 4 (jax.distributed).

    python benchmarks/refine_once/multihost_check.py --root /tmp/refine_mp \
        --out benchmarks/refine_once/multihost_check.json

The tiny test model (tests/train_tiny_config.py): a 2-step base run exports it, then the refine
stage (10 steps of 8: all 64 records) runs on one process and on two. Checks that the two
stored sets are equal (every record once, the same tokens) and compares the loss curves.
Too slow for the test suite (about a minute of subprocesses on 2 cores), hence a script.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests import train_helpers as th


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/refine_mp"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    root = args.root
    if not (root / "data").exists():
        th.build_tiny_data(root / "data")
    env8, env4 = th.subprocess_env(root / "cache", 8), th.subprocess_env(root / "cache", 4)
    common = {"data.data_dir": root / "data", "mesh.data": 4, "mesh.tensor": 2}
    if not (root / "base" / "export").exists():
        th.run_cli("base", root / "base", {**common, "steps": 2, "checkpoint.export": True}, env8)
    refine = {**common, "steps": 10, "init_from": root / "base" / "export", "refine.max_new_tokens": 8}

    start = time.perf_counter()
    th.run_cli("refine", root / "one", refine, env8)
    one_s = time.perf_counter() - start
    port, start = free_port(), time.perf_counter()
    procs = [
        subprocess.Popen(
            th.cli(
                "refine",
                root / "two",
                refine,
                ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(pid)],
            ),
            cwd=th.REPO,
            env=env4,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(2)
    ]
    for proc, (_, err) in zip(procs, [p.communicate(timeout=900) for p in procs]):
        if proc.returncode != 0:
            raise SystemExit(err[-3000:])
    two_s = time.perf_counter() - start

    sets = {name: np.load(root / name / "refine_sequences" / "sequences.npz") for name in ("one", "two")}
    equal = {key: bool(np.array_equal(sets["one"][key], sets["two"][key])) for key in sets["one"].files}
    ids = sets["two"]["record_ids"]
    losses = {name: th.losses(root / name) for name in ("one", "two")}
    result = {
        "records": int(len(ids)),
        "records_unique": int(len(np.unique(ids))),
        "sets_equal": equal,
        "loss_max_abs_diff": max(abs(losses["one"][s] - losses["two"][s]) for s in losses["one"]),
        "one_process_s": one_s,
        "two_processes_s": two_s,
        "files_two": sorted(p.name for p in (root / "two" / "refine_sequences").iterdir()),
        "command": " ".join(["python", *sys.argv]),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0 if all(equal.values()) and len(ids) == len(np.unique(ids)) else 1


if __name__ == "__main__":
    sys.exit(main())
