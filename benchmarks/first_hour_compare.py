"""Measured next to predicted: a benchmarks/first_hour.py JSON against the compile-only JSONs
of the same slice (decode.bench --compile-only, train.run --compile-only).

    python benchmarks/first_hour_compare.py first_hour.json decode_compile_only.json train_compile_only.json

Prints one markdown table: per decode batch size (matched by batch_size and draft_len) the
round's pieces (ms per call: the compiled piece's roofline lower bound on must-read bytes vs
the measured median), the AR and SSD tokens/s of the decoding loop (prefill excluded), the SSD
speedup and the peak memory per chip; for training the step time, tokens/s and peak memory.
ratio = measured / predicted: above 1 a time took longer than its lower bound (expected:
the bounds are roofline bounds), below 1 a rate fell short of its bound.

SSD predictions come twice: at the acceptance the compile-only run assumed (its
tokens_per_round; random weights accept far less) and re-evaluated at the measured tokens
and drafts per round from the predicted piece times, which is the like-for-like one.
Mismatched topology, mesh, batch or sequence length is printed as a warning above the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GiB = 1024**3


def _ms(seconds):
    return None if seconds is None else 1000 * seconds


def _row(section, quantity, unit, predicted, measured) -> dict:
    ratio = measured / predicted if predicted and measured is not None else None
    return {
        "section": section,
        "quantity": quantity,
        "unit": unit,
        "predicted": predicted,
        "measured": measured,
        "ratio": ratio,
    }


def _warn_mismatch(warnings: list[str], what: str, measured, predicted) -> None:
    if measured is not None and predicted is not None and measured != predicted:
        warnings.append(f"{what}: measured on {measured}, predicted for {predicted}")


def decode_rows(measured: dict, predicted: dict, warnings: list[str]) -> list[dict]:
    _warn_mismatch(warnings, "decode topology", measured.get("topology"), predicted.get("topology"))
    _warn_mismatch(warnings, "decode mesh", measured.get("mesh"), predicted.get("mesh"))
    _warn_mismatch(warnings, "model", measured.get("model"), predicted.get("model"))
    per_chip = measured.get("devices_per_chip", 1)
    by_point = {(r["batch_size"], r["draft_len"]): r for r in predicted.get("runs", [])}
    rows = []
    for run in measured.get("runs", []):
        pred = by_point.get((run["batch_size"], run["draft_len"]))
        if pred is None:
            warnings.append(f"batch {run['batch_size']} draft {run['draft_len']}: no compile-only point")
            continue
        _warn_mismatch(
            warnings, f"batch {run['batch_size']} max_new_tokens", run["max_new_tokens"], pred["max_new_tokens"]
        )
        section = f"decode batch {run['batch_size']}"
        pieces, times = pred["pieces"], {}
        for name in ("ar_step", "draft_step", "shallow_step", "verify"):
            t = pieces.get(name, {}).get("time_lower_bound_s")
            times[name] = t
            got = run["pieces"].get(name, {}).get("measured_time_s")
            if t is not None or got is not None:
                rows.append(_row(section, f"{name} per call", "ms", _ms(t), _ms(got)))
        batch = run["batch_size"]
        ar, ssd = run["ar"], run["ssd"]
        if times["ar_step"]:
            rows.append(
                _row(section, "AR tokens/s (decode loop)", "tok/s", batch / times["ar_step"], ar["decode_tokens_per_s"])
            )
        imitation = pred.get("drafters", {}).get("imitation", {})
        if "predicted_speedup" in imitation:
            assumed = batch * imitation["tokens_per_round"] / (imitation["draft_cost_s"] + imitation["verify_s"])
            rows.append(
                _row(
                    section,
                    f"SSD tokens/s at {imitation['tokens_per_round']:.2f} tokens/round (compile-only's)",
                    "tok/s",
                    assumed,
                    ssd["decode_tokens_per_s"],
                )
            )
        if all(times.get(k) for k in ("draft_step", "shallow_step", "verify")):
            round_s = ssd["drafted_per_round"] * times["draft_step"] + times["shallow_step"] + times["verify"]
            rows.append(_row(section, "SSD round", "ms", _ms(round_s), _ms(ssd["round_time_s"])))
            rows.append(
                _row(
                    section,
                    f"SSD tokens/s at the measured {ssd['tokens_per_round']:.2f} tokens/round",
                    "tok/s",
                    batch * ssd["tokens_per_round"] / round_s,
                    ssd["decode_tokens_per_s"],
                )
            )
            if times["ar_step"]:
                measured_speedup = (
                    ssd["decode_tokens_per_s"] / ar["decode_tokens_per_s"]
                    if ssd["decode_tokens_per_s"] and ar["decode_tokens_per_s"]
                    else None
                )
                rows.append(
                    _row(
                        section,
                        "SSD/AR speedup at the measured tokens/round",
                        "x",
                        ssd["tokens_per_round"] * times["ar_step"] / round_s,
                        measured_speedup,
                    )
                )
        peak = run.get("per_device_peak_bytes_since_start")
        rows.append(
            _row(
                section,
                "peak memory per chip",
                "GiB",
                pred["per_chip_peak_bytes"] / GiB,
                None if peak is None else peak * per_chip / GiB,
            )
        )
    return rows


def train_rows(measured: dict, predicted: dict, warnings: list[str]) -> list[dict]:
    got = measured.get("train")
    if got is None:
        warnings.append("the first-hour JSON has no training part")
        return []
    _warn_mismatch(warnings, "train topology", measured.get("topology"), predicted.get("topology"))
    for key in ("mesh", "batch_size", "seq_len", "stage"):
        _warn_mismatch(warnings, f"train {key}", got.get(key), predicted.get(key))
    section = f"train {got['stage']} batch {got['batch_size']} x {got['seq_len']}"
    bound = predicted["step_time_lower_bound_s"]
    peak = got.get("per_chip_peak_bytes")
    return [
        _row(section, "step time", "ms", _ms(bound), _ms(got["step_time_s"])),
        _row(
            section, "tokens/s", "tok/s", predicted["tokens_per_step"] / bound if bound else None, got["tokens_per_s"]
        ),
        _row(
            section,
            "peak memory per chip",
            "GiB",
            predicted["per_chip_peak_bytes"] / GiB,
            None if peak is None else peak / GiB,
        ),
    ]


def compare(measured: dict, predicted: list[dict]) -> tuple[list[dict], list[str]]:
    """(rows, warnings): every predicted JSON paired with the measured one (train reports
    have a 'stage', decode reports 'runs' with 'pieces')."""
    rows, warnings = [], []
    for report in predicted:
        if "stage" in report:
            rows += train_rows(measured, report, warnings)
        elif "runs" in report:
            rows += decode_rows(measured, report, warnings)
        else:
            warnings.append("a predicted JSON is neither a decode nor a train compile-only report")
    return rows, warnings


def _cell(value, unit) -> str:
    if value is None:
        return "-"
    if unit == "tok/s":
        return f"{value:.1f}"
    return f"{value:.3f}" if unit in ("ms", "x") and value < 10 else f"{value:.2f}"


def table(rows: list[dict]) -> list[str]:
    lines = ["| part | quantity | predicted | measured | measured / predicted |", "|---|---|--:|--:|--:|"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(
            f"| {r['section']} | {r['quantity']} ({r['unit']}) | {_cell(r['predicted'], r['unit'])} | "
            f"{_cell(r['measured'], r['unit'])} | {ratio} |"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/first_hour_compare.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("measured", help="a benchmarks/first_hour.py JSON")
    parser.add_argument("predicted", nargs="+", help="compile-only JSONs (decode.bench and/or train.run) of the slice")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    measured = json.loads(Path(args.measured).read_text())
    if measured.get("kind") != "first_hour":
        print(f"error: {args.measured} is not a first_hour.py JSON", file=sys.stderr)
        return 2
    rows, warnings = compare(measured, [json.loads(Path(p).read_text()) for p in args.predicted])
    print(
        f"measured: {measured['devices']} x {measured['device_kind']} ({measured.get('topology') or measured['platform']}), "
        f"jax {measured['jax_version']}, {measured['model']} ({measured['weights']} weights, {measured['dtype']})"
    )
    for w in warnings:
        print(f"warning: {w}")
    print("\n".join(table(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "warnings": warnings}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
