"""The sharded train step: losses per stage, AdamW, gradient accumulation, pjit.

    state, metrics = train_step(state, frozen, batch)

`state` (TrainState: step, trainable params, optimizer state, rng) is donated and comes
back with the same shardings; `frozen` (the rest of the VLM) is read only. The batch
is a dict of global arrays sharded over ('data', 'fsdp') on its leading axis:

    pixels     [batch, height, width, 3] uint8  resized, not yet normalised: StepSpec.pixel_table
                                          maps it on device (float32 where the table is empty)
               or, for images that keep their size (Qwen2.5-VL), [batch, image_patches,
               patch_dim] uint8 patches, with
    image_grid [batch, 3] int32       each row's patch grid (t, h, w): model_pixels makes a PatchImages
    input_ids  [batch, seq] int32     prompt (with image tokens) + caption + EOS + padding
    targets    [batch, seq] int32     input_ids shifted left by one
    loss_mask  [batch, seq] float32   1 where targets[t] is a caption token or EOS
    prompt_len [batch] int32          prompt length (the caption starts there; rows differ when
                                      their images do: StepSpec.row_windows)

Stages (all share one forward: the shallow layers run once and feed both paths):
  base:       CE of the full model on the captions (+ draft metrics, no gradient).
  imitation:  the VLM is frozen (stop_gradient teacher); the imitation network learns
              w_cos * (1 - cos(IN(h_k), h_L)) + w_kd * T^2 KL(full || draft) + w_ce * CE(draft).
  refine:     the same on sequences the full model generated itself, with the positions
              where the draft's argmax disagreed weighted up.
  eagle:      the VLM is frozen; its EAGLE head learns from the same pass (train/eagle.py):
              w_ce * T^2 soft CE(head || full) + w_feat * SmoothL1(predicted f_{t+1}, f_{t+1}).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from fastvlm_jax.image.patches import PatchImages
from fastvlm_jax.nn.model import VLM
from fastvlm_jax.runtime import sharding
from train import eagle as eagle_lib
from train import losses
from train import params as param_lib
from train.config import EagleStageConfig, ImitationLossConfig, OptimConfig

Array = jax.Array
Params = Any
Batch = dict[str, Array]

BATCH_KEYS = ("pixels", "input_ids", "targets", "loss_mask", "prompt_len")
PATCH_KEYS = ("image_grid",)  # with patch images (Qwen2.5-VL) besides BATCH_KEYS


@flax.struct.dataclass
class TrainState:
    """Everything a training checkpoint holds besides the data position.

    params: the trainable parameters only (float32 master copy).
    rng: a raw uint32[2] key (typed keys do not serialize); unused by the deterministic
      losses today, kept so sampling-based stages resume exactly.
    """

    step: Array
    params: Params
    opt_state: Any
    rng: Array


# ---------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------


def make_schedule(optim: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to end_lr_factor * peak at total_steps."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim.learning_rate * optim.end_lr_factor,
    )


def make_optimizer(optim: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW; no weight decay on vectors (norms, biases)."""
    decay_mask = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)  # noqa: E731
    parts = []
    if optim.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
    parts.append(
        optax.adamw(
            make_schedule(optim, total_steps),
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------
# Losses per stage
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Static settings of the step (hashable: part of the jitted function).

    remat: what each decoder layer keeps for the backward pass (fastvlm_jax.nn.layers.
      REMAT_POLICIES); only the base stage differentiates through the layer stack.
    loss_start: the first position that can carry loss (the prompt's last token predicts
      the caption's first): the LM head, the imitation losses and the metrics run on
      positions [loss_start, seq) only. With LLaVA's 576 image tokens that is a few dozen of 640
      positions, and the [batch, seq, vocab] logits are the step's largest activations.
    loss: the imitation and refine stages' loss weights; disagreement_weight: the refine
      stage's (RefineConfig); eagle: the eagle stage's head and loss (EagleStageConfig).
    pixel_table: fastvlm_jax.image.processing.pixel_value_table as nested tuples: the batch's
      pixels come as uint8 (a quarter of float32's bytes from host to device) and are looked
      up in it on device, giving the host preprocessing's float32 values bit for bit. Empty:
      the pixels come as float32 already.
    row_windows: prompts differ in length per row (images that keep their size): each row's
      loss window is [prompt_len - 1, prompt_len - 1 + seq - loss_start), from the batch's
      prompt_len, with loss_start the longest prompt's length - 1 (the windows of every row
      have that width, train.input.TextFormat.answer_budget); the hidden states are gathered
      per row before the LM head.
    """

    stage: str
    loss: ImitationLossConfig
    grad_accum: int = 1
    remat: str = "none"
    loss_start: int = 0
    disagreement_weight: float = 1.0
    eagle: EagleStageConfig = EagleStageConfig()
    pixel_table: tuple[tuple[float, float, float], ...] = ()
    row_windows: bool = False


def device_pixels(pixels: Array, table: tuple[tuple[float, float, float], ...]) -> Array:
    """uint8 [..., 3] -> float32 [..., 3] by `table` ([256][3]: value v of channel c at
    [v][c]); pixels unchanged where the table is empty (they are float32 already)."""
    if not table:
        return pixels
    lookup = jnp.asarray(table, jnp.float32)  # [256, 3]
    return lookup[pixels.astype(jnp.int32), jnp.arange(3)]


def device_patches(patches: Array, grid: Array, table: tuple[tuple[float, float, float], ...]) -> PatchImages:
    """uint8 patches [batch, max_patches, patch_dim] (each flattened channel-major, as
    fastvlm_jax.image.qwen_vl.preprocess lays them out) and grid [batch, 3] -> the PatchImages
    of the host processor's float32 values, bit for bit: each value looked up in `table` by
    its channel, and the padding rows after each row's t * h * w patches zero
    (fastvlm_jax.image.patches.stack_patch_images'); float32 patches pass unchanged."""
    grid = grid.astype(jnp.int32)
    if not table:
        return PatchImages(patches=patches, grid=grid)
    lookup = jnp.asarray(table, jnp.float32)  # [256, 3]
    dim = patches.shape[-1]
    channel = jnp.arange(dim) // (dim // 3)
    values = lookup[patches.astype(jnp.int32), channel]
    real = jnp.arange(patches.shape[1])[None, :] < jnp.prod(grid, axis=-1)[:, None]
    return PatchImages(patches=jnp.where(real[..., None], values, 0.0), grid=grid)


def model_pixels(batch: Batch, table: tuple[tuple[float, float, float], ...]) -> Any:
    """The batch's images as the model takes them: float32 pixels (device_pixels), or a
    PatchImages where the batch has an image_grid (device_patches)."""
    if "image_grid" in batch:
        return device_patches(batch["pixels"], batch["image_grid"], table)
    return device_pixels(batch["pixels"], table)


def loss_window(spec: StepSpec, batch: Batch) -> Callable[[Array], Array]:
    """x [batch, seq, ...] -> its loss positions [batch, seq - loss_start, ...]: the same
    positions [loss_start, seq) of every row, or each row's own window (StepSpec.row_windows)."""
    if not spec.row_windows:
        return lambda x: x[:, spec.loss_start :]
    seq = batch["input_ids"].shape[1]
    index = (batch["prompt_len"][:, None] - 1) + jnp.arange(seq - spec.loss_start)[None, :]
    return lambda x: jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def forward_losses(
    model: VLM, spec: StepSpec, trainable: Params, frozen: Params, batch: Batch, num_text: Array
) -> tuple[Array, dict[str, Array]]:
    """(loss, metrics) of one (micro-)batch, both normalised by `num_text`, the number of
    text positions of the whole global batch (so micro-batch values add up exactly)."""
    params = param_lib.merge(trainable, frozen)
    cfg = model.config
    exit_layer, num_layers = cfg.draft.exit_layer, cfg.text.num_layers
    ids, targets, mask = batch["input_ids"], batch["targets"], batch["loss_mask"]
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)

    pixels = model_pixels(batch, spec.pixel_table)
    hidden = model.embed(params, ids, model.encode_images(params, pixels))
    span = model.image_span(ids, pixels)  # None unless the family needs where the image lies
    window = loss_window(spec, batch)  # the positions that carry loss (StepSpec)
    if spec.stage == "eagle":
        # The head reads only the model's first and last states: no exit-layer states.
        h_last, _, _ = model.run_layers(params, hidden, positions, 0, num_layers, image_span=span)
        full_logits = model.logits(params, window(h_last))
        # Each row's first loss position (the head's slots are gathered from it on).
        loss_start = batch["prompt_len"] - 1 if spec.row_windows else spec.loss_start
        loss, metrics = eagle_lib.eagle_losses(
            model, params, spec.eagle, hidden, h_last, full_logits, ids, targets, mask, loss_start
        )
        metrics["full_acc"] = losses.top1_accuracy(jax.lax.stop_gradient(full_logits), window(targets), window(mask))
        metrics = {k: v / num_text for k, v in metrics.items()}
        return loss / num_text, metrics
    # One pass over the whole layer stack (which scans the stacked params directly, so
    # the base stage's gradients stay one [num_layers, ...] array per leaf) that also
    # returns the exit-layer states the draft path reads.
    h_last, _, states = model.run_layers(
        params, hidden, positions, 0, num_layers, collect=(exit_layer,), remat=spec.remat, image_span=span
    )
    # The imitation network sees every position (it may attend); everything after it
    # only the loss window.
    draft_hidden, _ = model.imitate(params, jax.lax.stop_gradient(states[exit_layer]), positions)
    h_last, draft_hidden = window(h_last), window(draft_hidden)
    targets, mask = window(targets), window(mask)
    full_logits = model.logits(params, h_last)

    if spec.stage == "base":
        # The draft path is only measured here (untrained imitation = plain early exit).
        draft_logits = jax.lax.stop_gradient(model.logits(params, draft_hidden))
        ce = losses.cross_entropy(full_logits, targets, mask)
        loss = ce
        metrics = {"ce": ce}
    else:
        # Online teacher: the frozen deep layers' outputs, computed in this same pass.
        teacher_hidden = jax.lax.stop_gradient(h_last)
        teacher_logits = jax.lax.stop_gradient(full_logits)
        draft_logits = model.logits(params, draft_hidden)
        weights = mask
        if spec.stage == "refine":
            weights = losses.disagreement_weights(draft_logits, teacher_logits, mask, spec.disagreement_weight)
        cos = losses.cosine_distance(draft_hidden, teacher_hidden, weights)
        kd = losses.kl_distillation(draft_logits, teacher_logits, weights, spec.loss.temperature)
        ce = losses.cross_entropy(draft_logits, targets, weights)
        loss = spec.loss.cos * cos + spec.loss.kd * kd + spec.loss.ce * ce
        metrics = {"cos": cos, "kd": kd, "draft_ce": ce}
        draft_logits = jax.lax.stop_gradient(draft_logits)

    metrics.update(
        draft_agreement=losses.top1_agreement(draft_logits, full_logits, mask),
        draft_acc=losses.top1_accuracy(draft_logits, targets, mask),
        full_acc=losses.top1_accuracy(jax.lax.stop_gradient(full_logits), targets, mask),
    )
    metrics = {k: v / num_text for k, v in metrics.items()}
    return loss / num_text, metrics


def _micro_batches(batch: Batch, num: int) -> Batch:
    """[batch, ...] -> [num, batch // num, ...]; micro-batch j takes rows j, j + num, ...

    Strided rather than contiguous so that each device's rows split evenly into the
    micro-batches and the data sharding of the leading axis survives the reshape.
    """

    def one(x):
        x = x.reshape((x.shape[0] // num, num) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(one, batch)


def train_step(
    model: VLM,
    spec: StepSpec,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    state: TrainState,
    frozen: Params,
    batch: Batch,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimizer update from one global batch (pure; jit it with `jit_train_step`)."""
    num_text = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    grad_fn = jax.value_and_grad(forward_losses, argnums=2, has_aux=True)

    if spec.grad_accum == 1:
        (loss, metrics), grads = grad_fn(model, spec, state.params, frozen, batch, num_text)
    else:

        def micro_step(grads, micro):
            (loss, metrics), micro_grads = grad_fn(model, spec, state.params, frozen, micro, num_text)
            return jax.tree.map(jnp.add, grads, micro_grads), (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (loss, metrics) = jax.lax.scan(micro_step, zeros, _micro_batches(batch, spec.grad_accum))
        # Each micro-batch term is already divided by the global count: sums are exact.
        loss, metrics = jnp.sum(loss), jax.tree.map(jnp.sum, metrics)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    metrics = dict(
        metrics, loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step), text_tokens=num_text
    )
    new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state)
    return new_state, metrics


# ---------------------------------------------------------------------------------------
# Shardings and jit
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shardings:
    """Where every input and output of the step lives on the mesh."""

    state: TrainState
    frozen: Params
    batch: dict[str, NamedSharding]
    replicated: NamedSharding


def batch_shardings(mesh: Mesh, patch_images: bool = False) -> dict[str, NamedSharding]:
    """Every batch array split over (data, fsdp) on its leading axis; patch_images: the batch
    of a family whose images keep their size (pixels [batch, patches, dim] + image_grid)."""
    ndims = {"pixels": 4, "input_ids": 2, "targets": 2, "loss_mask": 2, "prompt_len": 1}
    if patch_images:
        ndims.update(pixels=3, image_grid=2)
    return {k: sharding.data_sharding(mesh, n) for k, n in ndims.items()}


def make_shardings(
    model: VLM, mesh: Mesh, trainable: set[str], tx: optax.GradientTransformation, rules=sharding.DEFAULT_RULES
) -> Shardings:
    """Params by their logical axes; optimizer moments like their params; scalars replicated;
    the batch split over the data axes (with patch images where the family's images keep
    their size)."""
    boxed = model.abstract_params()
    param_sh = sharding.param_shardings(boxed, mesh, rules)
    trainable_sh, frozen_sh = param_lib.split(param_sh, trainable)
    abstract_trainable, _ = param_lib.split(nn.meta.unbox(boxed), trainable)
    abstract_opt = jax.eval_shape(tx.init, abstract_trainable)
    replicated = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        trainable_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    state_sh = TrainState(step=replicated, params=trainable_sh, opt_state=opt_sh, rng=replicated)
    batch_sh = batch_shardings(mesh, patch_images=uses_patch_images(model))
    return Shardings(state=state_sh, frozen=frozen_sh, batch=batch_sh, replicated=replicated)


def uses_patch_images(model: VLM) -> bool:
    """Whether the family's images keep their size (it takes PatchImages: Qwen2.5-VL)."""
    return isinstance(model.family.module_class.dummy_inputs(model.config)[1], PatchImages)


def train_step_program(
    model: VLM, spec: StepSpec, tx: optax.GradientTransformation, schedule: optax.Schedule, shardings: Shardings
):
    """The jitted step with explicit shardings, the state's buffers donated (updated in
    place). Trace it (call or `.lower`) inside `jax.set_mesh(mesh)` and the axis rules, as
    `jit_train_step` does; train.compile_only lowers it for a TPU topology."""
    return jax.jit(
        lambda state, frozen, batch: train_step(model, spec, tx, schedule, state, frozen, batch),
        in_shardings=(shardings.state, shardings.frozen, shardings.batch),
        out_shardings=(shardings.state, shardings.replicated),
        donate_argnums=(0,),
    )


def jit_train_step(
    model: VLM,
    spec: StepSpec,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    shardings: Shardings,
    mesh: Mesh,
    rules=sharding.DEFAULT_RULES,
) -> Callable:
    """`step(state, frozen, batch) -> (state, metrics)` compiled with explicit shardings;
    the state's buffers are donated (updated in place)."""
    fn = train_step_program(model, spec, tx, schedule, shardings)

    def step(state, frozen, batch):
        # The mesh and logical rules must be active while tracing, for the activation
        # sharding constraints inside the model.
        with jax.set_mesh(mesh), sharding.axis_rules(rules):
            return fn(state, frozen, batch)

    return step


def init_state(trainable: Params, tx: optax.GradientTransformation, seed: int, shardings: Shardings) -> TrainState:
    """A fresh TrainState for already-placed trainable params (optimizer state sharded)."""

    def build(params):
        rng = jax.random.key_data(jax.random.key(seed))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

    return jax.jit(build, in_shardings=(shardings.state.params,), out_shardings=shardings.state)(trainable)


def abstract_state(shardings: Shardings, abstract_trainable: Params, tx: optax.GradientTransformation) -> TrainState:
    """ShapeDtypeStructs with shardings: the restore target of a training checkpoint."""

    def build(params):
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.key_data(jax.random.key(0)),
        )

    shapes = jax.eval_shape(build, abstract_trainable)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings.state)
