"""Continuous batching (decode.engine.slots): each request's tokens are what it gets decoded
alone, whatever the slots, the batch or the rest of the traffic; sampling is exact and
per-request deterministic."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate
from decode.engine.drafters import EagleDrafter, ModelDrafter
from decode.engine.sampling import SamplingConfig
from decode.engine.slots import Request, SlotEngine, SlotStats
from decode.engine.tree import TreeShape
from fastvlm_jax.nn.model import VLM
from tests.test_drafters import _eagle_config, _echo_eagle, _scaled_residuals, _truncated

CAPACITY = 16
PROMPT_LEN = 32


def _requests(config, count, seed=0):
    """`count` requests of different prompt lengths and budgets, each with its own key."""
    rng = np.random.RandomState(seed)
    n = config.num_image_tokens
    size = config.vision.image_size
    requests = []
    for index in range(count):
        text = rng.randint(3, config.image_token_id, int(rng.randint(2, 10))).tolist()
        ids = (1, *([config.image_token_id] * n), *text)
        pixels = rng.randn(size, size, 3).astype(np.float32)
        budget = int(rng.choice([3, 7, CAPACITY]))
        key = jax.random.fold_in(jax.random.key(123), index)
        requests.append(Request(ids, pixels, key, budget, tag=index))
    return requests


def _one(request):
    """The request as a batch of one, right-padded to the engine's bucket (one program for all)."""
    ids = list(request.prompt_ids) + [0] * (PROMPT_LEN - len(request.prompt_ids))
    return Prompts(
        jnp.asarray([ids], jnp.int32),
        jnp.asarray([len(request.prompt_ids)], jnp.int32),
        jnp.asarray(request.pixels[None]),
    )


def _alone(model, params, spec, request, draft_params=None):
    """The request decoded alone, at batch 1, with generate (its key as the batch's key)."""
    out = generate(
        model, params, _one(request), spec, request.max_new_tokens, jax.random.key(0), draft_params=draft_params
    )
    return tuple(int(t) for t in np.asarray(out.tokens[0, : int(out.num_tokens[0])]))


def _model():
    config = _eagle_config(1, "pool", num_layers=4, exit_layer=2, kind="layer")
    model = VLM(config)
    params = _echo_eagle(_scaled_residuals(model.init(jax.random.key(3)), 0.3))
    return model, params


SPECS = {
    "ar": lambda: (DecodeSpec("ar", capacity=CAPACITY, eos_ids=()), None),
    "eagle": lambda: (
        DecodeSpec("ssd", capacity=CAPACITY, eos_ids=(), policy=DraftPolicy(draft_len=3), drafter=EagleDrafter()),
        None,
    ),
    "model": lambda: ("model", None),
}


@pytest.mark.slow
# SSD chains and draft trees: test_auto_draft_lengths_take_turns_on_the_slots, where both run.
@pytest.mark.parametrize("name", sorted(SPECS))
def test_greedy_continuous_equals_each_request_alone(name):
    model, params = _model()
    spec, draft_params = SPECS[name]()
    if spec == "model":
        small, draft_params = _truncated(model, params, 2)
        spec = DecodeSpec(
            "ssd", capacity=CAPACITY, eos_ids=(), policy=DraftPolicy(draft_len=2), drafter=ModelDrafter(small)
        )
    requests = _requests(model.config, 9, seed=1)
    # An EOS that some requests reach mid-way, so slots free up at different rounds.
    eos = int(_alone(model, params, DecodeSpec("ar", capacity=CAPACITY, eos_ids=()), requests[0])[2])
    spec = DecodeSpec(spec.mode, spec.capacity, spec.sampling, spec.policy, (eos,), spec.tree, spec.drafter)
    want = {r.tag: _alone(model, params, spec, r, draft_params) for r in requests}
    stats = SlotStats(4)
    engine = SlotEngine(model, params, spec, 4, prompt_len=PROMPT_LEN, prefill_rows=2, draft_params=draft_params)
    got = {f.request.tag: f.token_ids for f in engine.stream(requests, stats)}
    assert got == want
    assert stats.inserts == len(requests) and stats.prefills >= len(requests) // 2
    assert 0.5 < stats.utilization <= 1.0
    if name != "ar":
        assert 0 < sum(f for f in stats.position_accepts) < sum(stats.position_attempts)


@pytest.mark.slow
def test_sampled_requests_do_not_depend_on_batch_or_order():
    """Sampling: a request's tokens come from its own key: the same at 2 and at 5 slots, in
    another order, and decoded alone."""
    model, params = _model()
    spec = DecodeSpec(
        "ssd", capacity=CAPACITY, eos_ids=(), sampling=SamplingConfig(temperature=1.0), policy=DraftPolicy(draft_len=3)
    )
    requests = _requests(model.config, 7, seed=2)
    runs = []
    for batch, order in ((2, requests), (5, requests[::-1])):
        engine = SlotEngine(model, params, spec, batch, prompt_len=PROMPT_LEN, prefill_rows=1)
        runs.append({f.request.tag: f.token_ids for f in engine.stream(order)})
    assert runs[0] == runs[1]
    # Alone: a batch-1 generate with the request's key as a one-row key array.
    request = requests[3]
    out = generate(model, params, _one(request), spec, request.max_new_tokens, request.key[None])
    assert tuple(int(t) for t in np.asarray(out.tokens[0, : int(out.num_tokens[0])])) == runs[0][3]
    # Different keys give different samples (the keys are used).
    assert len({runs[0][r.tag] for r in requests}) > 1


@pytest.mark.slow
def test_speculative_sampling_is_exact_under_continuous_batching():
    """Chi-square of the 3-token samples of requests decoded in slots, amid requests of other
    budgets that finish and free their slots at other rounds, against the enumerated
    distribution (test_sampling's 6-token model). Auto draft lengths: draft lengths 1 and 2
    take turns (each measured for a few rounds, then chosen from the acceptance of rounds
    already run), so chains of either length and the switches between them are covered."""
    from decode.engine.autodraft import AutoDraft, AutoDraftConfig
    from tests.test_sampling import PROMPT, _chi_square, _exact_joint
    from tests.tiny import tiny_config

    config = tiny_config(vocab_size=6, num_layers=3, exit_layer=1, hidden_size=32)
    model = VLM(config)
    params = jax.jit(model.init)(jax.random.key(11))
    params["language_model"]["lm_head"]["kernel"] = params["language_model"]["lm_head"]["kernel"] * 12
    steps = 3
    sampling = SamplingConfig(temperature=1.0)
    spec = DecodeSpec("ssd", capacity=steps, sampling=sampling, eos_ids=(), policy=DraftPolicy(draft_len=1))
    base = jax.random.key(5)
    requests = [
        Request(tuple(PROMPT), None, jax.random.fold_in(base, i), steps if i % 2 == 0 else 1 + i % 4 // 2, tag=i)
        for i in range(8000)
    ]
    choices = {g: dataclasses.replace(spec, policy=DraftPolicy(draft_len=g)) for g in (1, 2)}
    engine = SlotEngine(
        model,
        params,
        spec,
        512,
        prompt_len=len(PROMPT),
        prompt_bucket=len(PROMPT),
        prefill_rows=128,
        auto=AutoDraft(AutoDraftConfig((1, 2))),
        choices=choices,
    )
    stats = SlotStats(512)
    finished = [f for f in engine.stream(requests, stats) if f.request.max_new_tokens == steps]
    assert len(finished) == 4000 and stats.inserts == 8000
    assert set(stats.choice_rounds) == {1, 2}
    assert 0 < sum(stats.position_accepts) < sum(stats.position_attempts)
    joint = _exact_joint((model, params, {}), steps, sampling)
    pvalue, impossible = _chi_square(np.asarray([f.token_ids for f in finished]), joint)
    print(f"continuous SSD, {steps} steps: p = {pvalue:.3g}")
    assert impossible == 0 and pvalue > 1e-3, pvalue


@pytest.mark.slow
def test_auto_draft_lengths_take_turns_on_the_slots():
    """--draft-len auto under continuous batching: chains of two lengths and a tree take turns
    on one slot state (sized for the deepest), every choice runs, and each request still gets
    exactly the tokens it gets decoded alone."""
    from decode.engine.autodraft import AutoDraft, AutoDraftConfig

    model, params = _model()
    requests = _requests(model.config, 9, seed=4)
    eos = int(_alone(model, params, DecodeSpec("ar", capacity=CAPACITY, eos_ids=()), requests[0])[2])
    ar = DecodeSpec("ar", capacity=CAPACITY, eos_ids=(eos,))
    want = {r.tag: _alone(model, params, ar, r) for r in requests}
    tree = TreeShape(nodes=4, width=2)
    choices = {
        1: DecodeSpec("ssd", capacity=CAPACITY, eos_ids=(eos,), policy=DraftPolicy(draft_len=1)),
        4: DecodeSpec("ssd", capacity=CAPACITY, eos_ids=(eos,), policy=DraftPolicy(draft_len=4)),
        tree: DecodeSpec("ssd", capacity=CAPACITY, eos_ids=(eos,), tree=tree),
    }
    auto = AutoDraft(AutoDraftConfig(choices=tuple(choices)))
    stats = SlotStats(4)
    engine = SlotEngine(model, params, ar, 4, prompt_len=PROMPT_LEN, prefill_rows=2, auto=auto, choices=choices)
    assert engine.cache_slots == PROMPT_LEN + CAPACITY + max(s.lookahead for s in choices.values())
    got = {f.request.tag: f.token_ids for f in engine.stream(requests, stats)}
    assert got == want
    assert set(stats.choice_rounds) == {1, 4, "tree:4x2"} and sum(stats.choice_rounds.values()) == stats.rounds
    assert set(auto.round_seconds[("slots", 4, engine.cache_slots)]) == set(choices)
    # The counters grew at every depth the deepest choice drafts.
    assert len(stats.position_attempts) == 4 and min(stats.position_attempts) > 0


def test_auto_draft_lengths_refuse_what_cannot_share_slots():
    from decode.engine.autodraft import AutoDraft, AutoDraftConfig

    model, params = _model()
    eagle = {
        g: DecodeSpec("ssd", capacity=CAPACITY, eos_ids=(), policy=DraftPolicy(draft_len=g), drafter=EagleDrafter())
        for g in (2, 4)
    }
    with pytest.raises(ValueError, match="eagle drafter's state depends on the draft length"):
        SlotEngine(model, params, eagle[2], 4, PROMPT_LEN, auto=AutoDraft(AutoDraftConfig((2, 4))), choices=eagle)
    with_ar = {0: DecodeSpec("ar", capacity=CAPACITY, eos_ids=()), 2: DecodeSpec("ssd", capacity=CAPACITY, eos_ids=())}
    with pytest.raises(ValueError, match="AR rounds would leave the drafter's cache behind"):
        SlotEngine(model, params, with_ar[2], 4, PROMPT_LEN, auto=AutoDraft(AutoDraftConfig((0, 2))), choices=with_ar)
