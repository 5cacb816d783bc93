"""Continuous batching: B decoding slots that are refilled as their requests finish.

`generate` decodes a batch in lockstep until its longest row ends, so rows that finish early
wait. Here the decoder holds B slots; when a request ends (EOS or its budget), its slot is
handed a waiting request while the others keep decoding. Everything stays fixed-shape and
is compiled once per shape, in three programs (JetStream's prefill / insert / generate split):

  prefill  P waiting requests together (prompts right-padded to a bucket): their KV caches
           (every layer, sized for the slots), first tokens and drafter carries, as loop
           state rows (decode.engine.loop._prefill, the same code `generate` runs);
  insert   those rows into chosen slots of the slot state, in place: every leaf of the loop
           state (KV caches, positions, budgets, per-row RNG keys, counters, the drafter's
           carry) takes the new rows; a row aimed at slot B is dropped (padding);
  run      rounds of the spec's mode (AR, SSD chain, draft tree; any drafter) in one
           `lax.while_loop`, until a few slots have finished and prefilled rows wait for
           them (or none is left running, or a round budget is spent): the host is consulted
           once per refill, not once per token.

Prefills run ahead: the next P requests are prefilled while the slots still decode, and
their rows wait on the device until slots free up, so a finished slot is refilled by one
insert as soon as the rounds return, and every prefilled row is used (JetStream's engine
likewise keeps prefill results queued for its generate slots).

Rounds are the engine's own (decode.engine.loop), which already advance each row on its own.
Every row samples from its own key (decode.engine.keys), derived from its request by the
caller, so a request's tokens do not depend on its slot, on the batch or on what else is in
flight: greedy gives each request exactly the tokens it gets decoded alone, and sampling
the same tokens whatever the batch size, order or number of hosts.

Slot utilization (`SlotStats`): slot-rounds of an occupied, unfinished slot (each emits at
least one token) over all slot-rounds the programs ran.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from decode.engine.autodraft import AutoDraft, Choice, choice_label, is_tree
from decode.engine.drafters import RoundContext
from decode.engine.loop import DecodeSpec, Prompts, RoundStats, _LoopState, _prefill, _round_fn
from fastvlm_jax.image.patches import PatchImages, batch_pixels
from fastvlm_jax.nn.kv_cache import KVCache
from fastvlm_jax.nn.model import VLM

Array = jax.Array


@flax.struct.dataclass
class SlotState:
    """B slots: the engine's loop state over B rows and who occupies each.

    loop: decode.engine.loop._LoopState with batch B (rng: [B] keys).
    budget: [B] int32 the occupant's max_new_tokens (0 when empty).
    request: [B] int32 the occupant's request index, -1 when empty (a finished request stays
      until the host collects it).
    rounds: [] int32 rounds run; busy: [] int32 slot-rounds of occupied, unfinished slots.
    """

    loop: _LoopState
    budget: Array
    request: Array
    rounds: Array
    busy: Array

    if TYPE_CHECKING:  # flax.struct.dataclass adds it at runtime (dataclasses.replace)

        def replace(self, **changes: Any) -> SlotState: ...


def _insert_rows(live, new, targets: Array):
    """Every leaf of `new` ([P] rows) written into `live` ([B] rows) at rows `targets` [P]
    (targets >= B are dropped). The batch axis is 0, except a KV cache's keys and values
    ([layers, batch, ...])."""

    def put(axis):
        def write(live_leaf, new_leaf):
            index = (slice(None),) * axis + (targets,)
            return live_leaf.at[index].set(new_leaf, mode="drop")

        return write

    def insert(live_node, new_node):
        if isinstance(live_node, KVCache):
            return live_node.replace(
                keys=put(1)(live_node.keys, new_node.keys),
                values=put(1)(live_node.values, new_node.values),
                pos=put(0)(live_node.pos, new_node.pos),
                rope_offset=put(0)(live_node.rope_offset, new_node.rope_offset),
            )
        return put(0)(live_node, new_node)

    return jax.tree.map(insert, live, new, is_leaf=lambda node: isinstance(node, KVCache))


def _grow_rows(tree, batch: int):
    """Every leaf's batch axis (as in _insert_rows) grown to `batch` rows by repeating its rows."""

    def grow(axis):
        def repeat(leaf):
            copies = -(-batch // leaf.shape[axis])
            return jax.lax.slice_in_dim(jnp.concatenate([leaf] * copies, axis=axis), 0, batch, axis=axis)

        return repeat

    def node_grow(node):
        if isinstance(node, KVCache):
            return node.replace(
                keys=grow(1)(node.keys),
                values=grow(1)(node.values),
                pos=grow(0)(node.pos),
                rope_offset=grow(0)(node.rope_offset),
            )
        return grow(0)(node)

    return jax.tree.map(node_grow, tree, is_leaf=lambda node: isinstance(node, KVCache))


def empty_slots(first: _LoopState, batch: int) -> SlotState:
    """B empty slots shaped like the rows of a prefill (`first`, whose rows are repeated:
    the slots' values do not matter until a request is inserted, only their structure)."""
    grown = _grow_rows(first, batch)
    loop = grown.replace(
        done=jnp.ones((batch,), bool),
        stats=grown.stats.replace(
            position_attempts=jnp.zeros_like(first.stats.position_attempts),
            position_accepts=jnp.zeros_like(first.stats.position_accepts),
        ),
    )
    return SlotState(
        loop=loop,
        budget=jnp.zeros((batch,), jnp.int32),
        request=jnp.full((batch,), -1, jnp.int32),
        rounds=jnp.int32(0),
        busy=jnp.int32(0),
    )


def insert(slots: SlotState, new: _LoopState, targets: Array, requests: Array, budgets: Array) -> SlotState:
    """Puts P prefilled rows (`new`) into slots `targets` [P] (B: drop the row), for requests
    [P] with budgets [P]. The engine-wide per-position counters stay the slots' own."""
    loop = slots.loop
    stats = loop.stats
    rows = dataclasses.replace(
        new,
        stats=RoundStats(
            rounds=new.stats.rounds,
            drafted=new.stats.drafted,
            accepted=new.stats.accepted,
            position_attempts=stats.position_attempts,
            position_accepts=stats.position_accepts,
        ),
    )
    per_row = {
        "cache": (loop.cache, rows.cache),
        "draft": (loop.draft, rows.draft),
        "last_token": (loop.last_token, rows.last_token),
        "tokens": (loop.tokens, rows.tokens),
        "num_tokens": (loop.num_tokens, rows.num_tokens),
        "done": (loop.done, rows.done),
        "rng": (loop.rng, rows.rng),
    }
    updated = {name: _insert_rows(a, b, targets) for name, (a, b) in per_row.items()}
    counters = _insert_rows(
        (stats.rounds, stats.drafted, stats.accepted),
        (rows.stats.rounds, rows.stats.drafted, rows.stats.accepted),
        targets,
    )
    loop = loop.replace(
        **updated,
        stats=stats.replace(rounds=counters[0], drafted=counters[1], accepted=counters[2]),
    )
    return slots.replace(
        loop=loop,
        budget=_insert_rows(slots.budget, budgets.astype(jnp.int32), targets),
        request=_insert_rows(slots.request, requests.astype(jnp.int32), targets),
    )


def run_rounds(ctx: RoundContext, spec: DecodeSpec, slots: SlotState, max_rounds: Array, wanted: Array) -> SlotState:
    """Rounds until `wanted` occupied slots have finished (0: until none is running), no slot
    is running, or `max_rounds` more rounds ran."""
    round_fn = _round_fn(spec)
    start = slots.rounds

    def finished(s: SlotState):
        return jnp.sum(s.loop.done & (s.request >= 0))

    def cond(s: SlotState):
        running = jnp.any(~s.loop.done)
        enough = (wanted > 0) & (finished(s) >= wanted)
        return running & ~enough & (s.rounds - start < max_rounds)

    def body(s: SlotState):
        busy = jnp.sum(~s.loop.done & (s.request >= 0))
        loop = round_fn(ctx, spec, s.loop, s.budget)
        return s.replace(loop=loop, rounds=s.rounds + 1, busy=s.busy + busy)

    return jax.lax.while_loop(cond, body, slots)


@dataclasses.dataclass(frozen=True)
class Request:
    """One caption to make: prompt ids, pixels [H, W, 3] (an unbatched PatchImages for images
    kept near their own size, or None), its own sampling key, its budget, and anything the
    caller wants back (`tag`)."""

    prompt_ids: tuple[int, ...]
    pixels: np.ndarray | PatchImages | None
    key: Array
    max_new_tokens: int
    tag: Any = None


@dataclasses.dataclass(frozen=True)
class Finished:
    """A request's result: its generated ids and its counters (as DecodeOutput's per row)."""

    request: Request
    token_ids: tuple[int, ...]
    rounds: int
    drafted: int
    accepted: int


@dataclasses.dataclass
class SlotStats:
    """What the slots did: rounds run, busy slot-rounds, inserted requests, prefill calls,
    and the seconds spent in prefill + insert vs in rounds (device time, synchronised)."""

    slots: int
    rounds: int = 0
    busy: int = 0
    inserts: int = 0
    prefills: int = 0
    prefill_seconds: float = 0.0
    round_seconds: float = 0.0
    position_attempts: tuple[int, ...] = ()
    position_accepts: tuple[int, ...] = ()
    verified: int = 0  # positions the full model scored for occupied slots
    # Auto draft lengths: rounds run with each choice (by its label).
    choice_rounds: dict[int | str, int] = dataclasses.field(default_factory=dict)

    @property
    def utilization(self) -> float | None:
        return self.busy / (self.rounds * self.slots) if self.rounds else None


@functools.partial(jax.jit, static_argnums=(0, 1, 6))
def _prefill_jit(model: VLM, spec: DecodeSpec, params, draft_params, prompts: Prompts, keys_and_budgets, slots: int):
    keys, budgets = keys_and_budgets
    ctx = RoundContext(model, params, draft_params, spec.draft_depth)
    return _prefill(ctx, prompts, spec, keys, jnp.minimum(budgets, spec.capacity), slots)


@functools.partial(jax.jit, static_argnums=(1,))
def _empty_jit(first: _LoopState, batch: int) -> SlotState:
    return empty_slots(first, batch)


def _run(model: VLM, spec: DecodeSpec, params, draft_params, slots: SlotState, max_rounds, wanted) -> SlotState:
    ctx = RoundContext(model, params, draft_params, spec.draft_depth)
    return run_rounds(ctx, spec, slots, max_rounds, wanted)


# The slot state keeps one placement from its first allocation on: insert and rounds return it
# laid out as they received it. Left to choose, the compiler lays some outputs out differently
# on a mesh (replicated vs split over the rows), and every change of an input's layout
# compiles the program again.
@functools.cache
def _insert_program(layout) -> Callable:
    return jax.jit(insert, donate_argnums=(0,), out_shardings=layout)


@functools.cache
def _run_program(layout) -> Callable:
    return jax.jit(_run, static_argnums=(0, 1), donate_argnums=(4,), out_shardings=layout)


# Rounds a choice runs when it is measured (its first calls under auto draft lengths).
AUTO_MEASURE_ROUNDS = 4


def slot_choices(choices: Iterable[Choice]) -> tuple[Choice, ...]:
    """The auto draft choices that can take turns on the slots: chains of draft length >= 1 and
    trees (AR rounds, choice 0, would leave the drafter's cache behind); raises if none is."""
    kept = tuple(choice for choice in choices if is_tree(choice) or choice > 0)
    if not kept:
        raise ValueError(
            "--draft-len auto with continuous batching chooses among draft lengths >= 1 and trees "
            "(AR rounds, choice 0, are static batching's only): add one to --auto-choices"
        )
    return kept


def _check_choices(choices: Mapping[Choice, DecodeSpec]) -> None:
    """Auto draft settings must be able to take turns on one slot state."""
    if not choices:
        raise ValueError("auto draft lengths need their choices' specs")
    specs = list(choices.values())
    first = specs[0]
    for choice, spec in choices.items():
        if spec.mode != "ssd":
            raise ValueError(
                f"auto draft choice {choice_label(choice)!r}: plain AR rounds would leave the drafter's cache "
                "behind in continuous batching; choose among draft lengths >= 1 and trees"
            )
        same = (spec.capacity, spec.sampling, spec.eos_ids, spec.drafter)
        if same != (first.capacity, first.sampling, first.eos_ids, first.drafter):
            raise ValueError("auto draft choices must share capacity, sampling, EOS ids and drafter")
    if first.drafter.carry_follows_draft_len():
        raise ValueError(
            f"--draft-len auto with continuous batching: the {first.drafter.name} drafter's state depends on "
            "the draft length; use a fixed --draft-len or --batching static"
        )


def padded_width(longest: int, bucket: int, widths: Sequence[int] = ()) -> int:
    """The width a batch of prompts whose longest has `longest` tokens is padded to: the smallest
    of `widths` that holds it (images that become as many tokens as their size gives: a width per
    patch bucket, so that programs follow the buckets), else a multiple of `bucket`."""
    for width in sorted(widths):
        if longest <= width:
            return width
    return -(-longest // bucket) * bucket


def default_prefill_rows(batch: int, data_parallel: int = 1, rows: int | None = None) -> int:
    """Requests prefilled together: `rows`, else a quarter of the `batch` slots but at least 4,
    rounded up to a multiple of the mesh's data-parallel shards (prefilled rows are split over
    them like the slots), at most `batch`. (Prefilled rows wait to be inserted, so P costs no
    slot time; smaller prefills cost more per row: on the demo at 8 slots, P = 2 took 9.5-10.5 s
    for 256 captions, P = 4 8.9-9.4 s.)"""
    rows = max(4, batch // 4) if rows is None else rows
    return min(batch, -(-rows // data_parallel) * data_parallel)


def default_refill_at(batch: int) -> int:
    """Finished slots the rounds wait for before returning to the host (when prefilled rows
    wait): a sixteenth of the slots, at least 1."""
    return max(1, batch // 16)


class SlotEngine:
    """Continuous batching of one model and spec over `batch` slots.

    spec: what every round runs (with `auto`: unused, the deepest choice's spec prefills).
    prompt_len: the longest prompt bucket any request will need (every slot's KV cache holds
      prompt_len + capacity + lookahead positions); prompt_bucket: prompts are right-padded to
      a multiple of it for prefill (a program per bucket); prompt_widths: the widths to pad to
      instead, where they hold the prompts (`padded_width`).
    prefill_rows: requests prefilled together (P). Default: `default_prefill_rows`.
    refill_at: the rounds return to the host once this many slots have finished (fewer if
      fewer prefilled rows wait): each return costs a host round trip and an insert, each
      finished slot idles until it. Default: `default_refill_at`.
    place: host arrays -> device arrays (e.g. rows split over a mesh); default jnp.asarray.
    auto: `--draft-len auto` (decode.engine.autodraft.AutoDraft) choosing, before every call of
      the rounds, among `choices` (choice -> its SSD spec: chains and trees of one drafter).
      They take turns on one slot state, sized for the deepest (its cache holds the largest
      lookahead, its counters the deepest draft). Every choice's program is compiled with the
      first slot state; its seconds per round are measured on the slots themselves: every
      choice runs a few rounds first, then the choice of highest expected tokens per second is
      taken, with the acceptance observed so far. A choice depends only on rounds already
      run, so sampling stays exact; but which setting decoded a request then depends on what
      else was in flight, so sampled tokens (not their distribution) depend on the batch.
    """

    def __init__(
        self,
        model: VLM,
        params,
        spec: DecodeSpec,
        batch: int,
        prompt_len: int,
        *,
        pad_id: int = 0,
        prompt_bucket: int = 32,
        prompt_widths: Sequence[int] = (),
        prefill_rows: int | None = None,
        draft_params=None,
        place: Callable[[Any], Any] | None = None,
        max_rounds: int = 1 << 20,
        refill_at: int | None = None,
        auto: AutoDraft | None = None,
        choices: Mapping[Choice, DecodeSpec] | None = None,
    ):
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.auto = auto
        self.choices = dict(choices or {})
        if auto is not None:
            _check_choices(self.choices)
            # Prefill with the deepest setting: its counters are the widest.
            spec = max(self.choices.values(), key=lambda choice_spec: choice_spec.draft_depth)
        self.model, self.params, self.spec, self.batch = model, params, spec, int(batch)
        self.prompt_bucket = int(prompt_bucket)
        self.prompt_widths = tuple(prompt_widths)
        self.prompt_len = padded_width(int(prompt_len), self.prompt_bucket, self.prompt_widths)
        self.cache_slots = max(s.cache_slots(self.prompt_len) for s in [spec, *self.choices.values()])
        self.prefill_rows = max(1, default_prefill_rows(self.batch, rows=prefill_rows or None))
        self.pad_id = int(pad_id)
        self.draft_params = draft_params
        self.place = place or (lambda tree: jax.tree.map(jnp.asarray, tree))
        self.max_rounds = int(max_rounds)
        self.refill_at = default_refill_at(self.batch) if refill_at is None else max(1, int(refill_at))
        # The programs this engine has run, one per input shapes and slot layout: what it
        # compiled, unless an engine of the same model and spec compiled it first.
        self.programs: set[tuple] = set()

    def _next_choice(self) -> tuple[Choice | None, DecodeSpec, int]:
        """The setting of the next call of the rounds, its spec and its round budget."""
        if self.auto is None:
            return None, self.spec, self.max_rounds
        measured = self.auto.round_seconds.get(self._auto_shape, {})
        for choice in self.choices:
            if choice not in measured:  # measured over a few rounds before it is chosen
                return choice, self.choices[choice], min(self.max_rounds, AUTO_MEASURE_ROUNDS)
        choice = self.auto.choose(self._auto_shape)
        return choice, self.choices[choice], self.max_rounds

    @property
    def _auto_shape(self) -> tuple:
        return ("slots", self.batch, self.cache_slots)

    # -- host side -------------------------------------------------------------------------------

    def _prompts(self, requests: list[Request], rows: int) -> tuple[Prompts, Array, Array]:
        """`rows` prefill rows (requests, then copies of the first with budget 0)."""
        longest = max(len(r.prompt_ids) for r in requests)
        if longest > self.prompt_len:
            raise ValueError(f"a prompt of {longest} tokens is longer than the engine's prompt_len {self.prompt_len}")
        width = padded_width(longest, self.prompt_bucket, self.prompt_widths)
        ids = np.full((rows, width), self.pad_id, np.int32)
        lengths = np.zeros((rows,), np.int32)
        budgets = np.zeros((rows,), np.int32)
        pixels = batch_pixels([r.pixels for r in requests], rows)
        for row in range(rows):
            request = requests[row] if row < len(requests) else requests[0]
            ids[row, : len(request.prompt_ids)] = request.prompt_ids
            lengths[row] = len(request.prompt_ids)
            budgets[row] = request.max_new_tokens if row < len(requests) else 0
        keys = jnp.stack([requests[min(row, len(requests) - 1)].key for row in range(rows)])
        prompts = Prompts(*self.place((ids, lengths, pixels)))
        return prompts, keys, self.place(budgets)

    def _prefill(self, requests: list[Request], rows: int) -> _LoopState:
        prompts, keys, budgets = self._prompts(requests, rows)
        shapes = jax.tree.map(lambda leaf: leaf.shape, prompts)
        self.programs.add(("prefill", shapes))
        return _prefill_jit(
            self.model, self.spec, self.params, self.draft_params, prompts, (keys, budgets), self.cache_slots
        )

    def _observe(self, choice: Choice, seconds: float, rounds: int, attempts, accepts, stats: SlotStats) -> None:
        """Books a call of the rounds with an auto choice: the per-position counters it added
        (attempts, accepts) and its seconds per round."""
        assert self.auto is not None
        self.auto.observe(choice, attempts, accepts)
        self.auto.observe_rounds(self._auto_shape, choice, seconds, rounds)
        label = choice_label(choice)
        stats.choice_rounds[label] = stats.choice_rounds.get(label, 0) + rounds

    def stream(self, requests: Iterable[Request], stats: SlotStats | None = None) -> Iterator[Finished]:
        """Decodes every request; yields each as it finishes (not in input order).

        Requests are pulled from `requests` only as slots free up, so it may be a lazy
        iterator (images loaded in the background). `stats` (if given) is updated in place.

        Prefills run P requests at a time, and their rows wait on the device (`ready`) until
        slots free up: a slot is refilled as soon as the rounds return, one row at a time if
        need be, and no prefilled row is thrown away (only the last prefill may be short).
        """
        import time

        stats = stats if stats is not None else SlotStats(self.batch)
        pending = iter(requests)
        waiting: list[Request] = []

        def refill_queue(count: int) -> None:
            while len(waiting) < count:
                request = next(pending, None)
                if request is None:
                    return
                if request.max_new_tokens > self.spec.capacity:
                    raise ValueError(
                        f"max_new_tokens={request.max_new_tokens} exceeds the engine's capacity {self.spec.capacity}"
                    )
                waiting.append(request)

        rows = self.prefill_rows
        refill_queue(rows)
        if not waiting:
            return
        slots = None  # made from the first prefill's rows (its structure, at the engine's shapes)
        insert_program = run_program = None
        # The engine-wide per-position counters as last read (insert keeps the slots' own).
        attempts = accepts = np.zeros((), np.int32)
        ready: _LoopState | None = None  # the last prefill's P rows, on the device
        ready_rows: list[tuple[int, Request]] = []  # (row of `ready`, request) not yet inserted
        occupant: dict[int, Request] = {}  # slot -> request
        next_index = 0
        free = list(range(self.batch))

        def prefill_next() -> None:
            nonlocal ready, ready_rows
            take = waiting[:rows]
            del waiting[: len(take)]
            ready = self._prefill(take, rows)
            ready_rows = list(enumerate(take))
            stats.prefills += 1
            refill_queue(rows)

        while waiting or ready_rows or occupant:
            begin = time.perf_counter()
            while free and (ready_rows or waiting):
                if not ready_rows:
                    prefill_next()
                assert ready is not None
                if slots is None:
                    slots = _empty_jit(ready, self.batch)
                    layout = jax.tree.map(lambda leaf: leaf.sharding, slots)
                    insert_program, run_program = _insert_program(layout), _run_program(layout)
                    self.programs |= {("empty", layout), ("insert", layout)}
                    if not self.choices:
                        self.programs.add(("rounds", layout, None))
                    # Auto draft lengths: every choice's rounds compiled now (no round run), so
                    # that the measured seconds per round are never a compilation's.
                    for choice, spec in self.choices.items():
                        slots = run_program(
                            self.model, spec, self.params, self.draft_params, slots, jnp.int32(0), jnp.int32(0)
                        )
                        self.programs.add(("rounds", layout, choice_label(choice)))
                use, ready_rows = ready_rows[: len(free)], ready_rows[len(free) :]
                # Row r of `ready` goes to targets[r]; the rows not inserted now aim past the
                # last slot (dropped) and stay in `ready` for the next refill.
                targets = np.full((rows,), self.batch, np.int32)
                indices = np.full((rows,), -1, np.int32)
                budgets = np.zeros((rows,), np.int32)
                for (row, request), slot in zip(use, free):
                    targets[row], indices[row], budgets[row] = slot, next_index, request.max_new_tokens
                    occupant[slot] = request
                    next_index += 1
                del free[: len(use)]
                assert insert_program is not None
                slots = insert_program(slots, ready, *self.place((targets, indices, budgets)))
                stats.inserts += len(use)
            # The next P requests are prefilled now, while nothing waits on them: when slots
            # free up, the rounds can return at once and the refill is one insert.
            if not ready_rows and waiting:
                prefill_next()
            assert slots is not None and run_program is not None  # the first pass inserted the first requests
            jax.block_until_ready(slots)
            stats.prefill_seconds += time.perf_counter() - begin
            # Run rounds until enough slots finish for the prefilled rows (all of them: none).
            choice, spec, max_rounds = self._next_choice()
            begin = time.perf_counter()
            wanted = min(self.refill_at, len(ready_rows)) if ready_rows else 0
            rounds_before, busy_before = int(slots.rounds), int(slots.busy)
            attempts_before, accepts_before = attempts, accepts
            slots = run_program(
                self.model, spec, self.params, self.draft_params, slots, jnp.int32(max_rounds), jnp.int32(wanted)
            )
            done, request_ids, num_tokens, rounds, busy, attempts, accepts = jax.device_get(
                (
                    slots.loop.done,
                    slots.request,
                    slots.loop.num_tokens,
                    slots.rounds,
                    slots.busy,
                    slots.loop.stats.position_attempts,
                    slots.loop.stats.position_accepts,
                )
            )
            seconds = time.perf_counter() - begin
            stats.round_seconds += seconds
            ran, busy_ran = int(rounds) - rounds_before, int(busy) - busy_before
            stats.rounds += ran
            stats.busy += busy_ran
            stats.verified += busy_ran * spec.lookahead
            if choice is not None and ran:
                self._observe(choice, seconds, ran, attempts - attempts_before, accepts - accepts_before, stats)
            finished_slots = [s for s in range(self.batch) if done[s] and request_ids[s] >= 0]
            if not finished_slots:
                continue
            tokens, s_rounds, s_drafted, s_accepted = jax.device_get(
                (slots.loop.tokens, slots.loop.stats.rounds, slots.loop.stats.drafted, slots.loop.stats.accepted)
            )
            for slot in finished_slots:
                request = occupant.pop(slot)
                count = int(num_tokens[slot])
                yield Finished(
                    request,
                    tuple(int(t) for t in tokens[slot, :count]),
                    int(s_rounds[slot]),
                    int(s_drafted[slot]),
                    int(s_accepted[slot]),
                )
            cleared = np.full((self.batch,), -1, np.int32)
            keep = np.asarray(request_ids)
            keep = np.where(np.isin(np.arange(self.batch), finished_slots), cleared, keep)
            # Placed as the slot state's own array is, so the next insert and rounds reuse their
            # programs (a differently placed input would compile them again).
            slots = slots.replace(request=jax.device_put(keep.astype(np.int32), slots.request.sharding))
            free.extend(finished_slots)
        stats.position_attempts = tuple(int(x) for x in attempts)
        stats.position_accepts = tuple(int(x) for x in accepts)
