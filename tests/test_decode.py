"""The decoding engine: greedy SSD == AR exactly, structure, compilation (sampling: test_sampling.py)."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import engine
from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate
from decode.engine.drafters import Drafter, ImitationDrafter
from decode.engine.sampling import SamplingConfig
from fastvlm_jax.nn.model import VLM
from tests.test_sampling import PROMPT
from tests.tiny import tiny_config


def _near_identity_deep_layers(params, config, scale):
    """Scales the deep layers' residual branches so the draft path agrees often but not always."""
    params = jax.tree.map(lambda x: x, params)
    layers = params["language_model"]["layers"]
    for block, projection in (("self_attn", "o_proj"), ("mlp", "down_proj")):
        kernel = layers[block][projection]["kernel"]
        layers[block][projection]["kernel"] = kernel.at[config.draft.exit_layer :].multiply(scale)
    return params


def _perturbed_imitation(params, seed, scale=0.05):
    """The imitation network's params plus noise: a trained-looking, non-identity draft
    (its zero-initialised output projections become non-zero)."""
    leaves, treedef = jax.tree.flatten(params["imitation"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return {**params, "imitation": jax.tree.unflatten(treedef, noisy)}


def _prompts(config, lengths, seed=0, with_image=True):
    """Right-padded prompts of different lengths, each [bos, image tokens, text...]."""
    rng = np.random.RandomState(seed)
    n_image = config.num_image_tokens if with_image else 0
    width = max(lengths)
    ids = np.zeros((len(lengths), width), np.int32)
    for row, length in enumerate(lengths):
        text = rng.randint(3, config.image_token_id, length - 1 - n_image)
        ids[row, :length] = [1] + [config.image_token_id] * n_image + list(text)
    pixels = None
    if with_image:
        size = config.vision.image_size
        pixels = jnp.asarray(rng.randn(len(lengths), size, size, 3).astype(np.float32))
    return Prompts(jnp.asarray(ids), jnp.asarray(lengths, jnp.int32), pixels)


def _tokens(output):
    return [list(np.asarray(row[: int(n)])) for row, n in zip(output.tokens, output.num_tokens)]


# Each exit layer with each imitation kind, draft lengths from 1 to 8 (the drafters' tests
# in test_drafters.py cover more lengths).
CASES = [
    (1, "ffn", 1),
    (2, "ffn", 3),
    (3, "ffn", 8),
    (1, "layer", 5),
    (2, "layer", 2),
    (3, "layer", 4),
]


@pytest.mark.slow
@pytest.mark.parametrize("exit_layer,kind,draft_len", CASES)
def test_greedy_ssd_equals_ar(exit_layer, kind, draft_len):
    config = tiny_config(num_layers=4, exit_layer=exit_layer, kind=kind)
    model = VLM(config)
    params = model.init(jax.random.key(exit_layer * 10 + draft_len))
    params = _near_identity_deep_layers(params, config, 0.3)
    n = config.num_image_tokens
    prompts = _prompts(config, [n + 3, n + 9, n + 5], seed=draft_len)
    ar = generate(model, params, prompts, DecodeSpec("ar", capacity=24, eos_ids=()), 24)
    # An EOS that the greedy output reaches mid-way in some rows.
    eos = int(ar.tokens[0, 6])
    ar_spec = DecodeSpec("ar", capacity=24, eos_ids=(eos,))
    ssd_spec = DecodeSpec("ssd", capacity=24, eos_ids=(eos,), policy=DraftPolicy(draft_len=draft_len))
    ar = generate(model, params, prompts, ar_spec, 24)
    ssd = generate(model, params, prompts, ssd_spec, 24)
    assert _tokens(ssd) == _tokens(ar)
    assert int(ar.num_tokens[0]) <= 7 and int(ar.tokens[0, int(ar.num_tokens[0]) - 1]) == eos
    assert int(ssd.accepted.sum()) > 0, "the near-identity draft should get some tokens accepted"
    assert int(ssd.rounds.sum()) < int(ar.rounds.sum())


@pytest.mark.slow
def test_greedy_ssd_policies_equal_ar():
    """Confidence early-stop and the context-length schedule never change greedy output."""
    config = tiny_config(num_layers=4, exit_layer=1)
    model = VLM(config)
    params = _near_identity_deep_layers(model.init(jax.random.key(7)), config, 0.5)
    n = config.num_image_tokens
    prompts = _prompts(config, [n + 4, n + 2], seed=3)
    ar = generate(model, params, prompts, DecodeSpec("ar", capacity=32, eos_ids=()), 32)
    for policy in [
        DraftPolicy(draft_len=4, min_confidence=0.3),
        DraftPolicy(draft_len=5, schedule="context", start_len=1, grow_every=6),
    ]:
        ssd = generate(model, params, prompts, DecodeSpec("ssd", capacity=32, eos_ids=(), policy=policy), 32)
        assert _tokens(ssd) == _tokens(ar)
        assert int(ssd.drafted.sum()) < int(ssd.rounds.sum()) * policy.draft_len  # policy drafted less


DRAFT_PASSES = collections.Counter()  # drafter calls as they run, by kind (see _CountingDrafter)


@dataclasses.dataclass(frozen=True)
class _CountingDrafter(Drafter):
    """The imitation drafter, counting its passes (start, step, finish) each time one runs
    inside the compiled loop (a debug callback), not when it is traced."""

    inner: Drafter = ImitationDrafter()
    name: str = "counting"

    @staticmethod
    def _count(kind):
        jax.debug.callback(lambda: DRAFT_PASSES.update([kind]))

    def verify_from(self, model):
        return self.inner.verify_from(model)

    def cache_slots(self, model, slots):
        return self.inner.cache_slots(model, slots)

    def prefill(self, ctx, states, first_token, slots):
        return self.inner.prefill(ctx, states, first_token, slots)

    def start(self, ctx, cache, carry, last_token, pos):
        self._count("start")
        return self.inner.start(ctx, cache, carry, last_token, pos)

    def step(self, ctx, cache, carry, token, position):
        self._count("step")
        return self.inner.step(ctx, cache, carry, token, position)

    def finish(self, ctx, cache, carry, token, position):
        self._count("finish")
        return self.inner.finish(ctx, cache, carry, token, position)

    def commit(self, ctx, carry, verified):
        return self.inner.commit(ctx, carry, verified)


@pytest.mark.parametrize(
    "policy,temperature",
    [
        (DraftPolicy(draft_len=4), 0.0),
        (DraftPolicy(draft_len=4, min_confidence=0.6), 0.0),
        (DraftPolicy(draft_len=4, min_confidence=0.6), 1.0),
        (DraftPolicy(draft_len=4, schedule="context", start_len=1, grow_every=4), 0.0),
    ],
    ids=["static", "confidence", "confidence-sampling", "context"],
)
def test_a_round_runs_one_draft_pass_per_drafted_token(tiny, policy, temperature):
    """A round that drafts n tokens runs n + 1 drafter passes: start (the first token's
    distribution), a step for each drafted token but the last, and for the last a finish,
    or a step where its distribution is what stops the draft (a confidence stop). No pass
    for a token nobody proposes. Batch 1, so the round's n is the row's."""
    model, params, _ = tiny
    prompts = Prompts(jnp.asarray([PROMPT], jnp.int32), jnp.asarray([len(PROMPT)], jnp.int32))
    sampling = SamplingConfig(temperature=temperature)
    spec = DecodeSpec("ssd", capacity=24, sampling=sampling, eos_ids=(), policy=policy, drafter=_CountingDrafter())
    DRAFT_PASSES.clear()
    ssd = jax.block_until_ready(generate(model, params, prompts, spec, 24, jax.random.key(1)))
    jax.effects_barrier()  # every callback has run
    rounds, drafted = int(ssd.rounds[0]), int(ssd.drafted[0])
    assert DRAFT_PASSES["start"] == rounds
    assert sum(DRAFT_PASSES.values()) == rounds + drafted, (DRAFT_PASSES, rounds, drafted)
    if policy.schedule != "static" or policy.min_confidence > 0:
        assert drafted < rounds * policy.draft_len, "some rounds should stop early"
    if sampling.greedy:
        ar = generate(model, params, prompts, DecodeSpec("ar", capacity=24, eos_ids=()), 24)
        assert _tokens(ssd) == _tokens(ar)


def test_draft_identical_to_full_model_accepts_everything():
    config = tiny_config(num_layers=4, exit_layer=2)
    model = VLM(config)
    params = _near_identity_deep_layers(model.init(jax.random.key(8)), config, 0.0)
    prompts = _prompts(config, [config.num_image_tokens + 4] * 2)
    spec = DecodeSpec("ssd", capacity=21, eos_ids=(), policy=DraftPolicy(draft_len=4))
    out = generate(model, params, prompts, spec, 21)
    assert np.all(np.asarray(out.accepted) == np.asarray(out.drafted))
    assert np.all(np.asarray(out.rounds) == 4)  # 1 prefill token + 4 rounds of 5 tokens
    assert np.all(np.asarray(out.position_accepts) == np.asarray(out.position_attempts))


@pytest.mark.slow
@pytest.mark.parametrize("trained_draft", [False, True])
def test_caches_after_ssd_rounds_equal_a_cache_free_pass(trained_draft):
    """After SSD rounds, every committed slot of all three caches (shallow and deep layers,
    imitation network) holds what one pass over the committed tokens writes: none is
    missing (e.g. the last drafted slot when every draft was accepted) or stale.

    trained_draft=False: deep layers off and a fresh (identity) imitation network, so the
    draft equals the full model and whole drafts get accepted. True: a perturbed 'layer'
    imitation network and weakened (not removed) deep layers: partial acceptance, so
    rejected drafts leave stale slots that later rounds must overwrite."""
    config = tiny_config(num_layers=4, exit_layer=2, kind="layer")
    model = VLM(config)
    params = model.init(jax.random.key(3))
    if trained_draft:
        params = _perturbed_imitation(_near_identity_deep_layers(params, config, 0.3), seed=4, scale=0.005)
    else:
        params = _near_identity_deep_layers(params, config, 0.0)
    prompts = _prompts(config, [config.num_image_tokens + 4, config.num_image_tokens + 2])
    spec = DecodeSpec("ssd", capacity=20, eos_ids=(), policy=DraftPolicy(draft_len=3))

    @jax.jit
    def three_rounds(params):
        state = engine.prefill(model, params, prompts, spec, 20)
        for _ in range(3):
            state = engine.decode_round(model, params, spec, state, 20)
        return state

    state = three_rounds(params)
    if trained_draft:  # some drafts rejected, some accepted
        assert 0 < int(state.stats.accepted.sum()) < int(state.stats.drafted.sum())
    else:
        assert int(np.max(state.stats.accepted)) == 3 * 3  # whole drafts taken
    slots = state.cache.slots
    for row in range(2):
        length = int(prompts.lengths[row])
        committed = int(state.cache.pos[row])
        ids = np.concatenate(
            [np.asarray(prompts.input_ids[row, :length]), np.asarray(state.tokens[row, : committed - length])]
        )[None]
        positions = jnp.arange(committed)[None]
        pixels = prompts.pixels[row : row + 1]
        hidden = model.embed(params, jnp.asarray(ids), model.encode_images(params, pixels), positions)
        fresh = model.init_cache(1, slots)
        h_exit, fresh, _ = model.run_layers(params, hidden, positions, 0, config.draft.exit_layer, fresh)
        _, fresh, _ = model.run_layers(
            params, h_exit, positions, config.draft.exit_layer, config.text.num_layers, fresh
        )
        _, draft_kv = model.imitate(params, h_exit, positions, model.init_draft_cache(1, slots))
        pairs = [(state.cache.keys[i][row], fresh.keys[i][0]) for i in range(config.text.num_layers)]
        pairs += [(state.cache.values[i][row], fresh.values[i][0]) for i in range(config.text.num_layers)]
        pairs += [(state.draft.keys[0][row], draft_kv.keys[0][0]), (state.draft.values[0][row], draft_kv.values[0][0])]
        for got, want in pairs:
            np.testing.assert_allclose(got[:, :committed], want[:, :committed], rtol=1e-4, atol=1e-5)


class _RecordingVLM(VLM):
    """Records (start, stop, tokens per row) of every decoder layer-range call at trace time."""

    def __init__(self, config):
        super().__init__(config)
        self.calls = []

    def run_layers(self, params, hidden, positions, start, stop, *args, **kwargs):
        self.calls.append((start, stop, hidden.shape[1]))
        return super().run_layers(params, hidden, positions, start, stop, *args, **kwargs)


def test_verification_runs_only_the_deep_layers_for_drafted_tokens():
    config = tiny_config(num_layers=4, exit_layer=3)
    model = _RecordingVLM(config)
    params = model.init(jax.random.key(9))
    prompts = _prompts(config, [config.num_image_tokens + 3])
    draft_len = 5
    generate(model, params, prompts, DecodeSpec("ssd", capacity=8, policy=DraftPolicy(draft_len)), 8)
    prompt_len = prompts.input_ids.shape[1]
    after_prefill = [c for c in model.calls if c[2] != prompt_len]
    # Shallow layers only ever see one new token at a time (drafting); the multi-token
    # verification pass starts at the exit layer.
    assert set(after_prefill) == {(0, 3, 1), (3, 4, draft_len + 1)}


@pytest.mark.slow
def test_same_bucket_reuses_the_compiled_program():
    config = tiny_config(num_layers=2, exit_layer=1)
    model = VLM(config)
    params = model.init(jax.random.key(10))
    spec = DecodeSpec("ssd", capacity=16, policy=DraftPolicy(draft_len=3))
    n = config.num_image_tokens
    generate(model, params, _prompts(config, [n + 4, n + 6], seed=1), spec, 16)
    before = engine.compiled_programs()
    # Same shapes, different prompts, lengths, budgets and seeds: no new trace.
    for seed, max_new in [(2, 5), (3, 16), (4, 1)]:
        out = generate(model, params, _prompts(config, [n + 6, n + 2], seed=seed), spec, max_new, jax.random.key(seed))
        assert int(np.max(np.asarray(out.num_tokens))) <= max_new
    assert engine.compiled_programs() == before
    generate(model, params, _prompts(config, [n + 9, n + 2], seed=5), spec, 4)  # new bucket
    assert engine.compiled_programs() == before + 1


@pytest.mark.slow
def test_greedy_ssd_equals_ar_on_converted_hf_model(tmp_path):
    import json

    from fastvlm_jax.ckpt.convert import llava as convert_llava
    from tests.hf_models import build_tiny_llava, random_prompt_ids

    hf_model = build_tiny_llava(tmp_path, seed=3, num_kv_heads=2)
    config = convert_llava.config_from_hf(json.loads((tmp_path / "config.json").read_text()), exit_layer=2)
    params = convert_llava.convert_params(
        convert_llava.open_safetensors(tmp_path), config, jax.random.key(0), progress=False
    )
    model = VLM(config)
    rng = np.random.RandomState(1)
    rows = [random_prompt_ids(hf_model.config, rng, text_len=t) for t in (3, 8)]
    width = max(map(len, rows))
    ids = np.zeros((2, width), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    size = config.vision.image_size
    prompts = Prompts(
        jnp.asarray(ids),
        jnp.asarray([len(r) for r in rows], jnp.int32),
        jnp.asarray(rng.randn(2, size, size, 3).astype(np.float32)),
    )
    ar = generate(model, params, prompts, DecodeSpec("ar", capacity=20, eos_ids=(2,)), 20)
    ssd = generate(
        model, params, prompts, DecodeSpec("ssd", capacity=20, eos_ids=(2,), policy=DraftPolicy(draft_len=3)), 20
    )
    assert _tokens(ssd) == _tokens(ar)
