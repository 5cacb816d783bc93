"""benchmarks/batching/tpu_predict.py: the two schedules it prices, on workloads small enough to
follow by hand."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _predict():
    spec = importlib.util.spec_from_file_location("tpu_predict", ROOT / "benchmarks" / "batching" / "tpu_predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_static_batches_wait_for_their_slowest_request():
    predict = _predict()
    got = predict.simulate_static([4, 1, 1, 1, 1, 4], batch=2)
    assert got == {"rounds": 4 + 1 + 4, "prefills": 3, "prefill_rows": 6, "busy": 12}


def test_continuous_slots_refill_as_requests_finish():
    """Two slots, one prompt per prefill: the long first request runs beside four short ones
    inserted one after another, then the last long one alone: 8 rounds, not static's 9."""
    predict = _predict()
    rounds = [4, 1, 1, 1, 1, 4]
    got = predict.simulate_continuous(rounds, batch=2, prefill_rows=1, refill_at=1)
    assert got["rounds"] == 8 and got["busy"] == sum(rounds)
    assert got["prefills"] == 6 and got["inserted"] == 6
    # Nothing waits for a refill when the workload is one batch's worth.
    assert predict.simulate_continuous([3, 1], batch=2, prefill_rows=2, refill_at=1)["rounds"] == 3
