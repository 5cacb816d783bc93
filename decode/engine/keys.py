"""Random keys for a batch: one key for the whole batch, or one key per row.

`generate` draws a batch's randomness from one key, as it always has. Continuous batching
(decode.engine.slots) gives every row its own key, derived from the request, so that a
request's samples do not depend on its slot, its batch or what else is in flight: each
function here takes either a scalar key (the draw covers the whole `shape`, batch first) or
a [batch] array of keys (row r's draw comes from key r alone).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def per_row(key: Array) -> bool:
    """Whether `key` is a [batch] array of keys (else one key for the batch)."""
    return key.ndim == 1


def split(key: Array, num: int = 2) -> tuple[Array, ...]:
    """`num` independent keys (or [batch] arrays of them)."""
    if per_row(key):
        parts = jax.vmap(lambda k: jax.random.split(k, num))(key)  # [batch, num]
        return tuple(parts[:, i] for i in range(num))
    return tuple(jax.random.split(key, num))


def fold_in(key: Array, data) -> Array:
    if per_row(key):
        return jax.vmap(lambda k: jax.random.fold_in(k, data))(key)
    return jax.random.fold_in(key, data)


def uniform(key: Array, shape: tuple[int, ...]) -> Array:
    """Uniform [0, 1) of `shape` ([batch, ...])."""
    if per_row(key):
        return jax.vmap(lambda k: jax.random.uniform(k, shape[1:]))(key)
    return jax.random.uniform(key, shape)


def gumbel(key: Array, shape: tuple[int, ...]) -> Array:
    """Standard Gumbel noise of `shape` ([batch, ...])."""
    if per_row(key):
        return jax.vmap(lambda k: jax.random.gumbel(k, shape[1:]))(key)
    return jax.random.gumbel(key, shape)


def categorical(key: Array, logits: Array) -> Array:
    """One draw per distribution: logits [batch, ..., vocab] -> [batch, ...] int32."""
    if per_row(key):
        return jax.vmap(lambda k, row: jax.random.categorical(k, row, axis=-1))(key, logits).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
