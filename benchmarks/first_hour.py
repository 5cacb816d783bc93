"""The first hour on a TPU VM (or a GPU): measured AR and SSD tokens/s, the round's piece times
and the imitation training step, in the keys the compile-only reports use, so that a measured
number can stand next to its prediction (benchmarks/first_hour_compare.py).

    python benchmarks/first_hour.py --json first_hour.json                 # LLaVA-1.5-7B, random bf16
    python benchmarks/first_hour.py --arch random:tiny --batch-size 1 2 --max-new-tokens 8 \
        --train-batch 2 --train-steps 1 --train-seq-len 64 --json smoke.json  # a CPU smoke run

What it runs, on whatever JAX sees (TPU, GPU; CPU for a smoke run), one host:

- weights: random, initialised on the devices by one jitted init whose `out_shardings` are the
  library's logical-axis shardings over the mesh (no host copy of a 7B model; bfloat16 by
  default), or `--ckpt DIR` (a converted checkpoint, restored sharded);
- training first (so its peak memory is its own): the imitation stage of
  configs/llava15_7b.py (its optimizer, loss, seq_len 640 and loss window, frozen params in
  bf16, the imitation network in float32 with Adam), on `--train-mesh` (default FSDP over every
  device, as the config's fsdp=8) at `--train-batch` (default 8 per device), random tokens and
  pixels; one compiling step, then `--train-steps` timed steps: step time, tokens/s, MFU (TPU
  only: train.run's model FLOPs over the chips' peak), peak HBM;
- decoding, per `--batch-size` (default 1 8 32), on `--mesh` (default: tensor parallel over
  every device, as compile-only's default): the round's pieces as compile-only compiles them
  (decode/bench/compile_only/programs.py: steps.ar_step, draft_step, shallow_pass, verify,
  mid-generation caches), each compiled once and then timed over `--piece-iters` calls,
  `--repeats` times; then whole generate calls, AR and SSD (`--draft-len`, default 5), on
  random prompts of the architecture's prompt length (BOS + image tokens + 12 text tokens, as
  compile-only assumes), EOS disabled, `--max-new-tokens` (default 128) for every row: the
  first call compiles (reported apart), then `--repeats` timed calls, interleaved, with their
  median and range, and the same programs with a budget of one token (the prefill alone), so
  the decoding loop's own tokens/s is told apart.

Peak memory is `memory_stats()['peak_bytes_in_use']` (the largest over the devices), where the
backend reports it (TPU, GPU; not CPU); it is the process's peak since it started, so a
decode point's figure is the largest of everything before it (training runs first, the batch
sizes ascend).

With random weights the draft's acceptance is that of an untrained imitation network: the
SSD tokens/s is not the trained model's. The compare script therefore also re-evaluates the
compile-only prediction at the measured tokens per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import llava15_7b as llava_config
from decode.bench.compile_only.programs import (
    DrafterShapes,
    ModelShapes,
    ar_programs,
    imitation_programs,
    load_shapes,
    make_point,
)
from decode.bench.models import BenchModel, make_prompts
from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate
from fastvlm_jax import tpu
from fastvlm_jax.ckpt.checkpoint import load_checkpoint
from fastvlm_jax.nn.kv_cache import KVCache
from fastvlm_jax.nn.model import VLM, cast_params, param_bytes, param_count
from fastvlm_jax.runtime import sharding
from train import compile_only as train_compile_only
from train import model_setup
from train import params as param_lib
from train import step as step_lib
from train.config import ConfigError

PIECES = ("ar_step", "draft_step", "shallow_step", "verify")


# ---------------------------------------------------------------------------------------
# The devices
# ---------------------------------------------------------------------------------------


def device_summary(devices) -> dict:
    """What the run is on, in compile-only's keys where they exist (topology, chips, devices,
    device_kind, hbm_bytes_per_chip, ...): the topology name and chip figures on a TPU only."""
    first = devices[0]
    chip = next((c for c in tpu.CHIPS.values() if c.device_kind == first.device_kind), None)
    coords = [tuple(getattr(d, "coords", ())) for d in devices]
    chips = len(set(coords)) if chip is not None and all(coords) else len(devices)
    topology = None
    if chip is not None and all(coords):
        dims = [max(c[i] for c in coords) + 1 for i in range(chip.dims)]
        topology = f"{chip.name}:{'x'.join(str(d) for d in dims)}"
    stats = memory_stats(first)
    return {
        "topology": topology,
        "chips": chips,
        "devices": len(devices),
        "devices_per_chip": len(devices) // chips,
        "device_kind": first.device_kind,
        "platform": first.platform,
        "hbm_bytes_per_chip": chip.hbm_bytes if chip else None,
        "peak_bf16_flops_per_chip": chip.peak_bf16_flops if chip else None,
        "hbm_bandwidth_per_chip": chip.hbm_bandwidth if chip else None,
        "bytes_limit_per_device": stats.get("bytes_limit"),
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
    }


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return None


def memory_stats(device) -> dict:
    """The device's allocator figures ({} where the backend reports none: CPU)."""
    try:
        return device.memory_stats() or {}
    except (AttributeError, NotImplementedError, RuntimeError):
        return {}


def peak_bytes(devices) -> int | None:
    """The largest `peak_bytes_in_use` over the devices since the process started (None: not reported)."""
    peaks = [memory_stats(d).get("peak_bytes_in_use") for d in devices]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def median_range(times: list[float]) -> dict:
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "all": times,
    }


# ---------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------


def architecture_spec(arch: str) -> str:
    """'llava15_7b' -> 'shapes:llava15_7b'; shapes:NAME and random:PRESET as given."""
    return arch if ":" in arch else f"shapes:{arch}"


def random_params(config, mesh, dtype, seed: int):
    """Random params of `config`, cast to `dtype`, made on the devices with the library's
    shardings over `mesh` (one jitted init; each device computes its own shards)."""
    model = VLM(config)
    shardings = sharding.param_shardings(model.abstract_params(), mesh)
    init = jax.jit(lambda key: cast_params(model.init(key), dtype), out_shardings=shardings)
    return jax.block_until_ready(init(jax.random.key(seed)))


def load_model(args, mesh) -> tuple[object, object, str]:
    """(config, params on `mesh`, source): --ckpt restored sharded, else random weights of --arch."""
    dtype = jnp.dtype(args.dtype)
    if args.ckpt:
        ckpt = load_checkpoint(args.ckpt, mesh=mesh, dtype=dtype)
        return ckpt.config, ckpt.params, str(args.ckpt)
    spec = architecture_spec(args.arch)
    config = load_shapes(spec).config
    return config, random_params(config, mesh, dtype, args.seed), spec


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------


def _concrete(args, params, abstract_params, prompt_len: int):
    """The compile-only program's abstract args as device arrays: the real params where it
    has the abstract ones, zeros elsewhere (each with its sharding), every cache at position
    prompt_len (a step in the middle of a generation; attention reads every slot anyway)."""

    def one(arg):
        if arg is abstract_params:
            return params
        leaves, treedef = jax.tree.flatten(arg)
        made = jax.jit(
            lambda: [jnp.zeros(x.shape, x.dtype) for x in leaves], out_shardings=[x.sharding for x in leaves]
        )()
        tree = jax.tree.unflatten(treedef, made)
        if isinstance(tree, KVCache):
            tree = tree.replace(pos=jax.device_put(np.full(tree.pos.shape, prompt_len, np.int32), tree.pos.sharding))
        return tree

    return [one(arg) for arg in args]


def time_piece(program, params, abstract_params, prompt_len: int, mesh, iters: int, repeats: int) -> dict:
    """One round piece as the engine runs it: compiled by a first call, then `repeats` times
    `iters` back-to-back calls (the donated caches fed back), seconds per call."""
    fn = jax.jit(program.fn, donate_argnums=program.donate)
    args = _concrete(program.args, params, abstract_params, prompt_len)

    def call():
        nonlocal args
        with jax.set_mesh(mesh), sharding.axis_rules(sharding.DEFAULT_RULES):
            out = fn(*args)
        for i, index in enumerate(program.donate):
            args[index] = out[i]
        return out

    start = time.perf_counter()
    jax.block_until_ready(call())
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = call()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / iters)
    del args
    return {
        "measured_time_s": statistics.median(times),
        "measured_time_s_range": [min(times), max(times)],
        "measured_times_s": times,
        "calls_per_repeat": iters,
        "compile_seconds": compile_s,
        "must_read_bytes_per_device": program.must_read,
    }


def place_prompts(prompts: Prompts, mesh) -> Prompts:
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding.data_sharding(mesh, np.ndim(x))), prompts)


def time_generate(model, params, prompts, specs: dict, max_new: int, mesh, repeats: int) -> dict:
    """Each spec's generate: the first call (compile + run), then `repeats` timed calls of the
    whole budget and of a one-token budget (the prefill alone), interleaved."""
    rows = prompts.input_ids.shape[0]

    def call(spec, budget):
        with jax.set_mesh(mesh), sharding.axis_rules(sharding.DEFAULT_RULES):
            budgets = jax.device_put(np.full((rows,), budget, np.int32), sharding.data_sharding(mesh, 1))
            out = generate(model, params, prompts, spec, budgets)
        return jax.device_get(out)

    first, outs, times = {}, {}, {name: {"full": [], "prefill": []} for name in specs}
    for name, spec in specs.items():
        start = time.perf_counter()
        outs[name] = call(spec, max_new)
        first[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, spec in specs.items():
            for part, budget in (("full", max_new), ("prefill", 1)):
                start = time.perf_counter()
                out = call(spec, budget)
                times[name][part].append(time.perf_counter() - start)
                if part == "full":
                    outs[name] = out
    report = {}
    for name in specs:
        out, full, prefill = outs[name], times[name]["full"], times[name]["prefill"]
        tokens = int(np.sum(out.num_tokens))
        seconds, prefill_s = statistics.median(full), statistics.median(prefill)
        decode_s = seconds - prefill_s
        rounds = int(np.max(out.stats.rounds))  # the loop runs until its slowest row is done
        entry = {
            "tokens": tokens,
            "seconds": median_range(full),
            "tokens_per_s": tokens / seconds,
            "tokens_per_s_range": [tokens / max(full), tokens / min(full)],
            "prefill_seconds": median_range(prefill),
            # After the prefill's first token: the decoding loop alone.
            "decode_tokens_per_s": (tokens - rows) / decode_s if decode_s > 0 else None,
            "rounds": rounds,
            "round_time_s": decode_s / rounds if rounds and decode_s > 0 else None,
            "first_call_seconds": first[name],
        }
        if name == "ssd":
            drafted, accepted = int(np.sum(out.stats.drafted)), int(np.sum(out.stats.accepted))
            total_rounds = int(np.sum(out.stats.rounds))
            entry.update(
                tokens_per_round=(tokens - rows) / max(total_rounds, 1),
                drafted_per_round=drafted / max(total_rounds, 1),
                acceptance_rate=accepted / max(drafted, 1),
            )
        report[name] = entry
    report["identical"] = bool(np.array_equal(outs["ar"].tokens, outs["ssd"].tokens))
    return report


def bench_decode(args, config, params, source: str, mesh, devices) -> list[dict]:
    """Per batch size: the round's pieces, then AR and SSD generate."""
    dtype = jnp.dtype(args.dtype)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shapes = ModelShapes(config, abstract, dtype, source)
    model = VLM(config, dtype)
    bench = BenchModel(config, params, source=source)
    runs = []
    for batch in sorted(args.batch_size):
        point = make_point(shapes, mesh, batch, args.draft_len, args.max_new_tokens, generate=False)
        programs, _ = ar_programs(point)
        programs.update(imitation_programs(point, DrafterShapes("imitation", "imitation")).programs)
        pieces = {}
        if not args.no_pieces:
            for name in PIECES:
                pieces[name] = time_piece(
                    programs[name], params, point.params, point.prompt_len, mesh, args.piece_iters, args.repeats
                )
                print(
                    f"batch {batch} {name}: {1000 * pieces[name]['measured_time_s']:.3f} ms per call "
                    f"(compile {pieces[name]['compile_seconds']:.1f} s)",
                    flush=True,
                )
        prompts = place_prompts(make_prompts(bench, batch, ["random"], None, args.seed), mesh)
        assert prompts.input_ids.shape[1] == point.prompt_len, (prompts.input_ids.shape, point.prompt_len)
        specs = {
            "ar": DecodeSpec("ar", capacity=args.max_new_tokens, eos_ids=()),
            "ssd": DecodeSpec(
                "ssd", capacity=args.max_new_tokens, eos_ids=(), policy=DraftPolicy(draft_len=args.draft_len)
            ),
        }
        timed = time_generate(model, params, prompts, specs, args.max_new_tokens, mesh, args.repeats)
        peak = peak_bytes(devices)
        run = {
            "batch_size": batch,
            "draft_len": args.draft_len,
            "exit_layer": config.draft.exit_layer,
            "prompt_len": point.prompt_len,
            "max_new_tokens": args.max_new_tokens,
            "kv_cache_bytes_per_device": point.reads.cache,
            "pieces": pieces,
            **timed,
            "speedup": timed["ssd"]["tokens_per_s"] / timed["ar"]["tokens_per_s"],
            "tokens_per_round": timed["ssd"]["tokens_per_round"],
            "drafted_per_round": timed["ssd"]["drafted_per_round"],
            "per_device_peak_bytes_since_start": peak,
        }
        runs.append(run)
        print(
            f"batch {batch}: AR {timed['ar']['tokens_per_s']:.1f} tok/s, SSD {timed['ssd']['tokens_per_s']:.1f} "
            f"tok/s ({run['speedup']:.2f}x, {run['tokens_per_round']:.2f} tokens per round, identical "
            f"{timed['identical']}); compile AR {timed['ar']['first_call_seconds']:.1f} s, SSD "
            f"{timed['ssd']['first_call_seconds']:.1f} s",
            flush=True,
        )
    return runs


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def train_config(args, config, devices):
    """configs/llava15_7b.py's imitation stage at --train-batch on --train-mesh (init_from is
    not read: the weights are random)."""
    batch = args.train_batch or 8 * len(devices)
    cfg = llava_config.get_config("imitation", batch_size=batch, mesh=sharding.parse_mesh(args.train_mesh))
    cfg = cfg.replace(init_from="(random weights)", architecture="", compute_dtype=args.dtype)
    if args.train_seq_len:
        cfg = cfg.replace(seq_len=args.train_seq_len)
    return cfg


def random_batch(cfg, config, prompt_len: int, loss_start: int, shardings, seed: int) -> dict:
    """A batch of train/step.py's shapes: BOS, the image tokens, random text; random pixels."""
    rng = np.random.RandomState(seed)
    b, s = cfg.batch_size, cfg.seq_len
    image = config.num_image_tokens
    high = min(config.image_token_id, config.text.vocab_size - 1)
    ids = rng.randint(3, high, (b, s + 1)).astype(np.int32)
    ids[:, 0] = 1
    ids[:, 1 : 1 + image] = config.image_token_id
    loss_mask = np.zeros((b, s), np.float32)
    loss_mask[:, loss_start:] = 1.0
    size = config.vision.image_size
    host = {
        "input_ids": ids[:, :s],
        "targets": ids[:, 1:],
        "loss_mask": loss_mask,
        "prompt_len": np.full((b,), prompt_len, np.int32),
        "pixels": rng.randint(0, 256, (b, size, size, 3)).astype(np.uint8),
    }
    return {k: jax.device_put(v, shardings.batch[k]) for k, v in host.items()}


def bench_train(args, config, devices) -> dict:
    """The imitation stage's step: compile + first step, then --train-steps timed steps."""
    cfg = train_config(args, config, devices)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    model = VLM(config, jnp.dtype(cfg.compute_dtype))
    if step_lib.uses_patch_images(model):
        raise SystemExit(f"error: training: {args.arch}'s images keep their size; use --no-train")
    abstract = nn.meta.unbox(model.abstract_params())
    trainable_paths, tx, schedule, shardings = model_setup.plan_training(cfg, model, mesh, abstract)
    source = train_compile_only.ModelSource(config, {}, None, "random weights")
    notes: list[str] = []
    prompt_len, loss_start = train_compile_only.prompt_width(cfg, source, notes)
    compute = jnp.dtype(cfg.compute_dtype)

    def init(key):
        trainable, frozen = param_lib.split(VLM(config).init(key), trainable_paths)
        return cast_params(trainable, jnp.float32), cast_params(frozen, compute)

    trainable, frozen = jax.jit(init, out_shardings=(shardings.state.params, shardings.frozen))(
        jax.random.key(args.seed)
    )
    state = step_lib.init_state(trainable, tx, args.seed, shardings)
    del trainable
    spec = model_setup.step_spec(cfg, loss_start, model_setup.default_image_config(cfg, config))
    step = step_lib.jit_train_step(model, spec, tx, schedule, shardings, mesh)
    batch = random_batch(cfg, config, prompt_len, loss_start, shardings, args.seed)

    start = time.perf_counter()
    state, metrics = step(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.train_steps):
        start = time.perf_counter()
        state, metrics = step(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    metrics = jax.device_get(metrics)
    flops = train_compile_only.model_flops(
        cfg.stage,
        config,
        abstract,
        cfg.batch_size,
        cfg.seq_len,
        train_compile_only.head_positions(cfg, loss_start),
        model_setup.image_patches(cfg, config),
    )
    step_s = statistics.median(times)
    peak_flops = tpu.peak_flops(mesh.devices.flat)
    peak = peak_bytes(devices)
    summary = device_summary(devices)
    result = {
        "config": "configs/llava15_7b.py:imitation",
        "stage": cfg.stage,
        "weights": "random (a step's time does not depend on the values; also with --ckpt)",
        "mesh": dict(mesh.shape),
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "seq_len": cfg.seq_len,
        "compute_dtype": cfg.compute_dtype,
        "remat": cfg.remat,
        "prompt_len": prompt_len,
        "loss_positions": train_compile_only.head_positions(cfg, loss_start),
        "trainable_params": param_lib.count(param_lib.split(abstract, trainable_paths)[0]),
        "frozen_params": param_lib.count(param_lib.split(abstract, trainable_paths)[1]),
        "per_device_peak_bytes": peak,
        "per_chip_peak_bytes": peak * summary["devices_per_chip"] if peak is not None else None,
        "flops_per_step": flops,
        "tokens_per_step": cfg.batch_size * cfg.seq_len,
        "step_time_s": step_s,
        "step_time_s_range": [min(times), max(times)],
        "step_times_s": times,
        "tokens_per_s": cfg.batch_size * cfg.seq_len / step_s,
        "mfu": flops / step_s / peak_flops if peak_flops else None,
        "compile_and_first_step_s": compile_s,
        "loss": float(metrics["loss"]),
        "notes": notes,
    }
    del state, frozen, batch
    print(
        f"train {cfg.stage} batch {cfg.batch_size} x {cfg.seq_len} on {dict(mesh.shape)}: "
        f"{1000 * step_s:.1f} ms per step (compile + first step {compile_s:.1f} s)"
        + (f", MFU {result['mfu']:.3f}" if result["mfu"] else "")
        + (f", peak {tpu.format_bytes(peak)} per device" if peak else ""),
        flush=True,
    )
    return result


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/first_hour.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", default="llava15_7b", help="an architecture (shapes:NAME or NAME) or random:PRESET (e.g. random:tiny)"
    )
    parser.add_argument("--ckpt", default=None, help="a converted checkpoint to decode instead of random weights")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--mesh", default="data=1,tensor=-1", help="decoding mesh (compile-only's default)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--draft-len", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--piece-iters", type=int, default=20, help="back-to-back calls per timed piece repeat")
    parser.add_argument("--no-pieces", action="store_true", help="skip the per-piece step times")
    parser.add_argument("--train-mesh", default="data=1,fsdp=-1", help="training mesh (default FSDP over all devices)")
    parser.add_argument("--train-batch", type=int, default=0, help="global training batch (default 8 per device)")
    parser.add_argument("--train-seq-len", type=int, default=0, help="default: the config's (640)")
    parser.add_argument("--train-steps", type=int, default=5, help="timed steps after the compiling one")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument(
        "--devices", type=int, default=0, help="use the first N devices (default: all), e.g. 4 of 8 chips for a v5e:2x2"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    devices = jax.devices()[: args.devices or None]
    summary = device_summary(devices)
    print(f"{len(devices)} x {summary['device_kind']} ({summary['topology'] or summary['platform']})", flush=True)
    report = {
        "kind": "first_hour",
        **summary,
        "model": args.ckpt or architecture_spec(args.arch),
        "weights": "checkpoint" if args.ckpt else "random",
        "dtype": args.dtype,
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    try:
        mesh = sharding.make_mesh(sharding.parse_mesh(args.mesh), devices)
        if not args.no_train:
            report["train"] = bench_train(args, load_model_config(args), devices)
    except (ValueError, ConfigError) as err:  # a mesh or batch that does not fit the devices
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.no_decode:
        config, params, source = load_model(args, mesh)
        report.update(
            mesh=dict(mesh.shape),
            params=param_count(params),
            param_bytes=param_bytes(params),
            runs=bench_decode(args, config, params, source, mesh, devices),
        )
        peaks = [r["per_device_peak_bytes_since_start"] for r in report["runs"]]
        report["per_chip_peak_bytes"] = (
            max(peaks) * summary["devices_per_chip"] if all(p is not None for p in peaks) else None
        )
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


def load_model_config(args):
    """The model config without its params (the checkpoint's, or the architecture's)."""
    if args.ckpt:
        from fastvlm_jax.ckpt.checkpoint import load_config

        return load_config(args.ckpt)
    return load_shapes(architecture_spec(args.arch)).config


if __name__ == "__main__":
    sys.exit(main())
