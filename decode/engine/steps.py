"""The pieces of a decoding round, as pure functions: one home for each.

The engine's while loop (decode/engine/loop.py) and the drafters (drafters.py) call
these; decode.bench's CPU cost model (decode/bench/cost.py) times them and
`decode.bench --compile-only` (decode/bench/compile_only/) compiles them for a TPU
topology, so a prediction is about the program the engine runs (layers scanned, as
the engine runs them).

Every function is `fn(model, params, cache, ...) -> (..., cache)`: `model` is a
fastvlm_jax.nn.model.VLM (static), `params` its plain pytree, `cache` the full model's
stacked KVCache ([num_layers, batch, kv_heads, slots, head_dim]) whose `pos` [batch] is
each row's committed length. No function advances `cache.pos`: the loop does, once the
round is accepted. n is the number of tokens a pass scores.

  ar_step        one token through layers [0, L) + head            (AR decoding)
  shallow_pass   n tokens through layers [0, k)                    (the draft path's first half)
  draft_step     one token through [0, k) + imitation network + head
  verify         n states through layers [start, L) + head         (chain or tree)
  verify_tokens  n tokens through layers [0, L) + head             (drafters with their own path)
  tree_step      a drafting step of n tree nodes: [0, k) + imitation network + head, tree mask
  move_path      a tree's accepted path to contiguous cache slots

Each runs under a jax.named_scope of its name, so a compiled program's ops say which
piece (and, through the flax module path, which layer part) they come from
(`decode.bench --compile-only --explain`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fastvlm_jax.nn.kv_cache import KVCache, TreeSlots
from fastvlm_jax.nn.model import VLM

Array = jax.Array


def ar_step(model: VLM, params, cache: KVCache, token: Array) -> tuple[Array, KVCache]:
    """token [batch] at each row's cache.pos -> (logits [batch, vocab], cache)."""
    with jax.named_scope("ar_step"):
        positions = cache.pos[:, None]
        hidden = model.embed(params, token[:, None], None, positions)
        hidden, cache, _ = model.run_layers(params, hidden, positions, 0, model.config.text.num_layers, cache)
        return model.logits(params, hidden)[:, 0], cache


def shallow_pass(
    model: VLM, params, cache: KVCache, tokens: Array, positions: Array, tree: TreeSlots | None = None
) -> tuple[Array, KVCache]:
    """tokens, positions [batch, n] -> (exit-layer states [batch, n, embed], cache):
    embedding and layers [0, exit_layer), writing those layers' cache slots (at the
    positions, or at tree.slots for a token tree's nodes)."""
    with jax.named_scope("shallow_pass"):
        hidden = model.embed(params, tokens, None, positions)
        hidden, cache, _ = model.run_layers(
            params, hidden, positions, 0, model.config.draft.exit_layer, cache, tree=tree
        )
        return hidden, cache


def draft_step(
    model: VLM, params, cache: KVCache, draft_cache: KVCache | None, token: Array, position: Array
) -> tuple[Array, Array, KVCache, KVCache | None]:
    """One token of the draft path: token, position [batch] -> (draft logits [batch, vocab],
    exit-layer state [batch, embed] (what verification starts from), cache, draft_cache).
    draft_cache: the imitation network's own one-layer cache, or None (an FFN imitation)."""
    with jax.named_scope("draft_step"):
        positions = position[:, None]
        hidden, cache = shallow_pass(model, params, cache, token[:, None], positions)
        drafted, draft_cache = model.imitate(params, hidden, positions, draft_cache)
        return model.logits(params, drafted)[:, 0], hidden[:, 0], cache, draft_cache


def verify(
    model: VLM, params, cache: KVCache, states: Array, positions: Array, start: int, tree: TreeSlots | None = None
) -> tuple[Array, Array, KVCache]:
    """states [batch, n, embed] (state `start`), positions [batch, n] -> (logits [batch, n,
    vocab], last-layer states [batch, n, embed], cache): layers [start, L) + head. The
    imitation drafter starts at its exit layer (the shallow layers are not run again)."""
    with jax.named_scope("verify"):
        hidden, cache, _ = model.run_layers(
            params, states, positions, start, model.config.text.num_layers, cache, tree=tree
        )
        return model.logits(params, hidden), hidden, cache


def verify_tokens(model: VLM, params, cache: KVCache, tokens: Array, positions: Array) -> tuple[Array, Array, KVCache]:
    """verify from the tokens' embeddings: tokens, positions [batch, n] -> (logits [batch, n,
    vocab], last-layer states, cache): layers [0, L) + head."""
    return verify(model, params, cache, model.embed(params, tokens, None, positions), positions, 0)


def tree_step(
    model: VLM, params, cache: KVCache, draft_cache: KVCache | None, tokens: Array, positions: Array, tree: TreeSlots
) -> tuple[Array, Array, KVCache, KVCache | None]:
    """One drafting step of a token tree: the nodes' tokens, positions [batch, n] (each at
    its depth past the row's pos), written at tree.slots and seeing their ancestors ->
    (draft logits [batch, n, vocab], exit-layer states [batch, n, embed], cache, draft_cache)."""
    with jax.named_scope("tree_step"):
        hidden, cache = shallow_pass(model, params, cache, tokens, positions, tree)
        drafted, draft_cache = model.imitate(params, hidden, positions, draft_cache, tree=tree)
        return model.logits(params, drafted), hidden, cache, draft_cache


def move_path(cache: KVCache, draft_cache: KVCache | None, pos: Array, path: Array) -> tuple[KVCache, KVCache | None]:
    """A tree's accepted path [batch, depth + 1] of table indices (root first): its entries
    at slots pos + path move to slots pos + 0..depth, in every layer of the decoder's cache
    and in the imitation network's own (pos [batch])."""
    sources = pos[:, None] + path
    targets = pos[:, None] + jnp.arange(path.shape[1])[None]
    cache = cache.move_slots(sources, targets)
    if draft_cache is not None:
        draft_cache = draft_cache.move_slots(sources, targets)
    return cache, draft_cache
