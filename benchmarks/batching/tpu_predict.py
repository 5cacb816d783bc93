"""Predicted TPU throughput of static vs continuous batching: a measured workload's per-request
rounds, scheduled both ways on the TPU compiler's predicted costs of the programs.

    python benchmarks/batching/tpu_predict.py \
        --measured benchmarks/batching/demo_test256_auto_b8_32_64.json \
        --pieces benchmarks/tpu_compile/decode_batches_llava15_7b_v5e_2x2.json \
        --prefill benchmarks/tpu_compile/decode_prefill_llava15_7b_v5e_2x2.json \
        --slots 32 64 --out benchmarks/batching/tpu_predict_llava15_7b_v5e_2x2.json

What is measured and what is assumed:
- Each request's rounds after its prefill (`request_rounds` of a `decode.bench --batching` JSON:
  the demo's captions, greedy, AR and an SSD chain) are the workload. Rows advance on their
  own, so a request takes those rounds in either batching; the demo's caption lengths and
  acceptance stand in for the TPU model's.
- A round at B slots costs what its pieces cost at batch B in `--pieces` (compile-only): AR
  one `ar_step`; an SSD chain of draft length g, g `draft_step`s, a `shallow_step` and a
  `verify` (every live row drafts the whole chain). A prefill of n prompts costs the
  `prefill` piece of `--prefill` scaled by n / its batch (it is compute-bound: the Qwen2.5-VL-7B
  prefill pieces, 8 and 32 rows, differ by 4.00x). Both bases: the bytes that must be read
  (`time_lower_bound_s`) and the bytes the compiled programs access (`step_time_lower_bound_s`).
- An insert of n rows moves their KV cache rows: 2 x n x (KV bytes per slot per chip) at HBM
  bandwidth, an estimate (the insert's own static cost was not compiled here).
- Static batching: batches of B in arrival order, each a prefill of B prompts and the rounds of
  its slowest request. Continuous batching: the engine's policy (decode/engine/slots.py):
  prefills of P prompts kept ready, a return to the host once min(refill_at, ready) slots have
  finished, each return an insert (P and refill_at: the engine's defaults). Host round trips
  cost 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from decode.engine.slots import default_prefill_rows, default_refill_at

BASES = {"must_read": "time_lower_bound_s", "bytes_accessed": "step_time_lower_bound_s"}


def _run_at(report: dict, batch: int) -> dict:
    for run in report["runs"]:
        if run["batch_size"] == batch:
            return run
    raise SystemExit(f"no compile-only run at batch {batch} in {report.get('model')}: add it to --pieces")


def round_seconds(pieces_report: dict, batch: int, mode: str, draft_len: int, key: str) -> float:
    pieces = _run_at(pieces_report, batch)["pieces"]
    if mode == "ar":
        return pieces["ar_step"][key]
    return draft_len * pieces["draft_step"][key] + pieces["shallow_step"][key] + pieces["verify"][key]


def prefill_seconds(prefill_report: dict, rows: int, key: str) -> float:
    """The prefill of `rows` prompts, scaled from the nearest compiled batch (compute-bound)."""
    runs = [run for run in prefill_report["runs"] if "prefill" in run["pieces"]]
    if not runs:
        raise SystemExit("--prefill: no run with a 'prefill' piece (compile with --prefill)")
    run = min(runs, key=lambda r: abs(r["batch_size"] - rows))
    return run["pieces"]["prefill"][key] * rows / run["batch_size"]


def simulate_static(rounds: list[int], batch: int) -> dict:
    """Lockstep batches of `batch` in arrival order: prefills and rounds run."""
    total_rounds = prefills = busy = 0
    for start in range(0, len(rounds), batch):
        chunk = rounds[start : start + batch]
        total_rounds += max(chunk)
        busy += sum(chunk)
        prefills += 1
    return {"rounds": total_rounds, "prefills": prefills, "prefill_rows": prefills * batch, "busy": busy}


def simulate_continuous(rounds: list[int], batch: int, prefill_rows: int, refill_at: int) -> dict:
    """The slot engine's schedule: rounds run, prefill calls, inserts (calls, rows)."""
    waiting = list(rounds)
    ready: list[int] = []  # prefilled requests' rounds, not yet in a slot
    slots: list[int | None] = [None] * batch  # rounds left of each occupant
    total_rounds = prefills = insert_calls = inserted = busy = 0

    def prefill() -> None:
        nonlocal prefills
        ready.extend(waiting[:prefill_rows])
        del waiting[:prefill_rows]
        prefills += 1

    while waiting or ready or any(s is not None for s in slots):
        free = [i for i, s in enumerate(slots) if s is None]
        while free and (ready or waiting):
            if not ready:
                prefill()
            take = min(len(free), len(ready))
            for slot in free[:take]:
                slots[slot] = ready.pop(0)
            free = free[take:]
            insert_calls += 1
            inserted += take
        if not ready and waiting:
            prefill()
        wanted = min(refill_at, len(ready)) if ready else 0
        finished = [i for i, s in enumerate(slots) if s == 0]
        # Rounds until `wanted` occupants have finished (0: until none is left running).
        while any(s is not None and s > 0 for s in slots):
            if wanted and len(finished) >= wanted:
                break
            for i, s in enumerate(slots):
                if s is not None and s > 0:
                    slots[i] = s - 1
                    busy += 1
            total_rounds += 1
            finished = [i for i, s in enumerate(slots) if s == 0]
        for i in finished:
            slots[i] = None
    return {
        "rounds": total_rounds,
        "prefills": prefills,
        "prefill_rows": prefills * prefill_rows,
        "insert_calls": insert_calls,
        "inserted": inserted,
        "busy": busy,
    }


def predict(measured: dict, pieces: dict, prefill: dict, batch: int, draft_len: int, copies: int = 1) -> dict:
    run = measured["runs"][0]
    kv_per_slot = _run_at(pieces, batch)["kv_cache_bytes_per_device"] / batch
    bandwidth = pieces["hbm_bandwidth_per_chip"]
    prefill_rows = default_prefill_rows(batch)
    refill_at = default_refill_at(batch)
    out: dict = {"slots": batch, "prefill_rows": prefill_rows, "refill_at": refill_at, "modes": {}}
    for mode in ("ar", "ssd"):
        rounds = run["continuous"][mode]["request_rounds"] * copies
        static = simulate_static(rounds, batch)
        continuous = simulate_continuous(rounds, batch, prefill_rows, refill_at)
        entry: dict = {
            "requests": len(rounds),
            "static": static,
            "continuous": continuous,
            "slot_utilization": {
                "static": static["busy"] / (static["rounds"] * batch),
                "continuous": continuous["busy"] / (continuous["rounds"] * batch),
            },
        }
        for basis, key in BASES.items():
            per_round = round_seconds(pieces, batch, mode, draft_len, key)
            insert = 2 * continuous["inserted"] * kv_per_slot / bandwidth
            static_prefill = static["prefills"] * prefill_seconds(prefill, batch, key)
            static_s = static["rounds"] * per_round + static_prefill
            continuous_s = (
                continuous["rounds"] * per_round
                + continuous["prefills"] * prefill_seconds(prefill, prefill_rows, key)
                + insert
            )
            entry[basis] = {
                "round_ms": 1000 * per_round,
                "static_images_per_s": len(rounds) / static_s,
                "continuous_images_per_s": len(rounds) / continuous_s,
                "continuous_over_static": static_s / continuous_s,
                "static_prefill_share": static_prefill / static_s,
                "prefill_ms_per_prompt": 1000 * prefill_seconds(prefill, 1, key),
                "continuous_insert_share": insert / continuous_s,
            }
        out["modes"][mode] = entry
    for basis in BASES:
        ar, ssd = out["modes"]["ar"][basis], out["modes"]["ssd"][basis]
        out[f"ssd_over_ar_{basis}"] = {
            "static": ssd["static_images_per_s"] / ar["static_images_per_s"],
            "continuous": ssd["continuous_images_per_s"] / ar["continuous_images_per_s"],
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measured", required=True, help="decode.bench --batching JSON with request_rounds")
    parser.add_argument("--pieces", required=True, help="compile-only JSON with the round's pieces at each --slots")
    parser.add_argument("--prefill", required=True, help="compile-only JSON with a 'prefill' piece (--prefill)")
    parser.add_argument("--slots", type=int, nargs="+", default=[32, 64])
    parser.add_argument(
        "--copies",
        type=int,
        default=1,
        help="the workload repeated this many times (a longer run: the last slots' drain weighs less)",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    measured = json.loads(Path(args.measured).read_text())
    pieces = json.loads(Path(args.pieces).read_text())
    prefill = json.loads(Path(args.prefill).read_text())
    draft_len = int(measured["draft_len"])
    report = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "measured": args.measured,
        "pieces": args.pieces,
        "prefill": args.prefill,
        "model": pieces["model"],
        "topology": pieces["topology"],
        "draft_len": draft_len,
        "copies": args.copies,
        "mean_request_rounds": {
            mode: statistics.mean(measured["runs"][0]["continuous"][mode]["request_rounds"]) for mode in ("ar", "ssd")
        },
        "predictions": [predict(measured, pieces, prefill, batch, draft_len, args.copies) for batch in args.slots],
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    for point in report["predictions"]:
        for mode in ("ar", "ssd"):
            entry = point["modes"][mode]
            must = entry["must_read"]
            print(
                f"{point['slots']:3d} slots {mode}: static {must['static_images_per_s']:.1f} img/s, continuous "
                f"{must['continuous_images_per_s']:.1f} img/s ({must['continuous_over_static']:.2f}x; bytes accessed "
                f"{entry['bytes_accessed']['continuous_over_static']:.2f}x), utilization "
                f"{entry['slot_utilization']['static']:.2f} -> {entry['slot_utilization']['continuous']:.2f}"
            )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
