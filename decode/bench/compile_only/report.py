"""One compile-only point's JSON (compile_point: build the programs, compile them, predict),
the lines printed for it, and the CLI branch `run` (decode.bench --compile-only)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax

from decode.bench.compile_only.predict import (
    Acceptance,
    Acceptances,
    TreeAcceptance,
    paper_implied,
    parse_acceptances,
    parse_tree_acceptance,
    parse_trees,
    predict_drafter,
    predict_tree,
    tree_label,
)
from decode.bench.compile_only.programs import (
    DRAFTER_PROGRAMS,
    CompileOnlyError,
    DrafterShapes,
    ModelShapes,
    ar_programs,
    compile_programs,
    fixed_image_size,
    load_shapes,
    make_point,
    parse_drafter,
    prefill_programs,
    prompt_image_tokens,
    tree_programs,
    with_eagle_head,
)
from decode.bench.compile_only.slot_programs import slot_programs
from decode.engine.slots import default_prefill_rows
from decode.engine.tree import TreeShape
from fastvlm_jax import tpu
from fastvlm_jax.nn.config import ConfigError
from fastvlm_jax.runtime import sharding


def compile_point(
    shapes: ModelShapes,
    topology: tpu.Topology,
    mesh,
    batch: int,
    draft_len: int,
    max_new: int,
    acceptance: Acceptance | Acceptances,
    drafters: tuple[DrafterShapes, ...] = (DrafterShapes("imitation", "imitation"),),
    generate: bool = True,
    trees: dict[TreeShape, TreeAcceptance] | None = None,
    slot_rows: int | None = None,
    explain: int = 0,
    image_tokens: int | None = None,
    prefill: bool = False,
) -> dict[str, Any]:
    """Every program of one (batch, draft_len) point, and the speedup they predict per drafter.

    `slot_rows` (P): also continuous batching's programs over `batch` slots, P prompts
    prefilled together (slot_programs), under `slots`; they count in the point's fit.

    `trees` (shape -> its tokens per round): the imitation drafter's draft trees, each
    under `trees["NxK"]` with its pieces and predicted speedup (programs.tree_programs).
    explain > 0: each piece also says where its bytes go (its `explain` biggest op groups).
    image_tokens: a patch-image model's tokens per image (its patch bucket; default its most).
    prefill: also the prompts' prefill and the vision tower alone (programs.prefill_programs),
    among the pieces; they count in the point's fit.

    `pieces` holds the AR programs and the imitation drafter's (under their names of
    before drafters); `drafters` holds, per drafter, its own pieces (the imitation's
    again), its must-read bytes and its predicted speedup. The run-level
    `predicted_speedup` and `tokens_per_round` are the first drafter's.
    """
    if isinstance(acceptance, Acceptance):
        acceptance = Acceptances(acceptance, {})
    if any(d.kind == "eagle" for d in drafters) and not shapes.config.draft.eagle_layers:
        raise CompileOnlyError("--drafter eagle: the model has no EAGLE head (draft.eagle_layers=0)")
    # The unrolled twins that count FLOPs and bytes, then the engine's own programs (layers
    # scanned), whose point, sizes and roles the JSON reports.
    programs, twins = {}, {}
    for unroll, out in ((True, twins), (False, programs)):
        point = make_point(shapes, mesh, batch, draft_len, max_new, generate and not unroll, unroll, image_tokens)
        ar, ar_extra = ar_programs(point)
        if prefill:
            out.update(prefill_programs(point))
        per_drafter = {d.name: DRAFTER_PROGRAMS[d.kind](point, d) for d in drafters}
        per_tree = {tree_label(shape): tree_programs(point, shape) for shape in trees or {}}
        out.update(ar)
        for own in (*per_drafter.values(), *per_tree.values()):
            out.update(own.programs)
    pieces, reports, refusals, failed = compile_programs(programs, twins, mesh, topology, batch, explain)
    slot_entry = None
    if slot_rows:
        slot_pieces, slot_reports, slot_refusals, slot_failed = compile_programs(
            slot_programs(point, slot_rows), {}, mesh, topology, batch
        )
        reports.update(slot_reports)
        refusals += slot_refusals
        failed.update(slot_failed)
        slot_entry = {
            "prefill_rows": slot_rows,
            "pieces": slot_pieces,
            "per_chip_peak_bytes": max((p["per_chip_peak_bytes"] for p in slot_pieces.values()), default=0),
        }

    hbm = topology.hbm_bytes_per_device
    peak = max((r.memory.peak for r in reports.values()), default=0)
    over = [r for r in reports.values() if not tpu.fits(r.memory.peak, topology)]
    reason = (
        refusals[0]
        if refusals
        else (
            f"{max(over, key=lambda r: r.memory.peak).name} needs {tpu.format_bytes(peak)} per device, more than "
            f"the {tpu.format_bytes(hbm)} of HBM of a {topology.device_kind} device"
            if over
            else None
        )
    )
    drafter_entries = {}
    for d in drafters:
        built = per_drafter[d.name]
        own = {role: pieces[name] for role, name in built.roles.items() if name in pieces}
        entry = {
            "kind": d.kind,
            **built.extra,
            "pieces": own,
            "per_chip_peak_bytes": max((p["per_chip_peak_bytes"] for p in own.values()), default=0),
        }
        needed = [name for role, name in built.roles.items() if role != "generate_ssd"]
        if all(name in pieces for name in needed) and "ar_step" in pieces:
            acc = acceptance.for_drafter(d.name)
            entry["acceptance"] = dataclasses.asdict(acc)
            entry.update(predict_drafter(d.kind, pieces["ar_step"], own, acc, draft_len))
        drafter_entries[d.name] = entry
    tree_entries = {}
    for shape, tree_acc in (trees or {}).items():
        built = per_tree[tree_label(shape)]
        own = {role: pieces[name] for role, name in built.roles.items() if name in pieces}
        entry = {**built.extra, "pieces": own, "acceptance": dataclasses.asdict(tree_acc)}
        if all(role in own for role in ("root", "step", "verify", "move")) and "ar_step" in pieces:
            entry.update(predict_tree(shape, pieces["ar_step"], own, tree_acc))
        tree_entries[tree_label(shape)] = entry
    # The AR step and whole programs shared by all drafters stay at the top (with the
    # imitation drafter's pieces: the layout of before drafters).
    top = {name: p for name, p in pieces.items() if "/" not in name and name != "verify_tokens"}
    params = point.params
    result = {
        **tpu.topology_summary(topology),
        "batch_size": batch,
        "draft_len": draft_len,
        "exit_layer": point.exit_layer,
        "prompt_len": point.prompt_len,
        # Images of no fixed size (patch rows): the point's patch bucket.
        **(
            {"image_tokens": point.image_tokens, "image_patches": point.prompts(1).pixels.patches.shape[1]}
            if fixed_image_size(shapes.config) is None
            else {}
        ),
        "max_new_tokens": max_new,
        "kv_cache_bytes_per_device": point.reads.cache,
        **ar_extra,
        "param_bytes_per_device": sum(tpu.shard_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(params)),
        "per_chip_peak_bytes": peak * topology.devices_per_chip,
        "fits": not refusals and not over,
        "reason": reason,
        "pieces": top,
        "drafters": drafter_entries,
        "trees": tree_entries,
        "failed": failed,
    }
    if slot_entry is not None:
        result["slots"] = slot_entry
    first = drafter_entries[drafters[0].name]
    for key in ("tokens_per_round", "drafted_per_round", "predicted_speedup", "predicted_speedup_bytes_accessed"):
        if key in first:
            result[key] = first[key]
    return result


def run(args) -> int:
    """The CLI's compile-only branch (decode/bench/cli.py): 0 if every point fits, 1 if one
    does not or cannot be traced (with a one-line reason), 2 for bad input."""
    try:
        topology = tpu.get_topology(args.compile_only)
        mesh_config = sharding.parse_mesh(args.mesh) if args.mesh else sharding.MeshConfig(data=1, tensor=-1)
        mesh = sharding.make_mesh(mesh_config, topology.devices)
        acceptance = parse_acceptances(args.acceptance)
        shapes = load_shapes(args.ckpt, args.dtype, args.quantize)
        if args.exit_layer:
            shapes = dataclasses.replace(shapes, config=shapes.config.with_draft(exit_layer=args.exit_layer[0]))
        drafters = tuple(parse_drafter(name, shapes) for name in args.drafter)
        image_tokens = getattr(args, "image_tokens", None)
        prompt_image_tokens(shapes.config, image_tokens)  # a count the model cannot take: one line, before compiling
        shape_list = parse_trees(args.tree_nodes, args.tree_width, list(args.drafter))
        trees = {
            shape: parse_tree_acceptance(args.acceptance, shape, acceptance.for_drafter("imitation"))
            for shape in shape_list
        }
        notes = []
        if any(d.kind == "eagle" for d in drafters):
            shapes, added = with_eagle_head(shapes)
            if added:
                notes.append(
                    f"{shapes.source} has no EAGLE head: compiled with a fresh one (one layer, FFN "
                    f"{shapes.config.draft.eagle_hidden_size or shapes.config.text.intermediate_size})"
                )
                print(f"note: {notes[-1]}", flush=True)
        runs = []
        for batch in args.batch_size:
            for draft_len in args.draft_len:
                # Trees do not depend on the chain's draft length: compiled once per batch.
                point = compile_point(
                    shapes,
                    topology,
                    mesh,
                    batch,
                    draft_len,
                    args.max_new_tokens,
                    acceptance,
                    drafters,
                    generate=not args.no_generate,
                    trees=trees if draft_len == args.draft_len[0] else None,
                    slot_rows=default_prefill_rows(batch, mesh.shape["data"] * mesh.shape["fsdp"])
                    if "continuous" in (args.batching or ())
                    else None,
                    explain=args.explain,
                    image_tokens=image_tokens,
                    prefill=getattr(args, "prefill", False),
                )
                point["paper_implied"] = paper_implied(point, args.paper_speedup, shapes.config.text.num_layers)
                runs.append(point)
                for line in point_lines(point, topology):
                    print(line, flush=True)
    except (tpu.TopologyError, tpu.LibtpuMissingError, CompileOnlyError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {
        **tpu.topology_summary(topology),
        "model": shapes.source,
        "dtype": shapes.dtype.name,
        "quantization": shapes.config.quantization,
        "mesh": dict(mesh.shape),
        "hbm_bytes_per_device": topology.hbm_bytes_per_device,
        "acceptance": (
            dataclasses.asdict(acceptance.default)
            if acceptance.default is not None
            else {name: dataclasses.asdict(a) for name, a in acceptance.by_drafter.items()}
        ),
        "drafter_names": [d.name for d in drafters],
        "notes": notes,
        "tree_acceptance": {tree_label(shape): dataclasses.asdict(acc) for shape, acc in trees.items()},
        "time_basis": "predicted_speedup: max(FLOPs/peak, must-read bytes/bandwidth) per piece; "
        "predicted_speedup_bytes_accessed: the same with the compiler's bytes accessed; "
        "compiler-model predictions, not measurements",
        "per_chip_peak_bytes": max(r["per_chip_peak_bytes"] for r in runs),
        "fits": all(r["fits"] for r in runs),
        "batch_size": runs[0]["batch_size"],
        "predicted_speedup": runs[0].get("predicted_speedup"),
        "argv": list(args.argv) if getattr(args, "argv", None) is not None else sys.argv[1:],
        "runs": runs,
    }
    bad = next((r for r in runs if not r["fits"]), None)
    broken = next((r for r in runs if r["failed"]), None)
    failure = None
    if bad is not None:
        failure = f"batch {bad['batch_size']} does not fit on {topology.name}: {bad['reason']}"
    elif broken is not None:
        name, message = next(iter(broken["failed"].items()))
        failure = f"batch {broken['batch_size']}: {name} could not be traced: {message}"
    return tpu.write_report(report, args.json, failure)


def must_read_lines(piece: dict) -> list[str]:
    """A piece's must-read bytes, their time bound and the compiler's bytes against them;
    with --explain, the biggest groups of ops by bytes (explain.py)."""
    if "time_lower_bound_s" not in piece:
        return []
    lines = [
        f"  must read {tpu.format_bytes(piece['must_read_bytes_per_device'])} per device: "
        f">= {1000 * piece['time_lower_bound_s']:.3f} ms; bytes accessed / must read "
        f"{piece['bytes_accessed_to_must_read']:.2f}"
    ]
    where = piece.get("explain")
    if where is not None:
        lines.append(
            f"  where the bytes go (HLO ops; {where['counted_to_compiler']:.2f} of the compiler's total "
            f"accounted; in HBM {tpu.format_bytes(where['hbm_bytes'])} = "
            f"{where['hbm_to_must_read']:.2f}x must read):"
        )
        for row in where["top"]:
            lines.append(
                f"    {tpu.format_bytes(row['counted_bytes']):>10} (HBM {tpu.format_bytes(row['hbm_bytes']):>10}) "
                f"{row['count']:4d} x {row['name']:<22} {row['scope']}"
            )
    return lines


def point_lines(point: dict, topology: tpu.Topology) -> list[str]:
    lines = [
        f"batch {point['batch_size']} draft_len {point['draft_len']} exit {point['exit_layer']} on "
        f"{topology.name}: KV cache {tpu.format_bytes(point['kv_cache_bytes_per_device'])} and params "
        f"{tpu.format_bytes(point['param_bytes_per_device'])} per device"
    ]
    for name, piece in point["pieces"].items():
        lines += tpu.program_lines(name, piece, topology.hbm_bytes_per_device)
        lines += must_read_lines(piece)
    printed = {id(piece) for piece in point["pieces"].values()}  # the imitation drafter's are there
    for name, drafter in point["drafters"].items():
        for role, piece in drafter["pieces"].items():
            if id(piece) in printed:
                continue
            printed.add(id(piece))  # verify_tokens is shared by the eagle and model drafters
            lines += tpu.program_lines(
                "verify_tokens" if role == "verify" else f"{name}/{role}", piece, topology.hbm_bytes_per_device
            )
            lines += must_read_lines(piece)
    for name, drafter in point["drafters"].items():
        if "predicted_speedup" in drafter:
            lines.append(
                f"  {name}: predicted SSD/AR speedup {drafter['predicted_speedup']:.2f}x "
                f"({drafter['tokens_per_round']:.2f} tokens per round, draft {1000 * drafter['draft_cost_s']:.3f} "
                f"ms + verify {1000 * drafter['verify_s']:.3f} ms per round vs AR step "
                f"{1000 * drafter['ar_step_s']:.3f} ms; "
                f"{drafter['predicted_speedup_bytes_accessed']:.2f}x on the compiler's bytes accessed)"
            )
    for label, tree in point.get("trees", {}).items():
        for role, piece in tree["pieces"].items():
            lines += tpu.program_lines(f"tree {label}/{role}", piece, topology.hbm_bytes_per_device)
            lines += must_read_lines(piece)
    for label, tree in point.get("trees", {}).items():
        if "predicted_speedup" in tree:
            t = {role: 1000 * tree["pieces"][role]["time_lower_bound_s"] for role in ("root", "step", "verify", "move")}
            lines.append(
                f"  tree {label}: predicted SSD/AR speedup {tree['predicted_speedup']:.2f}x "
                f"({tree['tokens_per_round']:.2f} tokens per round, root {t['root']:.3f} + {tree['steps']} x "
                f"step {t['step']:.3f} + verify {t['verify']:.3f} + move {t['move']:.3f} ms per round vs "
                f"AR step {1000 * tree['ar_step_s']:.3f} ms; "
                f"{tree['predicted_speedup_bytes_accessed']:.2f}x on the compiler's bytes accessed)"
            )
    slots = point.get("slots")
    if slots is not None:
        lines.append(f"  continuous batching: {point['batch_size']} slots, {slots['prefill_rows']} prompts per prefill")
        for name, piece in slots["pieces"].items():
            lines += tpu.program_lines(name, piece, topology.hbm_bytes_per_device)
    for entry in point.get("paper_implied", []):
        if entry["per_position_acceptance"] is None:
            lines.append(
                f"  paper's {entry['paper_speedup']}x: not reachable at draft length {point['draft_len']} "
                "under the layer-count model"
            )
            continue
        lines.append(
            f"  paper's {entry['paper_speedup']}x implies acceptance {entry['per_position_acceptance']:.3f} "
            f"(layer-count model): predicted {entry['predicted_speedup']:.2f}x here "
            f"({entry['tokens_per_round']:.2f} tokens per round)"
        )
    lines.append(
        f"  per-chip peak {tpu.format_bytes(point['per_chip_peak_bytes'])}: "
        + ("fits" if point["fits"] else f"does not fit: {point['reason']}")
    )
    return lines
