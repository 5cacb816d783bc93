"""Acceptance by context length: the AR output replayed host-side with teacher forcing.

One full pass and one draft pass over prompt + AR tokens give, at each generated position,
the draft's and the full model's top-1: their agreement is the greedy acceptance of a draft
token proposed there, bucketed by context length (the paper's Figure 5). Replaying the
engine's greedy rounds on that agreement (`simulate_rounds`) gives per-round acceptance by
the context length each round was drafted at, and must reproduce the engine's round count.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from decode.bench.models import BenchModel, decode_sets, eos_ids, make_prompts, with_exit_layer
from decode.engine import DecodeOutput, DecodeSpec, DraftPolicy, Prompts
from decode.engine.sampling import SamplingConfig
from fastvlm_jax.nn.model import VLM


@functools.cache
def _top1_fn(model: VLM):
    """A jitted (params, input_ids [rows, seq], pixels | None) -> (full top-1, draft top-1,
    draft top probability), each [rows, seq]: one uncached pass of both paths."""
    cfg = model.config

    @jax.jit
    def run(params, input_ids, pixels):
        batch, seq = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        features = None if pixels is None else model.encode_images(params, pixels)
        hidden = model.embed(params, input_ids, features, positions)
        span = model.image_span(input_ids, pixels)
        h_exit, _, _ = model.run_layers(params, hidden, positions, 0, cfg.draft.exit_layer, image_span=span)
        h_last, _, _ = model.run_layers(
            params, h_exit, positions, cfg.draft.exit_layer, cfg.text.num_layers, image_span=span
        )
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
    """Teacher-forced replay of `ar_out` (the AR output of `prompt_sets`, rows stacked in
    order) with the draft exiting at `exit_layer`. The prompts must be unpadded."""
    config, params, _ = with_exit_layer(bench, exit_layer)
    run = _top1_fn(VLM(config, bench.dtype))
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
        gen = np.maximum(tokens[start : start + rows], 0)
        full_ids = np.concatenate([ids, gen[:, :-1]], axis=1).astype(np.int32)
        full, draft, conf = (np.asarray(x) for x in run(params, jnp.asarray(full_ids), prompts.pixels))
        # Position plen - 1 + t predicts generated token t.
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
    # The policy's own per-round draft length, for every count of emitted tokens at once.
    limits = np.asarray(policy.limit(jnp.arange(rep.ar_tokens.shape[1] + 1, dtype=jnp.int32)))
    rounds = []
    for row in range(rep.ar_tokens.shape[0]):
        n = int(rep.num_tokens[row])
        emitted = 1  # the prefill's token
        while emitted < n:
            accepted, proposed = 0, 0
            for slot in range(int(limits[emitted])):
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
    """Per-round acceptance of `simulate_rounds` output, bucketed by context length."""
    out = {
        "bucket_start": [],
        "rounds": [],
        "mean_accepted_drafts": [],
        "mean_tokens_per_round": [],
        "acceptance_rate": [],
    }
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


def replay_report(
    bench: BenchModel,
    prompt_sets: list[Prompts],
    ar_out: DecodeOutput,
    exit_layer: int,
    policy: DraftPolicy,
    engine_rounds: int,
    bucket: int,
) -> dict:
    """The engine's greedy SSD rounds replayed on its AR output: {'replay': round counts
    and whether they match the engine's, 'acceptance_vs_context': rounds_by_context}."""
    rep = replay(bench, prompt_sets, ar_out, exit_layer)
    rounds = simulate_rounds(rep, policy)
    return {
        "replay": {
            "rounds": len(rounds),
            "engine_rounds": engine_rounds,
            "accepted": int(sum(r[3] for r in rounds)),
            "matches_engine": len(rounds) == engine_rounds,
        },
        "acceptance_vs_context": rounds_by_context(rounds, bucket, rep.prompt_len),
    }


def context_acceptance(
    bench: BenchModel,
    exit_layers,
    draft_lens,
    rows: int,
    images: list[str],
    prompt: str | None,
    seed: int,
    max_new: int,
    bucket: int,
) -> dict:
    """Figure 5: greedy AR on `rows` distinct prompts (not the timed ones), then per exit
    layer the teacher-forced token agreement by context, and the replayed rounds of a static
    policy for each draft length. Keyed by str(exit layer)."""
    prompts = make_prompts(bench, rows, images, prompt, seed, offset=1000)
    spec = DecodeSpec("ar", capacity=max_new, sampling=SamplingConfig(), eos_ids=eos_ids(bench))
    ar_out = decode_sets(VLM(bench.config, bench.dtype), bench.params, [prompts], spec, max_new)
    out = {}
    for exit_layer in exit_layers:
        rep = replay(bench, [prompts], ar_out, exit_layer)
        entry = token_agreement_by_context(rep, bucket)
        entry["rounds_static"] = {}
        for draft_len in draft_lens:
            rounds = simulate_rounds(rep, DraftPolicy(draft_len=draft_len))
            entry["rounds_static"][str(draft_len)] = rounds_by_context(rounds, bucket, rep.prompt_len)
        out[str(exit_layer)] = entry
    return out
