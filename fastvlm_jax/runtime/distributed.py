"""Joining a multi-process JAX run (several hosts of a TPU slice, SLURM tasks, MPI ranks).

`jax.distributed.initialize()` must run before anything touches a device. On a Cloud TPU VM
slice JAX finds the coordinator and the process's rank by itself; elsewhere the caller (or
the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables) names them.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Callable

import jax
from jax._src import distributed as _jax_distributed  # the runtime client: its key-value store

from fastvlm_jax.runtime.platforms import tpu_attached, tpu_runtime_variables

# Variables that mark one process of a cluster JAX's own detection knows how to join.
_CLUSTER_SIZE_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM, where `jax.distributed.initialize()` detects the slice itself
    (one host or many): its runtime sets TPU_* variables, or libtpu is installed and TPU chips
    are attached (/dev/accel* on v2-v4, /dev/vfio/* on v5e and later)."""
    return tpu_runtime_variables() or (tpu_attached() and importlib.util.find_spec("libtpu") is not None)


def maybe_initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    independent: bool = False,
) -> bool:
    """Calls jax.distributed.initialize() when flags, env variables or the machine ask for it.

    Returns whether it did. A single process named explicitly (num_processes 1) is left alone.

    independent: the processes share no computation after start-up (each works on its own
    devices, as decode.run's processes do), so one that dies or finishes must not stop the
    others: JAX's recoverable-task mode is turned on, and a process leaves through
    `finish_independent` instead of JAX's shutdown barrier. Training leaves it off: there a
    lost process must stop the run, since every step is collective.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator or num_processes:
        if num_processes == 1:
            return False
        if independent:
            jax.config.update("jax_enable_recoverability", True)
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        return True
    if on_cloud_tpu_vm() or any(int(os.environ.get(v, "1")) > 1 for v in _CLUSTER_SIZE_VARIABLES):
        if independent:
            jax.config.update("jax_enable_recoverability", True)
        jax.distributed.initialize()
        return True
    return False


_KEY_PREFIX = "fastvlm_jax/independent/"
HEARTBEAT_SECONDS = 2.0
GIVE_UP_SECONDS = 30.0  # a process whose heartbeat stopped this long ago is taken for dead


def start_heartbeat() -> None:
    """Counts up this process's key in the run's key-value store every HEARTBEAT_SECONDS (a
    daemon thread), so process 0 can tell a working process from a dead one. JAX's own
    liveness query (`get_live_nodes`) is a barrier every live process must enter, which a
    busy process does not."""
    client = _jax_distributed.global_state.client
    if client is None:
        return
    key = f"{_KEY_PREFIX}alive/{jax.process_index()}"

    def beat():
        count = 0
        while True:
            count += 1
            try:
                client.key_value_set(key, str(count), allow_overwrite=True)
            except Exception:  # the coordinator is gone: nothing left to tell
                return
            time.sleep(HEARTBEAT_SECONDS)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def finish_independent(
    say: Callable[[str], None], poll_seconds: float = 1.0, give_up_seconds: float = GIVE_UP_SECONDS
) -> list[int]:
    """Marks this process of an independent run as finished; process 0 then waits for the rest.

    Process 0 hosts JAX's coordination service: if it exits, the runtime terminates every other
    process of the run, whatever it was doing. So it stays until each other process has
    either finished or died (its heartbeat, see `start_heartbeat`, unchanged for
    `give_up_seconds`). `say` gets one line naming whom it waits for as soon as it starts
    waiting, and again when that set changes. Other processes return at once. Returns the
    processes given up for dead (process 0 only; empty elsewhere). A no-op without
    jax.distributed.
    """
    client = _jax_distributed.global_state.client
    if client is None or jax.process_count() == 1:
        return []
    index, count = jax.process_index(), jax.process_count()
    client.key_value_set(f"{_KEY_PREFIX}done/{index}", "1", allow_overwrite=True)
    if index != 0:
        return []

    def read(folder: str) -> dict[int, str]:
        return {
            int(key.rsplit("/", 1)[-1]): value for key, value in client.key_value_dir_get(f"{_KEY_PREFIX}{folder}/")
        }

    started = time.monotonic()
    last_beat: dict[int, tuple[str | None, float]] = {k: (None, started) for k in range(1, count)}
    dead: set[int] = set()
    announced: tuple[int, ...] | None = None
    while True:
        now, done, beats = time.monotonic(), read("done"), read("alive")
        for k, (seen, since) in last_beat.items():
            if beats.get(k) != seen:
                last_beat[k] = (beats.get(k), now)
            elif k not in done and now - since > give_up_seconds:
                dead.add(k)
        waiting = tuple(k for k in last_beat if k not in done and k not in dead)
        if not waiting:
            return sorted(dead)
        if waiting != announced:
            say(
                f"process 0 is done; it hosts the run's coordinator, so it waits for process(es) "
                f"{', '.join(map(str, waiting))} to finish (one whose heartbeat stops is given up "
                f"after {give_up_seconds:.0f} s)"
            )
            announced = waiting
        time.sleep(poll_seconds)
