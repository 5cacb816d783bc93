"""Training checkpoints (orbax CheckpointManager), preemption, and the final export.

A training checkpoint holds what the run cannot recompute:

    workdir/checkpoints/<step>/
      state/   TrainState: step, *trainable* params, optimizer state, rng (sharded arrays)
      meta/    {"stage", "init_from", "seed", ...}: what a resumed run must keep

No data iterator state: the data position is the step (each step reads one global batch,
made of records that depend on the seed and the batch number only, train/input.py), so a
run resumes on any number of hosts, each reading its rows from that batch on.

Frozen parameters are not saved: they are a pure function of `init_from` (a checkpoint
in our format) or of the seed (from-scratch init), and for a draft stage on a 7B model
they are >99% of the bytes. Resuming re-reads them from the same source; `meta` records
that source and a resume from a different one fails loudly. The full model is written
once, at the end, by `export` (fastvlm_jax.ckpt.checkpoint format).

Preemption: `PreemptionFlag` notices SIGTERM (on every process, through JAX's preemption
service, when there are several) and the loop saves at the next step boundary every process
agrees on, and exits, so a save never races a half-done update.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax._src import distributed as _jax_distributed  # whether the preemption service runs
from jax.experimental import multihost_utils

from fastvlm_jax.ckpt.checkpoint import save_checkpoint
from fastvlm_jax.runtime.paths import as_path


class Checkpointer:
    """Save / restore TrainState + data iterator + metadata under `directory`."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            as_path(directory),
            item_names=("state", "meta"),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
            options=options,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
        )

    def read_meta(self, step: int) -> dict[str, Any]:
        """The metadata alone (checked before restoring arrays into a target)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores the state into `abstract_state` (ShapeDtypeStructs carrying shardings:
        those of this run's mesh, whatever mesh saved it)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionFlag:
    """Set by SIGTERM (TPU preemption notice, `kill`); polled at every step boundary.

    A single process checks its own flag (set by a Python handler). Several processes must
    all stop at the same step to join the final save: there JAX's preemption service does
    it (`jax.distributed.initialize` starts it, and its notifier owns SIGTERM): any
    process's notice reaches all of them through the coordination service, which agrees
    on a step in the background, and `reached_preemption_sync_point` is a local lookup,
    cheap enough to ask at every step (the same protocol orbax's
    CheckpointManager.reached_preemption uses). So a notice costs at most the step after
    the one in flight. Where the service is switched off (jax_enable_preemption_service)
    the local flags are all-gathered, a host-device sync, every `sync_every` steps.
    """

    def __init__(self, sync_every: int = 1, signals=(signal.SIGTERM,)):
        self._event = threading.Event()
        self._previous = {}
        self.sync_every = max(1, sync_every)
        # Not our own handler there: a Python handler would replace the service's notifier.
        self._jax_service = (
            jax.process_count() > 1 and _jax_distributed.global_state.preemption_sync_manager is not None
        )
        if not self._jax_service and threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self._event.set()

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`; every process must call it at every step."""
        if self._jax_service:
            return multihost_utils.reached_preemption_sync_point(step)
        local = self._event.is_set()
        if jax.process_count() == 1:
            return local
        if step % self.sync_every:
            return False
        flags = multihost_utils.process_allgather(np.array([local], np.int32))
        return bool(np.any(flags))

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def export(path: str | Path, model_config, params, tokenizer=None, image_config=None) -> Path:
    """Writes the whole model (frozen + trained params) in our checkpoint format.

    Every process takes part in writing the sharded params; only process 0 writes the
    tokenizer and preprocessor files (same content, one writer).
    """
    primary = jax.process_index() == 0
    return save_checkpoint(
        path,
        model_config,
        params,
        tokenizer=tokenizer if primary else None,
        image_config=image_config if primary else None,
    )
