"""The decoding engine: plain autoregressive (AR) and self-speculative (SSD) generation.

The model passes of a round are the named pure functions of decode/engine/steps.py (the
same ones decode.bench's cost model times and --compile-only compiles); this module owns
the loop, the sampling of drafts, acceptance and the stats around them.

Each mode is one jitted program, prefill to last token, built around a
`lax.while_loop`; nothing returns to the host per token or per round. Shapes are
fixed by (batch, prompt bucket, new-token capacity, draft_len), while the actual
`max_new_tokens` is a traced scalar, so one compiled program serves any budget up to
the capacity.

SSD round, per batch row (all rows in lockstep, each with its own position):
  1. draft: up to `draft_len` tokens with the spec's drafter (decode.engine.drafters). The
     default, the draft path (layers [0, exit_layer) -> imitation network -> shared head),
     writes the shallow layers' slots of the shared KV cache and keeps the exit-layer
     state of every drafted token; the EAGLE head and a separate draft model keep caches
     of their own.
  2. verify: layers [exit_layer, L) score the draft_len + 1 kept states in one pass (the
     shallow layers are not run again); for the other drafters, layers [0, L) from the
     tokens' embeddings. The drafter then learns what was accepted (`commit`).
  3. accept the longest agreeing prefix (greedy) or apply speculative sampling, append
     the full model's own next token, advance the row by accepted + 1. Rejected cache
     slots lie past the row's position: masked now, overwritten later.

With `DecodeSpec.tree` (tree.nodes > 0) a round drafts a token tree instead of a chain
(decode/engine/tree.py): the shallow layers run once per drafting step over that step's nodes
with a tree attention mask, verification runs layers [exit_layer, L) over all nodes at
once, the longest agreeing root path is accepted (greedy) or recursive rejection
sampling picks it (sampling), and its cache entries (every layer, and the imitation
network's own cache) are moved to contiguous slots, all inside the same loop.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from decode.engine import keys, steps
from decode.engine import tree as tree_lib
from decode.engine.drafters import (
    Drafter,
    ImitationDrafter,
    ModelDrafter,
    PrefillStates,
    RoundContext,
    TreeDrafter,
    Verified,
)
from decode.engine.sampling import SamplingConfig, accept_greedy, accept_speculative, next_token, warp
from decode.engine.tree import TreeShape, accept_speculative_tree
from fastvlm_jax.nn.kv_cache import KVCache
from fastvlm_jax.nn.model import VLM

Array = jax.Array
Mode = Literal["ar", "ssd"]


@dataclasses.dataclass(frozen=True)
class DraftPolicy:
    """How many tokens each SSD round drafts.

    draft_len: the static maximum (the paper's gamma); verification always scores draft_len + 1.
    min_confidence: a row stops drafting once the draft's top probability falls below it.
    schedule: 'static' drafts draft_len every round; 'context' starts at `start_len` and
      grows by one every `grow_every` generated tokens (acceptance rises with context).
    """

    draft_len: int = 5
    min_confidence: float = 0.0
    schedule: Literal["static", "context"] = "static"
    start_len: int = 1
    grow_every: int = 16

    def __post_init__(self):
        if self.draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {self.draft_len}")
        if self.schedule not in ("static", "context"):
            raise ValueError(f"unknown draft schedule {self.schedule!r}: use 'static' or 'context'")

    def limit(self, generated: Array) -> Array:
        """Per-row draft length for this round: generated [batch] -> [batch] in [1, draft_len]."""
        if self.schedule == "static":
            return jnp.full_like(generated, self.draft_len)
        grown = self.start_len + generated // max(self.grow_every, 1)
        return jnp.clip(grown, 1, self.draft_len).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Everything static about a generation program.

    capacity: the most new tokens (prompt excluded) one call can emit per row: the width of
      `DecodeOutput.tokens`, and a call's `max_new_tokens` may not exceed it (one compiled
      program serves every budget up to it). It is not the KV cache's size, which is
      `cache_slots(prompt_len)` (the cache calls its size `slots`).
    """

    mode: Mode = "ssd"
    capacity: int = 64  # the most new tokens a call may emit per row (see the docstring)
    sampling: SamplingConfig = SamplingConfig()
    policy: DraftPolicy = DraftPolicy()
    eos_ids: tuple[int, ...] = (2,)
    tree: TreeShape = TreeShape()  # tree.nodes > 0: SSD rounds draft a token tree, not a chain
    drafter: Drafter = ImitationDrafter()  # what drafts (decode.engine.drafters)

    def __post_init__(self):
        if self.mode not in ("ar", "ssd"):
            raise ValueError(f"unknown decoding mode {self.mode!r}: use 'ar' or 'ssd'")
        if self.tree.enabled and not isinstance(self.drafter, TreeDrafter):
            raise ValueError(
                f"draft trees are built by the imitation drafter only; the {self.drafter.name} "
                "drafter drafts chains: drop --tree-nodes or use --drafter imitation"
            )
        if self.tree.enabled and (self.policy.min_confidence > 0 or self.policy.schedule != "static"):
            raise ValueError(
                "a draft tree has a static shape: the chain policy's min_confidence and schedule do not apply to it"
            )

    @property
    def uses_tree(self) -> bool:
        return self.mode == "ssd" and self.tree.enabled

    @property
    def draft_depth(self) -> int:
        """The deepest a round's draft reaches: the width of the per-position counters."""
        return self.tree.steps if self.uses_tree else self.policy.draft_len

    @property
    def lookahead(self) -> int:
        """Cache slots a round may write past the row's position."""
        if self.mode != "ssd":
            return 1
        return self.tree.size if self.tree.enabled else self.policy.draft_len + 1

    def cache_slots(self, prompt_len: int) -> int:
        """KV cache slots per row: the prompt bucket, the new tokens and a round's lookahead."""
        return prompt_len + self.capacity + self.lookahead


@flax.struct.dataclass
class Prompts:
    """A batch of prompts, right-padded to a bucket length.

    input_ids: [batch, prompt_len] int32; lengths: [batch] int32 true lengths;
    pixels: [batch, height, width, 3] float32 or None (text-only prompts).
    """

    input_ids: Array
    lengths: Array
    pixels: Array | None = None

    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime (dataclasses.replace)

        def replace(self, **changes: Any) -> Prompts: ...


@flax.struct.dataclass
class RoundStats:
    """What the rounds did, counted inside the loop and returned as they are.

    Per row [batch]: rounds (full-model calls after prefill), drafted (tokens the draft
    proposed), accepted (drafted tokens the full model accepted *and* that were emitted:
    drafts past an EOS or past the row's budget are not counted).
    Per draft position j [depth]: position_attempts[j] rows that proposed a j-th token and
    position_accepts[j] how many of those were accepted and emitted (with a draft tree:
    position j is depth j + 1, and a round accepting a path of depth a counts at 0..a-1).
    """

    rounds: Array
    drafted: Array
    accepted: Array
    position_attempts: Array
    position_accepts: Array

    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime (dataclasses.replace)

        def replace(self, **changes: Any) -> RoundStats: ...

    @classmethod
    def zeros(cls, batch: int, depth: int) -> RoundStats:
        rows, positions = jnp.zeros((batch,), jnp.int32), jnp.zeros((depth,), jnp.int32)
        return cls(rounds=rows, drafted=rows, accepted=rows, position_attempts=positions, position_accepts=positions)


@flax.struct.dataclass
class DecodeOutput:
    """tokens: [batch, capacity] generated ids (prompt excluded), -1 past num_tokens;
    num_tokens: [batch]; stats: RoundStats (its counters also read as attributes here:
    out.rounds, out.drafted, out.accepted, out.position_attempts, out.position_accepts)."""

    tokens: Array
    num_tokens: Array
    stats: RoundStats

    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime (dataclasses.replace)

        def replace(self, **changes: Any) -> DecodeOutput: ...

    @property
    def rounds(self) -> Array:
        return self.stats.rounds

    @property
    def drafted(self) -> Array:
        return self.stats.drafted

    @property
    def accepted(self) -> Array:
        return self.stats.accepted

    @property
    def position_attempts(self) -> Array:
        return self.stats.position_attempts

    @property
    def position_accepts(self) -> Array:
        return self.stats.position_accepts


@flax.struct.dataclass
class _LoopState:
    cache: KVCache
    draft: Any  # the drafter's carry (decode.engine.drafters); the imitation network's cache or None
    last_token: Array  # [batch] generated but not yet in the cache
    tokens: Array  # [batch, capacity]
    num_tokens: Array  # [batch]
    done: Array  # [batch] bool
    rng: Array
    stats: RoundStats

    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime (dataclasses.replace)

        def replace(self, **changes: Any) -> _LoopState: ...


def _split(rng: Array, spec: DecodeSpec, num: int = 2):
    """jax.random.split, except under greedy decoding, which draws nothing: the key is
    passed through (a threefry split per step is measurable next to a small model's step)."""
    if spec.sampling.greedy:
        return (rng,) * num
    return keys.split(rng, num)


def _is_eos(tokens: Array, eos_ids: tuple[int, ...]) -> Array:
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, tokens.dtype))


def _emit(state: _LoopState, new_tokens: Array, count: Array, max_new: Array, eos_ids) -> _LoopState:
    """Appends up to `count` [batch] of new_tokens [batch, n] per live row, stopping at EOS."""
    width = new_tokens.shape[1]
    slot = jnp.arange(width)[None]
    eos_at = jnp.where(_is_eos(new_tokens, eos_ids) & (slot < count[:, None]), slot, width)
    first_eos = jnp.min(eos_at, axis=1)
    count = jnp.minimum(count, first_eos + 1)
    count = jnp.minimum(count, max_new - state.num_tokens)
    count = jnp.where(state.done, 0, count)
    index = jnp.where(slot < count[:, None], state.num_tokens[:, None] + slot, state.tokens.shape[1])
    rows = jnp.arange(new_tokens.shape[0])[:, None]
    tokens = state.tokens.at[rows, index].set(new_tokens, mode="drop")
    num_tokens = state.num_tokens + count
    done = state.done | (first_eos < count) | (num_tokens >= max_new)
    last = jnp.take_along_axis(new_tokens, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    return state.replace(
        tokens=tokens, num_tokens=num_tokens, done=done, last_token=jnp.where(count > 0, last, state.last_token)
    )


def _prefill(
    ctx: RoundContext, prompts: Prompts, spec: DecodeSpec, rng: Array, max_new: Array, slots: int | None = None
) -> _LoopState:
    """The loop state after the prompts' prefill, the first token emitted. rng: one key, or
    [batch] keys (decode.engine.keys); slots: KV cache slots per row (default: what these
    prompts need, `spec.cache_slots`; continuous batching sizes every row's cache alike)."""
    model, params = ctx.model, ctx.params
    cfg = model.config
    batch, prompt_len = prompts.input_ids.shape
    slots = spec.cache_slots(prompt_len) if slots is None else slots
    cache = model.init_cache(batch, slots)
    features = None if prompts.pixels is None else model.encode_images(params, prompts.pixels)
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    hidden = model.embed(params, prompts.input_ids, features, positions)
    exit_layer = cfg.draft.exit_layer
    span = model.image_span(prompts.input_ids, prompts.pixels)
    h_exit, cache, _ = model.run_layers(params, hidden, positions, 0, exit_layer, cache, image_span=span)
    h_last, cache, _ = model.run_layers(
        params, h_exit, positions, exit_layer, cfg.text.num_layers, cache, image_span=span
    )
    last_index = (prompts.lengths - 1)[:, None, None]
    logits = model.logits(params, jnp.take_along_axis(h_last, last_index, axis=1))[:, 0]
    rng, step_rng = _split(rng, spec)
    first = next_token(step_rng, logits, spec.sampling)
    cache = cache.replace(pos=prompts.lengths.astype(jnp.int32))
    draft = None
    if spec.mode == "ssd":
        states = PrefillStates(
            input_ids=prompts.input_ids,
            lengths=prompts.lengths,
            pixels=prompts.pixels,
            embeds=hidden,
            exit_states=h_exit,
            last_states=h_last,
        )
        draft = spec.drafter.prefill(ctx, states, first, spec.drafter.cache_slots(model, slots))
    state = _LoopState(
        cache=cache,
        draft=draft,
        last_token=first,
        tokens=jnp.full((batch, spec.capacity), -1, jnp.int32),
        num_tokens=jnp.zeros((batch,), jnp.int32),
        done=jnp.broadcast_to(max_new <= 0, (batch,)),
        rng=rng,
        stats=RoundStats.zeros(batch, spec.draft_depth),
    )
    return _emit(state, first[:, None], jnp.ones((batch,), jnp.int32), max_new, spec.eos_ids)


def _ar_round(ctx: RoundContext, spec: DecodeSpec, state: _LoopState, max_new: Array) -> _LoopState:
    """One full-model step for every live row."""
    pos = state.cache.pos
    logits, cache = steps.ar_step(ctx.model, ctx.params, state.cache, state.last_token)
    rng, step_rng = _split(state.rng, spec)
    token = next_token(step_rng, logits, spec.sampling)
    live = ~state.done
    state = state.replace(
        cache=cache.replace(pos=pos + live), rng=rng, stats=state.stats.replace(rounds=state.stats.rounds + live)
    )
    return _emit(state, token[:, None], jnp.ones_like(pos), max_new, spec.eos_ids)


def _draft(ctx: RoundContext, spec: DecodeSpec, state: _LoopState, rng: Array):
    """Drafts up to draft_len tokens per live row with the spec's drafter.

    Returns (tokens [batch, draft_len + 1] with the round's first token at 0, verification
    inputs [batch, draft_len + 1, embed] (the drafter's kept states) or None (verification
    embeds the tokens), draft probs [batch, draft_len, vocab] or None when greedy, draft
    lengths [batch], cache, drafter carry).
    """
    drafter, draft_len = spec.drafter, spec.policy.draft_len
    batch = state.last_token.shape[0]
    pos = state.cache.pos
    first = drafter.start(ctx, state.cache, state.draft, state.last_token, pos)
    assert first.logits is not None  # start always gives the first draft's distribution
    tokens = jnp.zeros((batch, draft_len + 1), jnp.int32).at[:, 0].set(state.last_token)
    states = (
        None
        if first.kept is None
        else jnp.zeros((batch, draft_len + 1) + first.kept.shape[1:], first.kept.dtype).at[:, 0].set(first.kept)
    )
    probs = None if spec.sampling.greedy else jnp.zeros((batch, draft_len, first.logits.shape[-1]), jnp.float32)
    limit = spec.policy.limit(state.num_tokens)

    def propose(slot, logits, tokens, probs, drafting, draft_lens, rng):
        """Draws token slot + 1 from `logits` and books which rows propose it."""
        rng, step_rng = _split(rng, spec)
        if spec.sampling.greedy:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            confidence = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1) if spec.policy.min_confidence > 0 else None
        else:
            step_probs = warp(logits, spec.sampling)
            token = keys.categorical(step_rng, jnp.log(jnp.maximum(step_probs, 1e-30)))
            confidence = jnp.max(step_probs, axis=-1)
            probs = jax.lax.dynamic_update_index_in_dim(probs, step_probs, slot, axis=1)
        confident = True if confidence is None else (slot == 0) | (confidence >= spec.policy.min_confidence)
        drafting = drafting & (slot < limit) & confident
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token, slot + 1, axis=1)
        return token, tokens, probs, drafting, draft_lens + drafting, rng

    def keep(states, kept, slot):
        return None if states is None else jax.lax.dynamic_update_index_in_dim(states, kept, slot, axis=1)

    # The loop's invariant: token slot + 1 is drawn, `drafting` says which rows propose it,
    # and it is not yet fed to the drafter. It is fed by a step (which also gives the next
    # token's distribution) only while some row that proposes it may propose one more:
    # a pass for a token nobody proposes, or whose successor nobody may propose, is wasted.
    def cond(loop):
        slot, drafting = loop[0], loop[5]
        return (slot + 1 < draft_len) & jnp.any(drafting & (slot + 1 < limit))

    def body(loop):
        slot, token, tokens, states, probs, drafting, draft_lens, cache, carry, rng = loop
        out = drafter.step(ctx, cache, carry, token, pos + slot + 1)
        token, tokens, probs, drafting, draft_lens, rng = propose(
            slot + 1, out.logits, tokens, probs, drafting, draft_lens, rng
        )
        return (
            slot + 1,
            token,
            tokens,
            keep(states, out.kept, slot + 1),
            probs,
            drafting,
            draft_lens,
            out.cache,
            out.carry,
            rng,
        )

    token, tokens, probs, drafting, draft_lens, rng = propose(
        0, first.logits, tokens, probs, ~state.done, jnp.zeros((batch,), jnp.int32), rng
    )
    loop = (jnp.int32(0), token, tokens, states, probs, drafting, draft_lens, first.cache, first.carry, rng)
    slot, token, tokens, states, probs, drafting, draft_lens, cache, carry, _ = jax.lax.while_loop(cond, body, loop)

    # The last drawn token: fed only as far as the drafter needs (the imitation drafter's
    # shallow state is what verification reads), and only where some row proposes it. Only a
    # confidence stop leaves it unproposed by every row, so the other policies need no
    # conditional: their program is the plain sequence of passes.
    def finish(states, cache, carry):
        last = drafter.finish(ctx, cache, carry, token, pos + slot + 1)
        return keep(states, last.kept, slot + 1), last.cache, last.carry

    if spec.policy.min_confidence > 0:
        states, cache, carry = jax.lax.cond(jnp.any(drafting), finish, lambda *skipped: skipped, states, cache, carry)
    else:
        states, cache, carry = finish(states, cache, carry)
    return tokens, states, probs, draft_lens, cache, carry


def _commit_round(
    spec: DecodeSpec,
    state: _LoopState,
    cache: KVCache,
    draft,
    rng: Array,
    drafted_tokens: Array,
    accepted: Array,
    final: Array,
    max_new: Array,
    drafted: Array,
    attempts: Array,
):
    """Emits a round's accepted drafts and the full model's own token, advances the caches
    and books the stats; shared by chain and tree rounds.

    drafted_tokens: [batch, depth] the drafts along the accepted path (chain: all of them);
    accepted: [batch] how many of them were accepted; final: [batch] the full model's token;
    drafted: [batch] tokens the draft proposed; attempts: [depth] rows that proposed a token
    at each depth. Returns (state, new_tokens [batch, depth + 1], advance [batch]).
    """
    live = ~state.done
    rows = jnp.arange(drafted_tokens.shape[0])
    # Emitted this round: the accepted draft tokens, then the full model's own token.
    new_tokens = jnp.concatenate([drafted_tokens, jnp.zeros_like(final)[:, None]], axis=1)
    new_tokens = new_tokens.at[rows, accepted].set(final)
    pos = state.cache.pos
    advance = jnp.where(live, accepted + 1, 0)
    before = state.num_tokens
    state = _emit(
        state.replace(cache=cache.replace(pos=pos + advance), draft=draft, rng=rng),
        new_tokens,
        accepted + 1,
        max_new,
        spec.eos_ids,
    )
    # Count only the accepted drafts that were emitted (not those past an EOS or the budget);
    # the emitted tokens are the first `emitted` of [accepted drafts..., final].
    emitted_drafts = jnp.minimum(accepted, state.num_tokens - before)
    stats = state.stats
    # The counters may be wider than this round's depth: a slot state shared by several draft
    # settings (continuous batching with auto draft lengths) is sized for the deepest.
    width = stats.position_attempts.shape[0]
    attempts = jnp.pad(attempts, (0, width - attempts.shape[0]))
    level = jnp.arange(width)[None]
    state = state.replace(
        stats=stats.replace(
            rounds=stats.rounds + live,
            drafted=stats.drafted + jnp.where(live, drafted, 0),
            accepted=stats.accepted + emitted_drafts,
            position_attempts=stats.position_attempts + attempts,
            position_accepts=stats.position_accepts + jnp.sum(level < emitted_drafts[:, None], axis=0),
        )
    )
    return state, new_tokens, advance


def _ssd_round(ctx: RoundContext, spec: DecodeSpec, state: _LoopState, max_new: Array) -> _LoopState:
    model, params = ctx.model, ctx.params
    draft_len = spec.policy.draft_len
    rng, draft_rng, accept_rng = _split(state.rng, spec, 3)
    tokens, states, draft_probs, draft_lens, cache, carry = _draft(ctx, spec, state, draft_rng)

    # Verification: layers [verify_from, L), from the drafter's kept states (imitation:
    # the exit-layer states, the shallow layers are not run again) or the tokens' embeddings.
    pos = state.cache.pos
    positions = pos[:, None] + jnp.arange(draft_len + 1, dtype=jnp.int32)[None]
    if states is None:
        logits, h_last, cache = steps.verify_tokens(model, params, cache, tokens, positions)
    else:
        logits, h_last, cache = steps.verify(model, params, cache, states, positions, spec.drafter.verify_from(model))
    drafted_tokens = tokens[:, 1:]
    if spec.sampling.greedy:
        target = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        accepted = accept_greedy(target[:, :draft_len], drafted_tokens, draft_lens)
        final = jnp.take_along_axis(target, accepted[:, None], axis=1)[:, 0]
    else:
        accepted, final = accept_speculative(
            accept_rng, warp(logits, spec.sampling), draft_probs, drafted_tokens, draft_lens
        )
    live = ~state.done
    attempts = jnp.sum((jnp.arange(draft_len)[None] < draft_lens[:, None]) & live[:, None], axis=0)
    last_token = state.last_token
    state, new_tokens, advance = _commit_round(
        spec, state, cache, carry, rng, drafted_tokens, accepted, final, max_new, draft_lens, attempts
    )
    verified = Verified(
        pos=pos, last_states=h_last, new_tokens=new_tokens, accepted=accepted, advance=advance, last_token=last_token
    )
    return state.replace(draft=spec.drafter.commit(ctx, state.draft, verified))


def _tree_drafter(spec: DecodeSpec) -> TreeDrafter:
    """The drafter of a spec that drafts trees (DecodeSpec allows trees with a TreeDrafter only)."""
    assert isinstance(spec.drafter, TreeDrafter), spec.drafter
    return spec.drafter


def _draft_tree(ctx: RoundContext, spec: DecodeSpec, state: _LoopState, rng: Array):
    """Grows each live row's draft tree (see decode.engine.tree): the root, then `steps`
    steps of `width` nodes, each step one `tree_step` of the drafter over its new nodes
    (the imitation drafter: the shallow layers and the imitation network, whose entries
    are written at slot pos + index; the node's exit-layer state is kept in the table).
    Returns (tree, draft probs [batch, size, vocab] after each node (warped; None when
    greedy; leaves' rows unset), cache, drafter carry)."""
    model, drafter = ctx.model, _tree_drafter(spec)
    shape = spec.tree
    batch = state.last_token.shape[0]
    pos = state.cache.pos
    cache_slots = state.cache.slots
    tree = tree_lib.Tree.root(state.last_token, shape.size, model.config.text.hidden_size, model.dtype)

    def feed(tree, ids, cache, carry):
        """The nodes ids [batch, n] (already in the table) through the drafter: -> (tree with
        their states, cache, carry, their draft logits [batch, n, vocab])."""
        positions = pos[:, None] + jnp.take_along_axis(tree.depths, ids, axis=1)
        layout = tree_lib.tree_slots(
            pos, ids, jnp.take_along_axis(tree.ancestors, ids[:, :, None], axis=1), cache_slots
        )
        out = drafter.tree_step(ctx, cache, carry, jnp.take_along_axis(tree.tokens, ids, axis=1), positions, layout)
        tree = tree.replace(states=tree.states.at[jnp.arange(batch)[:, None], ids].set(out.kept))
        return tree, out.cache, out.carry, out.logits

    def step_ids(step):  # table indices of the nodes added at drafting step `step` >= 1
        first = 1 + (step - 1) * shape.width
        return jnp.broadcast_to(first + jnp.arange(shape.width, dtype=jnp.int32), (batch, shape.width))

    greedy = spec.sampling.greedy
    probs = None if greedy else jnp.zeros((batch, shape.size, model.config.text.vocab_size), jnp.float32)

    def expand(step, tree, candidates, probs, ids, logits):
        """The nodes ids propose their children (and, sampling, keep their draft distributions)."""
        if greedy:
            return tree_lib.propose_children(candidates, tree, ids, jax.nn.log_softmax(logits, axis=-1)), probs
        step_probs = warp(logits, spec.sampling)
        probs = probs.at[jnp.arange(batch)[:, None], ids].set(step_probs)
        return tree_lib.propose_children(candidates, tree, ids, jnp.log(step_probs), keys.fold_in(rng, step)), probs

    root_ids = jnp.zeros((batch, 1), jnp.int32)
    tree, cache, carry, logits = feed(tree, root_ids, state.cache, state.draft)
    candidates, probs = expand(
        0, tree, tree_lib.Candidates.empty(batch, shape.size, shape.width), probs, root_ids, logits
    )

    def body(step, loop):
        tree, candidates, probs, cache, carry = loop
        ids = step_ids(step)
        tree, candidates = tree_lib.grow(tree, candidates, ids)
        tree, cache, carry, logits = feed(tree, ids, cache, carry)
        candidates, probs = expand(step, tree, candidates, probs, ids, logits)
        return tree, candidates, probs, cache, carry

    tree, candidates, probs, cache, carry = jax.lax.fori_loop(
        1, shape.steps, body, (tree, candidates, probs, cache, carry)
    )
    # The last step's nodes propose no children (their logits are dropped, and so not
    # computed): they go through the drafter only to fill its cache, since the next round
    # may build on any of them.
    ids = step_ids(shape.steps)
    tree, _ = tree_lib.grow(tree, candidates, ids)
    tree, cache, carry, _ = feed(tree, ids, cache, carry)
    return tree, probs, cache, carry


def _tree_round(ctx: RoundContext, spec: DecodeSpec, state: _LoopState, max_new: Array) -> _LoopState:
    """An SSD round with a draft tree: draft, verify every node in one pass of the deep
    layers, accept the longest agreeing root path, move its cache entries to contiguous slots."""
    model, params = ctx.model, ctx.params
    shape = spec.tree
    depth = shape.steps
    rng, draft_rng, accept_rng = _split(state.rng, spec, 3)
    tree, draft_probs, cache, carry = _draft_tree(ctx, spec, state, draft_rng)

    # Verification: layers [exit_layer, L) over all nodes, each seeing its ancestors.
    pos = state.cache.pos
    ids = jnp.broadcast_to(jnp.arange(shape.size, dtype=jnp.int32), tree.tokens.shape)
    layout = tree_lib.tree_slots(pos, ids, tree.ancestors, cache.slots)
    logits, _, cache = steps.verify(
        model, params, cache, tree.states, pos[:, None] + tree.depths, spec.drafter.verify_from(model), layout
    )  # logits: [batch, size, vocab]
    if spec.sampling.greedy:
        target = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        last = tree_lib.accept_greedy_tree(tree, target)
        final = jnp.take_along_axis(target, last[:, None], axis=1)[:, 0]
    else:
        last, final = accept_speculative_tree(
            accept_rng, tree, warp(logits, spec.sampling), draft_probs, shape.width, depth
        )
    accepted = jnp.take_along_axis(tree.depths, last[:, None], axis=1)[:, 0]

    # The accepted path's entries (slots pos + node) move to slots pos + depth, in the
    # decoder's cache and the drafter's own.
    live = ~state.done
    path = tree_lib.root_path(tree, last, depth)  # [batch, depth + 1]
    cache, carry = _tree_drafter(spec).tree_commit(ctx, cache, carry, pos, path, jnp.where(live, accepted + 1, 0))

    drafted_tokens = jnp.take_along_axis(tree.tokens, path[:, 1:], axis=1)  # [batch, depth]
    reached = jnp.max(jnp.where(tree.valid, tree.depths, 0), axis=1)  # the tree's depth in this row
    attempts = jnp.sum((jnp.arange(depth)[None] < reached[:, None]) & live[:, None], axis=0)
    state, _, _ = _commit_round(
        spec,
        state,
        cache,
        carry,
        rng,
        drafted_tokens,
        accepted,
        final,
        max_new,
        jnp.full_like(accepted, shape.nodes),
        attempts,
    )
    return state


def _round_fn(spec: DecodeSpec):
    if spec.mode == "ar":
        return _ar_round
    return _tree_round if spec.tree.enabled else _ssd_round


def _generate(
    model: VLM, spec: DecodeSpec, params, prompts: Prompts, max_new: Array, rng: Array, draft_params=None
) -> DecodeOutput:
    ctx = RoundContext(model, params, draft_params, spec.draft_depth)
    max_new = jnp.minimum(jnp.asarray(max_new, jnp.int32), spec.capacity)
    state = _prefill(ctx, prompts, spec, rng, max_new)
    round_fn = _round_fn(spec)
    state = jax.lax.while_loop(lambda s: jnp.any(~s.done), lambda s: round_fn(ctx, spec, s, max_new), state)
    return DecodeOutput(tokens=state.tokens, num_tokens=state.num_tokens, stats=state.stats)


_generate_jit = jax.jit(_generate, static_argnums=(0, 1))


def compiled_programs() -> int:
    """How many generation programs this process has compiled (jit's own cache of
    `generate`, one entry per model, spec and input shapes): a test reads it to check that
    calls with the same shapes reuse one program."""
    return _generate_jit._cache_size()  # pyright: ignore[reportAttributeAccessIssue] jax's private per-jit cache counter


def generate(
    model: VLM,
    params,
    prompts: Prompts,
    spec: DecodeSpec,
    max_new_tokens: int | Array,
    rng: Array | None = None,
    draft_params=None,
) -> DecodeOutput:
    """Generates up to `max_new_tokens` tokens per row; see DecodeSpec.

    draft_params: the drafter's own params (decode.engine.drafters.ModelDrafter's small
      model); None for the drafters that live in `params` (imitation, eagle).

    max_new_tokens: an int or a [batch] array of per-row budgets, each at most
      spec.capacity (the program's static size: a larger budget is an error, not a
      silent truncation).
    prompts: right-padded (Prompts); checked here when its arrays are concrete.
    """
    if rng is None:
        rng = jax.random.key(0)
    check_inputs(model, prompts, spec, max_new_tokens)
    if spec.uses_tree:
        tree_lib.check_width(spec.tree, model.config.text.vocab_size)
    if spec.mode == "ssd":
        spec.drafter.check(model)
    if isinstance(spec.drafter, ModelDrafter) and spec.mode == "ssd" and draft_params is None:
        raise ValueError("the model drafter needs its params: generate(..., draft_params=...)")
    return _generate_jit(model, spec, params, prompts, jnp.asarray(max_new_tokens, jnp.int32), rng, draft_params)


# --- generate's two phases, one round at a time (for measuring a round: decode.bench.cost) --


def prefill(
    model: VLM,
    params,
    prompts: Prompts,
    spec: DecodeSpec,
    max_new_tokens: int | Array,
    rng: Array | None = None,
    draft_params=None,
):
    """generate's prefill alone: the loop state before its first round, whose first token
    is already emitted. The state is opaque: pass it to `decode_round`. Not jitted (wrap it
    in jax.jit); the inputs are not checked (see generate)."""
    rng = jax.random.key(0) if rng is None else rng
    max_new = jnp.minimum(jnp.asarray(max_new_tokens, jnp.int32), spec.capacity)
    return _prefill(RoundContext(model, params, draft_params, spec.draft_depth), prompts, spec, rng, max_new)


def decode_round(model: VLM, params, spec: DecodeSpec, state, max_new_tokens: int | Array, draft_params=None):
    """One round of generate's loop for every live row (AR: one token; SSD: draft, verify,
    accept), state -> state. A finished row's tokens and counters stay as they are; generate
    runs rounds until every row is done. Not jitted (wrap it, e.g. in a fori_loop, in jax.jit).
    max_new_tokens: the same budget the state was prefilled with."""
    round_fn = _round_fn(spec)
    max_new = jnp.minimum(jnp.asarray(max_new_tokens, jnp.int32), spec.capacity)
    return round_fn(RoundContext(model, params, draft_params, spec.draft_depth), spec, state, max_new)


def check_inputs(model: VLM, prompts: Prompts, spec: DecodeSpec, max_new_tokens) -> None:
    """Raises ValueError for inputs the fixed-shape program would silently get wrong.

    Skipped for traced values (inside a caller's jit): only concrete arrays can be read.
    """
    window = getattr(model.config.text, "attention_window", None)
    if spec.uses_tree and window is not None and window <= spec.tree.steps:
        # A tree node's cache slot may lie up to its depth past its position (see
        # fastvlm_jax.nn.layers.causal_attention): exact only inside a wider window.
        raise ValueError(
            f"a draft tree {spec.tree.steps} deep needs a sliding window wider than that, but the "
            f"model's is {window}: use fewer tree steps"
        )
    try:
        budgets = np.asarray(max_new_tokens)
        lengths = np.asarray(prompts.lengths)
        input_ids = np.asarray(prompts.input_ids)
    except jax.errors.TracerArrayConversionError:
        return
    if budgets.size and int(budgets.max()) > spec.capacity:
        raise ValueError(
            f"max_new_tokens={int(budgets.max())} exceeds the program's capacity of "
            f"{spec.capacity} new tokens: build the DecodeSpec with capacity >= it"
        )
    width = input_ids.shape[1]
    if lengths.size and (lengths.min() < 1 or lengths.max() > width):
        raise ValueError(
            f"prompt lengths must lie in [1, {width}] (the padded width), got {lengths.min()}..{lengths.max()}"
        )
    for row, length in enumerate(lengths):
        tail = input_ids[row, length:]
        if tail.size > 1 and np.any(tail != tail[0]):
            raise ValueError(
                f"prompt row {row} has varied tokens after its length {length}: it looks "
                "left-padded; right-pad prompts (real tokens first, then padding)"
            )
    limit = getattr(model.config.text, "position_limit", None)
    if limit is not None and lengths.size:
        needed = int(lengths.max()) + int(budgets.max()) + spec.lookahead
        if needed > limit:
            raise ValueError(
                f"a prompt of {int(lengths.max())} tokens plus {int(budgets.max())} new tokens "
                f"(and {spec.lookahead} lookahead) needs {needed} positions, but the model's "
                f"learned position table has {limit}: shorten the prompt or max_new_tokens"
            )
