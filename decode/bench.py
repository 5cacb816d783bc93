"""The project's decoding benchmark: AR vs self-speculative decoding on the same model and
inputs, in one process, swept over batch size, exit layer, draft-length policy and draft length.

    python -m decode.bench --ckpt CKPT_DIR|demo|random:SIZE [--images PATH...|synthetic] \
        [--batch-size N ...] [--exit-layer K ...] [--draft-len G ...] \
        [--policy static|confidence|context ...] [--cost-model] [--context-acceptance] \
        --json OUT.json

For every (batch size, exit layer, policy, draft length) it compiles the programs once,
then times `--repeats` runs of AR and SSD, interleaved (AR, SSD, AR, SSD, ...) so that
load from other processes hits both alike, and reports the median and the min.
Tokens/s counts generated tokens only; compile time is reported apart. `identical` says
whether the greedy SSD tokens equal the AR tokens. The first combination's numbers are
also written at the top level of the JSON (ar.tokens_per_s, ssd.tokens_per_s, speedup,
...), and PNG plots next to the JSON (decode/plots.py).

--context-acceptance replays the AR output host-side with teacher forcing (one full
pass and one draft pass over prompt + AR tokens): the draft-vs-full top-1 agreement at
each position is the greedy acceptance of a draft token proposed there, bucketed by
context length (the paper's Figure 5). Replaying the engine's greedy rounds on that
agreement gives per-round acceptance by the context length each round was drafted at,
and must reproduce the engine's round count (`replay.matches_engine`).

--cost-model times single jitted primitives (inside a jitted loop, so dispatch costs do
not count): a full AR step for one token, a draft step (layers [0, k) + imitation + head
for one token), the shallow pass alone, and a verification pass of draft_len + 1 tokens
through layers [k, L) + head. Ideal speedup = E[tokens per round] * t_AR /
(gamma * t_draft + t_shallow + t_verify) (the engine also runs the shallow layers on the
last drafted token, which verification needs), and engine efficiency = measured speedup /
ideal.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from decode.engine import DecodeOutput, DecodeSpec, DraftPolicy, Prompts, generate
from decode.sampling import SamplingConfig
from fastvlm_jax.config import DraftConfig, TextConfig, VisionConfig, VLMConfig
from fastvlm_jax.model import VLM, cast_params, param_bytes, param_count, params_dtype
from fastvlm_jax.prompts import stop_ids

# Random-weight presets for speed measurements (acceptance of an untrained draft is low).
RANDOM_PRESETS = {
    "tiny": VLMConfig(
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                            num_layers=2, num_heads=4),
        text=TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4,
                        num_heads=4, num_kv_heads=4),
        draft=DraftConfig(exit_layer=1), image_token_id=511),
    "50m": VLMConfig(
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=256, intermediate_size=1024,
                            num_layers=4, num_heads=4),
        text=TextConfig(vocab_size=32064, hidden_size=512, intermediate_size=1408, num_layers=8,
                        num_heads=8, num_kv_heads=8),
        draft=DraftConfig(exit_layer=2), image_token_id=32000),
    "150m": VLMConfig(
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=256, intermediate_size=1024,
                            num_layers=4, num_heads=4),
        text=TextConfig(vocab_size=32064, hidden_size=768, intermediate_size=2048, num_layers=16,
                        num_heads=12, num_kv_heads=12),
        draft=DraftConfig(exit_layer=4), image_token_id=32000),
}


@dataclasses.dataclass
class BenchModel:
    config: VLMConfig
    params: object
    tokenizer: object = None
    image_config: object = None
    source: str = ""

    @property
    def dtype(self):
        """The compute dtype: the params' own (see load_bench_model's dtype)."""
        return params_dtype(self.params)


def load_bench_model(spec: str, seed: int = 0, dtype=None) -> BenchModel:
    """`random:PRESET`, `demo`, or a checkpoint directory; dtype: cast the params (None: keep
    the checkpoint's own dtype; random presets are float32)."""
    bench = _load_bench_model(spec, seed)
    if dtype is not None:
        bench.params = cast_params(bench.params, dtype)
    return bench


def _load_bench_model(spec: str, seed: int) -> BenchModel:
    if spec.startswith("random:"):
        preset = spec.split(":", 1)[1]
        if preset not in RANDOM_PRESETS:
            raise SystemExit(f"error: unknown random preset {preset!r}; choose from {sorted(RANDOM_PRESETS)}")
        config = RANDOM_PRESETS[preset]
        # One jitted init (an eager init compiles every op on its own: seconds).
        return BenchModel(config, jax.jit(VLM(config).init)(jax.random.key(seed)), source=spec)
    from fastvlm_jax.checkpoint import CheckpointError, load_checkpoint

    path = spec
    if spec == "demo":
        from fastvlm_jax.demo import DemoMissingError, demo_checkpoint

        try:
            path = demo_checkpoint()
        except DemoMissingError as err:
            raise SystemExit(f"error: {err}")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}")
    return BenchModel(ckpt.config, ckpt.params, ckpt.tokenizer, ckpt.image_config, source=str(path))


def with_exit_layer(bench: BenchModel, exit_layer: int) -> tuple[VLMConfig, object, bool]:
    """The model with another exit layer; its imitation network is reset to the identity
    (an untrained early exit) when the layer differs from the one it was trained for."""
    if exit_layer == bench.config.draft.exit_layer:
        return bench.config, bench.params, False
    config = bench.config.with_draft(exit_layer=exit_layer)
    if exit_layer not in _FRESH_IMITATION:
        _FRESH_IMITATION[exit_layer] = (config, cast_params(jax.jit(VLM(config).init_imitation)(jax.random.key(0)), bench.dtype))
    cached_config, fresh = _FRESH_IMITATION[exit_layer]
    if cached_config != config:
        fresh = cast_params(jax.jit(VLM(config).init_imitation)(jax.random.key(0)), bench.dtype)
        _FRESH_IMITATION[exit_layer] = (config, fresh)
    return config, {**bench.params, "imitation": fresh}, True


_FRESH_IMITATION: dict = {}


def make_prompts(bench: BenchModel, batch: int, images: list[str], prompt: str | None, seed: int,
                 offset: int = 0) -> Prompts:
    """Real images through the checkpoint's processor, else random pixels and text ids.

    images: file paths, or ['synthetic'] (the default for checkpoints with a tokenizer and
    image processor): test-split scenes of the synthetic caption data, rendered in memory,
    one distinct scene per batch row (what the demo model was trained to describe).
    prompt: the question, in the model family's prompt layout (None: the family's default).
    """
    config = bench.config
    if bench.tokenizer is not None and bench.image_config is not None and images != ["random"]:
        from fastvlm_jax.image_processing import load_image, preprocess_image
        from fastvlm_jax.prompts import build_prompt_ids, default_question

        if not images or images == ["synthetic"]:
            from fastvlm_jax.data.synthetic import make_example

            chosen = [make_example("test", offset + i)[0] for i in range(batch)]
        else:
            chosen = [load_image(images[(offset + i) % len(images)]) for i in range(batch)]
        pixels = np.stack([preprocess_image(p, bench.image_config) for p in chosen])
        question = default_question(config.model_type) if prompt is None else prompt
        ids = build_prompt_ids(config, bench.tokenizer, question)
        input_ids = np.asarray([ids] * batch, np.int32)
        return Prompts(jnp.asarray(input_ids), jnp.full((batch,), len(ids), jnp.int32), jnp.asarray(pixels))
    rng = np.random.RandomState(seed + offset)
    text = rng.randint(3, min(config.image_token_id, config.text.vocab_size - 1), (batch, 12))
    image = np.full((batch, config.num_image_tokens), config.image_token_id)
    input_ids = np.concatenate([np.ones((batch, 1)), image, text], axis=1).astype(np.int32)
    size = config.vision.image_size
    pixels = rng.randn(batch, size, size, 3).astype(np.float32)
    return Prompts(jnp.asarray(input_ids), jnp.full((batch,), input_ids.shape[1], jnp.int32),
                   jnp.asarray(pixels))


# --- draft-length policies -------------------------------------------------------------

POLICIES = ("static", "confidence", "context")


def make_policy(name: str, draft_len: int, args) -> DraftPolicy:
    if name == "static":
        return DraftPolicy(draft_len=draft_len)
    if name == "confidence":
        return DraftPolicy(draft_len=draft_len, min_confidence=args.confidence_threshold)
    if name == "context":
        return DraftPolicy(draft_len=draft_len, schedule="context", start_len=args.start_len,
                           grow_every=args.grow_every)
    if name == "custom":  # the legacy flags --min-confidence / --draft-schedule
        return DraftPolicy(draft_len=draft_len, min_confidence=args.min_confidence,
                           schedule=args.draft_schedule, start_len=args.start_len,
                           grow_every=args.grow_every)
    raise ValueError(f"unknown policy {name!r}")


def policy_record(name: str, policy: DraftPolicy) -> dict:
    return {"name": name, **dataclasses.asdict(policy)}


def host_limit(policy: DraftPolicy, generated: int) -> int:
    """DraftPolicy.limit for one row, on the host."""
    if policy.schedule == "static":
        return policy.draft_len
    return int(np.clip(policy.start_len + generated // max(policy.grow_every, 1), 1, policy.draft_len))


# --- timing the engine -----------------------------------------------------------------

def _concat_outputs(outs: list[DecodeOutput]) -> DecodeOutput:
    """Joins the outputs of several prompt sets (rows stacked, per-position counters summed)."""
    arrays = [jax.tree.map(np.asarray, o) for o in outs]
    if len(arrays) == 1:
        return arrays[0]
    stack = {f: np.concatenate([getattr(a, f) for a in arrays]) for f in
             ("tokens", "num_tokens", "rounds", "drafted", "accepted")}
    sums = {f: np.sum([getattr(a, f) for a in arrays], axis=0) for f in
            ("position_attempts", "position_accepts")}
    return DecodeOutput(**stack, **sums)


def _time_interleaved(calls: dict[str, Callable], repeats: int):
    """Calls each zero-argument function once (compile + first run), then `repeats` times
    each, interleaved. Returns {name: (output, [seconds...], first_call_seconds)}."""
    results = {}
    for name, call in calls.items():
        start = time.perf_counter()
        out = call()
        results[name] = [out, [], time.perf_counter() - start]
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            results[name][0] = call()
            results[name][1].append(time.perf_counter() - start)
    return {name: tuple(v) for name, v in results.items()}


def _runner(model, params, prompt_sets, spec, max_new):
    def call():
        return _concat_outputs([jax.block_until_ready(generate(model, params, p, spec, max_new))
                                for p in prompt_sets])
    return call


def _mode_report(out, times, compile_and_first, mode, sets: int = 1):
    tokens = int(np.sum(np.asarray(out.num_tokens)))
    median = statistics.median(times)
    rounds = int(np.sum(np.asarray(out.rounds)))
    rows = len(np.asarray(out.num_tokens))
    report = {
        "tokens": tokens, "seconds_median": median, "seconds_min": min(times),
        "seconds_all": times,
        "tokens_per_s": tokens / median, "tokens_per_s_best": tokens / min(times),
        # Wall time per generated token of one row (rows decode in lockstep; with several
        # prompt sets the time is theirs together): batch / tokens_per_s.
        "latency_ms_per_token": 1000 * median / max(tokens / rows, 1) / sets,
        "full_model_calls": rounds + rows, "first_call_seconds": compile_and_first,
    }
    if mode == "ssd":
        drafted = int(np.sum(np.asarray(out.drafted)))
        accepted = int(np.sum(np.asarray(out.accepted)))
        attempts = np.asarray(out.position_attempts)
        accepts = np.asarray(out.position_accepts)
        report.update({
            # Tokens per full-model call (verification round), bonus token included; the
            # prefill's first token is not a round's output, so it is left out.
            "mean_accepted_length": (tokens - rows) / max(rounds, 1),
            "mean_accepted_drafts": accepted / max(rounds, 1),
            "mean_drafted": drafted / max(rounds, 1),
            "acceptance_rate": accepted / max(drafted, 1),
            "drafted": drafted, "accepted": accepted, "rounds": rounds,
            # Per draft position j: of the rounds that proposed a j-th token, the share
            # whose j-th token was accepted (so P(accepted >= j+1) under a static policy).
            "acceptance_per_position": [float(a / max(n, 1)) for a, n in zip(accepts, attempts)],
            "attempts_per_position": [int(n) for n in attempts],
        })
    return report


# --- cost model: single jitted primitives -------------------------------------------------

def _loop_seconds(step, params, carry, iters: int, repeats: int) -> dict:
    """Seconds per call of step(params, carry) -> carry, timed as a jitted loop of `iters`."""
    loop = jax.jit(lambda p, c: jax.lax.fori_loop(0, iters, lambda i, c: step(p, c), c), donate_argnums=1)
    carry = jax.tree.map(jnp.copy, carry)  # donated: never the caller's buffers
    carry = jax.block_until_ready(loop(params, carry))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        carry = jax.block_until_ready(loop(params, carry))
        times.append((time.perf_counter() - start) / iters)
    return {"min": min(times), "median": statistics.median(times)}


class CostModel:
    """Measured cost of the decoding primitives, cached by (what, batch, exit layer, gamma)."""

    def __init__(self, bench: BenchModel, prompt_len: int, max_new: int, iters: int, repeats: int):
        self.bench, self.prompt_len, self.max_new = bench, prompt_len, max_new
        self.iters, self.repeats = iters, repeats
        self.cache: dict = {}

    def _get(self, key, fn):
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]

    def _setup(self, batch, exit_layer, lookahead):
        config, params, _ = with_exit_layer(self.bench, exit_layer)
        model = VLM(config, self.bench.dtype)
        capacity = self.prompt_len + self.max_new + lookahead
        pos = self.prompt_len + self.max_new // 2
        token = jnp.full((batch,), 5, jnp.int32)
        return model, params, capacity, pos, token

    def ar_step(self, batch: int) -> dict:
        def measure():
            model, params, capacity, pos, token = self._setup(batch, self.bench.config.draft.exit_layer, 1)
            num_layers = model.config.text.num_layers
            positions = jnp.full((batch, 1), pos, jnp.int32)

            def step(p, carry):
                cache, token = carry
                h = model.embed(p, token[:, None], None, positions)
                h, cache, _ = model.run_layers(p, h, positions, 0, num_layers, cache)
                return cache, jnp.argmax(model.logits(p, h)[:, 0], -1).astype(jnp.int32)

            return _loop_seconds(step, params, (model.init_cache(batch, capacity), token), self.iters, self.repeats)
        return self._get(("ar", batch), measure)

    def draft_steps(self, batch: int, exit_layer: int, gamma: int) -> dict:
        """{'draft': shallow + imitation + head for one token, 'shallow': the shallow pass alone}."""
        def measure():
            model, params, capacity, pos, token = self._setup(batch, exit_layer, gamma + 1)
            positions = jnp.full((batch, 1), pos, jnp.int32)
            vocab = model.config.text.vocab_size

            def shallow(p, token, cache):
                h = model.embed(p, token[:, None], None, positions)
                h, cache, _ = model.run_layers(p, h, positions, 0, exit_layer, cache)
                return h, cache

            def draft(p, carry):
                cache, draft_cache, token = carry
                h, cache = shallow(p, token, cache)
                d, draft_cache = model.imitate(p, h, positions, draft_cache)
                return cache, draft_cache, jnp.argmax(model.logits(p, d)[:, 0], -1).astype(jnp.int32)

            def shallow_only(p, carry):
                cache, token = carry
                h, cache = shallow(p, token, cache)
                return cache, (jnp.argmax(h[:, 0], -1) % vocab).astype(jnp.int32)

            cache = model.init_cache(batch, capacity)
            return {
                "draft": _loop_seconds(draft, params, (cache, model.init_draft_cache(batch, capacity), token),
                                       self.iters, self.repeats),
                "shallow": _loop_seconds(shallow_only, params, (model.init_cache(batch, capacity), token),
                                         self.iters, self.repeats),
            }
        # The cost of a draft step does not depend on gamma beyond the cache size: share it.
        return self._get(("draft", batch, exit_layer), measure)

    def verify(self, batch: int, exit_layer: int, gamma: int) -> dict:
        def measure():
            model, params, capacity, pos, _ = self._setup(batch, exit_layer, gamma + 1)
            num_layers = model.config.text.num_layers
            positions = pos + jnp.broadcast_to(jnp.arange(gamma + 1, dtype=jnp.int32), (batch, gamma + 1))
            states = 0.02 * jax.random.normal(jax.random.key(1), (batch, gamma + 1, model.config.text.hidden_size))

            def step(p, carry):
                cache, acc = carry
                h, cache, _ = model.run_layers(p, states, positions, exit_layer, num_layers, cache)
                return cache, acc + jnp.sum(jnp.argmax(model.logits(p, h), -1))

            carry = (model.init_cache(batch, capacity), jnp.int32(0))
            return _loop_seconds(step, params, carry, self.iters, self.repeats)
        return self._get(("verify", batch, exit_layer, gamma), measure)

    def ssd_round(self, batch: int, exit_layer: int, gamma: int) -> dict:
        """One engine round (draft gamma tokens, verify, accept, emit), timed as a jitted loop
        of rounds from a text-only prefill. Against the sum of the primitives above it shows
        what running them together in one program costs (weights evicted between the draft
        and the verification, loop carries), which timing each alone cannot."""
        def measure():
            from decode import engine

            config, params, _ = with_exit_layer(self.bench, exit_layer)
            model = VLM(config, self.bench.dtype)
            rounds = self.iters
            # No stop id and room for every round: all rows draft gamma tokens every round.
            capacity = rounds * (gamma + 1) + 1
            spec = DecodeSpec(mode="ssd", capacity=capacity, eos_ids=(),
                              policy=DraftPolicy(draft_len=gamma))
            prompts = Prompts(jnp.full((batch, self.prompt_len), 1, jnp.int32),
                              jnp.full((batch,), self.prompt_len, jnp.int32))
            max_new = jnp.int32(capacity)
            start = jax.jit(lambda p: engine._prefill(model, p, prompts, spec, jax.random.key(0), max_new))(params)
            loop = jax.jit(lambda p, s: jax.lax.fori_loop(
                0, rounds, lambda i, s: engine._ssd_round(model, p, spec, s, max_new), s))
            jax.block_until_ready(loop(params, start))
            times = []
            for _ in range(self.repeats):
                begin = time.perf_counter()
                jax.block_until_ready(loop(params, start))
                times.append((time.perf_counter() - begin) / rounds)
            return {"min": min(times), "median": statistics.median(times)}
        return self._get(("round", batch, exit_layer, gamma), measure)

    def layer_scaling(self, batch: int = 1) -> list[dict]:
        """Cost of one cached decode step through layers [0, n) for growing n: it should grow
        linearly in n; where it does not, the compiled step, not the arithmetic, is the cost."""
        model, params, capacity, pos, _ = self._setup(batch, self.bench.config.draft.exit_layer, 1)
        positions = jnp.full((batch, 1), pos, jnp.int32)
        h = 0.5 * jax.random.normal(jax.random.key(0), (batch, 1, model.config.text.hidden_size))
        out = []
        layers = model.config.text.num_layers
        for n in sorted({1, 2, layers // 2, (3 * layers) // 4, layers} - {0}):
            def step(p, carry, n=n):
                cache, acc = carry
                hidden, cache, _ = model.run_layers(p, h + 0 * acc, positions, 0, n, cache)
                return cache, acc + 0 * jnp.sum(hidden)
            t = _loop_seconds(step, params, (model.init_cache(batch, capacity), jnp.float32(0)),
                              self.iters, self.repeats)
            out.append({"layers": n, "ms_min": 1000 * t["min"], "ms_per_layer": 1000 * t["min"] / n})
        return out

    def predict(self, batch: int, exit_layer: int, gamma: int, tokens_per_round: float,
                drafted_per_round: float, measured_speedup: float) -> dict:
        ar = self.ar_step(batch)["min"]
        steps = self.draft_steps(batch, exit_layer, gamma)
        draft, shallow = steps["draft"]["min"], steps["shallow"]["min"]
        verify = self.verify(batch, exit_layer, gamma)["min"]
        round_cost = drafted_per_round * draft + shallow + verify
        ideal = tokens_per_round * ar / round_cost
        engine_round = self.ssd_round(batch, exit_layer, gamma)["min"]
        return {
            # A full round (gamma drafted) as the engine runs it, against its parts.
            "t_round_ms": 1000 * engine_round,
            "round_over_parts": engine_round / (gamma * draft + shallow + verify),
            "t_ar_step_ms": 1000 * ar, "t_draft_step_ms": 1000 * draft, "t_shallow_ms": 1000 * shallow,
            "t_verify_ms": 1000 * verify, "draft_over_ar": draft / ar, "verify_over_ar": verify / ar,
            "tokens_per_round": tokens_per_round, "drafted_per_round": drafted_per_round,
            "round_cost_ms": 1000 * round_cost,
            # measured_speedup is the decode-phase speedup (prefill excluded), like the model.
            "ideal_speedup": ideal,
            "engine_efficiency": measured_speedup / ideal if measured_speedup else None,
            # The brief's simpler form, without the extra shallow pass: gamma * t_draft + t_verify.
            "ideal_speedup_no_shallow_term": tokens_per_round * ar / (drafted_per_round * draft + verify),
        }


# --- acceptance by context length: host-side replay with teacher forcing -------------------

@functools.lru_cache(maxsize=None)
def _replay_fn(model: VLM):
    cfg = model.config

    @jax.jit
    def run(params, input_ids, pixels):
        batch, seq = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        features = None if pixels is None else model.encode_images(params, pixels)
        hidden = model.embed(params, input_ids, features, positions)
        h_exit, _, _ = model.run_layers(params, hidden, positions, 0, cfg.draft.exit_layer)
        h_last, _, _ = model.run_layers(params, h_exit, positions, cfg.draft.exit_layer, cfg.text.num_layers)
        draft_hidden, _ = model.imitate(params, h_exit, positions)
        full = model.logits(params, h_last)
        draft = model.logits(params, draft_hidden)
        return (jnp.argmax(full, -1), jnp.argmax(draft, -1), jnp.max(jax.nn.softmax(draft, -1), -1))
    return run


@dataclasses.dataclass
class Replay:
    """Per row, for generated token t (t = 0..n-1): the full model's and the draft's top-1
    at the position that predicts it, the draft's confidence there, and the AR token."""

    prompt_len: int
    num_tokens: np.ndarray  # [rows]
    ar_tokens: np.ndarray  # [rows, cap]
    full_top1: np.ndarray  # [rows, cap]
    draft_top1: np.ndarray  # [rows, cap]
    draft_conf: np.ndarray  # [rows, cap]

    @property
    def agree(self) -> np.ndarray:
        return self.draft_top1 == self.ar_tokens


def replay(bench: BenchModel, prompt_sets: list[Prompts], ar_out: DecodeOutput, exit_layer: int) -> Replay:
    config, params, _ = with_exit_layer(bench, exit_layer)
    run = _replay_fn(VLM(config, bench.dtype))
    tokens = np.asarray(ar_out.tokens)
    num_tokens = np.asarray(ar_out.num_tokens)
    cap = tokens.shape[1]
    outs, start = [], 0
    prompt_len = None
    for prompts in prompt_sets:
        ids = np.asarray(prompts.input_ids)
        rows, plen = ids.shape
        if not np.all(np.asarray(prompts.lengths) == plen):
            raise ValueError("replay needs unpadded prompts of one length")
        prompt_len = plen
        gen = np.maximum(tokens[start:start + rows], 0)
        full_ids = np.concatenate([ids, gen[:, :-1]], axis=1).astype(np.int32)
        full, draft, conf = (np.asarray(x) for x in run(params, jnp.asarray(full_ids), prompts.pixels))
        sl = slice(plen - 1, plen - 1 + cap)
        outs.append((full[:, sl], draft[:, sl], conf[:, sl]))
        start += rows
    full, draft, conf = (np.concatenate(x) for x in zip(*outs))
    return Replay(prompt_len, num_tokens, tokens, full, draft, conf)


def token_agreement_by_context(rep: Replay, bucket: int) -> dict:
    """Draft-vs-full top-1 agreement of every draftable token (t >= 1), bucketed by the
    context length (prompt + generated tokens before it) at which it would be drafted."""
    rows, cap = rep.ar_tokens.shape
    t = np.arange(cap)[None]
    valid = (t >= 1) & (t < rep.num_tokens[:, None])
    context = rep.prompt_len + np.broadcast_to(t, (rows, cap))
    edges = list(range(rep.prompt_len + 1, rep.prompt_len + cap + 1, bucket))
    out = {"bucket_start": [], "tokens": [], "agreement": []}
    for lo in edges:
        sel = valid & (context >= lo) & (context < lo + bucket)
        if sel.sum():
            out["bucket_start"].append(lo)
            out["tokens"].append(int(sel.sum()))
            out["agreement"].append(float(rep.agree[sel].mean()))
    out["overall"] = float(rep.agree[valid].mean()) if valid.any() else None
    # The full model's top-1 must reproduce the AR tokens (same model, no cache): a check
    # that the replay computes what the engine did (float rounding may flip near-ties).
    out["full_matches_ar"] = float((rep.full_top1 == rep.ar_tokens)[t < rep.num_tokens[:, None]].mean())
    out["prompt_len"] = rep.prompt_len
    out["rows"] = rows
    return out


def simulate_rounds(rep: Replay, policy: DraftPolicy) -> list[tuple[int, int, int, int]]:
    """The engine's greedy rounds replayed on the teacher-forced agreement: one
    (row, context length at drafting, proposed, accepted) per round. `proposed` is exact
    up to the first rejection (a confidence stop after it is not observable here)."""
    rounds = []
    for row in range(rep.ar_tokens.shape[0]):
        n = int(rep.num_tokens[row])
        emitted = 1  # the prefill's token
        while emitted < n:
            limit = host_limit(policy, emitted)
            accepted, proposed = 0, 0
            for slot in range(limit):
                t = emitted + slot  # the token this slot proposes
                if t >= n:
                    proposed += 1
                    break
                if slot > 0 and rep.draft_conf[row, t] < policy.min_confidence:
                    break
                proposed += 1
                if not rep.agree[row, t]:
                    break
                accepted += 1
            rounds.append((row, rep.prompt_len + emitted, proposed, accepted))
            emitted += accepted + 1
    return rounds


def rounds_by_context(rounds, bucket: int, prompt_len: int) -> dict:
    out = {"bucket_start": [], "rounds": [], "mean_accepted_drafts": [], "mean_tokens_per_round": [],
           "acceptance_rate": []}
    if not rounds:
        return out
    ctx = np.asarray([r[1] for r in rounds])
    proposed = np.asarray([r[2] for r in rounds])
    accepted = np.asarray([r[3] for r in rounds])
    for lo in range(prompt_len + 1, int(ctx.max()) + 1, bucket):
        sel = (ctx >= lo) & (ctx < lo + bucket)
        if sel.sum():
            out["bucket_start"].append(lo)
            out["rounds"].append(int(sel.sum()))
            out["mean_accepted_drafts"].append(float(accepted[sel].mean()))
            out["mean_tokens_per_round"].append(float(accepted[sel].mean() + 1))
            out["acceptance_rate"].append(float(accepted[sel].sum() / max(proposed[sel].sum(), 1)))
    return out


# --- one sweep point ----------------------------------------------------------------------

def bench_one(bench: BenchModel, prompt_sets: list[Prompts], exit_layer: int, policy_name: str,
              policy: DraftPolicy, max_new: int, repeats: int, sampling: SamplingConfig,
              cost: CostModel | None = None, replays: dict | None = None, bucket: int = 8) -> dict:
    config, params, reset = with_exit_layer(bench, exit_layer)
    model = VLM(config, bench.dtype)
    # AR does not depend on the exit layer: one program (compiled once per batch shape)
    # on the checkpoint's own config serves every sweep point.
    ar_model = VLM(bench.config, bench.dtype)
    eos = stop_ids(bench.config, bench.tokenizer) if bench.tokenizer is not None else ()
    ar_spec = DecodeSpec("ar", capacity=max_new, sampling=sampling, eos_ids=eos)
    ssd_spec = DecodeSpec("ssd", capacity=max_new, sampling=sampling, eos_ids=eos, policy=policy)
    # The same compiled programs with max_new_tokens=1 time the prefill alone (the budget
    # is a traced scalar), so the decode phase can be told apart from the prefill.
    ar_params, ssd_params = bench.params, params
    timed = _time_interleaved({
        "ar": _runner(ar_model, ar_params, prompt_sets, ar_spec, max_new),
        "ssd": _runner(model, ssd_params, prompt_sets, ssd_spec, max_new),
        "ar_prefill": _runner(ar_model, ar_params, prompt_sets, ar_spec, 1),
        "ssd_prefill": _runner(model, ssd_params, prompt_sets, ssd_spec, 1),
    }, repeats)
    ar_out, ssd_out = timed["ar"][0], timed["ssd"][0]
    ar = _mode_report(*timed["ar"], "ar", len(prompt_sets))
    ssd = _mode_report(*timed["ssd"], "ssd", len(prompt_sets))
    rows_total = len(np.asarray(ar_out.num_tokens))
    for report, name in ((ar, "ar"), (ssd, "ssd")):
        prefill = statistics.median(timed[f"{name}_prefill"][1])
        report["prefill_seconds_median"] = prefill
        decode_seconds = report["seconds_median"] - prefill
        # After the prefill's first token: tokens/s of the decoding loop alone (None when
        # the decode phase is too short to tell apart from timing noise).
        report["decode_tokens_per_s"] = ((report["tokens"] - rows_total) / decode_seconds
                                         if decode_seconds > 0.2 * report["seconds_median"] else None)
    batch, prompt_len = prompt_sets[0].input_ids.shape
    base = {k: v for k, v in params.items() if k != "imitation"}
    ar_cache = model.init_cache(batch, ar_spec.cache_slots(prompt_len))
    ssd_cache = model.init_cache(batch, ssd_spec.cache_slots(prompt_len))
    draft_cache = model.init_draft_cache(batch, ssd_spec.cache_slots(prompt_len))
    identical = bool(np.array_equal(np.asarray(ar_out.tokens), np.asarray(ssd_out.tokens)))
    speedup = ssd["tokens_per_s"] / ar["tokens_per_s"]
    result = {
        "batch_size": batch, "exit_layer": exit_layer, "draft_len": policy.draft_len,
        "policy": policy_record(policy_name, policy), "prompt_sets": len(prompt_sets),
        "imitation": "reset to identity (exit layer differs from checkpoint)" if reset else "as loaded",
        "ar": ar, "ssd": ssd,
        "speedup": speedup,
        "speedup_best": ssd["tokens_per_s_best"] / ar["tokens_per_s_best"],
        "speedup_decode": (ssd["decode_tokens_per_s"] / ar["decode_tokens_per_s"]
                           if ssd["decode_tokens_per_s"] and ar["decode_tokens_per_s"] else None),
        "identical": identical if sampling.greedy else None,
        "mean_accepted_length": ssd["mean_accepted_length"],
        "acceptance_rate": ssd["acceptance_rate"],
        "acceptance_per_position": ssd["acceptance_per_position"],
        "memory": {
            "base_params_bytes": param_bytes(base),
            "imitation_params_bytes": param_bytes(params["imitation"]),
            "ar_kv_cache_bytes": ar_cache.nbytes(),
            # The shallow layers share the full model's cache: SSD only adds the lookahead
            # slots and, for the one-layer imitation network, its own one-layer cache.
            "ssd_kv_cache_bytes": ssd_cache.nbytes(),
            "ssd_draft_cache_bytes": draft_cache.nbytes() if draft_cache is not None else 0,
        },
    }
    if cost is not None:
        result["cost"] = cost.predict(batch, exit_layer, policy.draft_len, ssd["mean_accepted_length"],
                                      ssd["mean_drafted"], result["speedup_decode"])
    if replays is not None and sampling.greedy and identical:
        rep = replay(bench, prompt_sets, ar_out, exit_layer)
        rounds = simulate_rounds(rep, policy)
        replays.setdefault((batch, exit_layer), rep)
        result["replay"] = {
            "rounds": len(rounds), "engine_rounds": ssd["rounds"],
            "accepted": int(sum(r[3] for r in rounds)),
            "matches_engine": len(rounds) == ssd["rounds"],
        }
        result["acceptance_vs_context"] = rounds_by_context(rounds, bucket, rep.prompt_len)
    return result


def device_name() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{getattr(device, 'device_kind', '')} x{jax.device_count()}"


def machine_info() -> dict:
    import os
    import platform

    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def context_acceptance_report(bench: BenchModel, exit_layers, args, sampling) -> dict:
    """Figure 5: AR on `--replay-rows` distinct prompts, then the teacher-forced replay."""
    eos = stop_ids(bench.config, bench.tokenizer) if bench.tokenizer is not None else ()
    prompts = make_prompts(bench, args.replay_rows, args.images, args.prompt, args.seed, offset=1000)
    spec = DecodeSpec("ar", capacity=args.max_new_tokens, sampling=SamplingConfig(), eos_ids=eos)
    ar_out = _concat_outputs([generate(VLM(bench.config, bench.dtype), bench.params, prompts, spec, args.max_new_tokens)])
    out = {}
    for exit_layer in exit_layers:
        rep = replay(bench, [prompts], ar_out, exit_layer)
        entry = token_agreement_by_context(rep, args.context_bucket)
        entry["rounds_static"] = {}
        for gamma in args.draft_len:
            rounds = simulate_rounds(rep, DraftPolicy(draft_len=gamma))
            entry["rounds_static"][str(gamma)] = rounds_by_context(rounds, args.context_bucket, rep.prompt_len)
        out[str(exit_layer)] = entry
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m decode.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint dir, 'demo', or random:PRESET "
                        f"({', '.join(sorted(RANDOM_PRESETS))})")
    parser.add_argument("--images", nargs="*", default=[],
                        help="image files, 'synthetic' (default for checkpoints with a tokenizer: "
                        "synthetic test scenes) or 'random' (random pixels and text ids)")
    parser.add_argument("--prompt", default=None,
                        help="the question (default: 'Describe the image.' for LLaVA, none for BLIP-2)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--exit-layer", type=int, nargs="+", default=None,
                        help="exit layers to try (default: the checkpoint's)")
    parser.add_argument("--draft-len", type=int, nargs="+", default=[5])
    parser.add_argument("--policy", nargs="+", choices=POLICIES, default=None,
                        help="draft-length policies to sweep (default: one policy from "
                        "--min-confidence / --draft-schedule)")
    parser.add_argument("--min-confidence", type=float, default=0.0)
    parser.add_argument("--draft-schedule", choices=["static", "context"], default="static")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="stop threshold of the 'confidence' policy")
    parser.add_argument("--start-len", type=int, default=1, help="'context' schedule: first draft length")
    parser.add_argument("--grow-every", type=int, default=16, help="'context' schedule: +1 every N tokens")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-sets", type=int, default=1,
                        help="distinct prompt batches decoded per timed repeat (more scenes, "
                        "steadier acceptance)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="params and compute dtype (default: the checkpoint's own)")
    parser.add_argument("--cost-model", action="store_true",
                        help="time the primitives and report ideal speedup + engine efficiency")
    parser.add_argument("--cost-iters", type=int, default=32)
    parser.add_argument("--layer-scaling", action="store_true",
                        help="time one cached step through layers [0, n) for several n (batch 1)")
    parser.add_argument("--context-acceptance", action="store_true",
                        help="replay AR outputs with teacher forcing: acceptance vs context length")
    parser.add_argument("--replay-rows", type=int, default=16,
                        help="distinct prompts for the acceptance-vs-context replay")
    parser.add_argument("--context-bucket", type=int, default=8)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--json", required=True, help="output JSON file")
    args = parser.parse_args(argv)
    try:  # before loading the model: a bad --temperature is reported at once, as one line
        sampling = SamplingConfig(temperature=args.temperature)
    except ValueError as e:
        parser.error(str(e))

    bench = load_bench_model(args.ckpt, args.seed, args.dtype)
    exit_layers = args.exit_layer or [bench.config.draft.exit_layer]
    for layer in exit_layers:
        if not 1 <= layer < bench.config.text.num_layers:
            parser.error(f"--exit-layer {layer} must be in [1, {bench.config.text.num_layers - 1}]")
    if args.policy:
        policies = list(args.policy)
    else:
        policies = ["context" if args.draft_schedule == "context" else
                    "confidence" if args.min_confidence > 0 else "static"]
        if args.min_confidence > 0 or args.draft_schedule == "context":
            policies = ["custom"]
    info = machine_info()
    cost = None
    replays = {} if sampling.greedy else None
    runs = []
    for batch in args.batch_size:
        prompt_sets = [make_prompts(bench, batch, args.images, args.prompt, args.seed, offset=s * batch)
                       for s in range(args.prompt_sets)]
        if args.cost_model and (cost is None or cost.prompt_len != prompt_sets[0].input_ids.shape[1]):
            cost = CostModel(bench, prompt_sets[0].input_ids.shape[1], args.max_new_tokens,
                             args.cost_iters, max(args.repeats, 3))
        for exit_layer in exit_layers:
            for policy_name in policies:
                for draft_len in args.draft_len:
                    policy = make_policy(policy_name, draft_len, args)
                    result = bench_one(bench, prompt_sets, exit_layer, policy_name, policy,
                                       args.max_new_tokens, args.repeats, sampling, cost, replays,
                                       args.context_bucket)
                    runs.append(result)
                    extra = ""
                    if "cost" in result:
                        eff = result["cost"]["engine_efficiency"]
                        extra = (f"  ideal {result['cost']['ideal_speedup']:.2f}x  efficiency "
                                 f"{eff:.2f}" if eff is not None else "  efficiency n/a")
                        extra += f"  round/parts {result['cost']['round_over_parts']:.2f}"
                    print(f"batch {batch:3d} exit {exit_layer:2d} {policy_name:>10s} draft {draft_len:2d}: "
                          f"AR {result['ar']['tokens_per_s']:8.1f} tok/s  SSD {result['ssd']['tokens_per_s']:8.1f} "
                          f"tok/s  speedup {result['speedup']:.2f}x  tokens/round "
                          f"{result['mean_accepted_length']:.2f}  acceptance {result['acceptance_rate']:.2f}  "
                          f"identical {result['identical']}{extra}", flush=True)
    top = runs[0]
    report = {
        "device": device_name(), "machine": info, "model": bench.source,
        "params": param_count(bench.params), "num_layers": bench.config.text.num_layers,
        "dtype": bench.dtype.name, "param_bytes": param_bytes(bench.params),
        "checkpoint_exit_layer": bench.config.draft.exit_layer,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "prompt_sets": args.prompt_sets,
        "temperature": args.temperature, "argv": sys.argv[1:] if argv is None else list(argv),
        **{k: top[k] for k in ("batch_size", "exit_layer", "draft_len", "ar", "ssd", "speedup", "identical",
                               "mean_accepted_length", "acceptance_rate", "memory")},
        "runs": runs,
    }
    if args.layer_scaling:
        prompt_len = make_prompts(bench, 1, args.images, args.prompt, args.seed).input_ids.shape[1]
        scaling_cost = cost or CostModel(bench, prompt_len, args.max_new_tokens, args.cost_iters,
                                         max(args.repeats, 3))
        report["layer_scaling"] = scaling_cost.layer_scaling(1)
        for row in report["layer_scaling"]:
            print(f"layers [0, {row['layers']}): {row['ms_min']:.3f} ms per step "
                  f"({row['ms_per_layer']:.3f} ms per layer)")
    if args.context_acceptance and sampling.greedy:
        report["context_acceptance"] = context_acceptance_report(bench, exit_layers, args, sampling)
    try:
        report["machine"]["loadavg_at_end"] = list(__import__("os").getloadavg())
    except OSError:
        pass
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        from decode.plots import plot_bench

        report["plots"] = [str(p) for p in plot_bench(report, json_path)]
    json_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}" + (f" and {', '.join(report.get('plots', []))}" if report.get("plots") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
