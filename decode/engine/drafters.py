"""Drafters: what proposes the tokens an SSD round verifies.

The engine (decode/engine/loop.py) owns the round: the while loop, sampling the drafts,
verification by the full model, acceptance, the policies and the stats. A drafter (the
`Drafter` base class) owns its own state (a cache, pending features: its `carry`) and
answers five calls:

    carry = drafter.prefill(ctx, prefill_states, first_token, drafter.cache_slots(model, slots))
    out = drafter.start(ctx, cache, carry, last_token, pos)         # DraftOut
    out = drafter.step(ctx, cache, carry, token, position)          # DraftOut
    out = drafter.finish(ctx, cache, carry, token, position)        # DraftOut, logits None
    carry = drafter.commit(ctx, carry, Verified(...))

`start` gives the distribution of the round's first draft token (the row's `last_token`
sits at `pos`, not yet in the cache), `step` feeds drafted token j (at pos + j) and gives
the distribution of token j + 1, `finish` feeds the last drafted token where no row may
draft past it (no distribution needed; after a confidence stop the last drafted token went
through `step`, whose distribution stopped the draft, and `finish` is not called),
`commit` learns what verification accepted. `cache` is the full model's KV
cache: the imitation drafter runs the full model's shallow layers and writes their slots;
the others leave it alone. Verification starts at layer `verify_from(model)`: from the
kept exit-layer states (`DraftOut.kept`, imitation) or from the token embeddings (0).

A `TreeDrafter` also drafts token trees (decode/engine/tree.py): `tree_step` feeds a
drafting step's nodes under the tree mask and `tree_commit` moves the accepted path to
contiguous cache slots. Only the imitation drafter is one.

Drafters (all static, hashable: they are part of the compiled program's identity):
  ImitationDrafter  layers [0, exit_layer) + imitation network + shared head (FastVLM).
  EagleDrafter      the EAGLE head on the full model's top features (SpecVLM's EagleVLM).
  ModelDrafter      a separate small VLM with the same tokenizer (Spec-LLaVA).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from decode.engine import steps
from fastvlm_jax.nn.eagle import compact_slots, compress
from fastvlm_jax.nn.kv_cache import KVCache, TreeSlots
from fastvlm_jax.nn.model import VLM

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RoundContext:
    """The static and traced inputs every drafter call sees.

    model, params: the full model; draft_params: the drafter's own params (ModelDrafter's
    small model) or None; draft_len: the chain's static length.
    """

    model: VLM
    params: Any
    draft_params: Any
    draft_len: int


@flax.struct.dataclass
class PrefillStates:
    """What the full model's prefill computed, for a drafter to start from.

    input_ids: [batch, prompt_len]; lengths: [batch]; pixels: [batch, h, w, 3] or None;
    embeds: state 0 [batch, prompt_len, embed]; exit_states: state exit_layer;
    last_states: the last layer's states (before the final norm); slots: cache slots per row.
    """

    input_ids: Array
    lengths: Array
    pixels: Array | None
    embeds: Array
    exit_states: Array
    last_states: Array

    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime (dataclasses.replace)

        def replace(self, **changes: Any) -> PrefillStates: ...


@flax.struct.dataclass
class Verified:
    """A round's outcome, for `commit`.

    pos: [batch] the round's start position; last_states: [batch, draft_len + 1, embed] the
    full model's last-layer states at pos .. pos + draft_len; new_tokens: [batch,
    draft_len + 1] the accepted drafts then the full model's own token (at index
    accepted); accepted: [batch]; advance: [batch] accepted + 1 on live rows, else 0;
    last_token: [batch] the token at `pos` this round started from.
    """

    pos: Array
    last_states: Array
    new_tokens: Array
    accepted: Array
    advance: Array
    last_token: Array

    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime (dataclasses.replace)

        def replace(self, **changes: Any) -> Verified: ...


class DraftOut(NamedTuple):
    """What a drafter call returns.

    logits: [batch, vocab] ([batch, n, vocab] from tree_step) the distribution of the next
      draft token, or None (finish: no next token);
    kept: [batch, embed] ([batch, n, embed]) the state verification starts from, or None
      (verification embeds the tokens);
    cache: the full model's KV cache; carry: the drafter's own state.
    """

    logits: Array | None
    kept: Array | None
    cache: KVCache
    carry: Any


class Drafter(abc.ABC):
    """What proposes a round's chain of drafts (the module docstring has the calls).
    Subclasses are frozen dataclasses with a `name`."""

    name: str

    def carry_follows_draft_len(self) -> bool:
        """Whether the carry's shapes depend on the draft length: then several draft lengths
        cannot take turns on one slot state (continuous batching with auto draft lengths)."""
        return False

    @abc.abstractmethod
    def verify_from(self, model: VLM) -> int:
        """The layer verification starts at: from `DraftOut.kept` if > 0, else the tokens."""

    def check(self, model: VLM) -> None:
        """Raises ValueError (one line) where this drafter cannot draft for the full model
        `model`; called by generate and where a drafter is loaded."""
        del model  # the drafters in the full model's own params (imitation, EAGLE) always can

    @abc.abstractmethod
    def cache_slots(self, model: VLM, slots: int) -> int:
        """The slots of the drafter's own cache, for a full-model cache of `slots`."""

    @abc.abstractmethod
    def prefill(self, ctx: RoundContext, states: PrefillStates, first_token: Array, slots: int) -> Any:
        """The carry before the first round, from the full model's prefill."""

    @abc.abstractmethod
    def start(self, ctx: RoundContext, cache: KVCache, carry, last_token: Array, pos: Array) -> DraftOut:
        """last_token [batch] at pos [batch] -> the first draft's distribution."""

    @abc.abstractmethod
    def step(self, ctx: RoundContext, cache: KVCache, carry, token: Array, position: Array) -> DraftOut:
        """Drafted token [batch] at position [batch] -> the next draft's distribution."""

    @abc.abstractmethod
    def finish(self, ctx: RoundContext, cache: KVCache, carry, token: Array, position: Array) -> DraftOut:
        """Feeds the last drafted token as far as verification and the carry need (logits None)."""

    @abc.abstractmethod
    def commit(self, ctx: RoundContext, carry, verified: Verified) -> Any:
        """The carry after verification accepted `verified`."""


class TreeDrafter(Drafter):
    """A drafter that also drafts token trees (decode/engine/tree.py)."""

    @abc.abstractmethod
    def tree_step(
        self, ctx: RoundContext, cache: KVCache, carry, tokens: Array, positions: Array, layout: TreeSlots
    ) -> DraftOut:
        """The nodes tokens, positions [batch, n] at layout.slots -> DraftOut with logits
        [batch, n, vocab] and kept [batch, n, embed] (what tree verification starts from)."""

    @abc.abstractmethod
    def tree_commit(
        self, ctx: RoundContext, cache: KVCache, carry, pos: Array, path: Array, advance: Array
    ) -> tuple[KVCache, Any]:
        """Moves the accepted path [batch, depth + 1] (table indices, root first) of rows at
        pos [batch] to contiguous slots in the full model's cache and the drafter's own;
        the rows advance by `advance` [batch]. -> (cache, carry)."""


def _token_states(ctx: RoundContext, tokens: Array, positions: Array) -> Array:
    return ctx.model.embed(ctx.params, tokens, None, positions)


# --- FastVLM: shallow layers + imitation network -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImitationDrafter(TreeDrafter):
    """The self-speculative draft path: layers [0, exit_layer) -> imitation network -> head.
    Its carry is the imitation network's own KV cache (kind 'layer') or None ('ffn')."""

    name: str = "imitation"

    def verify_from(self, model: VLM) -> int:
        return model.config.draft.exit_layer

    def cache_slots(self, model: VLM, slots: int) -> int:
        return slots

    def prefill(self, ctx: RoundContext, states: PrefillStates, first_token: Array, slots: int):
        batch, prompt_len = states.input_ids.shape
        cache = ctx.model.init_draft_cache(batch, slots)
        if cache is None:
            return None
        positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
        _, cache = ctx.model.imitate(ctx.params, states.exit_states, positions, cache)
        return cache.replace(pos=states.lengths.astype(jnp.int32))

    def start(self, ctx, cache, carry, last_token, pos):
        return DraftOut(*steps.draft_step(ctx.model, ctx.params, cache, carry, last_token, pos))

    def step(self, ctx, cache, carry, token, position):
        return DraftOut(*steps.draft_step(ctx.model, ctx.params, cache, carry, token, position))

    def finish(self, ctx, cache, carry, token, position):
        # The last draft's shallow state is verified, and the imitation cache needs its
        # entry in case every draft is accepted; its own next-token logits are not needed.
        positions = position[:, None]
        hidden, cache = steps.shallow_pass(ctx.model, ctx.params, cache, token[:, None], positions)
        if carry is not None:
            _, carry = ctx.model.imitate(ctx.params, hidden, positions, carry)
        return DraftOut(None, hidden[:, 0], cache, carry)

    def commit(self, ctx, carry, verified: Verified):
        if carry is None:
            return None
        return carry.replace(pos=verified.pos + verified.advance)

    def tree_step(self, ctx, cache, carry, tokens, positions, layout):
        return DraftOut(*steps.tree_step(ctx.model, ctx.params, cache, carry, tokens, positions, layout))

    def tree_commit(self, ctx, cache, carry, pos, path, advance):
        cache, carry = steps.move_path(cache, carry, pos, path)
        return cache, None if carry is None else carry.replace(pos=pos + advance)


# --- EAGLE head -----------------------------------------------------------------------------------


@flax.struct.dataclass
class EagleCarry:
    """The EAGLE head's state between rounds.

    cache: its one-layer KV cache (slot = position - removed, see fastvlm_jax.nn.eagle).
    removed: [batch] slots the visual compressor saved on the row's prompt.
    features / tokens: [batch, draft_len + 1, embed] / [batch, draft_len + 1]: the pairs
      (f_t, token t+1) at t = base .. base + draft_len that the head has not read yet (the
      last round's verified states, with the accepted tokens and the full model's own);
      only the first `count` [batch] are real.
    feature: [batch, embed] the head's latest predicted feature (drafting feeds it back).
    """

    cache: KVCache
    removed: Array
    features: Array
    tokens: Array
    base: Array
    count: Array
    feature: Array

    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime (dataclasses.replace)

        def replace(self, **changes: Any) -> EagleCarry: ...


def _chain_slots(slots: Array, cache_slots: int, valid: Array | None = None) -> TreeSlots:
    """Writes at `slots` [batch, n]; each query sees the cache slots at or before its own
    (and, with `valid` [batch, cache_slots], only valid ones)."""
    visible = jnp.arange(cache_slots)[None, None, :] <= slots[:, :, None]
    if valid is not None:
        visible = visible & valid[:, None, :]
    return TreeSlots(slots=slots.astype(jnp.int32), visible=visible)


@dataclasses.dataclass(frozen=True)
class EagleDrafter(Drafter):
    """SpecVLM's EagleVLM: the EAGLE head reads the full model's top features (see
    fastvlm_jax.nn.eagle). Verification runs the full model from layer 0; the next round's
    first call feeds the head the states that verification produced."""

    name: str = "eagle"

    def carry_follows_draft_len(self) -> bool:
        return True  # the pending (feature, token) pairs of a round: [batch, draft_len + 1, ...]

    def verify_from(self, model: VLM) -> int:
        return 0

    def _saved_slots(self, model: VLM) -> int:
        """Cache slots the compressor saves on a prompt holding the model's image tokens."""
        pool = model.config.draft.eagle_image_pool
        images = model.config.num_image_tokens
        return images - -(-images // pool) if pool > 1 else 0

    def cache_slots(self, model: VLM, slots: int) -> int:
        # Sized for prompts with an image: a text-only row's last slots would fall past the
        # end, be dropped, and only weaken its drafts (verification keeps output exact).
        return slots - self._saved_slots(model)

    def prefill(self, ctx: RoundContext, states: PrefillStates, first_token: Array, slots: int):
        model, params = ctx.model, ctx.params
        cfg = model.config
        if not cfg.draft.eagle_layers:
            raise ValueError(
                "--drafter eagle: this checkpoint has no EAGLE head (draft.eagle_layers=0); "
                "train one with the 'eagle' stage of train.run"
            )
        batch, prompt_len = states.input_ids.shape
        size = slots  # already this drafter's cache_slots (the engine sizes every drafter's cache)
        positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
        lengths = states.lengths.astype(jnp.int32)
        # Pair t = (f_t, e_{t+1}) for t < length - 1; the pair at length - 1 needs the first
        # generated token and is left pending for the first round.
        known = positions < (lengths - 1)[:, None]
        is_image = (states.input_ids == cfg.image_token_id) & known
        slot_of = compact_slots(is_image, cfg.draft.eagle_image_pool)
        next_embeds = jnp.concatenate([states.embeds[:, 1:], jnp.zeros_like(states.embeds[:, :1])], axis=1)
        features, rope = compress(states.last_states, positions, slot_of, is_image, cfg.draft.eagle_compressor)
        embeds, _ = compress(next_embeds, positions, slot_of, is_image, cfg.draft.eagle_compressor)
        used = jnp.take_along_axis(slot_of, jnp.maximum(lengths - 2, 0)[:, None], axis=1)[:, 0] + 1
        used = jnp.where(lengths > 1, used, 0)
        compact = jnp.arange(prompt_len, dtype=jnp.int32)[None]
        valid = compact < used[:, None]
        cache = model.init_eagle_cache(batch, size)
        shared = min(prompt_len, size)
        valid_slots = jnp.zeros((batch, size), bool).at[:, :shared].set(valid[:, :shared])
        layout = _chain_slots(jnp.where(valid, compact, size), size, valid_slots)
        _, cache = model.eagle_draft(params, features, embeds, rope, cache, tree=layout)
        removed = (lengths - 1) - used
        width = ctx.draft_len + 1
        last_feature = jnp.take_along_axis(states.last_states, (lengths - 1)[:, None, None], axis=1)
        pending = jnp.zeros((batch, width, states.last_states.shape[-1]), states.last_states.dtype)
        return EagleCarry(
            cache=cache,
            removed=removed,
            features=pending.at[:, 0].set(last_feature[:, 0]),
            tokens=jnp.zeros((batch, width), jnp.int32).at[:, 0].set(first_token),
            base=lengths - 1,
            count=jnp.ones((batch,), jnp.int32),
            feature=jnp.zeros((batch, states.last_states.shape[-1]), states.last_states.dtype),
        )

    def _head(self, ctx, carry: EagleCarry, features, tokens, positions):
        """The head over pairs at positions [batch, n] -> (predicted features, carry)."""
        model = ctx.model
        embeds = _token_states(ctx, tokens, positions + 1)
        slots = positions - carry.removed[:, None]
        size = carry.cache.slots
        predicted, cache = model.eagle_draft(
            ctx.params,
            features,
            embeds,
            positions,
            carry.cache,
            tree=_chain_slots(jnp.where(slots < size, slots, size), size),
        )
        return predicted, carry.replace(cache=cache)

    def start(self, ctx, cache, carry: EagleCarry, last_token, pos):
        del last_token  # it is the last pending pair's token
        width = carry.tokens.shape[1]
        positions = carry.base[:, None] + jnp.arange(width, dtype=jnp.int32)[None]
        predicted, carry = self._head(ctx, carry, carry.features, carry.tokens, positions)
        # Pairs past `count` wrote slots at or past pos: hidden now, overwritten by the drafts.
        feature = jnp.take_along_axis(predicted, (carry.count - 1)[:, None, None], axis=1)[:, 0]
        logits = ctx.model.logits(ctx.params, feature[:, None])[:, 0]
        return DraftOut(logits, None, cache, carry.replace(feature=feature))

    def step(self, ctx, cache, carry: EagleCarry, token, position):
        # Token j sits at `position`; its pair is (f_hat at position - 1, token j).
        predicted, carry = self._head(ctx, carry, carry.feature[:, None], token[:, None], (position - 1)[:, None])
        feature = predicted[:, 0]
        return DraftOut(ctx.model.logits(ctx.params, predicted)[:, 0], None, cache, carry.replace(feature=feature))

    def finish(self, ctx, cache, carry, token, position):
        return DraftOut(None, None, cache, carry)

    def commit(self, ctx, carry: EagleCarry, verified: Verified):
        return carry.replace(
            features=verified.last_states.astype(carry.features.dtype),
            tokens=verified.new_tokens,
            base=verified.pos,
            count=jnp.maximum(verified.advance, 1),
        )


# --- a separate small VLM -------------------------------------------------------------------------


@flax.struct.dataclass
class ModelCarry:
    """The small model's state: its own stacked KV cache; prev_token [batch], the token at
    pos - 1, which `start` feeds again where the small model never fed it (the last draft
    of a round, when every draft was accepted: `finish` does not feed it); refeed [batch]
    bool; fed [batch] the position of the last token fed to the small model this round."""

    cache: KVCache
    prev_token: Array
    refeed: Array
    fed: Array

    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime (dataclasses.replace)

        def replace(self, **changes: Any) -> ModelCarry: ...


@dataclasses.dataclass(frozen=True)
class ModelDrafter(Drafter):
    """Spec-LLaVA's separate draft VLM: its own image encoding, decoder, KV cache and head;
    the same tokenizer as the full model (checked where it is loaded) and the same
    vocabulary (`check`). Its params are the engine's draft_params."""

    draft_model: VLM
    name: str = "model"

    def verify_from(self, model: VLM) -> int:
        return 0

    def check(self, model: VLM) -> None:
        # Drafted ids index the full model's embeddings (an id past them embeds as NaN,
        # which poisons the row through attention) and both distributions share one width.
        draft_vocab, vocab = self.draft_model.config.text.vocab_size, model.config.text.vocab_size
        if draft_vocab != vocab:
            raise ValueError(
                f"the draft model's vocabulary has {draft_vocab} tokens and the full model's {vocab}: a draft "
                "model needs the full model's vocabulary; make one from the checkpoint with "
                "python -m train.recipes.make_draft_model"
            )

    def cache_slots(self, model: VLM, slots: int) -> int:
        return slots

    def prefill(self, ctx: RoundContext, states: PrefillStates, first_token: Array, slots: int):
        small, params = self.draft_model, ctx.draft_params
        batch, prompt_len = states.input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
        features = None if states.pixels is None else small.encode_images(params, states.pixels)
        hidden = small.embed(params, states.input_ids, features, positions)
        _, cache, _ = small.run_layers(
            params,
            hidden,
            positions,
            0,
            small.config.text.num_layers,
            small.init_cache(batch, slots),
            image_span=small.image_span(states.input_ids, states.pixels),
        )
        return ModelCarry(
            cache=cache,
            prev_token=first_token,
            refeed=jnp.zeros((batch,), bool),
            fed=states.lengths.astype(jnp.int32) - 1,
        )

    def _run(self, ctx, carry: ModelCarry, tokens, positions, slots):
        small, params = self.draft_model, ctx.draft_params
        size = carry.cache.slots
        hidden = small.embed(params, tokens, None, positions)
        hidden, cache, _ = small.run_layers(
            params, hidden, positions, 0, small.config.text.num_layers, carry.cache, tree=_chain_slots(slots, size)
        )
        return small.logits(params, hidden[:, -1:])[:, 0], carry.replace(cache=cache)

    def start(self, ctx, cache, carry: ModelCarry, last_token, pos):
        # Two tokens, [prev, last] at [pos - 1, pos]; rows that need no refeed write the
        # first one nowhere (a slot past the end is dropped).
        size = carry.cache.slots
        positions = jnp.stack([pos - 1, pos], axis=1)
        slots = jnp.stack([jnp.where(carry.refeed, pos - 1, size), pos], axis=1)
        tokens = jnp.stack([carry.prev_token, last_token], axis=1)
        logits, carry = self._run(ctx, carry, tokens, jnp.maximum(positions, 0), slots)
        return DraftOut(logits, None, cache, carry.replace(fed=pos))

    def step(self, ctx, cache, carry, token, position):
        logits, carry = self._run(ctx, carry, token[:, None], position[:, None], position[:, None])
        return DraftOut(logits, None, cache, carry.replace(fed=position))

    def finish(self, ctx, cache, carry, token, position):
        return DraftOut(None, None, cache, carry)

    def commit(self, ctx, carry: ModelCarry, verified: Verified):
        accepted = verified.accepted
        previous = jnp.take_along_axis(verified.new_tokens, jnp.maximum(accepted - 1, 0)[:, None], axis=1)[:, 0]
        # The next round starts at pos + accepted + 1: the token before it is fed again
        # where no step fed it (a round's last draft goes to `finish`, which feeds nothing).
        return carry.replace(
            prev_token=jnp.where(accepted > 0, previous, verified.last_token),
            refeed=(verified.advance > 0) & (verified.pos + accepted > carry.fed),
        )
