"""The project's decoding benchmark: AR vs self-speculative decoding on the same model and
inputs, in one process, swept over batch size, exit layer, draft-length policy and draft length.

    python -m decode.bench --ckpt CKPT_DIR|demo|random:SIZE [--images PATH...|synthetic] \
        [--batch-size N ...] [--exit-layer K ...] [--draft-len G ...] \
        [--policy static|confidence|context ...] [--tree-nodes N ...] [--tree-width K] \
        [--drafter imitation|eagle|model:CKPT ...] \
        [--cost-model] [--context-acceptance] --json OUT.json

For every (batch size, exit layer, policy, draft length), and every draft tree of
--tree-nodes > 0 (with --tree-width), it compiles the programs once,
then times `--repeats` runs of AR and SSD, interleaved (decode/bench/timing.py).
`identical` says whether the greedy SSD tokens equal the AR tokens. The first
combination's numbers are also written at the top level of the JSON (ar.tokens_per_s,
ssd.tokens_per_s, speedup, ...), every combination's in `runs`, and PNG plots next to the
JSON (decode/bench/plots.py).

--cost-model times single jitted primitives and reports the ideal speedup and the
engine's efficiency (decode/bench/cost.py). --context-acceptance replays AR outputs with
teacher forcing: acceptance vs context length, the paper's Figure 5 (decode/bench/replay.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from decode.bench import compile_only
from decode.bench.batching import bench_batching
from decode.bench.cost import CostModel
from decode.bench.machine import loadavg, machine_info
from decode.bench.models import RANDOM_PRESETS, load_bench_model, load_drafter, make_prompts
from decode.bench.plots import plot_bench
from decode.bench.replay import context_acceptance
from decode.bench.timing import bench_one, choose_auto_draft
from decode.engine import DraftPolicy
from decode.engine.autodraft import (
    DEFAULT_CHOICES,
    AutoDraft,
    AutoDraftConfig,
    choice_label,
    is_tree,
    parse_choice,
    parse_draft_len,
)
from decode.engine.captioner import describe_device
from decode.engine.sampling import SamplingConfig
from decode.engine.tree import TreeShape
from fastvlm_jax.nn.architectures import ARCHITECTURES
from fastvlm_jax.nn.model import param_bytes, param_count
from fastvlm_jax.nn.quant import QUANTIZATIONS

POLICIES = ("static", "confidence", "context")
# Copied from the first run to the top level of the JSON, where scripts read them (the README's bench keys).
TOP_LEVEL_KEYS = (
    "batch_size",
    "exit_layer",
    "draft_len",
    "ar",
    "ssd",
    "speedup",
    "identical",
    "mean_accepted_length",
    "acceptance_rate",
    "memory",
)


def make_policy(name: str, draft_len: int, args: argparse.Namespace) -> DraftPolicy:
    """The DraftPolicy named by --policy (or 'custom': the legacy flags --min-confidence /
    --draft-schedule), with the threshold and schedule flags."""
    if name == "static":
        return DraftPolicy(draft_len=draft_len)
    if name == "confidence":
        return DraftPolicy(draft_len=draft_len, min_confidence=args.confidence_threshold)
    if name == "context":
        return DraftPolicy(
            draft_len=draft_len, schedule="context", start_len=args.start_len, grow_every=args.grow_every
        )
    if name == "custom":
        return DraftPolicy(
            draft_len=draft_len,
            min_confidence=args.min_confidence,
            schedule=args.draft_schedule,
            start_len=args.start_len,
            grow_every=args.grow_every,
        )
    raise ValueError(f"unknown policy {name!r}")


def policy_names(args: argparse.Namespace) -> list[str]:
    """--policy, else one policy from the legacy flags ('custom' when they are used)."""
    if args.policy:
        return list(args.policy)
    if args.min_confidence > 0 or args.draft_schedule == "context":
        return ["custom"]
    return ["static"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m decode.bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--ckpt",
        required=True,
        help="checkpoint dir, 'demo', random:PRESET "
        f"({', '.join(sorted(RANDOM_PRESETS))}), or (with --compile-only) shapes:NAME "
        f"({', '.join(sorted(ARCHITECTURES))})",
    )
    parser.add_argument(
        "--images",
        nargs="*",
        default=[],
        help="image files, 'synthetic' (default for checkpoints with a tokenizer: "
        "synthetic test scenes) or 'random' (random pixels and text ids)",
    )
    parser.add_argument(
        "--prompt", default=None, help="the question (default: 'Describe the image.' for LLaVA, none for BLIP-2)"
    )
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument(
        "--exit-layer", type=int, nargs="+", default=None, help="exit layers to try (default: the checkpoint's)"
    )
    parser.add_argument(
        "--draft-len",
        type=parse_draft_len,
        nargs="+",
        default=[5],
        help="draft lengths to sweep; 'auto' chooses a setting per batch size among "
        "--auto-choices from measured round costs and acceptance (decode.engine.autodraft)",
    )
    parser.add_argument(
        "--auto-choices",
        type=parse_choice,
        nargs="+",
        default=list(DEFAULT_CHOICES),
        metavar="G|tree:NxK",
        help="--draft-len auto: the settings to choose among: chain draft lengths (0 = plain "
        "AR rounds) and draft trees tree:NODESxWIDTH",
    )
    parser.add_argument(
        "--drafter",
        nargs="+",
        default=["imitation"],
        help="drafters to compare: imitation (the checkpoint's draft path), eagle (its "
        "EAGLE head), model:CKPT (a small VLM with the same tokenizer, e.g. model:demo-draft); with "
        "--compile-only also eagle:pool=N (the head's visual compressor) and model:shapes:NAME "
        "(a draft architecture without weights)",
    )
    parser.add_argument(
        "--tree-nodes",
        type=int,
        nargs="+",
        default=[0],
        help="SSD draft trees to sweep, in nodes per round (0 = the chains of "
        "--draft-len; e.g. 0 16 runs the chains and a 16-node tree)",
    )
    parser.add_argument(
        "--tree-width", type=int, default=2, help="draft tree: nodes per drafting step and children per node"
    )
    parser.add_argument(
        "--policy",
        nargs="+",
        choices=POLICIES,
        default=None,
        help="draft-length policies to sweep (default: one policy from --min-confidence / --draft-schedule)",
    )
    parser.add_argument("--min-confidence", type=float, default=0.0)
    parser.add_argument("--draft-schedule", choices=["static", "context"], default="static")
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5, help="stop threshold of the 'confidence' policy"
    )
    parser.add_argument("--start-len", type=int, default=1, help="'context' schedule: first draft length")
    parser.add_argument("--grow-every", type=int, default=16, help="'context' schedule: +1 every N tokens")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--prompt-sets",
        type=int,
        default=1,
        help="distinct prompt batches decoded per timed repeat (more scenes, steadier acceptance)",
    )
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="params and compute dtype (default: the checkpoint's own)",
    )
    parser.add_argument(
        "--quantize",
        choices=list(QUANTIZATIONS),
        default=None,
        help="int8: weight-only int8 decoding weights, per-output-channel scales (fastvlm_jax.nn.quant); "
        "quantized on load, or the shapes with --compile-only",
    )
    parser.add_argument(
        "--cost-model", action="store_true", help="time the primitives and report ideal speedup + engine efficiency"
    )
    parser.add_argument("--cost-iters", type=int, default=32)
    parser.add_argument(
        "--layer-scaling",
        action="store_true",
        help="time one cached step through layers [0, n) for several n (batch 1)",
    )
    parser.add_argument(
        "--context-acceptance",
        action="store_true",
        help="replay AR outputs with teacher forcing: acceptance vs context length",
    )
    parser.add_argument(
        "--replay-rows", type=int, default=16, help="distinct prompts for the acceptance-vs-context replay"
    )
    parser.add_argument("--context-bucket", type=int, default=8)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--batching",
        nargs="+",
        choices=["static", "continuous"],
        default=None,
        help="compare batchings instead of the sweep: --num-images prompts captioned at each --batch-size "
        "with each batching, AR and SSD (draft length: the first integer --draft-len; with auto among them, also SSD "
        "with auto draft lengths under continuous batching), interleaved (decode/bench/batching.py); "
        "with --compile-only, 'continuous' also compiles continuous batching's prefill, insert and rounds "
        "programs over --batch-size slots",
    )
    parser.add_argument(
        "--num-images", type=int, default=256, help="--batching: the workload's size (synthetic test scenes by default)"
    )
    parser.add_argument(
        "--length-range",
        type=int,
        nargs=2,
        default=None,
        metavar=("SHORTEST", "LONGEST"),
        help="--batching: a workload of longer, varied captions: each prompt's budget drawn uniformly from "
        "[SHORTEST, LONGEST] (seeded by --seed) and EOS ignored, so each caption has its budget's tokens",
    )
    parser.add_argument("--json", required=True, help="output JSON file")
    compile_group = parser.add_argument_group(
        "compile-only",
        "compile the decoding programs for a TPU slice instead of running them "
        "(decode/bench/compile_only/; needs libtpu: pip install -e '.[tpu]')",
    )
    compile_group.add_argument(
        "--compile-only",
        metavar="TOPOLOGY",
        default=None,
        help="e.g. v5e:2x2, v5e:4x8, v5p:2x2x4; exit 1 if a program does not fit",
    )
    compile_group.add_argument(
        "--mesh",
        default=None,
        help="data=D,tensor=T[,fsdp=F] over the slice's devices (default: tensor parallel over all of them)",
    )
    compile_group.add_argument(
        "--acceptance",
        default="0.7",
        help="per-position acceptance probability, or a decode.run --stats / "
        "decode.bench JSON (default 0.7, the demo's measured acceptance)",
    )
    compile_group.add_argument(
        "--paper-speedup",
        type=float,
        nargs="*",
        default=[1.55, 1.85],
        help="published speedups whose implied acceptance (layer-count cost model) "
        "is also predicted (default: the paper's 1.55 1.85; none: no values)",
    )
    compile_group.add_argument(
        "--explain",
        type=int,
        nargs="?",
        const=12,
        default=0,
        metavar="N",
        help="also say where each piece's compiled bytes go: its N (default 12) biggest groups of ops "
        "by kind and named scope, with their bytes as the cost analysis counts them and in HBM",
    )
    compile_group.add_argument(
        "--no-generate", action="store_true", help="compile the round's pieces only, not the whole generate programs"
    )
    compile_group.add_argument(
        "--image-tokens",
        type=int,
        default=None,
        metavar="N",
        help="a model whose images have no fixed size (Qwen2.5-VL): N image tokens per prompt row, the patch "
        "bucket of N * merge^2 patches its images are padded to (default: the most one image may become)",
    )
    compile_group.add_argument(
        "--prefill",
        action="store_true",
        help="also compile the prompts' prefill (the engine's: vision tower, every layer, the drafter's prefill) "
        "and the vision tower alone, for their FLOPs, time bounds and memory",
    )
    return parser


def run_line(result: dict, policy_name: str) -> str:
    """One console line for one sweep point."""
    extra = ""
    if "cost" in result:
        cost = result["cost"]
        eff = cost["engine_efficiency"]
        extra = f"  ideal {cost['ideal_speedup']:.2f}x  efficiency {eff:.2f}" if eff is not None else "  efficiency n/a"
        extra += f"  round/parts {cost['round_over_parts']:.2f}"
    shape = (
        f"tree {result['tree_nodes']:2d}x{result['tree_width']}"
        if result.get("tree_nodes")
        else f"draft {result['draft_len']:2d}"
    )
    return (
        f"batch {result['batch_size']:3d} {result.get('drafter', 'imitation'):>10s} exit {result['exit_layer']:2d} "
        f"{policy_name:>8s} "
        f"{shape}: AR {result['ar']['tokens_per_s']:8.1f} tok/s  "
        f"SSD {result['ssd']['tokens_per_s']:8.1f} tok/s  speedup {result['speedup']:.2f}x  "
        f"tokens/round {result['mean_accepted_length']:.2f}  acceptance {result['acceptance_rate']:.2f}  "
        f"identical {result['identical']}{extra}"
    )


def _compare_batchings(args: argparse.Namespace, argv, bench) -> int:
    """--batching: static vs continuous on the same workload (decode/bench/batching.py)."""
    draft_len = next((d for d in args.draft_len if d != "auto"), 5)
    auto_choices = tuple(args.auto_choices) if "auto" in args.draft_len else ()
    if auto_choices and "continuous" not in args.batching:
        raise SystemExit("decode.bench: --batching with --draft-len auto compares auto under continuous batching")
    info = machine_info()
    runs = bench_batching(
        bench,
        num_images=args.num_images,
        batch_sizes=args.batch_size,
        batchings=tuple(args.batching),
        draft_len=draft_len,
        auto_choices=auto_choices,
        length_range=None if args.length_range is None else tuple(args.length_range),
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        images=args.images,
        prompt=args.prompt,
        seed=args.seed,
    )
    report = {
        "device": describe_device(),
        "machine": info,
        "model": bench.source,
        "dtype": bench.dtype.name,
        "quantization": bench.config.quantization,
        "num_images": args.num_images,
        "max_new_tokens": args.max_new_tokens,
        "draft_len": draft_len,
        "auto_choices": [str(choice_label(c)) for c in auto_choices],
        "length_range": args.length_range,
        "repeats": args.repeats,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "runs": runs,
    }
    load = loadavg()
    if load is not None:
        report["machine"]["loadavg_at_end"] = load
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.length_range is not None and not args.batching:
        parser.error("--length-range is a --batching workload: add --batching static continuous")
    if args.compile_only:
        args.argv = sys.argv[1:] if argv is None else list(argv)
        return compile_only.run(args)
    if args.ckpt.startswith("shapes:"):
        parser.error(f"--ckpt {args.ckpt} names an architecture without weights: use it with --compile-only TOPOLOGY")
    try:  # before loading the model: a bad --temperature is reported at once, as one line
        sampling = SamplingConfig(temperature=args.temperature)
    except ValueError as e:
        parser.error(str(e))

    bench = load_bench_model(args.ckpt, args.seed, args.dtype, args.quantize)
    if args.batching:
        return _compare_batchings(args, argv, bench)
    exit_layers = args.exit_layer or [bench.config.draft.exit_layer]
    for layer in exit_layers:
        if not 1 <= layer < bench.config.text.num_layers:
            parser.error(f"--exit-layer {layer} must be in [1, {bench.config.text.num_layers - 1}]")
    policies = policy_names(args)
    try:
        auto_config = AutoDraftConfig(choices=tuple(args.auto_choices))
    except ValueError as e:
        parser.error(f"--auto-choices: {e}")
    trees = []
    for nodes in args.tree_nodes:
        try:
            trees.append(TreeShape(nodes=nodes, width=args.tree_width))
        except ValueError as e:
            parser.error(f"--tree-nodes / --tree-width: {e}")
    drafters = [load_drafter(bench, name) for name in args.drafter]
    if any(t.enabled for t in trees) and any(d.name != "imitation" for d in drafters):
        parser.error("--tree-nodes: draft trees are built by the imitation drafter only")
    if "auto" in args.draft_len and auto_config.trees and any(d.name != "imitation" for d in drafters):
        parser.error("--auto-choices: draft trees are built by the imitation drafter only")
    info = machine_info()
    cost = None
    runs = []
    for batch in args.batch_size:
        prompt_sets = [
            make_prompts(bench, batch, args.images, args.prompt, args.seed, offset=s * batch)
            for s in range(args.prompt_sets)
        ]
        prompt_len = prompt_sets[0].input_ids.shape[1]
        if args.cost_model and (cost is None or cost.prompt_len != prompt_len):
            cost = CostModel(bench, prompt_len, args.max_new_tokens, args.cost_iters, max(args.repeats, 3))
        for exit_layer in exit_layers:
            # Chains: every policy and draft length; trees: one run each (static shape).
            points = [
                (name, make_policy(name, draft_len, args), tree)
                for tree in trees
                if not tree.enabled
                for name in policies
                for draft_len in args.draft_len
                if draft_len != "auto"
            ]
            if "auto" in args.draft_len:
                points.append(("auto", "auto", TreeShape()))
            points += [("tree", DraftPolicy(), tree) for tree in trees if tree.enabled]
            for drafter, (policy_name, policy, tree) in ((d, p) for d in drafters for p in points):
                auto_report = None
                if policy == "auto":
                    auto = AutoDraft(auto_config)
                    chosen = choose_auto_draft(
                        bench, prompt_sets[0], exit_layer, auto, args.max_new_tokens, sampling, drafter
                    )
                    if is_tree(chosen):
                        policy, tree = DraftPolicy(), chosen
                    else:
                        policy = DraftPolicy(draft_len=chosen) if chosen else None
                    policy_name, auto_report = "auto", {"chosen": choice_label(chosen), **auto.report()}
                result = bench_one(
                    bench,
                    prompt_sets,
                    exit_layer,
                    policy_name,
                    policy,
                    args.max_new_tokens,
                    args.repeats,
                    sampling,
                    cost,
                    replay_rounds=True,
                    bucket=args.context_bucket,
                    tree=tree,
                    drafter=drafter,
                )
                if auto_report:
                    result["auto_draft"] = auto_report
                runs.append(result)
                print(run_line(result, policy_name), flush=True)
    report = {
        "device": describe_device(),
        "machine": info,
        "model": bench.source,
        "params": param_count(bench.params),
        "num_layers": bench.config.text.num_layers,
        "dtype": bench.dtype.name,
        "quantization": bench.config.quantization,
        "param_bytes": param_bytes(bench.params),
        "checkpoint_exit_layer": bench.config.draft.exit_layer,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "prompt_sets": args.prompt_sets,
        "temperature": args.temperature,
        "argv": sys.argv[1:] if argv is None else list(argv),
        **{k: runs[0][k] for k in TOP_LEVEL_KEYS},
        "runs": runs,
    }
    if args.layer_scaling:
        prompt_len = make_prompts(bench, 1, args.images, args.prompt, args.seed).input_ids.shape[1]
        scaling_cost = cost or CostModel(bench, prompt_len, args.max_new_tokens, args.cost_iters, max(args.repeats, 3))
        report["layer_scaling"] = scaling_cost.layer_scaling(1)
        for row in report["layer_scaling"]:
            print(
                f"layers [0, {row['layers']}): {row['ms_min']:.3f} ms per step ({row['ms_per_layer']:.3f} ms per layer)"
            )
    if args.context_acceptance and sampling.greedy:
        report["context_acceptance"] = context_acceptance(
            bench,
            exit_layers,
            [d for d in args.draft_len if d != "auto"],
            args.replay_rows,
            args.images,
            args.prompt,
            args.seed,
            args.max_new_tokens,
            args.context_bucket,
        )
    load = loadavg()
    if load is not None:
        report["machine"]["loadavg_at_end"] = load
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        report["plots"] = [str(p) for p in plot_bench(report, json_path)]
    json_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}" + (f" and {', '.join(report['plots'])}" if report.get("plots") else ""))
    return 0
