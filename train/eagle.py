"""The eagle stage's loss: the EAGLE head (fastvlm_jax.nn.eagle) learns from the frozen model.

At position t the head reads f_t (the full model's last-layer state, before the final
norm) and e_{t+1} (the embedding of token t+1, image features merged in) at RoPE
position t, and predicts f_{t+1}; the shared final norm + LM head turn that into the
distribution of token t+2. The teacher is the same forward pass of the frozen model
that gives f: no second model, no stored features.

The head is trained on exactly the sequence decoding will show it. Decoding runs the
head over the prompt compressed by the visual compressor (`compact_slots` maps each
position to a head cache slot, `compress` gathers the slot's inputs), with a causal mask
in slot order, and then one slot per later position. Without a cache the same thing is
the head over the compact sequence of slots, each at the RoPE position of its first
position: those positions increase with the slot, so the model's position-based causal
mask is the slot-order mask, and `key_mask` hides the unused slots at the end.

The output of slot j (first position p) predicts f_{p+1}. For a text slot that is
exactly the next position's feature; an image slot under pooling stands for several
positions, so only text slots carry loss. With image_pool 1 every slot is one position
and the inputs are the plain shifted sequence.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from fastvlm_jax.nn.eagle import compact_slots, compress
from train import losses
from train.config import EagleStageConfig

Array = jax.Array


@flax.struct.dataclass
class HeadInputs:
    """What the head sees and what it is scored on, all indexed by head slot.

    features:     [batch, seq, embed] f_t of the slot's positions (mean or first)
    embeds:       [batch, seq, embed] e_{t+1} of the slot's positions (mean or first)
    positions:    [batch, seq] int32  RoPE position of the slot (its first position t)
    key_mask:     [batch, seq] bool   the slot holds positions (unused slots at the end)
    target_index: [batch, seq] int32  t+1: the position whose feature the slot predicts
                                      (clipped to seq-1; such slots have weight 0)
    weights:      [batch, seq] float  loss_mask[t+1] on text slots with a next position,
                                      0 elsewhere (the head at t predicts token t+2,
                                      whose mask is loss_mask[t+1])
    slot_of:      [batch, seq] int32  the slot of each *position* (compact_slots); a text
                                      position has a slot of its own
    """

    features: Array
    embeds: Array
    positions: Array
    key_mask: Array
    target_index: Array
    weights: Array
    slot_of: Array


def head_inputs(
    features: Array,
    embeds: Array,
    input_ids: Array,
    loss_mask: Array,
    image_token_id: int,
    image_pool: int,
    compressor: str,
) -> HeadInputs:
    """The head's compact input sequence from one full-model pass.

    features: [batch, seq, embed] f_t (last layer, pre final norm); embeds: [batch, seq,
    embed] the model's state 0; input_ids: [batch, seq]; loss_mask: [batch, seq] (1 where
    targets[t] = input_ids[t+1] is a caption token or EOS).
    """
    batch, seq = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    # e_{t+1} at t. The last position has no next token: zeros there. It is never a loss
    # position, and as the last key no earlier query attends to it.
    next_embeds = jnp.concatenate([embeds[:, 1:], jnp.zeros_like(embeds[:, :1])], axis=1)
    # The compressor groups positions by whether f_t is an image position.
    is_image = input_ids == image_token_id
    slots = compact_slots(is_image, image_pool)
    slot_features, slot_positions = compress(features, positions, slots, is_image, compressor)
    slot_embeds, _ = compress(next_embeds, positions, slots, is_image, compressor)
    used = jnp.arange(seq)[None, :] <= slots[:, -1:]  # slots are non-decreasing: the last is the max
    slot_is_image = jnp.take_along_axis(is_image, slot_positions, axis=1)
    has_next = slot_positions + 1 < seq
    target_index = jnp.minimum(slot_positions + 1, seq - 1)
    keep = used & ~slot_is_image & has_next
    weights = jnp.take_along_axis(loss_mask, target_index, axis=1) * keep
    return HeadInputs(
        slot_features, slot_embeds, slot_positions, used, target_index, weights.astype(jnp.float32), slots
    )


def _at(x: Array, index: Array) -> Array:
    """x [batch, seq, ...] gathered at index [batch, seq] along the sequence."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def eagle_losses(
    model,
    params,
    eagle: EagleStageConfig,
    state0: Array,
    h_last: Array,
    full_logits: Array,
    input_ids: Array,
    targets: Array,
    loss_mask: Array,
    loss_start: int | Array = 0,
) -> tuple[Array, dict[str, Array]]:
    """(loss, metrics) of the head on one batch, as sums over caption positions (the
    caller divides by the number of text positions, as for the other stages).

    state0: [batch, seq, embed] the model's embed output; h_last: [batch, seq, embed]
    last-layer states; full_logits: [batch, W, vocab] the full model's logits of positions
    [loss_start, loss_start + W) of each row (position t predicts token t+1); input_ids,
    targets, loss_mask: [batch, seq] as in the batch, loss_mask 0 outside that window.
    loss_start: an int (every row's window is [loss_start, seq)), or [batch] int32 (each
    row's own, for prompts of different lengths). The head runs over every slot (later
    slots attend to the prompt's); the LM head only over the slots of positions
    [loss_start - 1, loss_start - 1 + W), the only ones that can carry loss: [batch, seq,
    vocab] logits are the step's largest arrays.
    """
    draft = model.config.draft
    teacher_features = jax.lax.stop_gradient(h_last)
    teacher_logits = jax.lax.stop_gradient(full_logits)
    inputs = head_inputs(
        teacher_features,
        jax.lax.stop_gradient(state0),
        input_ids,
        loss_mask,
        model.config.image_token_id,
        draft.eagle_image_pool,
        draft.eagle_compressor,
    )
    # A slot carries loss only if it is a text slot predicting a position in the loss window:
    # the slot of a position in [loss_start - 1, loss_start - 1 + W). Those positions' slots,
    # per row (a text position has its own slot, so no weighted slot comes twice; image slots
    # weigh 0).
    if isinstance(loss_start, int):
        window = inputs.slot_of[:, max(loss_start - 1, 0) : -1]  # [batch, W]
        first = jnp.full((input_ids.shape[0], 1), loss_start, jnp.int32)
    else:
        first = loss_start[:, None].astype(jnp.int32)
        window = _at(inputs.slot_of, first - 1 + jnp.arange(full_logits.shape[1])[None, :])
    target_index = _at(inputs.target_index, window)
    w = _at(inputs.weights, window)
    # Full logits at t+1 are the full model's distribution of token t+2, the head's token.
    # Slots predicting a position before the window have weight 0: any in-range logits do.
    target_logits = _at(teacher_logits, jnp.clip(target_index - first, 0, full_logits.shape[1] - 1))
    target_features = _at(teacher_features, inputs.target_index)
    features, total, metrics = inputs.features, 0.0, {}
    for step in range(max(eagle.unroll_steps, 1)):
        predicted, _ = model.eagle_draft(params, features, inputs.embeds, inputs.positions, key_mask=inputs.key_mask)
        # The frozen final norm + LM head: gradients flow through them into the head only.
        logits = model.logits(params, _at(predicted, window))
        ce = losses.soft_cross_entropy(logits, target_logits, w, eagle.temperature)
        feature = losses.smooth_l1(predicted, target_features, inputs.weights)
        total = total + eagle.ce_weight * ce + eagle.feature_weight * feature
        logits = jax.lax.stop_gradient(logits)
        suffix = "" if step == 0 else f"_unrolled{step}"
        metrics.update(
            {
                f"eagle_ce{suffix}": ce,
                f"eagle_feature_l1{suffix}": feature,
                # Greedy acceptance proxy: the head's top-1 equals the full model's.
                f"eagle_agreement{suffix}": losses.top1_agreement(logits, target_logits, w),
            }
        )
        if step == 0:
            metrics["eagle_acc"] = losses.top1_accuracy(logits, _at(targets, target_index), w)
        features = feed_predictions(inputs.features, jax.lax.stop_gradient(predicted), inputs.positions)
    return total, metrics


def feed_predictions(features: Array, predicted: Array, positions: Array) -> Array:
    """The next unrolled pass's input features: slot j gets the prediction of slot j - 1
    where slot j - 1 is the previous position (what drafting feeds the head), else keeps its
    own real feature (the first slot, and slots after a pooled image run).

    features, predicted: [batch, seq, embed]; positions: [batch, seq] of the slots."""
    follows = jnp.concatenate(
        [jnp.zeros_like(positions[:, :1], bool), positions[:, 1:] == positions[:, :-1] + 1], axis=1
    )
    fed = jnp.concatenate([features[:, :1], predicted[:, :-1].astype(features.dtype)], axis=1)
    return jnp.where(follows[..., None], fed, features)
