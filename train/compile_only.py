"""`train.run --compile-only TOPOLOGY`: compile the run's step for a TPU slice, run nothing.

    python -m train.run --config configs/llava15_7b.py:imitation --compile-only v5e:4x8 --json OUT.json

The same pieces as train.run build the program (mesh rules, trainable split, optimizer,
shardings, batch, seq_len, dtype, the jitted step of train/step.py), but every input is
a ShapeDtypeStruct with a NamedSharding on a Mesh of the topology's abstract devices, so
no parameter is allocated. The refine stage also compiles its generation program
(`refine_pregenerate`, train/refine.py: one global batch of the one-off pre-pass that
writes the full model's greedy sequences before training, not a per-step cost).
Reported per program: memory per chip, FLOPs and bytes per step, collectives, roofline
time (fastvlm_jax.tpu); the run fits when every program fits.

Where the model comes from: `model` (from scratch), else the `init_from` checkpoint's
config.json and saved dtypes (its params are not read), else the config's named
`architecture` with frozen params in the compute dtype (as the big configs' convert
commands write them).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastvlm_jax import tpu
from fastvlm_jax.ckpt import checkpoint as ckpt_lib
from fastvlm_jax.nn.architectures import architecture
from fastvlm_jax.nn.families import stop_ids
from fastvlm_jax.nn.model import VLM
from fastvlm_jax.runtime import sharding
from train import deepen, model_setup
from train import input as input_lib
from train import params as param_lib
from train import step as step_lib
from train.config import ConfigError, TrainConfig
from train.refine import decode_placement, generate_program

# Tokens of a LLaVA/BLIP-2 prompt around the image tokens (chat template + a short question),
# for the prompt width (the refine program's, the loss window's start) without a tokenizer.
PROMPT_TEXT_ESTIMATE = 32


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """The model the run would train. frozen_dtypes: {path: dtype name} of the frozen
    params as they would be loaded; tokenizer: None when neither config nor checkpoint has one."""

    config: Any
    frozen_dtypes: dict
    tokenizer: Any
    where: str


def resolve_model(cfg: TrainConfig) -> ModelSource:
    """The model config, param dtypes and tokenizer of `cfg`, without loading any params."""
    compute = jnp.dtype(cfg.compute_dtype)
    if cfg.model is not None:
        tokenizer = (
            model_setup.make_tokenizer(cfg, None) if (cfg.model.text.vocab_size == 0 or cfg.tokenizer.path) else None
        )
        config = model_setup.resolve_model_config(cfg.model, tokenizer) if tokenizer else cfg.model
        # From scratch: float32 params from the init (train.run.init_params).
        return ModelSource(config, {}, tokenizer, "model (from scratch)")
    path = Path(cfg.init_from)
    if (path / ckpt_lib.CONFIG_FILE).is_file():
        ckpt = ckpt_lib.load_without_params(path)
        dtypes = {
            param_lib.path_str(p): jnp.dtype(x.dtype).name
            for p, x in jax.tree_util.tree_flatten_with_path(ckpt.params)[0]
        }
        tokenizer = model_setup.make_tokenizer(cfg, ckpt.tokenizer) if (ckpt.tokenizer or cfg.tokenizer.path) else None
        config = ckpt.config
        where = f"init_from {cfg.init_from}"
    elif cfg.architecture:
        config, dtypes, tokenizer = architecture(cfg.architecture), None, None
        where = f"architecture {cfg.architecture} (init_from {cfg.init_from} is not on this machine)"
    else:
        raise ConfigError(
            f"init_from {cfg.init_from} has no {ckpt_lib.CONFIG_FILE} and the config names no "
            "architecture: --compile-only needs the model's shapes (set architecture=NAME)"
        )
    if cfg.deepen_to:
        config = deepen.deepened_config(config, cfg.deepen_to)
    config = model_setup.with_eagle_head(cfg, config, where)
    if dtypes is None:  # the architecture alone: frozen params in the compute dtype
        abstract = nn.meta.unbox(VLM(config).abstract_params())
        dtypes = {param_lib.path_str(p): compute.name for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    return ModelSource(config, dtypes, tokenizer, where)


def model_flops(
    stage: str,
    config,
    abstract,
    batch: int,
    seq_len: int,
    loss_positions: int | None = None,
    image_patches: int = 0,
) -> float:
    """Matmul FLOPs of one training step from the shapes (2 per multiply-add), as MFU counts
    them. XLA's cost analysis counts a layer scan's body once, so the compiled `flops`
    undercount a step by about the number of layers; this estimate does not.

    Forward: every weight a token meets (decoder layers, imitation network, the LM head
    twice: full and draft logits), attention scores and values over the whole sequence,
    the vision side over its patch tokens. Backward: twice the forward of what carries
    gradients (base: the full model; draft stages: the imitation network, or the EAGLE
    head in the eagle stage, and, for its input gradient only, the LM head). The LM head
    runs on the `loss_positions` of each row that can carry loss (train.step.StepSpec's
    window; default all of them). image_patches: the patch rows per image of a family whose
    images keep their size (data.image_patches; 0 for fixed-size images).
    """

    def count(prefix):
        return sum(
            x.size
            for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
            if param_lib.path_str(p).startswith(prefix)
        )

    text = config.text
    tokens = batch * seq_len
    head_tokens = batch * (seq_len if loss_positions is None else loss_positions)
    head = text.hidden_size * text.vocab_size
    layers, imitation = count("language_model/layers/"), count("imitation/")
    vision = sum(count(k) for k in ("vision_tower/", "projector/", "qformer/"))
    if image_patches:  # images that keep their size: every row padded to image_patches
        vision_tokens, vision_layers = image_patches, config.vision.depth
    else:
        vision_tokens, vision_layers = config.vision.num_patches + 1, config.vision.num_layers
    attention = 4 * tokens * seq_len * text.num_heads * text.resolved_head_dim * text.num_layers
    # (Qwen2.5-VL's windowed vision blocks attend within windows: counted as full attention.)
    vision_attention = 4 * batch * vision_tokens**2 * config.vision.hidden_size * vision_layers
    full = (
        2 * tokens * layers + 2 * head_tokens * head + attention + 2 * batch * vision_tokens * vision + vision_attention
    )
    if stage == "eagle":  # the EAGLE head is the drafter (and the imitation network idle)
        imitation = count("eagle/")
    draft = 2 * tokens * imitation + 2 * head_tokens * head
    if stage == "base":
        return float(3 * full + draft)
    return float(full + draft + 2 * (2 * tokens * imitation) + 2 * head_tokens * head)


def head_positions(cfg: TrainConfig, loss_start: int) -> int:
    """Positions of a row the LM head runs on in a step (model_flops' loss_positions): the
    loss window, in every stage (the eagle head's slots start a few image slots earlier,
    train.eagle.slot_window_start; not counted)."""
    return cfg.seq_len - loss_start


def _abstract(tree, shardings, dtype_of=None):
    """ShapeDtypeStructs of `tree`'s leaves with `shardings` (and dtypes by path, if given)."""

    def leaf(path, x, sh):
        dtype = dtype_of(param_lib.path_str(path), x.dtype) if dtype_of else x.dtype
        return jax.ShapeDtypeStruct(x.shape, dtype, sharding=sh)

    return jax.tree_util.tree_map_with_path(leaf, tree, shardings)


def abstract_batch(cfg: TrainConfig, config, shardings: step_lib.Shardings) -> dict:
    """The global batch of train/step.py as ShapeDtypeStructs (pixels [B, S, S, 3] uint8, or
    for images that keep their size pixels [B, image_patches, patch_dim] uint8 + image_grid
    [B, 3] int32; input_ids / targets [B, seq] int32, loss_mask [B, seq] float32, prompt_len
    [B] int32)."""
    b, s = cfg.batch_size, cfg.seq_len
    shapes = {
        "input_ids": ((b, s), jnp.int32),
        "targets": ((b, s), jnp.int32),
        "loss_mask": ((b, s), jnp.float32),
        "prompt_len": ((b,), jnp.int32),
    }
    patches = model_setup.image_patches(cfg, config)
    if patches:
        vision = config.vision
        dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        shapes.update(pixels=((b, patches, dim), jnp.uint8), image_grid=((b, 3), jnp.int32))
    else:
        size = config.vision.image_size
        shapes["pixels"] = ((b, size, size, 3), jnp.uint8)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings.batch[k]) for k, (shape, dtype) in shapes.items()}


def prompt_width(cfg: TrainConfig, source: ModelSource, notes: list[str]) -> tuple[int, int]:
    """(the run's prompt length, the start of its loss window: train.run.step_spec).

    Counted with the checkpoint's tokenizer; without one, the prompt is estimated as the
    image tokens + PROMPT_TEXT_ESTIMATE and the window (conservatively, more positions
    than the run will have) as starting right after the image tokens; `notes` says so.
    """
    patches = model_setup.image_patches(cfg, source.config)
    # Images that keep their size: the longest prompt's (every row's loss window is as wide).
    image_tokens = patches // source.config.merge_size**2 if patches else source.config.num_image_tokens
    if source.tokenizer is not None:
        prompt_len = input_lib.TextFormat(
            source.tokenizer, cfg.data.question, image_tokens, cfg.seq_len, source.config.model_type
        ).prompt_len
        return prompt_len, prompt_len - 1
    prompt_len = min(cfg.seq_len - 2, image_tokens + PROMPT_TEXT_ESTIMATE)
    loss_start = min(image_tokens, prompt_len - 1)
    notes.append(
        f"no tokenizer here: the prompt width is estimated as {prompt_len} ({image_tokens} image "
        f"tokens + {PROMPT_TEXT_ESTIMATE}), the loss window as positions [{loss_start}, {cfg.seq_len})"
    )
    return prompt_len, loss_start


def compile_run(cfg: TrainConfig, topology: tpu.Topology, spec_name: str = "") -> dict[str, Any]:
    """Compiles what `train.run` would execute per step for `cfg` on `topology`; the report
    as a JSON-ready dict (fits, reason, per program figures). ConfigError for configs the
    real run would refuse too (mesh, batch divisibility, trainable patterns)."""
    devices = list(topology.devices)
    try:
        mesh = sharding.make_mesh(cfg.mesh, devices)
    except ValueError as err:
        raise ConfigError(f"mesh {cfg.mesh} on {topology.name}: {err}") from None
    source = resolve_model(cfg)
    model = VLM(source.config, jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32)

    abstract = nn.meta.unbox(model.abstract_params())
    trainable_paths, tx, schedule, shardings = model_setup.plan_training(cfg, model, mesh, abstract)

    trainable_abs, frozen_abs = param_lib.split(abstract, trainable_paths)
    # The trainable params are float32 master weights (train.run casts them); the frozen
    # ones keep the dtype they are loaded in.
    state = step_lib.abstract_state(
        shardings, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable_abs), tx
    )
    frozen_dtypes = source.frozen_dtypes
    frozen = _abstract(frozen_abs, shardings.frozen, lambda path, dtype: frozen_dtypes.get(path, jnp.dtype(dtype).name))
    batch = abstract_batch(cfg, source.config, shardings)

    notes = []
    prompt_len, loss_start = prompt_width(cfg, source, notes)
    loss_positions = head_positions(cfg, loss_start)
    reports, refusals = [], []
    # The table's values do not change the program, only its constants: the preset's will do.
    image_config = model_setup.default_image_config(cfg, source.config)
    spec = model_setup.step_spec(cfg, loss_start, image_config)
    train_program = step_lib.train_step_program(model, spec, tx, schedule, shardings)
    programs = [("train_step", train_program, (state, frozen, batch), mesh)]
    if cfg.stage == "refine":
        if source.tokenizer is not None:
            eos = stop_ids(source.config, source.tokenizer)
        else:
            eos = (2,)
        max_new = cfg.refine.max_new_tokens or (cfg.seq_len - prompt_len)
        if "image_grid" in batch:  # prompts differ per row: as train.run.refine_sequences
            max_new = min(max_new, cfg.seq_len - prompt_len)
        decode_mesh, decode_sh, params_abs, frozen_abs_placed = mesh, shardings, state.params, frozen
        if cfg.refine.decode_tensor:  # the pre-pass's own tensor-parallel placement (train.run)
            decode_mesh, decode_sh = decode_placement(model, shardings, mesh, trainable_paths, cfg.refine.decode_tensor)
            params_abs = _abstract(state.params, decode_sh.state.params)
            frozen_abs_placed = _abstract(frozen, decode_sh.frozen)
            notes.append(
                f"refine_pregenerate on a data x tensor={cfg.refine.decode_tensor} mesh (refine.decode_tensor)"
            )
        prompts = {
            "input_ids": jax.ShapeDtypeStruct(
                (cfg.batch_size, prompt_len), jnp.int32, sharding=decode_sh.batch["input_ids"]
            ),
            "prompt_len": jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32, sharding=decode_sh.batch["prompt_len"]),
        }
        for key in ("pixels", "image_grid"):
            if key in batch:
                prompts[key] = jax.ShapeDtypeStruct(batch[key].shape, batch[key].dtype, sharding=decode_sh.batch[key])
        programs.insert(
            0,
            (
                "refine_pregenerate",
                generate_program(model, decode_sh, max_new, eos, spec.pixel_table),
                (params_abs, frozen_abs_placed, prompts),
                decode_mesh,
            ),
        )
        notes.append(
            "refine_pregenerate is the one-off pre-pass before training (one call per global "
            "batch of the records the run reads), not part of a step: its per-step figures "
            "are per call"
        )
    for name, program, args, program_mesh in programs:
        report, refusal = tpu.compile_program(name, program, args, program_mesh, topology)
        if report is None:
            refusals.append(refusal)
        else:
            reports.append(report)

    hbm = topology.hbm_bytes_per_device
    image_patches = model_setup.image_patches(cfg, source.config)
    estimate = model_flops(
        cfg.stage, source.config, abstract, cfg.batch_size, cfg.seq_len, loss_positions, image_patches
    )
    train_report = next((r for r in reports if r.name == "train_step"), None)
    # The step's time bound: the compiled costs, with the FLOPs raised to the model's own
    # count where the compiler's (one layer per scan) fall short.
    train_bound = (
        tpu.roofline_seconds(max(train_report.flops, estimate / len(devices)), train_report.bytes_accessed, topology)[0]
        if train_report
        else 0.0
    )
    over = [r for r in reports if not tpu.fits(r.memory.peak, topology)]
    reason = None
    if refusals:
        reason = refusals[0]
    elif over:
        worst = max(over, key=lambda r: r.memory.peak)
        reason = (
            f"{worst.name} needs {tpu.format_bytes(worst.memory.peak)} per device, more than the "
            f"{tpu.format_bytes(hbm)} of HBM of a {topology.device_kind} device"
        )
    programs_json = {r.name: tpu.report_dict(r, topology) for r in reports}
    peak = max((r.memory.peak for r in reports), default=0)
    return {
        "config": spec_name,
        "stage": cfg.stage,
        **tpu.topology_summary(topology),
        "mesh": dict(mesh.shape),
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "seq_len": cfg.seq_len,
        "compute_dtype": cfg.compute_dtype,
        "remat": cfg.remat,
        "prompt_len": prompt_len,
        "loss_positions": loss_positions,
        "image_patches": image_patches,
        "frozen_param_dtypes": sorted({jnp.dtype(x.dtype).name for x in jax.tree.leaves(frozen)}),
        "model_source": source.where,
        "trainable_params": param_lib.count(trainable_abs),
        "frozen_params": param_lib.count(frozen_abs),
        "per_chip_peak_bytes": peak * topology.devices_per_chip,
        "hbm_bytes_per_device": hbm,
        "fits": not refusals and not over,
        "reason": reason,
        # The train step's figures (refine also runs `refine_pregenerate`, once per global batch
        # of its records before training, see programs).
        # flops_per_step: the model FLOPs of the step (model_flops); compiled_flops_per_step:
        # the compiler's, which count each layer scan's body once.
        "flops_per_step": estimate,
        "compiled_flops_per_step": programs_json.get("train_step", {}).get("flops_per_step"),
        "bytes_per_step": programs_json.get("train_step", {}).get("bytes_per_step"),
        "step_time_lower_bound_s": train_bound,
        "time_basis": "max(model FLOPs / chip peak, compiled bytes accessed / HBM bandwidth) per device",
        "tokens_per_step": cfg.batch_size * cfg.seq_len,
        "program_names": [name for name, _, _, _ in programs],
        "programs": programs_json,
        "notes": notes,
    }


def main(cfg: TrainConfig, spec_name: str, topology_name: str, json_path: str | None) -> int:
    """The CLI's compile-only branch: 0 if it fits, 1 (with a one-line reason) if not,
    2 for a bad topology or config; libtpu missing is a one-line error too."""
    try:
        topology = tpu.get_topology(topology_name)
        result = compile_run(cfg, topology, spec_name)
    except (tpu.TopologyError, tpu.LibtpuMissingError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in summary_lines(result, topology):
        print(line)
    failure = None if result["fits"] else f"does not fit on {topology.name}: {result['reason']}"
    return tpu.write_report(result, json_path, failure)


def summary_lines(result: dict, topology: tpu.Topology) -> list[str]:
    """The console report: one block per program, then the verdict."""
    lines = [
        f"{result['config']} stage {result['stage']} on {topology.name} ({topology.chips} chips, "
        f"{len(topology.devices)} devices of {topology.device_kind}), mesh {result['mesh']}, "
        f"batch {result['batch_size']} x seq {result['seq_len']}, {result['compute_dtype']}; "
        f"model: {result['model_source']}"
    ]
    for name, p in result["programs"].items():
        lines += tpu.program_lines(name, p, result["hbm_bytes_per_device"])
        if p.get("while_loops"):
            lines.append(
                f"  ({p['while_loops']} while loops: the compiler's FLOPs and bytes count each loop body once)"
            )
    if result["step_time_lower_bound_s"]:
        lines.append(
            f"train step: {result['flops_per_step']:.3e} model FLOPs; roofline >= "
            f"{1000 * result['step_time_lower_bound_s']:.1f} ms per step on {topology.name}"
        )
    lines += [f"note: {n}" for n in result["notes"]]
    if result["programs"] and len(result["programs"]) == len(result["program_names"]):
        lines.append(
            f"per-chip peak {tpu.format_bytes(result['per_chip_peak_bytes'])} of "
            f"{tpu.format_bytes(result['hbm_bytes_per_chip'])}: " + ("fits" if result["fits"] else "does not fit")
        )
    return lines
