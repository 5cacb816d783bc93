"""Bucket paths (gs://...) stay bucket paths through our own file handling.

Without network, gs:// is mocked by etils.epath's testing backend, redirected to a local
folder; what goes through it here is everything we write and read ourselves (checkpoint
config.json, preprocessor.json, the tokenizer, training metrics). Param arrays go through
orbax/tensorstore, which talk to GCS themselves and are not covered by this mock.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from fastvlm_jax.ckpt import checkpoint
from fastvlm_jax.image.processing import ImageProcessorConfig
from fastvlm_jax.runtime.paths import as_path, is_url
from fastvlm_jax.text.tokenizer import load_tokenizer
from tests.run_fixtures import make_tiny_tokenizer
from tests.tiny import tiny_config
from train import metrics as metrics_lib
from train.metrics import MetricsLogger, read_metrics

_FUNCTIONS = ("open", "exists", "isdir", "listdir", "makedirs", "mkdir", "glob", "remove", "rmtree", "stat", "walk")


@pytest.fixture
def bucket(tmp_path):
    """gs://bucket/... is tmp_path/bucket/... for the duration of the test."""

    def local(path):
        return os.fspath(path).replace("gs://", f"{tmp_path}/")

    def redirect(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    with epath_testing.mock_epath(**{name: redirect for name in _FUNCTIONS}):
        yield tmp_path


def test_as_path_keeps_bucket_paths_and_absolutizes_local_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert os.fspath(as_path("gs://b/run/x")) == "gs://b/run/x" and is_url("gs://b/run")
    assert os.fspath(as_path("run/x")) == os.fspath(tmp_path / "run" / "x") and not is_url("run/x")
    assert isinstance(as_path("run"), epath.Path)


def test_checkpoint_files_and_tokenizer_in_a_bucket(bucket):
    tokenizer = make_tiny_tokenizer(bucket / "local_sp")
    folder = as_path("gs://bucket/ckpts/tiny")
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    (folder / checkpoint.CONFIG_FILE).write_text(json.dumps({**config.to_dict(), "format_version": 2}))
    tokenizer.save(folder / checkpoint.TOKENIZER_DIR)
    image_config = ImageProcessorConfig(shortest_edge=16)
    (folder / checkpoint.PREPROCESSOR_FILE).write_text(json.dumps(image_config.to_dict()))

    assert (bucket / "bucket" / "ckpts" / "tiny" / "config.json").is_file()  # where the mock put it
    assert checkpoint.load_config("gs://bucket/ckpts/tiny") == config
    assert checkpoint.format_version("gs://bucket/ckpts/tiny") == 2
    loaded = load_tokenizer("gs://bucket/ckpts/tiny/tokenizer")
    assert loaded.encode("a red circle") == tokenizer.encode("a red circle")
    assert checkpoint._load_image_config(folder) == image_config


class _EventWriter:
    """A SummaryWriter's interface writing one local text file (no tensorboard installed here)."""

    def __init__(self, directory):
        self.file = Path(directory) / "events.out"
        self.lines = []

    def add_scalar(self, key, value, step):
        self.lines.append(f"{step} {key} {value}\n")

    def flush(self):
        self.file.write_text("".join(self.lines))

    def close(self):
        self.flush()


def test_training_metrics_in_a_bucket(bucket, monkeypatch):
    monkeypatch.setattr(metrics_lib, "_tensorboard_writer", _EventWriter)
    workdir = as_path("gs://bucket/runs/base")
    logger = MetricsLogger(workdir, total_steps=3, progress=False)
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step})
        # The event file is in the bucket after each record, not only at the end.
        events = bucket / "bucket" / "runs" / "base" / "tensorboard" / "events.out"
        assert events.read_text().splitlines()[-1] == f"{step} loss {1.0 / step}"
    logger.close()
    assert [m["step"] for m in read_metrics(workdir)] == [1, 2, 3]
    # A resumed run from step 2 keeps what came before it and rewrites the rest.
    MetricsLogger(workdir, total_steps=3, start_step=2, progress=False).log(3, {"loss": 0.5})
    assert [(m["step"], m["loss"]) for m in read_metrics(workdir)] == [(1, 1.0), (2, 0.5), (3, 0.5)]
    assert (bucket / "bucket" / "runs" / "base" / "metrics.jsonl").is_file()
