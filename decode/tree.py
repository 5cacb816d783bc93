"""Token trees for SSD rounds, in fixed shapes (an EAGLE-2-style dynamic tree).

A round's tree, per batch row, is a table of `TreeShape.size` nodes. Node 0 is the root:
the round's first token, already generated but not yet in the cache. The draft adds
`width` nodes per step for `steps` steps, each time the `width` open candidates with
the highest cumulative draft log-probability anywhere in the tree (best-first), and each
node added proposes its own top-`width` children as new candidates. So the node budget is
static while the shape follows the draft's confidence: a confident draft grows deep
chains, an unsure one bushy levels. A parent always precedes its children in the table
(a candidate exists only once its parent is in the tree).

Cache layout: node i of a row at position `pos` (the row's committed length) is written
at cache slot pos + i and rotated as position pos + depth(i); a node sees the committed
context and its own ancestors (`fastvlm_jax.kv_cache.TreeSlots`). After verification the
accepted root path is moved to the contiguous slots pos, pos + 1, ... (`KVCache.move_slots`).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from fastvlm_jax.kv_cache import TreeSlots

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TreeShape:
    """The static size of a round's draft tree.

    nodes: drafted nodes per round and row, the root excluded (0 = chain drafting, see
      DraftPolicy); verification scores nodes + 1 positions.
    width: nodes added per drafting step, and children each node proposes. Width 1 is a
      chain of `nodes` tokens.
    """

    nodes: int = 0
    width: int = 2

    def __post_init__(self):
        if self.nodes < 0 or self.width < 1:
            raise ValueError(f"tree nodes must be >= 0 and width >= 1, got {self.nodes} and {self.width}")
        if self.nodes % self.width:
            raise ValueError(f"tree nodes ({self.nodes}) must be a multiple of the tree width ({self.width}): "
                             "each drafting step adds `width` nodes")

    @property
    def enabled(self) -> bool:
        return self.nodes > 0

    @property
    def size(self) -> int:
        """Nodes in the table, the root included."""
        return self.nodes + 1

    @property
    def steps(self) -> int:
        """Drafting steps after the root; also the deepest possible node's depth."""
        return self.nodes // self.width


@flax.struct.dataclass
class Tree:
    """One round's node table, per row: node 0 is the root; parents precede children.

    tokens: [batch, size] int32; parents: [batch, size] int32 (the root's is 0);
    depths: [batch, size] int32 (root 0); scores: [batch, size] float32 cumulative draft
    log-probability of the path to the node (root 0); ancestors: [batch, size, size] bool,
    ancestors[b, i, j] = node j lies on the path root..i (i itself included); states:
    [batch, size, embed] exit-layer states (filled when a node goes through the shallow layers).
    """

    tokens: Array
    parents: Array
    depths: Array
    scores: Array
    ancestors: Array
    states: Array

    @classmethod
    def root(cls, tokens: Array, size: int, embed: int, dtype) -> "Tree":
        """A table holding only the root, tokens [batch]."""
        batch = tokens.shape[0]
        zeros = jnp.zeros((batch, size), jnp.int32)
        ancestors = jnp.zeros((batch, size, size), bool).at[:, 0, 0].set(True)
        return cls(tokens=zeros.at[:, 0].set(tokens), parents=zeros, depths=zeros,
                   scores=jnp.zeros((batch, size), jnp.float32), ancestors=ancestors,
                   states=jnp.zeros((batch, size, embed), dtype))

    def add(self, ids: Array, tokens: Array, parents: Array, scores: Array) -> "Tree":
        """Writes new nodes at table indices ids [batch, n] (tokens, parents, scores: [batch, n])."""
        rows = jnp.arange(ids.shape[0])[:, None]
        parent_ancestors = jnp.take_along_axis(self.ancestors, parents[:, :, None], axis=1)  # [batch, n, size]
        own = jax.nn.one_hot(ids, self.ancestors.shape[-1], dtype=bool)
        return self.replace(
            tokens=self.tokens.at[rows, ids].set(tokens),
            parents=self.parents.at[rows, ids].set(parents),
            depths=self.depths.at[rows, ids].set(jnp.take_along_axis(self.depths, parents, axis=1) + 1),
            scores=self.scores.at[rows, ids].set(scores),
            ancestors=self.ancestors.at[rows, ids].set(parent_ancestors | own))


@flax.struct.dataclass
class Candidates:
    """Children proposed by the nodes in the tree, `width` per node: node i's j-th child
    is entry i * width + j. tokens: [batch, size * width] int32; scores: [batch, size * width]
    float32 (the cumulative log-probability the child would have); open: [batch, size * width]
    bool, proposed and not yet taken into the tree."""

    tokens: Array
    scores: Array
    open: Array

    @classmethod
    def empty(cls, batch: int, size: int, width: int) -> "Candidates":
        shape = (batch, size * width)
        return cls(tokens=jnp.zeros(shape, jnp.int32), scores=jnp.full(shape, -jnp.inf, jnp.float32),
                   open=jnp.zeros(shape, bool))


def propose_children(candidates: Candidates, tree: Tree, ids: Array, logits: Array) -> Candidates:
    """Each node ids [batch, n] proposes its top-`width` draft tokens (logits [batch, n, vocab])."""
    width = candidates.tokens.shape[1] // tree.tokens.shape[1]
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_logprobs, top_tokens = jax.lax.top_k(logprobs, width)  # [batch, n, width]
    scores = jnp.take_along_axis(tree.scores, ids, axis=1)[:, :, None] + top_logprobs
    entries = (ids[:, :, None] * width + jnp.arange(width)).reshape(ids.shape[0], -1)
    rows = jnp.arange(ids.shape[0])[:, None]
    return candidates.replace(
        tokens=candidates.tokens.at[rows, entries].set(top_tokens.reshape(entries.shape).astype(jnp.int32)),
        scores=candidates.scores.at[rows, entries].set(scores.reshape(entries.shape)),
        open=candidates.open.at[rows, entries].set(True))


def grow(tree: Tree, candidates: Candidates, ids: Array) -> tuple[Tree, Candidates]:
    """Takes the len(ids) best open candidates into the tree at table indices ids [batch, n]."""
    width = candidates.tokens.shape[1] // tree.tokens.shape[1]
    ranked = jnp.where(candidates.open, candidates.scores, -jnp.inf)
    scores, entries = jax.lax.top_k(ranked, ids.shape[1])  # [batch, n]
    tokens = jnp.take_along_axis(candidates.tokens, entries, axis=1)
    rows = jnp.arange(ids.shape[0])[:, None]
    tree = tree.add(ids, tokens, entries // width, scores)
    return tree, candidates.replace(open=candidates.open.at[rows, entries].set(False))


def tree_slots(pos: Array, ids: Array, ancestors: Array, cache_slots: int) -> TreeSlots:
    """Cache layout of the nodes ids [batch, n] (ancestors: their rows [batch, n, size] of
    Tree.ancestors) for a row at committed length pos [batch]: node i goes to slot pos + i
    and sees the slots before pos and those of its ancestors."""
    size = ancestors.shape[-1]
    offset = jnp.arange(cache_slots)[None, None, :] - pos[:, None, None]  # [batch, 1, slots]
    index = jnp.broadcast_to(jnp.clip(offset, 0, size - 1), ancestors.shape[:2] + (cache_slots,))
    ancestor_slot = jnp.take_along_axis(ancestors, index, axis=2) & (offset < size)
    return TreeSlots(slots=pos[:, None] + ids, visible=(offset < 0) | ancestor_slot)


def accept_greedy_tree(tree: Tree, target_tokens: Array) -> Array:
    """The deepest node whose whole root path the full model agrees with.

    target_tokens: [batch, size] the full model's argmax after each node. A node agrees
    when its token is the argmax after its parent. Top-k siblings are distinct tokens, so
    at most one child of a node agrees and the agreeing nodes form one path.
    Returns the path's last node [batch] int32 (its depth is the accepted length).
    """
    after_parent = jnp.take_along_axis(target_tokens, tree.parents, axis=1)
    agrees = (tree.tokens == after_parent) | (jnp.arange(tree.tokens.shape[1]) == 0)[None]
    on_path = ~jnp.any(tree.ancestors & ~agrees[:, None, :], axis=2)  # [batch, size]
    return jnp.argmax(jnp.where(on_path, tree.depths, -1), axis=1).astype(jnp.int32)


def root_path(tree: Tree, node: Array, max_depth: int) -> Array:
    """Table indices of the nodes on the path root..node [batch], by depth: [batch, max_depth + 1].

    Entries past the node's depth are 0 (the root): those slots are never committed."""
    on_path = jnp.take_along_axis(tree.ancestors, node[:, None, None], axis=1)[:, 0]  # [batch, size]
    at_depth = tree.depths[:, None, :] == jnp.arange(max_depth + 1)[None, :, None]
    return jnp.argmax(on_path[:, None, :] & at_depth, axis=2).astype(jnp.int32)
