"""Joining a multi-process JAX run (several hosts of a TPU slice, SLURM tasks, MPI ranks).

`jax.distributed.initialize()` must run before anything touches a device. On a Cloud TPU VM
slice JAX finds the coordinator and the process's rank by itself; elsewhere the caller (or
the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables) names them.
"""

from __future__ import annotations

import importlib.util
import os

import jax

# Variables that mark one process of a cluster JAX's own detection knows how to join.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM, where `jax.distributed.initialize()` detects the slice itself
    (one host or many): its runtime sets TPU_* variables, or libtpu is installed and TPU chips
    are attached (/dev/accel* on v2-v4, /dev/vfio/* on v5e and later)."""
    if os.environ.get("TPU_ACCELERATOR_TYPE") or os.environ.get("TPU_WORKER_HOSTNAMES"):
        return True
    chips = os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")
    return chips and importlib.util.find_spec("libtpu") is not None


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> bool:
    """Calls jax.distributed.initialize() when flags, env variables or the machine ask for it.

    Returns whether it did. A single process named explicitly (num_processes 1) is left alone.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator or num_processes:
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        return True
    if on_cloud_tpu_vm() or any(int(os.environ.get(v, "1")) > 1 for v in _CLUSTER_SIZE_VARIABLES):
        jax.distributed.initialize()
        return True
    return False
