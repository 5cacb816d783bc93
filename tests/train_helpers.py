"""Shared helpers of the training tests: tiny data, configs, CLI subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from train.config import apply_overrides, load_config_file
from train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "tests" / "train_tiny_config.py")
# train.run's CLI with a pause after each step (tests/slow_train_run.py): room to interrupt.
SLOW_RUN = "tests.slow_train_run"


def build_tiny_data(data_dir: Path) -> None:
    from fastvlm_jax.data import tfds_builders

    tfds_builders.build_dataset("synthetic_captions/tiny", str(data_dir))


def tiny_config(stage: str = "base", **overrides):
    """The tiny TrainConfig with dotted overrides (values given as Python objects)."""
    cfg = load_config_file(f"{TINY_CONFIG}:{stage}")
    return apply_overrides(cfg, {k: _text(v) for k, v in overrides.items()})


def _text(value) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def losses(workdir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(workdir)}


def subprocess_env(cache_dir: Path, devices: int, **extra) -> dict[str, str]:
    """Environment of a CLI subprocess: its own CPU device count with the suite's other XLA
    flags (tests/conftest.py), and a persistent compilation cache: the run's shared one when
    there is one, else `cache_dir`, shared by the test's subprocesses (identical programs
    compile once)."""
    env = dict(os.environ)
    suite_flags = [
        f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
    ]
    shared_cache = env.get("FASTVLM_TEST_COMPILE_CACHE", "off")
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}", *suite_flags]),
        JAX_COMPILATION_CACHE_DIR=str(cache_dir) if shared_cache == "off" else shared_cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        JAX_PLATFORMS="cpu",
    )
    env.update(extra)
    return env


def cli(stage: str, workdir, overrides: dict, extra_args=(), module: str = "train.run") -> list[str]:
    args = [
        sys.executable,
        "-m",
        module,
        "--config",
        f"{TINY_CONFIG}:{stage}",
        "--workdir",
        str(workdir),
        "--no-progress",
        *extra_args,
    ]
    return args + [f"{k}={_text(v)}" for k, v in overrides.items()]


def run_cli(stage: str, workdir, overrides: dict, env: dict, extra_args=(), timeout=300):
    result = subprocess.run(
        cli(stage, workdir, overrides, extra_args), env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"train.run failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result
