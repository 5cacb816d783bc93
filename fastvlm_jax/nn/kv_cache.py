"""The KV cache: an explicit pytree passed into and returned from every decoder call."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class KVCache:
    """Keys and values of a stack of attention layers, with a position per batch row.

    keys/values: [num_layers, batch, kv_heads, slots, head_dim], one array each for
      the whole stack (absolute layer index first). A layer writes its new entries into
      its own slice in place, so the draft path and verification touch only their own
      layers and no call copies the layers it does not run.
    pos: [batch] int32, the number of committed tokens of each row. Slots at or past
      `pos` may hold stale entries (prompt padding, rejected drafts); attention masks by
      query position, so they are never read before being overwritten.
    rope_offset: [batch] int32, what RoPE adds to a committed or new token's position past
      the prompt (multimodal RoPE: an image of h x w tokens spans max(h, w) positions, so
      every later position shifts by max(h, w) - h * w). Zero for every other family; set by
      the prefill that writes the prompt.
    """

    keys: Array
    values: Array
    pos: Array
    rope_offset: Array

    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime (dataclasses.replace)

        def replace(self, **changes: Any) -> KVCache: ...

    @classmethod
    def zeros(cls, num_layers: int, batch: int, slots: int, kv_heads: int, head_dim: int, dtype=jnp.float32) -> KVCache:
        shape = (num_layers, batch, kv_heads, slots, head_dim)
        return cls(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            pos=jnp.zeros((batch,), jnp.int32),
            rope_offset=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def slots(self) -> int:
        """Cache slots per row (prompt + new tokens + a round's lookahead)."""
        return self.keys.shape[3]

    def write(self, layer: Array | int, keys: Array, values: Array, positions: Array) -> KVCache:
        """Scatters one layer's new entries at per-row positions.

        layer: scalar layer index (may be traced); keys/values: [batch, seq, kv_heads,
        head_dim]; positions: [batch, seq]. Positions past the last slot are dropped (the
        engine sizes the cache so that only masked, never-accepted slots can fall there).
        """
        batch, kv_heads = self.keys.shape[1], self.keys.shape[2]
        rows = jnp.arange(batch)[:, None, None]
        heads = jnp.arange(kv_heads)[None, :, None]
        index = (layer, rows, heads, positions[:, None, :])

        def scatter(buffer, new):  # new: [batch, seq, kv_heads, head_dim] -> [batch, kv_heads, seq, head_dim]
            return buffer.at[index].set(jnp.swapaxes(new, 1, 2).astype(buffer.dtype), mode="drop")

        return self.replace(keys=scatter(self.keys, keys), values=scatter(self.values, values))

    def layer(self, layer: Array | int) -> tuple[Array, Array]:
        """Keys and values of one layer: ([batch, kv_heads, slots, head_dim],) * 2."""
        return (
            jax.lax.dynamic_index_in_dim(self.keys, layer, 0, keepdims=False),
            jax.lax.dynamic_index_in_dim(self.values, layer, 0, keepdims=False),
        )

    def move_slots(self, sources: Array, targets: Array) -> KVCache:
        """Copies the entries at slots sources [batch, n] to slots targets [batch, n] of the
        same row, in every layer: one gather and one scatter over the whole stack (a token
        tree's accepted path, moved to contiguous slots). All sources are read before any
        target is written. Targets past the last slot are dropped."""
        num_layers, batch, kv_heads = self.keys.shape[:3]
        layers = jnp.arange(num_layers)[:, None, None, None]
        rows = jnp.arange(batch)[None, :, None, None]
        heads = jnp.arange(kv_heads)[None, None, :, None]

        def move(buffer):  # [layers, batch, kv_heads, slots, head_dim]
            picked = buffer[layers, rows, heads, sources[None, :, None, :]]  # [layers, batch, kv_heads, n, head_dim]
            return buffer.at[layers, rows, heads, targets[None, :, None, :]].set(picked, mode="drop")

        return self.replace(keys=move(self.keys), values=move(self.values))

    def advance(self, counts: Array) -> KVCache:
        """Commits `counts` [batch] more tokens per row."""
        return self.replace(pos=self.pos + counts.astype(jnp.int32))

    def nbytes(self) -> int:
        return self.keys.size * self.keys.dtype.itemsize + self.values.size * self.values.dtype.itemsize


@flax.struct.dataclass
class TreeSlots:
    """Cache layout of a pass whose queries form a token tree rather than one causal chain.

    In a chain, a token's cache slot equals its position and it sees every slot before it.
    In a tree, siblings share a position (their depth) but each needs a slot of its own, and
    a node may see only its own ancestors among the tree's slots.

    slots: [batch, seq] int32, the cache slot each new entry is written at (the `positions`
      of the call then only rotate / embed: RoPE or learned position rows).
    visible: [batch, seq, cache slots] bool, the slots each query attends to: the committed
      context, its ancestors in the tree and itself.
    """

    slots: Array
    visible: Array
