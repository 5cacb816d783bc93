"""What a result was measured on: the host and its load (the device: decode.engine.captioner.describe_device)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import jax


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS does not report them)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def machine_info() -> dict:
    """CPU count and model, OS, jax version, and the load average now (`loadavg_at_start`)."""
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = loadavg()
    if load is not None:
        info["loadavg_at_start"] = load
    return info
