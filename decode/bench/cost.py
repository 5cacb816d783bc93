"""The cost model: measured cost of single decoding primitives, and the speedup they predict.

Each primitive is one of the engine's own round pieces (decode.engine.steps), timed as a
jitted loop of `iters` calls, so dispatch costs do not count: a full AR step for one token
(steps.ar_step), a draft step (steps.draft_step: layers [0, k) + imitation + head for one
token), the shallow pass alone (steps.shallow_pass), and a verification pass of
draft_len + 1 states through layers [k, L) + head (steps.verify).
Ideal speedup = E[tokens per round] * t_AR / (drafted * t_draft + t_shallow + t_verify)
(the engine also runs the shallow layers on the last drafted token, which verification
needs); engine efficiency = measured decode-phase speedup / ideal. A whole engine round
(decode.engine.prefill / decode_round) is timed too, to compare with the sum of its parts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from decode import engine
from decode.bench.models import BenchModel, with_exit_layer
from decode.engine import DecodeSpec, DraftPolicy, Prompts, steps
from fastvlm_jax.nn.model import VLM


def seconds_per_call(run: Callable[[], object], calls: int, repeats: int) -> dict:
    """{'min', 'median'} seconds per call over `repeats` timings of run(), which makes
    `calls` calls and blocks until they are done; the first run (the compile) is not timed."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) / calls)
    return {"min": min(times), "median": statistics.median(times)}


def loop_seconds(step, params, carry, iters: int, repeats: int) -> dict:
    """Seconds per call of step(params, carry) -> carry, timed as a jitted loop of `iters`."""
    loop = jax.jit(lambda p, c: jax.lax.fori_loop(0, iters, lambda i, c: step(p, c), c), donate_argnums=1)
    # The carry is donated and fed back: start from a copy, never the caller's buffers.
    state = {"carry": jax.tree.map(jnp.copy, carry)}

    def run():
        state["carry"] = jax.block_until_ready(loop(params, state["carry"]))

    return seconds_per_call(run, iters, repeats)


class CostModel:
    """Measured cost of the decoding primitives for one model and prompt length.

    Every measurement is cached on the instance by (primitive, batch, exit layer[, draft_len]):
    a sweep asks for the same ones at every draft length. Times are in seconds.
    """

    def __init__(self, bench: BenchModel, prompt_len: int, max_new: int, iters: int, repeats: int):
        self.bench, self.prompt_len, self.max_new = bench, prompt_len, max_new
        self.iters, self.repeats = iters, repeats
        self.cache: dict = {}

    def _get(self, key, measure: Callable[[], object]):
        if key not in self.cache:
            self.cache[key] = measure()
        return self.cache[key]

    def _setup(self, batch, exit_layer, lookahead):
        """(model, params, cache slots, the position timed at, a [batch] token): a step in
        the middle of a generation of max_new tokens."""
        config, params, _ = with_exit_layer(self.bench, exit_layer)
        model = VLM(config, self.bench.dtype)
        slots = self.prompt_len + self.max_new + lookahead
        pos = self.prompt_len + self.max_new // 2
        token = jnp.full((batch,), 5, jnp.int32)
        return model, params, slots, pos, token

    def ar_step(self, batch: int) -> dict:
        """One full-model step for one token (decode.engine.steps.ar_step), then argmax."""

        def measure():
            model, params, slots, pos, token = self._setup(batch, self.bench.config.draft.exit_layer, 1)

            def step(p, carry):
                cache, token = carry
                logits, cache = steps.ar_step(model, p, cache, token)
                return cache, jnp.argmax(logits, -1).astype(jnp.int32)

            cache = model.init_cache(batch, slots).replace(pos=jnp.full((batch,), pos, jnp.int32))
            return loop_seconds(step, params, (cache, token), self.iters, self.repeats)

        return self._get(("ar", batch), measure)

    def draft_steps(self, batch: int, exit_layer: int, draft_len: int) -> dict:
        """{'draft': steps.draft_step (shallow + imitation + head for one token), 'shallow':
        steps.shallow_pass alone}."""

        def measure():
            model, params, slots, pos, token = self._setup(batch, exit_layer, draft_len + 1)
            position = jnp.full((batch,), pos, jnp.int32)
            vocab = model.config.text.vocab_size

            def draft(p, carry):
                cache, draft_cache, token = carry
                logits, _, cache, draft_cache = steps.draft_step(model, p, cache, draft_cache, token, position)
                return cache, draft_cache, jnp.argmax(logits, -1).astype(jnp.int32)

            def shallow_only(p, carry):
                cache, token = carry
                h, cache = steps.shallow_pass(model, p, cache, token[:, None], position[:, None])
                # A token that depends on h, so the loop cannot drop the pass.
                return cache, (jnp.argmax(h[:, 0], -1) % vocab).astype(jnp.int32)

            cache = model.init_cache(batch, slots)
            return {
                "draft": loop_seconds(
                    draft, params, (cache, model.init_draft_cache(batch, slots), token), self.iters, self.repeats
                ),
                "shallow": loop_seconds(
                    shallow_only, params, (model.init_cache(batch, slots), token), self.iters, self.repeats
                ),
            }

        # The cost of a draft step does not depend on draft_len beyond the cache size: share it.
        return self._get(("draft", batch, exit_layer), measure)

    def verify(self, batch: int, exit_layer: int, draft_len: int) -> dict:
        """One verification pass (steps.verify): draft_len + 1 exit-layer states through
        layers [k, L) + head."""

        def measure():
            model, params, slots, pos, _ = self._setup(batch, exit_layer, draft_len + 1)
            tokens = draft_len + 1
            positions = pos + jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32), (batch, tokens))
            states = 0.02 * jax.random.normal(jax.random.key(1), (batch, tokens, model.config.text.hidden_size))

            def step(p, carry):
                cache, acc = carry
                logits, _, cache = steps.verify(model, p, cache, states, positions, exit_layer)
                return cache, acc + jnp.sum(jnp.argmax(logits, -1))

            carry = (model.init_cache(batch, slots), jnp.int32(0))
            return loop_seconds(step, params, carry, self.iters, self.repeats)

        return self._get(("verify", batch, exit_layer, draft_len), measure)

    def ssd_round(self, batch: int, exit_layer: int, draft_len: int) -> dict:
        """One engine round (draft `draft_len` tokens, verify, accept, emit), timed as a jitted loop
        of rounds from a text-only prefill. Against the sum of the primitives above it shows
        what running them together in one program costs (weights evicted between the draft
        and the verification, loop carries), which timing each alone cannot."""

        def measure():
            config, params, _ = with_exit_layer(self.bench, exit_layer)
            model = VLM(config, self.bench.dtype)
            rounds = self.iters
            # No stop id and room for every round: all rows draft `draft_len` tokens every round.
            capacity = rounds * (draft_len + 1) + 1
            spec = DecodeSpec(mode="ssd", capacity=capacity, eos_ids=(), policy=DraftPolicy(draft_len=draft_len))
            prompts = Prompts(
                jnp.full((batch, self.prompt_len), 1, jnp.int32), jnp.full((batch,), self.prompt_len, jnp.int32)
            )
            start = jax.jit(lambda p: engine.prefill(model, p, prompts, spec, capacity))(params)
            # Not donated: every timing starts again from the same prefilled state.
            loop = jax.jit(
                lambda p, s: jax.lax.fori_loop(
                    0, rounds, lambda i, s: engine.decode_round(model, p, spec, s, capacity), s
                )
            )
            return seconds_per_call(lambda: jax.block_until_ready(loop(params, start)), rounds, self.repeats)

        return self._get(("round", batch, exit_layer, draft_len), measure)

    def layer_scaling(self, batch: int = 1) -> list[dict]:
        """Cost of one cached decode step through layers [0, n) for growing n: it should grow
        linearly in n; where it does not, the compiled step, not the arithmetic, is the cost."""
        model, params, slots, pos, _ = self._setup(batch, self.bench.config.draft.exit_layer, 1)
        positions = jnp.full((batch, 1), pos, jnp.int32)
        h = 0.5 * jax.random.normal(jax.random.key(0), (batch, 1, model.config.text.hidden_size))
        out = []
        layers = model.config.text.num_layers
        for n in sorted({1, 2, layers // 2, (3 * layers) // 4, layers} - {0}):

            def step(p, carry, n=n):
                cache, acc = carry
                # acc ties each iteration to the last, so the loop cannot be collapsed.
                hidden, cache, _ = model.run_layers(p, h + 0 * acc, positions, 0, n, cache)
                return cache, acc + 0 * jnp.sum(hidden)

            t = loop_seconds(step, params, (model.init_cache(batch, slots), jnp.float32(0)), self.iters, self.repeats)
            out.append({"layers": n, "ms_min": 1000 * t["min"], "ms_per_layer": 1000 * t["min"] / n})
        return out

    def predict(
        self,
        batch: int,
        exit_layer: int,
        draft_len: int,
        tokens_per_round: float,
        drafted_per_round: float,
        measured_speedup: float | None,
    ) -> dict:
        """The ideal speedup for the measured tokens and drafts per round, and how close the
        engine's measured (decode-phase) speedup comes to it."""
        ar = self.ar_step(batch)["min"]
        steps = self.draft_steps(batch, exit_layer, draft_len)
        draft, shallow = steps["draft"]["min"], steps["shallow"]["min"]
        verify = self.verify(batch, exit_layer, draft_len)["min"]
        round_cost = drafted_per_round * draft + shallow + verify
        ideal = tokens_per_round * ar / round_cost
        engine_round = self.ssd_round(batch, exit_layer, draft_len)["min"]
        return {
            # A full round (draft_len drafted) as the engine runs it, against its parts.
            "t_round_ms": 1000 * engine_round,
            "round_over_parts": engine_round / (draft_len * draft + shallow + verify),
            "t_ar_step_ms": 1000 * ar,
            "t_draft_step_ms": 1000 * draft,
            "t_shallow_ms": 1000 * shallow,
            "t_verify_ms": 1000 * verify,
            "draft_over_ar": draft / ar,
            "verify_over_ar": verify / ar,
            "tokens_per_round": tokens_per_round,
            "drafted_per_round": drafted_per_round,
            "round_cost_ms": 1000 * round_cost,
            # measured_speedup is the decode-phase speedup (prefill excluded), like the model.
            "ideal_speedup": ideal,
            "engine_efficiency": measured_speedup / ideal if measured_speedup else None,
            # The brief's simpler form, without the extra shallow pass: draft_len * t_draft + t_verify.
            "ideal_speedup_no_shallow_term": tokens_per_round * ar / (drafted_per_round * draft + verify),
        }
