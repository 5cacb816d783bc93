"""Markdown tables of the compile-only JSONs in this folder (python benchmarks/tpu_compile/table.py)."""

import json
import sys
from pathlib import Path

GiB = 1024**3
HERE = Path(__file__).parent


def collectives_cell(report):
    """'program: op count, ...; program: ...' of a train compile-only report."""
    return "; ".join(
        f"{name}: "
        + (", ".join(f"{k} {v}" for k, v in p["collectives"].items() if v) if p["collectives"] is not None else "n/a")
        for name, p in report["programs"].items()
    )


def mesh_cell(report):
    return ",".join(f"{k}={v}" for k, v in report["mesh"].items() if v > 1)


def decode_run_cells(report, run):
    """The cells a decode table's row starts with: model, topology, mesh, batch, KV cache per chip."""
    return [
        report["model"],
        report["topology"],
        mesh_cell(report),
        str(run["batch_size"]),
        f"{run['kv_cache_bytes_per_device'] * report['devices_per_chip'] / GiB:.2f} GiB",
    ]


def piece_times(pieces, names):
    """{piece: 'x.xx ms'} of its lower-bound time, '-' for a piece not compiled."""
    return {k: f"{1000 * pieces[k]['time_lower_bound_s']:.2f} ms" if k in pieces else "-" for k in names}


def train_rows(paths):
    yield (
        "| config:stage | topology | mesh | batch x seq | peak per chip | HBM per chip | fits | "
        "FLOPs per step | roofline step time | collectives (static) | compile |"
    )
    yield "|---|---|---|---|---:|---:|:-:|---:|---:|---|---:|"
    for path in paths:
        r = json.loads(path.read_text())
        coll, mesh = collectives_cell(r), mesh_cell(r)
        compile_s = sum(p["compile_seconds"] for p in r["programs"].values())
        yield (
            f"| {Path(r['config']).name} | {r['topology']} | {mesh} | {r['batch_size']} x {r['seq_len']} | "
            f"{r['per_chip_peak_bytes'] / GiB:.2f} GiB | {r['hbm_bytes_per_chip'] / GiB:.0f} GiB | "
            f"{'yes' if r['fits'] else 'no'} | {r['flops_per_step']:.3g} | "
            f"{1000 * r['step_time_lower_bound_s']:.0f} ms | {coll} | {compile_s:.0f} s |"
        )


def decode_rows(paths):
    yield (
        "| model | topology | mesh | batch | KV cache per chip | peak per chip (generate SSD) | "
        "AR step | draft step | shallow | verify (G+1) | tokens/round | predicted speedup "
        "(must-read / bytes-accessed basis) |"
    )
    yield "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    for path in paths:
        r = json.loads(path.read_text())
        for run in r["runs"]:
            p = run["pieces"]
            ms = piece_times(p, ("ar_step", "draft_step", "shallow_step", "verify"))
            gen = p.get("generate_ssd", {}).get("per_chip_peak_bytes")
            cells = decode_run_cells(r, run) + [
                f"{gen / GiB:.2f} GiB" if gen else "-",
                ms["ar_step"],
                ms["draft_step"],
                ms["shallow_step"],
                ms["verify"],
                f"{run.get('tokens_per_round', 0):.2f}",
                f"{run.get('predicted_speedup', 0):.2f}x / {run.get('predicted_speedup_bytes_accessed', 0):.2f}x",
            ]
            yield "| " + " | ".join(cells) + " |"


def stage_rows(paths):
    """run.sh train-stages / refine-stages: every stage, with what it trains and the loss window."""
    yield (
        "| config:stage | topology | mesh | batch x seq (loss positions) | trained params | remat | "
        "peak per chip | of HBM | fits | FLOPs per step | roofline step time | collectives (static) | compile |"
    )
    yield "|---|---|---|---|--:|---|--:|--:|:-:|--:|--:|---|--:|"
    for path in paths:
        r = json.loads(path.read_text())
        coll, mesh = collectives_cell(r), mesh_cell(r)
        compile_s = " + ".join(f"{p['compile_seconds']:.0f}" for p in r["programs"].values())
        yield (
            f"| {Path(r['config']).name} | {r['topology']} | {mesh} | {r['batch_size']} x {r['seq_len']} "
            f"({r['loss_positions']}) | {r['trainable_params'] / 1e9:.3f}e9 | {r['remat']} | "
            f"{r['per_chip_peak_bytes'] / GiB:.2f} GiB | {r['hbm_bytes_per_chip'] / GiB:.0f} GiB | "
            f"{'yes' if r['fits'] else 'no'} | {r['flops_per_step']:.3g} | "
            f"{1000 * r['step_time_lower_bound_s']:.0f} ms | {coll} | {compile_s} s |"
        )


def both_bases(entry):
    """'1.53x / 0.96x': the predicted speedup from must-read bytes, then from the compiler's
    bytes accessed (the two bases disagree; neither is a measurement)."""
    return f"{entry['predicted_speedup']:.2f}x / {entry['predicted_speedup_bytes_accessed']:.2f}x"


def batch_rows(paths):
    """run.sh decode-batches: the pieces per batch size and the predictions at the demo's
    measured profile and at the paper's implied acceptances, on both time bases."""
    yield (
        "| model | topology | mesh | batch | KV cache per chip | peak per chip | AR step | draft step | "
        "verify (G+1) | demo profile: tokens/round, speedup (must-read / bytes accessed) | "
        "paper 1.55x: a, tokens/round, speedup (must-read / bytes accessed) | "
        "paper 1.85x: a, tokens/round, speedup (must-read / bytes accessed) |"
    )
    yield "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    for path in paths:
        r = json.loads(path.read_text())
        for run in r["runs"]:
            ms = piece_times(run["pieces"], ("ar_step", "draft_step", "verify"))
            paper = {e["paper_speedup"]: e for e in run.get("paper_implied", [])}
            cells = decode_run_cells(r, run) + [
                f"{run['per_chip_peak_bytes'] / GiB:.2f} GiB",
                ms["ar_step"],
                ms["draft_step"],
                ms["verify"],
                f"{run['tokens_per_round']:.2f}, {both_bases(run)}",
            ]
            for speedup in (1.55, 1.85):
                e = paper.get(speedup)
                cells.append(
                    f"{e['per_position_acceptance']:.3f}, {e['tokens_per_round']:.2f}, {both_bases(e)}"
                    if e and e["per_position_acceptance"]
                    else "-"
                )
            yield "| " + " | ".join(cells) + " |"


def both_times(piece):
    """'14.2 / 60.6 ms': a piece's roofline time on the must-read basis (for the compute-bound
    prefill pieces, FLOPs / peak), then with the compiler's bytes accessed."""
    return f"{1000 * piece['time_lower_bound_s']:.1f} / {1000 * piece['step_time_lower_bound_s']:.1f} ms"


def prefill_rows(paths):
    """run.sh qwen25vl-decode / qwen25vl-plan (--prefill --image-tokens N): per batch and patch
    bucket, the vision tower alone and the whole prefill (peak, FLOPs, time bound) beside the
    round's pieces and the prediction at the demo's profile."""
    yield (
        "| model | topology | mesh | batch | image tokens (patches) per row | prompt | KV cache per chip | "
        "vision tower: peak per chip, FLOPs per chip, time (must-read / bytes accessed) | prefill: peak per chip, "
        "time (must-read / bytes accessed) | AR step | draft step | "
        "verify (G+1) | demo profile: tokens/round, speedup (must-read / bytes accessed) | peak per chip | fits |"
    )
    yield "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|"
    for path in paths:
        r = json.loads(path.read_text())
        for run in r["runs"]:
            p = run["pieces"]
            ms = piece_times(p, ("ar_step", "draft_step", "verify"))
            vision, prefill = p.get("encode_images"), p.get("prefill")
            cells = decode_run_cells(r, run)
            cells[4:4] = [f"{run['image_tokens']} ({run['image_patches']})", str(run["prompt_len"])]
            cells += [
                f"{vision['per_chip_peak_bytes'] / GiB:.2f} GiB, {vision['flops_per_device'] * r['devices_per_chip']:.3g}, "
                f"{both_times(vision)}"
                if vision
                else "-",
                f"{prefill['per_chip_peak_bytes'] / GiB:.2f} GiB, {both_times(prefill)}" if prefill else "-",
                ms["ar_step"],
                ms["draft_step"],
                ms["verify"],
                f"{run['tokens_per_round']:.2f}, {both_bases(run)}" if "predicted_speedup" in run else "-",
                f"{run['per_chip_peak_bytes'] / GiB:.2f} GiB",
                "yes" if run["fits"] else "no",
            ]
            yield "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    files = sorted(HERE.glob("*.json"))
    stages = [f for f in files if f.name.startswith("stages_")]
    batches = [f for f in files if f.name.startswith("decode_batches_") and "_img" not in f.name]
    prefills = [f for f in files if f.name.startswith("decode_batches_") and "_img" in f.name]
    train = [f for f in files if f.name.startswith("llava15_")]
    decode = [f for f in files if f.name.startswith("decode_llava15_")]
    for rows, group in (
        (stage_rows, stages),
        (batch_rows, batches),
        (prefill_rows, prefills),
        (train_rows, train),
        (decode_rows, decode),
    ):
        if group:
            print("\n".join(rows(group)))
            print()
    sys.exit(0)
