"""Loss terms as pure functions of arrays.

Every term returns a *sum* over positions, weighted by `weights` [batch, seq] (zero off
the caption positions). The caller divides by the number of text positions of the whole
(global, all micro-batches) batch: gradient accumulation then gives exactly the
full-batch gradient, and the result does not depend on how the batch is split over
devices or micro-batches.

Position t's logits predict token t+1 (targets are the inputs shifted left by one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy(logits: Array, targets: Array, weights: Array) -> Array:
    """sum_t w_t * -log softmax(logits_t)[target_t].

    logits: [batch, seq, vocab]; targets: [batch, seq] int; weights: [batch, seq].
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * weights)


def cosine_distance(pred: Array, target: Array, weights: Array, eps: float = 1e-6) -> Array:
    """sum_t w_t * (1 - cos(pred_t, target_t)); pred/target: [batch, seq, embed]."""
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    dot = jnp.sum(pred * target, axis=-1)
    norms = jnp.linalg.norm(pred, axis=-1) * jnp.linalg.norm(target, axis=-1)
    return jnp.sum((1.0 - dot / jnp.maximum(norms, eps)) * weights)


def kl_distillation(student_logits: Array, teacher_logits: Array, weights: Array, temperature: float = 1.0) -> Array:
    """sum_t w_t * T^2 * KL(softmax(teacher_t / T) || softmax(student_t / T)).

    The T^2 factor keeps the gradient scale independent of T (Hinton et al.).
    logits: [batch, seq, vocab]; the teacher side should already be stop_gradient-ed.
    """
    t = float(temperature)
    teacher_logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    student_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1)
    return (t * t) * jnp.sum(kl * weights)


def top1_agreement(student_logits: Array, teacher_logits: Array, weights: Array) -> Array:
    """sum_t w_t * [argmax student_t == argmax teacher_t]: predicts greedy acceptance."""
    same = jnp.argmax(student_logits, axis=-1) == jnp.argmax(teacher_logits, axis=-1)
    return jnp.sum(same * weights)


def top1_accuracy(logits: Array, targets: Array, weights: Array) -> Array:
    """sum_t w_t * [argmax logits_t == target_t]."""
    return jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)


def disagreement_weights(student_logits: Array, teacher_logits: Array, mask: Array, factor: float) -> Array:
    """mask * (factor where the draft's argmax differs from the full model's, else 1).

    The refine stage's imitation-learning weighting: the draft's mistakes on sequences the
    full model generates are exactly the tokens verification would reject.
    """
    differs = jnp.argmax(student_logits, axis=-1) != jnp.argmax(teacher_logits, axis=-1)
    return jax.lax.stop_gradient(mask * jnp.where(differs, factor, 1.0))


def soft_cross_entropy(student_logits: Array, teacher_logits: Array, weights: Array, temperature: float = 1.0) -> Array:
    """sum_t w_t * T^2 * -sum_v softmax(teacher_t / T)_v log softmax(student_t / T)_v.

    The EAGLE head's distillation term: cross-entropy against the full model's whole
    distribution (KL plus the teacher's entropy, which has no gradient).
    logits: [batch, seq, vocab]; the teacher side should already be stop_gradient-ed.
    """
    t = float(temperature)
    teacher_p = jax.nn.softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    student_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    ce = -jnp.sum(teacher_p * student_logp, axis=-1)
    return (t * t) * jnp.sum(ce * weights)


def smooth_l1(pred: Array, target: Array, weights: Array, delta: float = 1.0) -> Array:
    """sum_t w_t * mean_d huber_delta(pred_td - target_td); pred/target: [batch, seq, embed].

    Huber with delta 1 is Smooth L1: quadratic below |x| = 1, linear above, so the large
    outlier features of a decoder's last layer do not dominate the gradient.
    """
    diff = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
    per_feature = jnp.where(diff < delta, 0.5 * diff * diff / delta, diff - 0.5 * delta)
    return jnp.sum(jnp.mean(per_feature, axis=-1) * weights)
