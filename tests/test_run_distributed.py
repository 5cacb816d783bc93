"""decode.run across chips (--mesh) and processes (each writes a part, the last one merges).

Greedy tokens must equal a one-device run's; every image must land in OUT exactly once,
also after a process is killed mid-write and the command is run again.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
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


@pytest.mark.slow
def test_mesh_data_and_tensor_gives_the_one_device_tokens(setup, tmp_path):
    root, ckpt, folder, reference = setup
    out = tmp_path / "mesh.jsonl"
    stats = tmp_path / "stats.json"
    assert (
        run.main(
            [
                "--ckpt",
                ckpt,
                "--images",
                str(folder),
                "--out",
                str(out),
                "--mesh",
                "data=2,tensor=4",
                "--stats",
                str(stats),
                *COMMON,
            ]
        )
        == 1
    )
    _same_tokens(_by_image(out), reference)
    assert json.loads(stats.read_text())["mesh"] == "data=2,tensor=4"


@pytest.mark.slow
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
    assert (
        run.main(
            [
                "--ckpt",
                ckpt,
                "--images",
                str(folder),
                "--out",
                str(out),
                "--mesh",
                "data=2,tensor=4",
                "--drafter",
                flag,
                "--stats",
                str(stats),
                *COMMON,
            ]
        )
        == 1
    )
    _same_tokens(_by_image(out), reference)
    summary = json.loads(stats.read_text())
    assert summary["drafter"].startswith(drafter) and summary["drafted"] > 0


def test_mesh_usage_errors(setup, tmp_path, capsys):
    _, ckpt, folder, _ = setup
    for mesh, expected in [
        ("data=3", "devices"),
        ("data=8", "--batch-size 4 does not divide"),
        ("rows=2", "axis=size"),
    ]:
        assert (
            run.main(
                ["--ckpt", ckpt, "--images", str(folder), "--out", str(tmp_path / "x.jsonl"), "--mesh", mesh, *COMMON]
            )
            == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert expected in err[-1], (mesh, err)


def _launch(
    root, ckpt, images, out, count: int, devices: int = 1, extra=(), peer_timeout: float = 60.0
) -> list[subprocess.Popen]:
    """`count` decode.run processes joined by --coordinator, each on `devices` CPU devices.

    peer_timeout: how long process 0 waits on a silent heartbeat before it leaves (and the
    coordinator with it, which aborts the rest). Short only where a process is killed: on a
    loaded machine (the suite's other workers) a live process's heartbeat thread can miss a
    few seconds, and a 5 s timeout then took it for dead."""
    port = _free_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "decode.run",
                "--ckpt",
                ckpt,
                "--images",
                str(images),
                "--out",
                str(out),
                *COMMON,
                *extra,
                "--peer-timeout",
                str(peer_timeout),
                "--coordinator",
                f"localhost:{port}",
                "--num-processes",
                str(count),
                "--process-id",
                str(pid),
            ],
            cwd=th.REPO,
            env=th.subprocess_env(root / "cache", devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in range(count)
    ]


def _finish(procs, statuses) -> list[str]:
    """Waits for every process; checks exit statuses (None: any); returns their stderr."""
    errors = []
    for proc, status in zip(procs, statuses):
        _, err = proc.communicate(timeout=300)
        assert status is None or proc.returncode == status, (proc.returncode, err[-3000:])
        errors.append(err)
    return errors


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def many(setup, tmp_path_factory):
    """16 images and their one-process captions at batch 2 (8 per process with two
    processes: four batches each, so a kill can land between them)."""
    root, ckpt, _, _ = setup
    folder = tmp_path_factory.mktemp("many")
    for index in range(16):
        write_image(folder / f"p{index:02d}.png", seed=100 + index)
    reference = folder.parent / f"{folder.name}.jsonl"
    assert (
        run.main(["--ckpt", ckpt, "--images", str(folder), "--out", str(reference), *COMMON, "--batch-size", "2"]) == 0
    )
    return folder, _by_image(reference)


@pytest.mark.slow
@pytest.mark.parametrize("victim, devices", [(1, 1), (0, 2)], ids=["kill-1", "kill-0-mesh"])
def test_a_killed_process_is_rerun_and_out_holds_every_image_once(setup, many, tmp_path, victim, devices):
    """A host is preempted (SIGKILL after a random number of finished batches); the same
    command is run again on both hosts. Killing process 1 leaves process 0 with nothing to do
    on the rerun (it must still let process 1 finish: it hosts the coordinator); killing
    process 0 takes the coordinator, and with it process 1, down. Either way the rerun
    writes OUT with every image once and the one-process tokens."""
    root, ckpt, _, _ = setup
    folder, reference = many
    out = tmp_path / "captions.jsonl"
    extra = ["--batch-size", "2"] + (["--mesh", "data=2"] if devices == 2 else [])
    part = tmp_path / f"captions.part-{victim}-of-2.jsonl"
    kill_at = random.Random().choice([2, 4, 6])  # lines of its 8 (each batch of 2 is written whole)
    procs = _launch(root, ckpt, folder, out, 2, devices, extra, peer_timeout=5.0)
    deadline = time.monotonic() + 240
    while _lines(part) < kill_at and procs[victim].poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    procs[victim].send_signal(signal.SIGKILL)
    errors = _finish(procs, (None, None))
    assert procs[victim].returncode == -signal.SIGKILL, errors[victim][-2000:]
    assert _lines(part) < 8, f"process {victim} finished before the kill (kill_at={kill_at})"
    assert not out.exists()

    errors = _finish(_launch(root, ckpt, folder, out, 2, devices, extra), (0, 0))
    if victim == 1:  # process 0 had nothing left, and said so and whom it waited for
        assert "nothing to do: every image is already captioned" in errors[0], errors[0][-2000:]
    assert any(f"wrote {out}" in err for err in errors), errors
    shares = [_by_image(tmp_path / f"captions.part-{k}-of-2.jsonl") for k in range(2)]
    assert not shares[0].keys() & shares[1].keys() and [len(s) for s in shares] == [8, 8]
    _same_tokens(_by_image(out), reference)

    # One process rerunning the same command resumes from the parts and merges them.
    out.unlink()
    assert run.main(["--ckpt", ckpt, "--images", str(folder), "--out", str(out), *COMMON, "--batch-size", "2"]) == 0
    _same_tokens(_by_image(out), reference)


@pytest.mark.slow
def test_three_processes_two_images(setup, tmp_path):
    """A process whose share is empty (process 2 of 3, 2 images) exits cleanly; OUT is whole."""
    root, ckpt, _, reference = setup
    folder = tmp_path / "two"
    for name in ("img0.png", "img1.png"):
        (folder).mkdir(exist_ok=True)
        (folder / name).write_bytes((root / "images" / name).read_bytes())
    out = tmp_path / "captions.jsonl"
    errors = _finish(_launch(root, ckpt, folder, out, 3), (0, 0, 0))
    assert "this process's share of the images is empty" in errors[2], errors[2][-2000:]
    got = _by_image(out)
    assert len(got) == 2
    for name, line in got.items():
        assert line["token_ids"] == reference[str(root / "images" / Path(name).name)]["token_ids"]
