"""Which JAX platforms to start: on a host without a TPU, not the TPU.

With libtpu installed (the `tpu` and `test` extras, for `--compile-only`), JAX tries to start
a TPU backend in every process; on a host with no TPU attached, libtpu then prints a screen
of initialisation errors (TPU_WORKER_HOSTNAMES, TPU_ACCELERATOR_TYPE) before JAX falls back
to the CPU. Compiling for a named TPU topology does not need that backend (it loads libtpu
by itself), so there we start the CPU alone. A user's JAX_PLATFORMS always wins, and hosts
with a TPU attached or a GPU plugin installed are left to JAX's own choice.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm6_plugin", "jax_rocm7_plugin")


def tpu_runtime_variables() -> bool:
    """A Cloud TPU runtime's TPU_* variables are set."""
    return bool(os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("TPU_WORKER_HOSTNAMES"))


def tpu_attached() -> bool:
    """TPU chips on this host, or a Cloud TPU runtime's TPU_* variables (v2-v4 chips show as
    /dev/accel*, v5e and later as /dev/vfio/*)."""
    return tpu_runtime_variables() or bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def skip_absent_tpu() -> bool:
    """Starts only the CPU backend where libtpu is installed but no TPU is attached (and no
    GPU plugin is installed, and JAX_PLATFORMS is not set). Call it before JAX starts a
    backend; returns whether it changed anything."""
    if os.environ.get("JAX_PLATFORMS") or tpu_attached():
        return False
    if importlib.util.find_spec("libtpu") is None:
        return False
    if any(importlib.util.find_spec(name) is not None for name in _GPU_PLUGINS):
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already: its config read the variable before we set it
        # (imported here, not at the top: this module must run before JAX reads its variables)
        import jax

        jax.config.update("jax_platforms", "cpu")
    return True
