"""benchmarks/first_hour.py on a tiny random model (CPU): the JSON holds the measured keys with
positive values, and benchmarks/first_hour_compare.py pairs it with compile-only-style JSONs."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _predicted_from(measured: dict) -> tuple[dict, dict]:
    """A decode and a train compile-only report in their real keys, with times of half the
    measured ones (what a roofline bound looks like next to a measurement)."""
    runs = []
    for run in measured["runs"]:
        pieces = {
            name: {"time_lower_bound_s": piece["measured_time_s"] / 2, "per_chip_peak_bytes": 1 << 20}
            for name, piece in run["pieces"].items()
        }
        runs.append(
            {
                "batch_size": run["batch_size"],
                "draft_len": run["draft_len"],
                "max_new_tokens": run["max_new_tokens"],
                "per_chip_peak_bytes": 1 << 20,
                "pieces": pieces,
                "drafters": {
                    "imitation": {
                        "tokens_per_round": 3.0,
                        "draft_cost_s": 0.001,
                        "verify_s": 0.001,
                        "predicted_speedup": 1.5,
                    }
                },
            }
        )
    decode = {"topology": None, "model": measured["model"], "mesh": measured["mesh"], "runs": runs}
    train = copy.deepcopy({k: measured["train"][k] for k in ("stage", "mesh", "batch_size", "seq_len")})
    train.update(
        topology=None,
        step_time_lower_bound_s=measured["train"]["step_time_s"] / 2,
        per_chip_peak_bytes=1 << 30,
        tokens_per_step=measured["train"]["tokens_per_step"],
    )
    return decode, train


@pytest.mark.slow
def test_first_hour_smoke_and_compare(tmp_path, capsys):
    first_hour, compare = _load("first_hour"), _load("first_hour_compare")
    out = tmp_path / "first_hour.json"
    argv = [
        "--arch",
        "random:tiny",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "6",
        "--repeats",
        "1",
        "--piece-iters",
        "2",
        "--mesh",
        "data=1,tensor=2",
        "--devices",
        "2",
        "--train-mesh",
        "data=1,fsdp=2",
        "--train-batch",
        "2",
        "--train-seq-len",
        "40",
        "--train-steps",
        "1",
        "--json",
        str(out),
    ]
    assert first_hour.main(argv) == 0
    report = json.loads(out.read_text())

    assert report["kind"] == "first_hour" and report["weights"] == "random" and report["model"] == "random:tiny"
    assert report["devices"] == 2
    for key in ("device_kind", "platform", "jax_version", "devices", "chips", "topology"):
        assert key in report
    assert report["mesh"] == {"data": 1, "fsdp": 1, "tensor": 2}
    assert [r["batch_size"] for r in report["runs"]] == [2]
    for run in report["runs"]:
        assert set(run["pieces"]) == {"ar_step", "draft_step", "shallow_step", "verify"}
        assert all(p["measured_time_s"] > 0 and p["compile_seconds"] > 0 for p in run["pieces"].values())
        for mode in ("ar", "ssd"):
            assert run[mode]["tokens"] == run["batch_size"] * 6  # EOS disabled: the whole budget
            assert run[mode]["tokens_per_s"] > 0 and run[mode]["first_call_seconds"] > 0
            assert run[mode]["seconds"]["min"] <= run[mode]["seconds"]["median"] <= run[mode]["seconds"]["max"]
        assert run["identical"] is True  # greedy SSD reproduces AR
        assert run["tokens_per_round"] >= 1 and run["speedup"] > 0
    train = report["train"]
    assert train["stage"] == "imitation" and train["batch_size"] == 2 and train["seq_len"] == 40
    assert train["step_time_s"] > 0 and train["tokens_per_s"] > 0 and train["flops_per_step"] > 0
    assert train["mfu"] is None  # no TPU peak on a CPU

    decode, train_pred = _predicted_from(report)
    rows, warnings = compare.compare(report, [decode, train_pred])
    assert not warnings
    sections = {r["section"] for r in rows}
    assert sections == {"decode batch 2", "train imitation batch 2 x 40"}
    ar_step = next(r for r in rows if r["section"] == "decode batch 2" and r["quantity"] == "ar_step per call")
    assert ar_step["ratio"] == pytest.approx(2.0)
    step = next(r for r in rows if r["quantity"] == "step time")
    assert step["ratio"] == pytest.approx(2.0)
    # The CLI prints the same rows as a table, and warns about a mismatched slice.
    decode["mesh"] = {"data": 1, "fsdp": 1, "tensor": 4}
    paths = [tmp_path / "decode.json", tmp_path / "train.json"]
    for path, data in zip(paths, (decode, train_pred)):
        path.write_text(json.dumps(data))
    assert compare.main([str(out), *map(str, paths)]) == 0
    printed = capsys.readouterr().out
    assert "| decode batch 2 | verify per call (ms) |" in printed
    assert "warning: decode mesh" in printed
