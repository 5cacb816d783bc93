"""Training CLI and loop: `python -m train.run --config configs/NAME.py[:ARG] [--workdir DIR] [k=v ...]`.

One loop serves the stages (base / imitation / refine / eagle); they differ in which
parameters are trainable and in the loss (train/step.py), and the refine stage first
writes the frozen model's greedy sequences once (train/refine.py) and trains on them.
The run resumes from the latest checkpoint in the workdir automatically, saves every
`checkpoint.save_every` steps and on SIGTERM, and exports the final model to
workdir/export in our checkpoint format (with tokenizer and preprocessor), loadable by
`python -m decode.run --ckpt`.

Multi-host: pass --coordinator/--num-processes/--process-id, or set
JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID, or run on a cluster JAX
detects by itself (Cloud TPU pod, SLURM, Open MPI); then `jax.distributed.initialize()`
is called before anything touches the devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from fastvlm_jax import tpu
from fastvlm_jax.ckpt import checkpoint as ckpt_lib
from fastvlm_jax.nn.families import stop_ids
from fastvlm_jax.nn.llava import LlavaConfig
from fastvlm_jax.nn.model import VLM, params_dtype
from fastvlm_jax.runtime import sharding
from fastvlm_jax.runtime.distributed import maybe_initialize
from fastvlm_jax.runtime.paths import as_path
from train import checkpointing, compile_only, deepen, model_setup
from train import input as input_lib
from train import metrics as metrics_lib
from train import params as param_lib
from train import refine as refine_lib
from train import step as step_lib
from train.config import ConfigError, TrainConfig, apply_overrides, load_config_file, parse_overrides
from train.model_setup import (
    make_tokenizer,
    pixel_table,
    plan_training,
    resolve_model_config,
    step_spec,
    with_eagle_head,
)

EXPORT_DIR = "export"
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "train_config.json"
COMPILE_CACHE_DIR = "compile_cache"
PROFILE_DIR = "profile"


# ---------------------------------------------------------------------------------------
# Setup pieces
# ---------------------------------------------------------------------------------------


def open_source(cfg: TrainConfig):
    """The training split as a random-access source (synthetic data is built if missing).

    Process 0 builds first; the others wait at a barrier and then only find the files,
    so no two processes write one dataset.
    """
    # Here, not at the top: tensorflow_datasets takes about a second to import, and only a
    # run that reads data needs it (not --help, nor --compile-only).
    from fastvlm_jax.data import tfds_builders

    data = cfg.data
    if tfds_builders.parse_dataset_name(data.name)[0] != "synthetic_captions":
        return tfds_builders.open_split(data.name, data.split, data.data_dir, decode=False)
    kwargs = {}
    if data.synthetic_num_train > 0:
        kwargs = dict(
            num_train=data.synthetic_num_train, num_validation=0, num_test=0, image_size=data.synthetic_image_size
        )
    if jax.process_index() == 0:
        tfds_builders.build_dataset(data.name, data.data_dir, **kwargs)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("train data ready")
    # Reuses what process 0 wrote; resolves the folder of custom-size builds by their name.
    builder = tfds_builders.build_dataset(data.name, data.data_dir, **kwargs)
    return tfds_builders.CaptionSource(builder.data_dir, data.split, decode=False)


def use_compilation_cache(workdir: str | os.PathLike) -> str:
    """Turns on JAX's persistent compilation cache in workdir/compile_cache (a bucket path
    too) unless one is configured already (JAX_COMPILATION_CACHE_DIR); returns the folder.

    A restarted run (preemption, crash) then loads its compiled step instead of compiling
    it again, which takes minutes for a 7B model.
    """
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    folder = str(as_path(workdir) / COMPILE_CACHE_DIR)
    jax.config.update("jax_compilation_cache_dir", folder)
    return folder


@functools.lru_cache(maxsize=8)
def _jitted_init(config: LlavaConfig, dtype) -> Callable:
    return jax.jit(VLM(config, dtype).init)


def init_params(model: VLM, seed: int, shardings) -> Any:
    """Seeded from-scratch parameters, placed with `shardings`.

    Initialised on one local device and then distributed: identical values on every
    mesh and host count (each host computes the same tree and hands out its shards),
    and one compiled init per model config rather than one per mesh (compiling a
    flax init is slow on CPU). Models too big for one device start from `init_from`.
    """
    host = jax.device_get(_jitted_init(model.config, model.dtype)(jax.random.key(seed)))
    return jax.tree.map(
        lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda index: x[index]), host, shardings
    )


@functools.lru_cache(maxsize=8)
def _jitted_eagle_init(config: LlavaConfig, dtype) -> Callable:
    return jax.jit(VLM(config, dtype).init_eagle)


def init_eagle(model: VLM, seed: int, params, shardings) -> Any:
    """Fresh EAGLE-head params for a checkpoint without a head, placed with `shardings`.

    In the checkpoint's own param dtype (not the compute dtype), so the export keeps one
    dtype throughout; computed on the host like `init_params`, so every mesh starts from
    the same values.
    """
    dtype = params_dtype(params)
    # A key of its own: the seed also drives the data order.
    key = jax.random.fold_in(jax.random.key(seed), 0xEA61E)
    host = jax.device_get(_jitted_eagle_init(model.config, model.dtype)(key))
    return jax.tree.map(
        lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda index: x.astype(dtype)[index]), host, shardings
    )


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    status: str  # "done" | "preempted" | "stopped"
    step: int
    workdir: Path
    export_dir: Path | None
    last_metrics: dict[str, Any]


def build_model(cfg: TrainConfig, mesh):
    """(model, tokenizer, image config, init checkpoint params or None), from `init_from`
    where it has them, else from the config."""
    init = None
    if cfg.init_from:
        if cfg.model is not None:
            raise ConfigError("set either model (from scratch) or init_from (its config is used)")
        if ckpt_lib.load_config(cfg.init_from).quantization is not None:
            raise ConfigError(f"{cfg.init_from} has int8 weights (for decoding only): train from its float checkpoint")
        init = ckpt_lib.load_checkpoint(cfg.init_from, mesh=mesh)
    tokenizer = make_tokenizer(cfg, init.tokenizer if init else None)
    model_config = resolve_model_config(init.config if init else cfg.model, tokenizer)
    if cfg.deepen_to:
        try:
            model_config = deepen.deepened_config(model_config, cfg.deepen_to)
        except ValueError as err:
            raise ConfigError(f"{cfg.init_from}: {err}") from None
    model_config = with_eagle_head(cfg, model_config, cfg.init_from)
    image_config = (
        init.image_config
        if init and init.image_config is not None
        else model_setup.default_image_config(cfg, model_config)
    )
    dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
    return VLM(model_config, dtype), tokenizer, image_config, (init.params if init else None)


def caption_transform(
    cfg: TrainConfig, model: VLM, tokenizer, image_config, cls: type = input_lib.CaptionExample
) -> input_lib.CaptionExample:
    """Record -> training example (`cls`: the caption pipeline's, or the refine stage's)."""
    return cls(
        tokenizer,
        image_config,
        cfg.data.question,
        model.config.num_image_tokens,
        cfg.seq_len,
        cfg.data.caption_index,
        model.config.model_type,
        image_patches=model_setup.image_patches(cfg, model.config),
        image_overflow=cfg.data.image_overflow,
    )


def build_data(cfg: TrainConfig, source, transform, shardings, start_step: int = 0):
    """Iterator over this host's rows of each global batch, from step `start_step`'s on (a
    step reads one global batch, and which records make it up depends on nothing else)."""
    rows = input_lib.host_rows(shardings.batch["input_ids"], cfg.batch_size)
    loader = input_lib.make_loader(
        source,
        transform,
        cfg.batch_size,
        rows,
        cfg.seed,
        cfg.data.worker_count,
        cfg.data.read_threads,
        start_batch=start_step,
    )
    return iter(loader)


def refine_sequences(
    cfg: TrainConfig,
    workdir,
    model: VLM,
    mesh,
    shardings,
    trainable,
    frozen,
    tokenizer,
    image_config,
    source,
    transform,
    progress: bool,
    trainable_paths: set[str],
):
    """The refine stage's pre-pass: the frozen full model's greedy generation for every record
    the run reads, made once (or reused) in workdir/refine_sequences (train.refine); on the
    training mesh, or with refine.decode_tensor on a tensor-parallel copy of the weights."""
    prompt_len = transform.text.prompt_len  # the longest prompt's
    max_new = cfg.refine.max_new_tokens or (cfg.seq_len - prompt_len)
    if transform.patches is not None:
        # Prompts differ per row: what a row trains on must stay in its loss window (the
        # answer budget), which the longest prompt's caption room also is.
        max_new = min(max_new, cfg.seq_len - prompt_len)
    eos = stop_ids(model.config, tokenizer)
    record_ids = refine_lib.records_to_generate(len(source), cfg.batch_size, cfg.steps, cfg.seed)
    wanted = refine_lib.identity(
        init_from=cfg.init_from,
        compute_dtype=cfg.compute_dtype,
        max_new_tokens=max_new,
        eos_ids=eos,
        prompt_ids=transform.text.prompt,
        image_config=image_config,
        source=source,
        record_ids=record_ids,
    )
    if cfg.refine.decode_tensor:
        if refine_lib.check_stored(workdir / refine_lib.SEQUENCES_DIR, wanted):  # nothing to generate
            return refine_lib.load_sequences(workdir / refine_lib.SEQUENCES_DIR)
        mesh, shardings = refine_lib.decode_placement(model, shardings, mesh, trainable_paths, cfg.refine.decode_tensor)
        if cfg.batch_size % (mesh.shape["data"]):
            raise ConfigError(
                f"refine.decode_tensor={cfg.refine.decode_tensor}: batch_size {cfg.batch_size} does not split "
                f"over the decode mesh's {mesh.shape['data']} data shards"
            )
        # Resharded once: a second copy of the weights, freed when the pre-pass returns.
        trainable = jax.device_put(trainable, shardings.state.params)
        frozen = jax.device_put(frozen, shardings.frozen)
    program = refine_lib.generate_program(model, shardings, max_new, eos, pixel_table(image_config))

    def generate_fn(prompts):
        with jax.set_mesh(mesh):
            return program(trainable, frozen, prompts)

    return refine_lib.pregenerate(
        workdir / refine_lib.SEQUENCES_DIR,
        wanted,
        source,
        transform,
        record_ids,
        generate_fn,
        shardings.batch,
        cfg.batch_size,
        max_new,
        progress=progress,
        read_threads=cfg.data.read_threads,
    )


def train(
    cfg: TrainConfig,
    workdir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    stop_after: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    profile_steps: int = 0,
) -> RunResult:
    """Runs (or resumes) `cfg` in `workdir`; returns when done, when preempted (SIGTERM),
    or after `stop_after` steps in this call. devices: the mesh's (default: all), e.g. one
    device for a reference run. profile_steps: trace that many steps with jax.profiler into
    workdir/profile (TensorBoard's profile plugin reads it), starting after the call's first
    step so that compiling stays out of the trace."""
    if not (workdir or cfg.workdir):
        raise ConfigError("no workdir: pass --workdir or set workdir in the config")
    workdir = as_path(workdir or cfg.workdir)  # local, or a bucket (gs://...)
    primary = jax.process_index() == 0
    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    model, tokenizer, image_config, params = build_model(cfg, mesh)

    # Parameters: placed by logical axes, split into trainable (optimized) and frozen.
    abstract = nn.meta.unbox(model.abstract_params())
    trainable_paths, tx, schedule, shardings = plan_training(cfg, model, mesh, abstract)
    placement = param_lib.merge(shardings.state.params, shardings.frozen)
    if params is None:
        params = init_params(model, cfg.seed, placement)
    elif cfg.deepen_to:
        params = deepen.deepen_params(params, init_params(model, cfg.seed, placement), model.config.draft.exit_layer)
    elif "eagle" in abstract and ("eagle" not in params or cfg.eagle.reinit):
        params = dict(params, eagle=init_eagle(model, cfg.seed, params, placement["eagle"]))
    trainable, frozen = param_lib.split(params, trainable_paths)
    del params
    # float32 master weights for what we train, whatever the checkpoint's dtype; the
    # export casts them back so the checkpoint keeps its dtype.
    saved_dtypes = jax.tree.map(lambda x: x.dtype, trainable)
    trainable = jax.tree.map(lambda x: x.astype(jnp.float32), trainable)

    # State: resume from the workdir, or start fresh.
    checkpointer = checkpointing.Checkpointer(workdir / CHECKPOINT_DIR, cfg.checkpoint.keep, cfg.checkpoint.async_save)
    # What a resumed run must share with the one that saved: the model, the data order,
    # and everything the learning-rate schedule and the optimizer state depend on.
    meta = {
        "stage": cfg.stage,
        "init_from": cfg.init_from,
        "seed": cfg.seed,
        "process_count": jax.process_count(),  # recorded, not required: see the check below
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "optim": dataclasses.asdict(cfg.optim),
    }
    if cfg.stage == "eagle":  # the head's shape and what its training data looks like
        meta["eagle"] = {
            "hidden_size": cfg.eagle.hidden_size,
            "image_pool": cfg.eagle.image_pool,
            "compressor": cfg.eagle.compressor,
        }
    latest = checkpointer.latest_step()
    if latest is not None:  # the run must match the checkpoint it resumes
        saved_meta = checkpointer.read_meta(latest)
        for key in meta:
            if key == "process_count":
                # The data position is the step (build_data) and the global order does not
                # depend on how hosts split a batch; orbax reshards the state: any count resumes.
                continue
            if key not in saved_meta and key not in ("stage", "init_from", "seed"):
                continue  # saved before this key was recorded
            if saved_meta.get(key) != meta[key]:
                raise ConfigError(
                    f"{workdir} holds a checkpoint with {key}={saved_meta.get(key)!r}, "
                    f"this run has {key}={meta[key]!r}: a resumed run must keep it "
                    "(use a fresh workdir, or init_from the export to start a new run)"
                )

    # Data (after the checks above: a mismatched resume fails before the refine pre-pass).
    source = open_source(cfg)
    transform = caption_transform(cfg, model, tokenizer, image_config)
    if cfg.stage == "refine":
        # Generated once before training (not per step): the full model is frozen and the
        # prompt fixed, so each record's greedy sequence never changes during the stage.
        sequences = refine_sequences(
            cfg,
            workdir,
            model,
            mesh,
            shardings,
            trainable,
            frozen,
            tokenizer,
            image_config,
            source,
            transform,
            progress and primary,
            trainable_paths,
        )
        source = refine_lib.WithSequences(source, sequences)
        transform = caption_transform(cfg, model, tokenizer, image_config, refine_lib.RefineExample)
    if latest is not None:
        target = step_lib.abstract_state(shardings, param_lib.split(abstract, trainable_paths)[0], tx)
        state = checkpointer.restore(latest, target)
    else:
        state = step_lib.init_state(trainable, tx, cfg.seed, shardings)
    del trainable
    if primary:  # only once the run is known to match what the workdir holds
        (workdir / CONFIG_FILE).write_text(cfg.to_json())
    start_step = int(state.step)
    data_iter = build_data(cfg, source, transform, shardings, start_step)

    # The prompt's last token predicts the caption's first: no position before it carries loss.
    loss_start = transform.text.prompt_len - 1
    spec = step_spec(cfg, loss_start, image_config)
    train_step = step_lib.jit_train_step(model, spec, tx, schedule, shardings, mesh)
    logger = metrics_lib.MetricsLogger(workdir, cfg.steps, start_step, progress=progress and primary)
    preemption = checkpointing.PreemptionFlag(sync_every=cfg.log_every)
    status, step, last, saved_step = "done", start_step, {}, latest
    tokens_per_batch = cfg.batch_size * cfg.seq_len
    # MFU: the model's matmul FLOPs per step by formula (compile_only.model_flops; XLA's cost
    # analysis counts a layer scan's body once) over the chips' peak; no peak, no MFU.
    flops_per_step = compile_only.model_flops(
        cfg.stage,
        model.config,
        abstract,
        cfg.batch_size,
        cfg.seq_len,
        compile_only.head_positions(cfg, loss_start),
        model_setup.image_patches(cfg, model.config),
    )
    peak_flops = tpu.peak_flops(mesh.devices.flat)
    profile_start = start_step + 1 if profile_steps > 0 else None
    profiling = False
    window_start, window_steps = time.perf_counter(), 0
    try:
        while step < cfg.steps:
            rows = next(data_iter)
            input_lib.check_loss_window(rows, loss_start, spec.row_windows)
            batch = input_lib.to_global(rows, shardings.batch, cfg.batch_size)
            state, metrics = train_step(state, frozen, batch)
            step += 1
            window_steps += 1
            if step % cfg.log_every == 0 or step == cfg.steps or step == start_step + 1:
                metrics = jax.device_get(metrics)  # waits for the step: the timings are real
                elapsed = time.perf_counter() - window_start
                metrics.update(
                    step_time_s=elapsed / window_steps,
                    tokens_per_s=tokens_per_batch * window_steps / elapsed,
                    model_flops_per_s=flops_per_step * window_steps / elapsed,
                )
                if peak_flops:
                    metrics["mfu"] = flops_per_step * window_steps / elapsed / peak_flops
                if step == start_step + 1:
                    metrics["compile_and_first_step_s"] = elapsed
                    metrics.pop("mfu", None)  # compiling is not the model's time
                last = logger.log(step, metrics) or last
                window_start, window_steps = time.perf_counter(), 0
            if profiling and step >= profile_start + profile_steps:
                jax.block_until_ready(state)  # the traced steps' device work ends inside the trace
                jax.profiler.stop_trace()
                profiling = False
            if step == profile_start:
                jax.block_until_ready(state)
                jax.profiler.start_trace(str(workdir / PROFILE_DIR))
                profiling = True
            if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0 and step < cfg.steps:
                checkpointer.save(step, state, meta)
                saved_step = step
            if preemption.should_stop(step):
                status = "preempted"
                break
            if stop_after is not None and step - start_step >= stop_after and step < cfg.steps:
                status = "stopped"
                break
        if saved_step != step and (status != "done" or cfg.checkpoint.save_final):
            checkpointer.save(step, state, meta)
        checkpointer.wait()
        export_dir = None
        if status == "done" and cfg.checkpoint.export:
            trained = jax.tree.map(lambda x, dtype: x.astype(dtype), state.params, saved_dtypes)
            export_dir = checkpointing.export(
                workdir / EXPORT_DIR, model.config, param_lib.merge(trained, frozen), tokenizer, image_config
            )
    finally:
        if profiling:  # stopped before the last profiled step
            jax.profiler.stop_trace()
        logger.close()
        checkpointer.close()
        preemption.restore_handlers()
    return RunResult(status, step, workdir, export_dir, last)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are dotted key=value pairs, e.g. steps=100 optim.learning_rate=3e-4 "
        "mesh.tensor=2 model.text.num_layers=4 trainable='imitation/.*'.",
    )
    parser.add_argument("--config", required=True, help="configs/NAME.py[:ARG] (ARG goes to get_config)")
    parser.add_argument("--workdir", default=None, help="run folder (default: the config's workdir)")
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (multi-host)")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        metavar="N",
        help="trace N steps (after the first) with jax.profiler into WORKDIR/profile",
    )
    parser.add_argument(
        "--compile-only",
        metavar="TOPOLOGY",
        default=None,
        help="compile the step for a TPU slice (e.g. v5e:4x8, v5p:2x2x4) and report "
        "memory per chip, FLOPs, collectives and a roofline time; runs nothing "
        "(needs libtpu: pip install -e '.[tpu]'); exit 1 if it does not fit",
    )
    parser.add_argument("--json", default=None, help="--compile-only: write the report here")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = apply_overrides(load_config_file(args.config), parse_overrides(args.overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.compile_only:
        return compile_only.main(cfg, args.config, args.compile_only, args.json)
    if args.profile_steps < 0:
        print(f"error: --profile-steps {args.profile_steps}: give a number of steps >= 0", file=sys.stderr)
        return 2
    maybe_initialize(args.coordinator, args.num_processes, args.process_id)
    if args.workdir or cfg.workdir:
        use_compilation_cache(args.workdir or cfg.workdir)
    result = train(cfg, args.workdir, progress=not args.no_progress, profile_steps=args.profile_steps)
    if jax.process_index() == 0:
        print(
            json.dumps(
                {
                    "status": result.status,
                    "step": result.step,
                    "workdir": str(result.workdir),
                    "export": str(result.export_dir) if result.export_dir else None,
                    "metrics": result.last_metrics,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
