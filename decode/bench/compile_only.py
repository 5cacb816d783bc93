"""`decode.bench --compile-only TOPOLOGY`: the decoding programs compiled for a TPU slice,
and the SSD speedup their compiled costs predict. Nothing runs; no weights are needed.

    python -m decode.bench --ckpt shapes:llava15_7b --compile-only v5e:2x2 [--mesh data=1,tensor=4] \
        --batch-size 1 8 [--draft-len 5] [--acceptance 0.6|STATS.json] --json OUT.json

Per batch size and draft length it compiles the pieces of a decoding round, each as the
engine runs it (decode/engine.py), with the layers unrolled so that the compiler's cost
analysis counts every layer (it counts a loop body once): the AR step (one token through layers [0, L) + head),
the draft step (layers [0, k) + imitation network + head), the shallow pass alone
(layers [0, k)), the verification pass (draft_len + 1 exit-layer states through [k, L) +
head), and both whole generate programs (prefill + while loop), whose peak memory holds
the params, the KV cache and the loop state. Params and caches are sharded by the
library's logical-axis rules over `--mesh` (default: tensor parallel over every device).

Step times are roofline lower bounds on one chip: max(FLOPs / peak FLOP/s, bytes / HBM
bandwidth). Two byte counts are reported: the compiler's `bytes accessed` (every op's
operands and results, which overcounts what HBM must deliver, DESIGN.md section 5) and
the bytes a step must read at least (its layers' weight shards and KV cache shards, the
LM head, the imitation network), from the shapes. The prediction uses the latter:

    speedup = tokens_per_round * t_AR / (drafted_per_round * t_draft + t_shallow + t_verify)

with tokens and drafts per round from `--acceptance`: a per-position acceptance
probability a (independent positions: tokens = 1 + a + ... + a^G, drafted = G), or a
decode.run --stats / decode.bench JSON measured elsewhere (its mean_accepted_length and
acceptance_rate). Every such number is a compiler-model prediction, not a measurement.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from decode import engine
from decode.engine import DecodeSpec, DraftPolicy, Prompts
from fastvlm_jax import sharding, tpu
from fastvlm_jax.architectures import architecture
from fastvlm_jax.config import ConfigError
from fastvlm_jax.kv_cache import KVCache
from fastvlm_jax.model import VLM

# Text tokens of the benchmark's random prompts besides the image tokens: BOS + 12
# (decode.bench.models.make_prompts), about a LLaVA chat prompt's length.
PROMPT_TEXT_TOKENS = 13

KV_CACHE_AXES = ("layers", "batch", "kv_heads", "length", None)


class CompileOnlyError(ValueError):
    """Bad input for a compile-only run (one line)."""


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """A model without weights: its config, its params as ShapeDtypeStructs in the dtypes
    they would be loaded in, and the compute dtype (the widest float param dtype, as the
    benchmark's BenchModel.dtype)."""

    config: Any
    params: Any
    dtype: Any
    source: str


def load_shapes(spec: str, dtype: str | None = None) -> ModelShapes:
    """`shapes:NAME` (bfloat16 unless `dtype`), `random:PRESET` (float32), `demo` or a
    checkpoint dir (its saved dtypes; its params are not read)."""
    from decode.bench.models import RANDOM_PRESETS

    if spec.startswith("shapes:") or spec.startswith("random:"):
        kind, name = spec.split(":", 1)
        if kind == "random":
            if name not in RANDOM_PRESETS:
                raise CompileOnlyError(f"unknown random preset {name!r}; choose from {sorted(RANDOM_PRESETS)}")
            config = RANDOM_PRESETS[name]
        else:
            try:
                config = architecture(name)
            except ConfigError as err:
                raise CompileOnlyError(str(err)) from None
        params = nn.meta.unbox(VLM(config).abstract_params())
        dtype = dtype or ("bfloat16" if kind == "shapes" else "float32")
        source = spec
    else:
        from fastvlm_jax.checkpoint import CheckpointError, load_without_params

        path = spec
        if spec == "demo":
            from fastvlm_jax.demo import DemoMissingError, demo_checkpoint

            try:
                path = demo_checkpoint()
            except DemoMissingError as err:
                raise CompileOnlyError(str(err)) from None
        try:
            ckpt = load_without_params(path)
        except CheckpointError as err:
            raise CompileOnlyError(str(err)) from None
        config, params, source = ckpt.config, ckpt.params, str(path)
    if dtype is not None:
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype), params)
    floats = [jnp.dtype(x.dtype) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    compute = max(floats, key=lambda d: d.itemsize) if floats else jnp.dtype(jnp.float32)
    return ModelShapes(config, params, compute, source)


# ---------------------------------------------------------------------------------------
# Acceptance profile
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Acceptance:
    """rate: accepted / drafted. tokens_per_round: measured tokens per full-model call
    (None: derive it from `rate` as a per-position probability). source: where it came from."""

    rate: float
    tokens_per_round: float | None
    source: str

    def per_round(self, draft_len: int) -> tuple[float, float]:
        """(tokens emitted, tokens drafted) per round."""
        if self.tokens_per_round is not None:
            drafted = (self.tokens_per_round - 1) / self.rate if self.rate > 0 else float(draft_len)
            return self.tokens_per_round, drafted
        return sum(self.rate**j for j in range(draft_len + 1)), float(draft_len)


def parse_acceptance(text: str) -> Acceptance:
    """A number in [0, 1), or a decode.run --stats / decode.bench JSON file."""
    try:
        rate = float(text)
    except ValueError:
        path = Path(text)
        if not path.is_file():
            raise CompileOnlyError(f"--acceptance {text!r}: neither a number in [0, 1) nor a JSON file") from None
        data = json.loads(path.read_text())
        if "mean_accepted_length" not in data or "acceptance_rate" not in data:
            raise CompileOnlyError(f"--acceptance {text}: the JSON has no mean_accepted_length / acceptance_rate "
                                   "(use a decode.run --stats or decode.bench JSON)")
        return Acceptance(float(data["acceptance_rate"]), float(data["mean_accepted_length"]), str(path))
    if not 0.0 <= rate < 1.0:
        raise CompileOnlyError(f"--acceptance {text}: a per-position acceptance probability lies in [0, 1)")
    return Acceptance(rate, None, f"per-position probability {rate}")


# ---------------------------------------------------------------------------------------
# The pieces of a round, as the engine runs them
# ---------------------------------------------------------------------------------------


def _argmax(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def piece_functions(model: VLM, draft_len: int) -> dict[str, Any]:
    """{name: (fn, donated arg indices)}; each fn(params, caches..., x) -> (caches..., out).

    token: [batch] int32; states: [batch, draft_len + 1, embed]. Positions are the
    cache's own per-row positions, as in the engine.
    """
    cfg = model.config
    exit_layer, num_layers = cfg.draft.exit_layer, cfg.text.num_layers

    def shallow(params, cache, token):
        pos = cache.pos[:, None]
        hidden = model.embed(params, token[:, None], None, pos)
        hidden, cache, _ = model.run_layers(params, hidden, pos, 0, exit_layer, cache)
        return hidden, cache

    def ar_step(params, cache, token):
        pos = cache.pos[:, None]
        hidden = model.embed(params, token[:, None], None, pos)
        hidden, cache, _ = model.run_layers(params, hidden, pos, 0, num_layers, cache)
        return cache, _argmax(model.logits(params, hidden)[:, 0])

    def shallow_step(params, cache, token):
        hidden, cache = shallow(params, cache, token)
        return cache, hidden

    def draft_step(params, cache, draft_cache, token):
        hidden, cache = shallow(params, cache, token)
        drafted, draft_cache = model.imitate(params, hidden, cache.pos[:, None], draft_cache)
        return cache, draft_cache, _argmax(model.logits(params, drafted)[:, 0])

    def verify(params, cache, states):
        positions = cache.pos[:, None] + jnp.arange(draft_len + 1, dtype=jnp.int32)[None]
        hidden, cache, _ = model.run_layers(params, states, positions, exit_layer, num_layers, cache)
        return cache, _argmax(model.logits(params, hidden))

    return {"ar_step": (ar_step, (1,)), "draft_step": (draft_step, (1, 2)),
            "shallow_step": (shallow_step, (1,)), "verify": (verify, (1,))}


def _sds(shape, dtype, mesh, logical):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding.logical_to_sharding(logical, shape, mesh))


def abstract_cache(num_layers: int, batch: int, slots: int, config, dtype, mesh) -> KVCache:
    """KVCache of ShapeDtypeStructs: [num_layers, batch, kv_heads, slots, head_dim], sharded
    over the batch (data) and the kv heads (tensor) where they divide."""
    text = config.text
    shape = (num_layers, batch, text.num_kv_heads, slots, text.resolved_head_dim)
    return KVCache(keys=_sds(shape, dtype, mesh, KV_CACHE_AXES), values=_sds(shape, dtype, mesh, KV_CACHE_AXES),
                   pos=_sds((batch,), jnp.int32, mesh, ("batch",)))


@dataclasses.dataclass(frozen=True)
class ReadBytes:
    """Bytes one device must read at least, by part of the model (from shard shapes)."""

    layers: int  # every decoder layer's weight shards
    cache: int  # the whole KV cache shard (attention reads every slot, masked)
    head: int  # final norm + LM head (the tied embedding table when tied)
    imitation: int  # the imitation network, with its own cache if it has one

    def span(self, start: int, stop: int, num_layers: int) -> float:
        return (self.layers + self.cache) * (stop - start) / num_layers


def read_bytes(params, config, cache: KVCache, draft_cache: KVCache | None) -> ReadBytes:
    def size(x):
        return tpu.shard_bytes(x.shape, x.dtype, x.sharding)

    parts = {"layers": 0, "head": 0, "imitation": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[0] == "imitation":
            parts["imitation"] += size(leaf)
        elif keys[0] == "language_model" and keys[1] == "layers":
            parts["layers"] += size(leaf)
        elif keys[0] == "language_model" and keys[1].startswith("embed"):
            # A gather of one row per token, unless the table is also the LM head.
            if keys[1] == "embed_tokens" and config.text.tie_word_embeddings:
                parts["head"] += size(leaf)
        elif keys[0] == "language_model":
            parts["head"] += size(leaf)
    cache_bytes = size(cache.keys) + size(cache.values)
    if draft_cache is not None:
        parts["imitation"] += size(draft_cache.keys) + size(draft_cache.values)
    return ReadBytes(cache=cache_bytes, **parts)


def _compile(name, fn, args, donate, mesh, topology):
    start = time.perf_counter()
    with jax.set_mesh(mesh), sharding.axis_rules(sharding.DEFAULT_RULES):
        lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        first = next((line for line in str(err).splitlines() if line.strip()), str(err))
        return None, f"{name}: the TPU compiler refused it: {first}"
    return tpu.analyze(name, compiled, topology, time.perf_counter() - start), None


def compile_point(shapes: ModelShapes, topology: tpu.Topology, mesh, batch: int, draft_len: int,
                  max_new: int, acceptance: Acceptance, generate: bool = True) -> dict[str, Any]:
    """Every program of one (batch, draft_len) point, and the speedup they predict."""
    config = shapes.config
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % data_parallel:
        raise CompileOnlyError(f"--batch-size {batch} is not divisible by the {data_parallel} data-parallel "
                               f"shards of mesh {dict(mesh.shape)}")
    model = VLM(config, shapes.dtype)
    # The pieces are compiled with their layers unrolled: XLA's cost analysis counts a loop
    # body once, so a layer scan would report one layer's FLOPs for the whole range.
    piece_model = VLM(config, shapes.dtype, unroll_layers=True)
    num_layers, exit_layer = config.text.num_layers, config.draft.exit_layer
    param_sh = sharding.param_shardings(model.abstract_params(), mesh)
    params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), shapes.params, param_sh)
    prompt_len = config.num_image_tokens + PROMPT_TEXT_TOKENS
    ssd_spec = DecodeSpec(mode="ssd", capacity=max_new, eos_ids=(), policy=DraftPolicy(draft_len=draft_len))
    ar_spec = DecodeSpec(mode="ar", capacity=max_new, eos_ids=())
    # A step in the middle of a generation: the caches the engine's programs carry.
    cache = abstract_cache(num_layers, batch, ssd_spec.cache_slots(prompt_len), config, shapes.dtype, mesh)
    ar_cache = abstract_cache(num_layers, batch, ar_spec.cache_slots(prompt_len), config, shapes.dtype, mesh)
    draft_cache = (abstract_cache(1, batch, ssd_spec.cache_slots(prompt_len), config, shapes.dtype, mesh)
                   if config.draft.kind == "layer" else None)
    token = _sds((batch,), jnp.int32, mesh, ("batch",))
    states = _sds((batch, draft_len + 1, config.text.hidden_size), shapes.dtype, mesh,
                  ("batch", None, None))
    fns = piece_functions(piece_model, draft_len)
    programs = {
        "ar_step": (*fns["ar_step"], (params, ar_cache, token)),
        "draft_step": (*fns["draft_step"], (params, cache, draft_cache, token)),
        "shallow_step": (*fns["shallow_step"], (params, cache, token)),
        "verify": (*fns["verify"], (params, cache, states)),
    }
    if generate:
        size = config.vision.image_size
        prompts = Prompts(input_ids=_sds((batch, prompt_len), jnp.int32, mesh, ("batch", None)),
                          lengths=_sds((batch,), jnp.int32, mesh, ("batch",)),
                          pixels=_sds((batch, size, size, 3), jnp.float32, mesh, ("batch", None, None, None)))
        for name, spec in (("generate_ar", ar_spec), ("generate_ssd", ssd_spec)):
            fn = (lambda spec: lambda p, prompts: engine.generate(model, p, prompts, spec, max_new))(spec)
            programs[name] = (fn, (), (params, prompts))

    reports, refusals = {}, []
    for name, (fn, donate, args) in programs.items():
        report, refusal = _compile(name, fn, args, donate, mesh, topology)
        if report is None:
            refusals.append(refusal)
        else:
            reports[name] = report

    reads = read_bytes(params, config, cache, draft_cache)
    ar_reads = read_bytes(params, config, ar_cache, None)
    must_read = {
        "ar_step": ar_reads.span(0, num_layers, num_layers) + ar_reads.head,
        "draft_step": reads.span(0, exit_layer, num_layers) + reads.imitation + reads.head,
        "shallow_step": reads.span(0, exit_layer, num_layers),
        "verify": reads.span(exit_layer, num_layers, num_layers) + reads.head,
    }
    pieces = {}
    for name, report in reports.items():
        entry = tpu.report_dict(report, topology)
        if name in must_read:
            bound, _, memory = tpu.roofline_seconds(report.flops, must_read[name], topology)
            entry.update(must_read_bytes_per_device=must_read[name], must_read_time_s=memory,
                         time_lower_bound_s=bound)
        pieces[name] = entry

    hbm = topology.hbm_bytes_per_device
    peak = max((r.memory.peak for r in reports.values()), default=0)
    over = [r for r in reports.values() if not tpu.fits(r.memory.peak, topology)]
    reason = refusals[0] if refusals else (
        f"{max(over, key=lambda r: r.memory.peak).name} needs {tpu.format_bytes(peak)} per device, more than "
        f"the {tpu.format_bytes(hbm)} of HBM of a {topology.device_kind} device" if over else None)
    for name in ("generate_ar", "generate_ssd"):
        if name in pieces:
            pieces[name]["note"] = ("memory is the program's; FLOPs and bytes are the compiler's static "
                                    "cost, each loop body (a round, a layer) counted once")
    result = {
        **tpu.topology_summary(topology),
        "batch_size": batch, "draft_len": draft_len, "exit_layer": exit_layer, "prompt_len": prompt_len,
        "max_new_tokens": max_new,
        "kv_cache_bytes_per_device": reads.cache, "ar_kv_cache_bytes_per_device": ar_reads.cache,
        "param_bytes_per_device": sum(tpu.shard_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(params)),
        "per_chip_peak_bytes": peak * topology.devices_per_chip, "fits": not refusals and not over,
        "reason": reason, "pieces": pieces,
    }
    if all(name in pieces for name in must_read):
        result.update(predict(pieces, acceptance, draft_len))
    return result


def predict(pieces: dict, acceptance: Acceptance, draft_len: int) -> dict[str, Any]:
    """The speedup the pieces' lower-bound times predict, on two byte counts."""
    tokens, drafted = acceptance.per_round(draft_len)

    def speedup(key):
        t = {name: pieces[name][key] for name in ("ar_step", "draft_step", "shallow_step", "verify")}
        return tokens * t["ar_step"] / (drafted * t["draft_step"] + t["shallow_step"] + t["verify"])

    return {"tokens_per_round": tokens, "drafted_per_round": drafted,
            "predicted_speedup": speedup("time_lower_bound_s"),
            "predicted_speedup_bytes_accessed": speedup("step_time_lower_bound_s")}


def run(args) -> int:
    """The CLI's compile-only branch (decode/bench/cli.py): 0 if every point fits, 1 if one
    does not (with a one-line reason), 2 for bad input."""
    import sys

    try:
        topology = tpu.get_topology(args.compile_only)
        mesh_config = sharding.parse_mesh(args.mesh) if args.mesh else sharding.MeshConfig(data=1, tensor=-1)
        mesh = sharding.make_mesh(mesh_config, topology.devices)
        acceptance = parse_acceptance(args.acceptance)
        shapes = load_shapes(args.ckpt, args.dtype)
        if args.exit_layer:
            shapes = dataclasses.replace(shapes, config=shapes.config.with_draft(exit_layer=args.exit_layer[0]))
        runs = []
        for batch in args.batch_size:
            for draft_len in args.draft_len:
                point = compile_point(shapes, topology, mesh, batch, draft_len, args.max_new_tokens,
                                      acceptance, generate=not args.no_generate)
                runs.append(point)
                for line in point_lines(point, topology):
                    print(line, flush=True)
    except (tpu.TopologyError, tpu.LibtpuMissingError, CompileOnlyError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {
        **tpu.topology_summary(topology), "model": shapes.source, "dtype": shapes.dtype.name,
        "mesh": dict(mesh.shape), "hbm_bytes_per_device": topology.hbm_bytes_per_device,
        "acceptance": dataclasses.asdict(acceptance),
        "time_basis": "predicted_speedup: max(FLOPs/peak, must-read bytes/bandwidth) per piece; "
                      "predicted_speedup_bytes_accessed: the same with the compiler's bytes accessed",
        "per_chip_peak_bytes": max(r["per_chip_peak_bytes"] for r in runs),
        "fits": all(r["fits"] for r in runs),
        "batch_size": runs[0]["batch_size"], "predicted_speedup": runs[0].get("predicted_speedup"),
        "argv": list(args.argv) if getattr(args, "argv", None) is not None else sys.argv[1:],
        "runs": runs,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    if not report["fits"]:
        bad = next(r for r in runs if not r["fits"])
        print(f"error: batch {bad['batch_size']} does not fit on {topology.name}: {bad['reason']}", file=sys.stderr)
        return 1
    return 0


def point_lines(point: dict, topology: tpu.Topology) -> list[str]:
    lines = [f"batch {point['batch_size']} draft_len {point['draft_len']} exit {point['exit_layer']} on "
             f"{topology.name}: KV cache {tpu.format_bytes(point['kv_cache_bytes_per_device'])} and params "
             f"{tpu.format_bytes(point['param_bytes_per_device'])} per device"]
    for name, piece in point["pieces"].items():
        lines += tpu.program_lines(name, piece, topology.hbm_bytes_per_device)
        if "time_lower_bound_s" in piece:
            lines.append(f"  must read {tpu.format_bytes(piece['must_read_bytes_per_device'])} per device: "
                         f">= {1000 * piece['time_lower_bound_s']:.3f} ms")
    if "predicted_speedup" in point:
        lines.append(f"  predicted SSD/AR speedup {point['predicted_speedup']:.2f}x "
                     f"({point['tokens_per_round']:.2f} tokens per round; "
                     f"{point['predicted_speedup_bytes_accessed']:.2f}x on the compiler's bytes accessed)")
    lines.append(f"  per-chip peak {tpu.format_bytes(point['per_chip_peak_bytes'])}: "
                 + ("fits" if point["fits"] else f"does not fit: {point['reason']}"))
    return lines
