"""The KV cache: an explicit pytree passed into and returned from every decoder call."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class KVCache:
    """Keys and values for a stack of attention layers, with a position per batch row.

    keys/values: one [batch, kv_heads, capacity, head_dim] array per layer (absolute
      layer index), so the draft path and verification touch only their own layers.
    pos: [batch] int32, the number of committed tokens of each row. Slots at or past
      `pos` may hold stale entries (prompt padding, rejected drafts); attention masks by
      query position, so they are never read before being overwritten.
    """

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    pos: Array

    @classmethod
    def zeros(cls, num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
              dtype=jnp.float32) -> "KVCache":
        shape = (batch, kv_heads, capacity, head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            pos=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    def layer(self, index: int) -> tuple[Array, Array]:
        return self.keys[index], self.values[index]

    def with_layer(self, index: int, kv: tuple[Array, Array]) -> "KVCache":
        keys, values = list(self.keys), list(self.values)
        keys[index], values[index] = kv
        return self.replace(keys=tuple(keys), values=tuple(values))

    def advance(self, counts: Array) -> "KVCache":
        """Commits `counts` [batch] more tokens per row."""
        return self.replace(pos=self.pos + counts.astype(jnp.int32))

    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in self.keys + self.values)
