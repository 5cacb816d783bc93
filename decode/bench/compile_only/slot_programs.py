"""Continuous batching's programs for `--compile-only ... --batching continuous`: the three
programs decode/engine/slots.py runs, over `batch` slots, compiled for a TPU slice.

- slot_prefill: P waiting prompts through the full model (vision tower, every layer, the
  drafter's prefill) into P fresh rows of loop state, each row's cache sized as a slot's;
- slot_insert: those P rows written into the B slots' stacked caches and loop state in place
  (the slot state donated);
- slot_rounds: draft/verify rounds over the B slots in one while loop (the slot state donated).

Their memory (peak per chip, fits) is what these add to static batching's programs: the
slot state lives across calls and a prefill's rows exist beside it while they are inserted.
Their FLOPs and bytes are the compiler's static cost with every loop body counted once
(`cost_counting: static_loop_bodies_once`), so no time is predicted from them here; the
round inside slot_rounds is the one whose pieces the point already times.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from decode.bench.compile_only.programs import KV_CACHE_AXES, Point, Program, _sds
from decode.engine.drafters import RoundContext
from decode.engine.loop import _prefill
from decode.engine.slots import empty_slots, insert, run_rounds
from fastvlm_jax.nn.kv_cache import KVCache
from fastvlm_jax.runtime import sharding


def _rows_sharded(abstract, batch: int, mesh):
    """ShapeDtypeStructs of a loop or slot state with shardings: a KV cache's keys and values
    by KV_CACHE_AXES, every other leaf whose leading axis is the `batch` rows over the batch
    axis, the rest (per-position counters, scalars) replicated."""

    def place(node):
        if isinstance(node, KVCache):
            return node.replace(
                keys=_sds(node.keys.shape, node.keys.dtype, mesh, KV_CACHE_AXES),
                values=_sds(node.values.shape, node.values.dtype, mesh, KV_CACHE_AXES),
                pos=_sds(node.pos.shape, node.pos.dtype, mesh, ("batch",)),
                rope_offset=_sds(node.rope_offset.shape, node.rope_offset.dtype, mesh, ("batch",)),
            )
        rows = node.ndim >= 1 and node.shape[0] == batch
        axes = ("batch",) + (None,) * (node.ndim - 1) if rows else (None,) * node.ndim
        return _sds(node.shape, node.dtype, mesh, axes)

    return jax.tree.map(place, abstract, is_leaf=lambda node: isinstance(node, KVCache))


def slot_programs(point: Point, prefill_rows: int) -> dict[str, Program]:
    """{name: Program} of continuous batching over point.batch slots with the imitation
    drafter's SSD spec (point.ssd_spec), prefill_rows (P) prompts prefilled together."""
    model, spec, mesh, batch = point.model, point.ssd_spec, point.mesh, point.batch
    rows = int(prefill_rows)
    prompts = point.prompts(rows)
    key_shape = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))
    keys = jax.ShapeDtypeStruct(
        key_shape.shape, key_shape.dtype, sharding=sharding.logical_to_sharding(("batch",), (rows,), mesh)
    )
    budgets = _sds((rows,), jnp.int32, mesh, ("batch",))
    cache_slots = spec.cache_slots(point.prompt_len)

    def prefill(params, prompts, keys, budgets):
        ctx = RoundContext(model, params, None, spec.draft_depth)
        return _prefill(ctx, prompts, spec, keys, jnp.minimum(budgets, spec.capacity), cache_slots)

    new_rows = _rows_sharded(jax.eval_shape(prefill, point.params, prompts, keys, budgets), rows, mesh)
    slots = _rows_sharded(jax.eval_shape(lambda first: empty_slots(first, batch), new_rows), batch, mesh)
    targets = _sds((rows,), jnp.int32, mesh, ("batch",))

    def rounds(params, slots, max_rounds, wanted):
        ctx = RoundContext(model, params, None, spec.draft_depth)
        return run_rounds(ctx, spec, slots, max_rounds, wanted)

    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.logical_to_sharding((), (), mesh))
    programs: dict[str, Any] = {
        "slot_prefill": Program(prefill, (), (point.params, prompts, keys, budgets), None),
        "slot_insert": Program(insert, (0,), (slots, new_rows, targets, targets, budgets), None),
        "slot_rounds": Program(rounds, (1,), (point.params, slots, scalar, scalar), None),
    }
    return programs
