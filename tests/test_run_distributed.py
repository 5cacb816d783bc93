"""decode.run across chips (--mesh) and processes (each writes a part, the last one merges).

Greedy tokens must equal a one-device run's; every image must land in OUT exactly once,
also after a process is killed mid-write and the command is run again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from decode import run
from tests import train_helpers as th
from tests.run_fixtures import make_tiny_checkpoint, write_image
from tests.test_train_distributed import _free_port

COMMON = ["--batch-size", "4", "--max-new-tokens", "8", "--no-progress"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    ckpt = str(make_tiny_checkpoint(root / "ckpt"))
    folder = root / "images"
    for index in range(7):
        write_image(folder / f"img{index}.png", seed=index)
    (folder / "broken.png").write_bytes(b"not a png")
    reference = root / "reference.jsonl"
    assert run.main(["--ckpt", ckpt, "--images", str(folder), "--out", str(reference), *COMMON]) == 1
    return root, ckpt, folder, _by_image(reference)


def _by_image(path: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    images = [line["image"] for line in lines]
    assert len(images) == len(set(images)), f"an image appears twice in {path}"
    return {line["image"]: line for line in lines}


def _same_tokens(got: dict, reference: dict) -> None:
    assert got.keys() == reference.keys()
    for image, line in reference.items():
        if "error" in line:
            assert "error" in got[image], image
        else:
            assert got[image]["token_ids"] == line["token_ids"], image


def test_mesh_data_and_tensor_gives_the_one_device_tokens(setup, tmp_path):
    root, ckpt, folder, reference = setup
    out = tmp_path / "mesh.jsonl"
    stats = tmp_path / "stats.json"
    assert run.main(["--ckpt", ckpt, "--images", str(folder), "--out", str(out), "--mesh", "data=2,tensor=4",
                     "--stats", str(stats), *COMMON]) == 1
    _same_tokens(_by_image(out), reference)
    assert json.loads(stats.read_text())["mesh"] == "data=2,tensor=4"


@pytest.mark.parametrize("drafter", ["eagle", "model"])
def test_other_drafters_on_a_mesh_give_the_one_device_tokens(setup, tmp_path, drafter):
    """The EAGLE head (its params sharded with the model's) and a separate draft model
    (loaded onto the same mesh) on 8 devices: greedy tokens equal the one-device run's."""
    root, _, folder, reference = setup
    if drafter == "eagle":
        ckpt, flag = str(make_tiny_checkpoint(tmp_path / "eagle", eagle=True)), "eagle"
    else:
        ckpt = setup[1]
        flag = "model:" + str(make_tiny_checkpoint(tmp_path / "draft", num_layers=2, exit_layer=1, seed=1))
    out, stats = tmp_path / "mesh.jsonl", tmp_path / "stats.json"
    assert run.main(["--ckpt", ckpt, "--images", str(folder), "--out", str(out), "--mesh", "data=2,tensor=4",
                     "--drafter", flag, "--stats", str(stats), *COMMON]) == 1
    _same_tokens(_by_image(out), reference)
    summary = json.loads(stats.read_text())
    assert summary["drafter"].startswith(drafter) and summary["drafted"] > 0


def test_mesh_usage_errors(setup, tmp_path, capsys):
    _, ckpt, folder, _ = setup
    for mesh, expected in [("data=3", "devices"), ("data=8", "--batch-size 4 does not divide"),
                           ("rows=2", "axis=size")]:
        assert run.main(["--ckpt", ckpt, "--images", str(folder), "--out", str(tmp_path / "x.jsonl"),
                         "--mesh", mesh, *COMMON]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert expected in err[-1], (mesh, err)


def _two_processes(root, ckpt, folder, out) -> list[str]:
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "decode.run", "--ckpt", ckpt, "--images", str(folder), "--out", str(out),
         "--mesh", "data=2", *COMMON, "--coordinator", f"localhost:{port}", "--num-processes", "2",
         "--process-id", str(pid)],
        cwd=th.REPO, env=th.subprocess_env(root / "cache", 2), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for pid in range(2)]
    errors = []
    # Process 0's share holds the broken image (exit 1: some failed), process 1's does not.
    for proc, status in zip(procs, (1, 0)):
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == status, err[-3000:]
        errors.append(err)
    return errors


def test_two_processes_write_parts_and_merge_every_image_once(setup, tmp_path):
    root, ckpt, folder, reference = setup
    out = tmp_path / "captions.jsonl"
    errors = _two_processes(root, ckpt, folder, out)
    assert any(f"wrote {out}" in err for err in errors), errors
    parts = [tmp_path / "captions.part-0-of-2.jsonl", tmp_path / "captions.part-1-of-2.jsonl"]
    shares = [_by_image(part) for part in parts]
    assert not shares[0].keys() & shares[1].keys()
    assert [len(s) for s in shares] == [4, 4]  # broken, img1, img3, img5 | img0, img2, img4, img6
    _same_tokens(_by_image(out), reference)

    # A process killed while writing: its part ends in half a line, and OUT is not written yet.
    out.unlink()
    text = parts[1].read_text()
    first = text.index("\n") + 1
    parts[1].write_text(text[:first] + text[first:first + 25])
    errors = _two_processes(root, ckpt, folder, out)
    assert "skipping them" in errors[0]  # process 0 had nothing left to do
    _same_tokens(_by_image(out), reference)

    # One process rerunning the same command resumes from the parts and merges them.
    out.unlink()
    assert run.main(["--ckpt", ckpt, "--images", str(folder), "--out", str(out), *COMMON]) == 1
    _same_tokens(_by_image(out), reference)
