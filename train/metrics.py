"""Metric logging: workdir/metrics.jsonl, a tqdm bar, and TensorBoard when installed.

Only process 0 writes. JSONL lines are appended, so a resumed run continues the same
file (lines past the restored step are dropped first: they belong to work that the
checkpoint does not contain and will be redone). A workdir in a bucket gets both too:
the JSONL file is rewritten whole per record (buckets have no append), and the TensorBoard
event files are written locally and copied to workdir/tensorboard after each record (the
writers here write local files only).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from fastvlm_jax.runtime.paths import as_path, is_url

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _tensorboard_writer(directory: Path):
    """A SummaryWriter from tensorboardX, or torch's when tensorboard is installed; else None.

    Probed with find_spec first: importing torch only to find tensorboard missing costs
    seconds at every start.
    """
    try:  # optional dependencies, imported only where installed
        if importlib.util.find_spec("tensorboardX"):
            from tensorboardX import SummaryWriter
        elif importlib.util.find_spec("tensorboard") and importlib.util.find_spec("torch"):
            from torch.utils.tensorboard import SummaryWriter
        else:
            return None
        return SummaryWriter(str(directory))
    except Exception:  # a broken install must not stop training
        return None


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    path = as_path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    def __init__(
        self,
        workdir: str | Path,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        tensorboard: bool = True,
    ):
        self.primary = jax.process_index() == 0
        self.path = as_path(workdir) / METRICS_FILE
        # Buckets have no append: there the whole file is rewritten per record (small).
        self._lines: list[str] | None = [] if is_url(workdir) else None
        self._bar = None
        self._tb = None
        self._tb_local: Path | None = None
        self._tb_remote = None  # the bucket folder the local event files are copied to
        if not self.primary:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [json.dumps(m) + "\n" for m in read_metrics(workdir) if m.get("step", 0) <= start_step]
        self.path.write_text("".join(kept))
        if self._lines is not None:
            self._lines = kept
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if tensorboard:
            tb_dir = as_path(workdir) / TENSORBOARD_DIR
            # The writers write local files: for a bucket, a local folder copied there per record.
            local = Path(tempfile.mkdtemp(prefix="tensorboard_")) if is_url(workdir) else Path(tb_dir)
            self._tb = _tensorboard_writer(local)
            if self._tb is not None:
                self._tb_local, self._tb_remote = local, (tb_dir if is_url(workdir) else None)
            elif is_url(workdir):
                shutil.rmtree(local, ignore_errors=True)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Writes one record {"step": step, **metrics} (device arrays are fetched)."""
        if not self.primary:
            return {}
        values = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
        record = {"step": int(step), **values}
        if self._lines is None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            self._lines.append(json.dumps(record) + "\n")
            self.path.write_text("".join(self._lines))
        if self._bar is not None:
            self._bar.n = step
            shown = {k: f"{values[k]:.4g}" for k in ("loss", "draft_agreement", "tokens_per_s") if k in values}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.refresh()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            if self._tb_remote is not None:
                self._tb.flush()
                self._copy_tensorboard()
        return record

    def _copy_tensorboard(self) -> None:
        """Local event files -> the bucket folder (whole files: small, and rewritten)."""
        assert self._tb_remote is not None and self._tb_local is not None
        for local in self._tb_local.rglob("*"):
            if local.is_file():
                remote = self._tb_remote / local.relative_to(self._tb_local).as_posix()
                remote.parent.mkdir(parents=True, exist_ok=True)
                remote.write_bytes(local.read_bytes())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
            if self._tb_remote is not None:
                self._copy_tensorboard()
                shutil.rmtree(self._tb_local or "", ignore_errors=True)
