"""Token trees for SSD rounds, in fixed shapes (an EAGLE-2-style dynamic tree).

A round's tree, per batch row, is a table of `TreeShape.size` nodes. Node 0 is the root:
the round's first token, already generated but not yet in the cache. The draft adds
`width` nodes per step for `steps` steps, each time the `width` open candidates of
highest priority anywhere in the tree (best-first), and each node added proposes `width`
children of its own as new candidates. So the node budget is static while the shape
follows the draft's confidence: a confident draft grows deep chains, an unsure one bushy
levels. A parent always precedes its children in the table (a candidate exists only once
its parent is in the tree).

Greedy: a node's children are its top-`width` draft tokens and a candidate's priority is
the cumulative draft log-probability of its path (EAGLE-2). Sampling: the children are
`width` draws *without replacement* from the warped draft distribution q (Gumbel top-k,
which yields them in draw order), and the j-th child's priority is its parent's path
log-probability plus log(1 - q(children 0..j-1)): it never looks at the child's own
token. That keeps the tree's shape a stopping rule over the draws, so the recursive
rejection rule (`accept_speculative_tree`) stays exact: whether the j-th sibling exists
depends only on what was drawn before it, and a sibling never ranks above an earlier one.

Cache layout: node i of a row at position `pos` (the row's committed length) is written
at cache slot pos + i and rotated as position pos + depth(i); a node sees the committed
context and its own ancestors (`fastvlm_jax.nn.kv_cache.TreeSlots`). After verification the
accepted root path is moved to the contiguous slots pos, pos + 1, ... (`KVCache.move_slots`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp

from decode.engine import keys
from decode.engine.sampling import sample
from fastvlm_jax.nn.kv_cache import TreeSlots

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
            raise ValueError(
                f"tree nodes ({self.nodes}) must be a multiple of the tree width ({self.width}): "
                "each drafting step adds `width` nodes"
            )

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


def check_width(shape: TreeShape, vocab_size: int) -> None:
    """Raises ValueError (one line) for a tree wider than the vocabulary: each node proposes
    `width` distinct tokens (lax.top_k over the vocabulary would fail at trace)."""
    if shape.enabled and shape.width > vocab_size:
        raise ValueError(
            f"a draft tree of width {shape.width} proposes {shape.width} distinct tokens per node, "
            f"but the model's vocabulary has {vocab_size} tokens: use a tree width <= {vocab_size}"
        )


@flax.struct.dataclass
class Tree:
    """One round's node table, per row: node 0 is the root; parents precede children.

    tokens: [batch, size] int32; parents: [batch, size] int32 (the root's is 0);
    depths: [batch, size] int32 (root 0); ranks: [batch, size] int32, the node's place among
    its parent's children (draw order); valid: [batch, size] bool (a step may find fewer
    open candidates than it has nodes, e.g. under top-k / top-p: the rest are invalid and
    never accepted); scores: [batch, size] float32 cumulative draft log-probability of the
    path to the node (root 0, invalid -inf); ancestors: [batch, size, size] bool,
    ancestors[b, i, j] = node j lies on the path root..i (i itself included); states:
    [batch, size, embed] exit-layer states (filled when a node goes through the shallow layers).
    """

    tokens: Array
    parents: Array
    depths: Array
    ranks: Array
    valid: Array
    scores: Array
    ancestors: Array
    states: Array

    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime (dataclasses.replace)

        def replace(self, **changes: Any) -> Tree: ...

    @classmethod
    def root(cls, tokens: Array, size: int, embed: int, dtype) -> Tree:
        """A table holding only the root, tokens [batch]."""
        batch = tokens.shape[0]
        zeros = jnp.zeros((batch, size), jnp.int32)
        ancestors = jnp.zeros((batch, size, size), bool).at[:, 0, 0].set(True)
        return cls(
            tokens=zeros.at[:, 0].set(tokens),
            parents=zeros,
            depths=zeros,
            ranks=zeros,
            valid=jnp.zeros((batch, size), bool).at[:, 0].set(True),
            scores=jnp.zeros((batch, size), jnp.float32),
            ancestors=ancestors,
            states=jnp.zeros((batch, size, embed), dtype),
        )

    def add(
        self,
        ids: Array,
        tokens: Array,
        parents: Array,
        scores: Array,
        ranks: Array | None = None,
        valid: Array | None = None,
    ) -> Tree:
        """Writes new nodes at table indices ids [batch, n] (the rest: [batch, n] each)."""
        rows = jnp.arange(ids.shape[0])[:, None]
        ranks = jnp.zeros_like(ids) if ranks is None else ranks
        valid = jnp.ones(ids.shape, bool) if valid is None else valid
        parent_ancestors = jnp.take_along_axis(self.ancestors, parents[:, :, None], axis=1)  # [batch, n, size]
        own = jax.nn.one_hot(ids, self.ancestors.shape[-1], dtype=bool)
        return self.replace(
            tokens=self.tokens.at[rows, ids].set(tokens),
            parents=self.parents.at[rows, ids].set(parents),
            depths=self.depths.at[rows, ids].set(jnp.take_along_axis(self.depths, parents, axis=1) + 1),
            ranks=self.ranks.at[rows, ids].set(ranks),
            valid=self.valid.at[rows, ids].set(valid),
            scores=self.scores.at[rows, ids].set(jnp.where(valid, scores, -jnp.inf)),
            ancestors=self.ancestors.at[rows, ids].set(parent_ancestors | own),
        )

    def children(self, width: int) -> Array:
        """children[b, i, j]: the table index of node i's j-th child (draw order), -1 if none:
        [batch, size, width]."""
        batch, size = self.tokens.shape
        index = jnp.arange(size)[None]
        is_child = self.valid & (index > 0)
        rows = jnp.arange(batch)[:, None]
        table = jnp.full((batch, size, width), -1, jnp.int32)
        # Invalid nodes go to an out-of-range parent and are dropped.
        return table.at[rows, jnp.where(is_child, self.parents, size), self.ranks].set(
            jnp.broadcast_to(index, (batch, size)).astype(jnp.int32), mode="drop"
        )


@flax.struct.dataclass
class Candidates:
    """Children proposed by the nodes in the tree, `width` per node: node i's j-th child
    is entry i * width + j. All [batch, size * width]: tokens int32; priorities float32
    (the rank for best-first growth, see the module docstring); scores float32 (the path
    log-probability the child would have in the tree); open bool (proposed, not yet taken)."""

    tokens: Array
    priorities: Array
    scores: Array
    open: Array

    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime (dataclasses.replace)

        def replace(self, **changes: Any) -> Candidates: ...

    @classmethod
    def empty(cls, batch: int, size: int, width: int) -> Candidates:
        shape = (batch, size * width)
        minus_inf = jnp.full(shape, -jnp.inf, jnp.float32)
        return cls(
            tokens=jnp.zeros(shape, jnp.int32), priorities=minus_inf, scores=minus_inf, open=jnp.zeros(shape, bool)
        )


def propose_children(
    candidates: Candidates, tree: Tree, ids: Array, logprobs: Array, rng: Array | None = None
) -> Candidates:
    """Each node ids [batch, n] proposes `width` children from its draft log-probabilities
    logprobs [batch, n, vocab]: the top `width` (rng None, greedy), or `width` draws without
    replacement (Gumbel top-k with rng), in draw order. Tokens of probability 0 are never
    proposed (a distribution with fewer than `width` such tokens proposes fewer)."""
    batch, n = ids.shape
    width = candidates.tokens.shape[1] // tree.tokens.shape[1]
    logprobs = logprobs.astype(jnp.float32)
    if rng is None:
        _, tokens = jax.lax.top_k(logprobs, width)  # [batch, n, width]
    else:
        _, tokens = jax.lax.top_k(logprobs + keys.gumbel(rng, logprobs.shape), width)
    child_logprobs = jnp.take_along_axis(logprobs, tokens, axis=-1)
    parent = jnp.take_along_axis(tree.scores, ids, axis=1)[:, :, None]
    scores = parent + child_logprobs
    if rng is None:
        priorities = scores
    else:
        # The mass left after the earlier siblings: known before this child is drawn.
        earlier = jnp.cumsum(jnp.exp(child_logprobs), axis=-1) - jnp.exp(child_logprobs)
        priorities = parent + jnp.log(jnp.maximum(1.0 - earlier, 0.0))
    parent_valid = jnp.take_along_axis(tree.valid, ids, axis=1)[:, :, None]
    is_open = parent_valid & jnp.isfinite(child_logprobs) & jnp.isfinite(priorities)
    entries = (ids[:, :, None] * width + jnp.arange(width)).reshape(batch, -1)
    rows = jnp.arange(batch)[:, None]

    def put(table, values):
        return table.at[rows, entries].set(values.reshape(entries.shape).astype(table.dtype))

    return candidates.replace(
        tokens=put(candidates.tokens, tokens),
        priorities=put(candidates.priorities, priorities),
        scores=put(candidates.scores, scores),
        open=put(candidates.open, is_open),
    )


def grow(tree: Tree, candidates: Candidates, ids: Array) -> tuple[Tree, Candidates]:
    """Takes the len(ids) open candidates of highest priority into the tree at table
    indices ids [batch, n]; where fewer are open, the rest of ids become invalid nodes.
    (lax.top_k breaks ties by the lower entry, so an earlier sibling goes first.)"""
    width = candidates.tokens.shape[1] // tree.tokens.shape[1]
    ranked = jnp.where(candidates.open, candidates.priorities, -jnp.inf)
    best, entries = jax.lax.top_k(ranked, ids.shape[1])  # [batch, n]
    taken = jnp.isfinite(best)
    tokens = jnp.take_along_axis(candidates.tokens, entries, axis=1)
    scores = jnp.take_along_axis(candidates.scores, entries, axis=1)
    rows = jnp.arange(ids.shape[0])[:, None]
    tree = tree.add(ids, tokens, entries // width, scores, ranks=entries % width, valid=taken)
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
    agrees = ((tree.tokens == after_parent) & tree.valid) | (jnp.arange(tree.tokens.shape[1]) == 0)[None]
    on_path = ~jnp.any(tree.ancestors & ~agrees[:, None, :], axis=2)  # [batch, size]
    return jnp.argmax(jnp.where(on_path, tree.depths, -1), axis=1).astype(jnp.int32)


def root_path(tree: Tree, node: Array, max_depth: int) -> Array:
    """Table indices of the nodes on the path root..node [batch], by depth: [batch, max_depth + 1].

    Entries past the node's depth are 0 (the root): those slots are never committed."""
    on_path = jnp.take_along_axis(tree.ancestors, node[:, None, None], axis=1)[:, 0]  # [batch, size]
    at_depth = tree.depths[:, None, :] == jnp.arange(max_depth + 1)[None, :, None]
    return jnp.argmax(on_path[:, None, :] & at_depth, axis=2).astype(jnp.int32)


def reject_sibling(residual: Array, draft: Array, token: Array) -> tuple[Array, Array]:
    """After a sibling `token` [batch] is rejected: the target becomes the residual
    norm(max(0, residual - draft)), and the next sibling's draft distribution is `draft`
    without `token` (it was drawn without replacement). residual, draft: [batch, vocab]."""
    rows = jnp.arange(token.shape[0])
    left = jnp.maximum(residual - draft, 0.0)
    mass = jnp.sum(left, axis=-1, keepdims=True)
    # A zero residual means the rejection had probability 0: keep the target as it was.
    residual = jnp.where(mass > 0, left / jnp.maximum(mass, 1e-30), residual)
    draft = draft.at[rows, token].set(0.0)
    draft_mass = jnp.sum(draft, axis=-1, keepdims=True)
    return residual, draft / jnp.maximum(draft_mass, 1e-30)


def accept_speculative_tree(
    rng: Array, tree: Tree, target_probs: Array, draft_probs: Array, width: int, max_depth: int
) -> tuple[Array, Array]:
    """Multi-draft speculative sampling down a tree: recursive rejection over siblings
    drawn without replacement (SpecInfer's multi-step speculative sampling; the
    without-replacement form of Jeon et al. 2024, "Recursive Speculative Decoding").

    From the root: at node v the target is p_v; its children x_0, x_1, ... are tried in
    draw order, x_j accepted with probability min(1, r_j(x_j) / q_j(x_j)) where r_0 = p_v,
    q_0 = q_v, and after a rejection r_{j+1} = norm(max(0, r_j - q_j)) and q_{j+1} = q_j
    without x_j. An accepted child becomes v; when no child is accepted (or v has none),
    the round's own token is drawn from the last r. The emitted tokens are then distributed
    exactly as the full model's warped distribution.

    target_probs / draft_probs: [batch, size, vocab] (warped) full-model / draft
    distributions after each node (draft rows of leaves are not read).
    Returns (the last accepted node [batch], the round's own next token [batch]).
    """
    batch = tree.tokens.shape[0]
    rows = jnp.arange(batch)
    children = tree.children(width)

    def level(depth, carry):
        node, walking, token = carry
        uniform_rng, sample_rng = keys.split(keys.fold_in(rng, depth))
        uniforms = keys.uniform(uniform_rng, (batch, width))
        residual, draft = target_probs[rows, node], draft_probs[rows, node]
        chosen = jnp.full((batch,), -1, jnp.int32)
        for j in range(width):  # static and small: siblings in draw order
            child = children[rows, node, j]
            tried = walking & (child >= 0) & (chosen < 0)
            x = tree.tokens[rows, jnp.maximum(child, 0)]
            accept = tried & (uniforms[:, j] * draft[rows, x] < residual[rows, x])
            chosen = jnp.where(accept, child, chosen)
            next_residual, next_draft = reject_sibling(residual, draft, x)
            rejected = (tried & ~accept)[:, None]
            residual = jnp.where(rejected, next_residual, residual)
            draft = jnp.where(rejected, next_draft, draft)
        stops = walking & (chosen < 0)
        token = jnp.where(stops, sample(sample_rng, residual), token)
        return jnp.where(walking & ~stops, chosen, node), walking & ~stops, token

    start = (jnp.zeros((batch,), jnp.int32), jnp.ones((batch,), bool), jnp.zeros((batch,), jnp.int32))
    node, _, token = jax.lax.fori_loop(0, max_depth + 1, level, start)
    return node, token
