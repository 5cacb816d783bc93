"""The other drafters in the same engine (decode.engine.drafters): the EAGLE head (with and
without its visual compressor) and a separate small draft VLM. Greedy: exactly AR's
tokens; sampling: exactly the full model's distribution (chi-square against enumeration).
The imitation drafter's own tests are test_decode / test_sampling / test_tree."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate
from decode.engine.drafters import EagleDrafter, ModelDrafter
from fastvlm_jax.nn.eagle import compact_slots, compress
from fastvlm_jax.nn.model import VLM
from tests.test_decode import _prompts, _tokens
from tests.test_sampling import PROMPT, ROWS, VOCAB, WARPED, _chi_square, _exact_joint
from tests.tiny import tiny_config
from train.recipes.make_draft_model import truncated_config, truncated_params


def _scaled_residuals(params, scale):
    """Every decoder layer's residual branches scaled: the last-layer state stays close to
    the embedding, so a cheap drafter agrees with the full model often but not always."""
    params = jax.tree.map(lambda x: x, params)
    layers = params["language_model"]["layers"]
    for block, projection in (("self_attn", "o_proj"), ("mlp", "down_proj")):
        layers[block][projection]["kernel"] = layers[block][projection]["kernel"] * scale
    return params


def _echo_eagle(params, scale=0.05):
    """An EAGLE head that predicts f_{t+1} ~ norm(e_{t+1}) (plus a little of f_t and of its
    layer): with _scaled_residuals, a partly right draft, as a trained head would be."""
    eagle = jax.tree.map(lambda x: x, params["eagle"])
    width = eagle["fuse"]["kernel"].shape[1]
    eagle["fuse"]["kernel"] = jnp.concatenate([scale * jnp.eye(width), jnp.eye(width)], axis=0)
    for block, projection in (("self_attn", "o_proj"), ("mlp", "down_proj")):
        eagle["layer"][block][projection]["kernel"] = eagle["layer"][block][projection]["kernel"] * scale
    return {**params, "eagle": eagle}


def _truncated(model: VLM, params, num_layers: int):
    """A small draft VLM: the first num_layers layers of the model, its embeddings, head and
    vision side (train.recipes.make_draft_model's truncation)."""
    return (VLM(truncated_config(model.config, num_layers)), truncated_params(params, num_layers))


def _eagle_config(pool=1, compressor="pool", **kwargs):
    config = tiny_config(**kwargs)
    return config.with_draft(eagle_layers=1, eagle_image_pool=pool, eagle_compressor=compressor)


# (drafter, image pool, compressor, draft_len, residual scale: how far the full model is
# from what the drafter can guess)
GREEDY_CASES = [
    ("eagle", 1, "pool", 4, 0.3),
    ("eagle", 4, "prune", 6, 0.3),
    ("model", 1, "pool", 4, 0.6),
    ("model", 1, "pool", 1, 0.8),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "drafter,pool,compressor,draft_len,scale", GREEDY_CASES, ids=["eagle", "eagle-prune4", "model", "model-draft1"]
)
def test_greedy_drafters_equal_ar(drafter, pool, compressor, draft_len, scale):
    config = _eagle_config(pool, compressor, num_layers=4, exit_layer=2, kind="layer")
    model = VLM(config)
    params = _echo_eagle(_scaled_residuals(model.init(jax.random.key(draft_len + pool)), scale))
    n = config.num_image_tokens
    prompts = _prompts(config, [n + 3, n + 9, n + 5], seed=draft_len)
    ar = generate(model, params, prompts, DecodeSpec("ar", capacity=24, eos_ids=()), 24)
    eos = int(ar.tokens[0, 6])  # an EOS that some rows reach mid-way
    ar = generate(model, params, prompts, DecodeSpec("ar", capacity=24, eos_ids=(eos,)), 24)
    if drafter == "eagle":
        spec_drafter, draft_params = EagleDrafter(), None
    else:
        small, draft_params = _truncated(model, params, 2)
        spec_drafter = ModelDrafter(small)
    spec = DecodeSpec("ssd", capacity=24, eos_ids=(eos,), policy=DraftPolicy(draft_len=draft_len), drafter=spec_drafter)
    ssd = generate(model, params, prompts, spec, 24, draft_params=draft_params)
    assert _tokens(ssd) == _tokens(ar)
    assert int(ar.tokens[0, int(ar.num_tokens[0]) - 1]) == eos
    accepted, drafted = int(ssd.accepted.sum()), int(ssd.drafted.sum())
    assert 0 < accepted < drafted, f"want partial acceptance, got {accepted} of {drafted}"
    assert int(ssd.rounds.sum()) < int(ar.rounds.sum())


# (policy, budget): budgets that cut no round short when every draft is accepted (drafts
# past the budget would count as not accepted).
SELF_DRAFT_CASES = [
    # the prefill's token + 7 rounds of 3 drafts and the full model's own
    (DraftPolicy(draft_len=3), 29),
    # rounds of 1, 1, 2, 3, 3, ... drafts (one more every 4 tokens, up to 3): 1 + 2 + 2 + 3
    # + 4 * 4 tokens. The last draft of a round shorter than draft_len is not fed to the
    # draft model in its round either.
    (DraftPolicy(draft_len=3, schedule="context", start_len=1, grow_every=4), 24),
]


@pytest.mark.slow
@pytest.mark.parametrize("policy,budget", SELF_DRAFT_CASES, ids=["static", "context"])
def test_the_model_drafting_for_itself_is_always_accepted(policy, budget):
    """A draft model equal to the full model proposes exactly its tokens: every draft is
    accepted, so a stale or missing entry in the draft model's own cache (the last draft of
    an all-accepted round is fed again at the next round's start) would show as a rejection."""
    config = tiny_config(num_layers=3, exit_layer=1)
    model = VLM(config)
    params = model.init(jax.random.key(2))
    n = config.num_image_tokens
    prompts = _prompts(config, [n + 2, n + 7], seed=1)
    spec = DecodeSpec("ssd", capacity=budget, eos_ids=(), policy=policy, drafter=ModelDrafter(model))
    out = generate(model, params, prompts, spec, budget, draft_params=params)
    ar = generate(model, params, prompts, DecodeSpec("ar", capacity=budget, eos_ids=()), budget)
    assert _tokens(out) == _tokens(ar)
    assert int(out.accepted.sum()) == int(out.drafted.sum()) > 0


def test_eagle_with_compressor_is_exact_on_text_only_prompts():
    """A text-only row has no image to compress: its last head slots fall past the
    compressed cache and are dropped. Drafts get worse there; output stays exact."""
    config = _eagle_config(4, num_layers=4, exit_layer=2)
    model = VLM(config)
    params = _echo_eagle(_scaled_residuals(model.init(jax.random.key(5)), 0.3))
    # 4 image tokens pooled to 1 leave the head 3 slots short: the rows run past them.
    prompts = _prompts(config, [6, 9], seed=3, with_image=False)
    ar = generate(model, params, prompts, DecodeSpec("ar", capacity=24, eos_ids=()), 24)
    spec = DecodeSpec("ssd", capacity=24, eos_ids=(), policy=DraftPolicy(draft_len=4), drafter=EagleDrafter())
    assert _tokens(generate(model, params, prompts, spec, 24)) == _tokens(ar)


def test_compressor_slots_pool_and_prune():
    is_image = jnp.asarray([[0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]], bool)
    slots = compact_slots(is_image, 2)
    np.testing.assert_array_equal(slots, [[0, 1, 1, 2, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]])
    values = jnp.arange(16, dtype=jnp.float32).reshape(2, 8, 1)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    pooled, first = compress(values, positions, slots, is_image, "pool")
    np.testing.assert_allclose(pooled[0, :6, 0], [0, 1.5, 3.5, 5, 6, 7])
    np.testing.assert_array_equal(first[0, :6], [0, 1, 3, 5, 6, 7])
    np.testing.assert_allclose(pooled[1, :, 0], values[1, :, 0])
    pruned, _ = compress(values, positions, slots, is_image, "prune")
    np.testing.assert_allclose(pruned[0, :6, 0], [0, 1, 3, 5, 6, 7])


def test_drafter_errors_are_clear():
    config = tiny_config(num_layers=4, exit_layer=2)
    model = VLM(config)
    params = model.init(jax.random.key(0))
    prompts = _prompts(config, [config.num_image_tokens + 3])
    spec = DecodeSpec("ssd", capacity=8, policy=DraftPolicy(draft_len=2), drafter=EagleDrafter())
    with pytest.raises(ValueError, match="no EAGLE head"):
        generate(model, params, prompts, spec, 8)
    small, _ = _truncated(model, params, 2)
    with pytest.raises(ValueError, match="draft_params"):
        generate(model, params, prompts, dataclasses.replace(spec, drafter=ModelDrafter(small)), 8)
    from decode.engine.tree import TreeShape

    with pytest.raises(ValueError, match="imitation drafter only"):
        DecodeSpec("ssd", tree=TreeShape(nodes=4, width=2), drafter=EagleDrafter())


def _padded_vocabulary(config, extra):
    """The config with `extra` more embedding and head rows (same tokenizer, image token)."""
    return dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=config.text.vocab_size + extra))


def test_a_draft_model_with_another_vocabulary_is_refused():
    """A draft model with more rows than the full model proposes ids the full model has no
    embedding for (jnp.take fills NaN, which poisons the row through attention); one with
    fewer gives distributions of another width. generate refuses either in one line."""
    from tests.run_fixtures import random_params

    config = tiny_config(num_layers=2, exit_layer=1)
    model = VLM(config)
    prompts = _prompts(config, [config.num_image_tokens + 3])
    vocab = config.text.vocab_size
    for extra in (8, -4):
        small = _padded_vocabulary(config, extra)
        spec = DecodeSpec("ssd", capacity=8, policy=DraftPolicy(draft_len=2), drafter=ModelDrafter(VLM(small)))
        with pytest.raises(ValueError) as info:
            generate(model, random_params(config), prompts, spec, 8, draft_params=random_params(small, 1))
        message = str(info.value)
        assert "\n" not in message and f"{vocab + extra} tokens" in message and f"{vocab}" in message, message
        assert "make_draft_model" in message  # the fix


def test_decode_run_refuses_a_draft_checkpoint_with_another_vocabulary(tmp_path, capsys):
    """The same tokenizer but a padded embedding table: refused when the Captioner loads the
    draft model, so the CLI says so in one line before decoding anything."""
    from decode import run
    from decode.engine.captioner import Captioner
    from fastvlm_jax.ckpt.checkpoint import load_checkpoint, save_checkpoint
    from tests.run_fixtures import make_tiny_checkpoint, random_params, write_image

    ckpt = make_tiny_checkpoint(tmp_path / "full", num_layers=2, exit_layer=1)
    full = load_checkpoint(ckpt)
    padded = _padded_vocabulary(full.config, 8)
    draft = save_checkpoint(tmp_path / "draft", padded, random_params(padded, 1), full.tokenizer, full.image_config)
    vocab = full.config.text.vocab_size
    with pytest.raises(ValueError, match=f"{vocab + 8} tokens"):
        Captioner(full, batch_size=1, drafter=f"model:{draft}")
    argv = ["--ckpt", str(ckpt), "--images", str(write_image(tmp_path / "in.png")), "--out", str(tmp_path / "o.jsonl")]
    assert run.main([*argv, "--drafter", f"model:{draft}"]) == run.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{vocab + 8} tokens" in err[0] and f"{vocab}" in err[0], err
    out = tmp_path / "o.jsonl"
    assert not out.exists() or not out.read_text()  # nothing decoded


# --- sampling: exact in distribution ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_eagle():
    """The test_sampling model (vocab 6, 3 layers), with an EAGLE head, and the draft
    small model made of its first 2 layers: both drafters accept often but not always."""
    config = _eagle_config(vocab_size=VOCAB, num_layers=3, exit_layer=1, hidden_size=32)
    model = VLM(config)
    params = jax.jit(model.init)(jax.random.key(11))
    params["language_model"]["lm_head"]["kernel"] = params["language_model"]["lm_head"]["kernel"] * 12
    params = _echo_eagle(_scaled_residuals(params, 0.5))
    return model, params, {}


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["eagle", "model"])
def test_drafters_sample_the_exact_distribution(tiny_eagle, drafter):
    model, params, _ = tiny_eagle
    steps, draft_len = 4, 2
    joint = _exact_joint(tiny_eagle, steps, WARPED)
    if drafter == "eagle":
        spec_drafter, draft_params = EagleDrafter(), None
    else:
        small, draft_params = _truncated(model, params, 2)
        # A flatter head than the full model's: the truncation alone agrees too often to
        # exercise rejections.
        head = draft_params["language_model"]["lm_head"]
        draft_params["language_model"] = {**draft_params["language_model"], "lm_head": {"kernel": head["kernel"] * 0.5}}
        spec_drafter = ModelDrafter(small)
    prompts = Prompts(jnp.asarray([PROMPT] * ROWS, jnp.int32), jnp.full((ROWS,), len(PROMPT), jnp.int32))
    spec = DecodeSpec(
        "ssd",
        capacity=steps,
        sampling=WARPED,
        eos_ids=(),
        policy=DraftPolicy(draft_len=draft_len),
        drafter=spec_drafter,
    )
    out = generate(model, params, prompts, spec, steps, jax.random.key(3), draft_params=draft_params)
    assert np.all(np.asarray(out.num_tokens) == steps)
    accepted, drafted = int(out.accepted.sum()), int(out.drafted.sum())
    # Both branches of the acceptance rule shaped the samples.
    assert 0.2 * drafted < accepted < 0.9 * drafted, (accepted, drafted)
    pvalue, impossible = _chi_square(np.asarray(out.tokens)[:, :steps], joint)
    print(f"{drafter}: p = {pvalue:.3g}, accepted {accepted}/{drafted}")
    assert impossible == 0
    assert pvalue > 1e-3, f"{drafter} samples differ from the exact distribution: p = {pvalue:.3g}"


@pytest.mark.slow
def test_a_wrong_draft_distribution_is_detected(tiny_eagle, monkeypatch):
    """Power: if the engine judged the EAGLE drafts by a distribution other than the one
    they were drawn from (here: sharpened), the chi-square test must fail."""
    from decode.engine import loop

    model, params, _ = tiny_eagle
    steps = 4
    joint = _exact_joint(tiny_eagle, steps, WARPED)
    original = loop.accept_speculative

    def sharpened(rng, target_probs, draft_probs, *args):
        sharp = draft_probs**3
        return original(rng, target_probs, sharp / jnp.maximum(sharp.sum(-1, keepdims=True), 1e-30), *args)

    monkeypatch.setattr(loop, "accept_speculative", sharpened)
    prompts = Prompts(jnp.asarray([PROMPT] * ROWS, jnp.int32), jnp.full((ROWS,), len(PROMPT), jnp.int32))
    spec = DecodeSpec(
        "ssd", capacity=steps + 1, sampling=WARPED, eos_ids=(), policy=DraftPolicy(draft_len=2), drafter=EagleDrafter()
    )
    out = generate(model, params, prompts, spec, steps, jax.random.key(3))
    pvalue, impossible = _chi_square(np.asarray(out.tokens)[:, :steps], joint)
    assert impossible > 0 or pvalue < 1e-3, f"the broken rule went unnoticed: p = {pvalue:.3g}"


@pytest.mark.slow
def test_the_compressor_shrinks_the_eagle_cache_by_the_pooled_image_slots():
    from decode import engine

    config = _eagle_config(4, num_layers=4, exit_layer=2)  # 4 image tokens -> 1 slot
    model = VLM(config)
    params = model.init(jax.random.key(0))
    n = config.num_image_tokens
    prompts = _prompts(config, [n + 3, n + 5])
    spec = DecodeSpec("ssd", capacity=8, policy=DraftPolicy(draft_len=2), drafter=EagleDrafter())
    state = engine.prefill(model, params, prompts, spec, 8)
    saved = n - -(-n // 4)
    assert saved > 0
    assert state.draft.cache.slots == spec.cache_slots(n + 5) - saved
    np.testing.assert_array_equal(state.draft.removed, [saved, saved])


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["eagle", "model"])
def test_drafters_on_a_converted_hf_blip2_equal_ar_and_hf(converted, drafter):
    """A converted Hugging Face model of the other family (BLIP-2 / OPT: learned positions,
    its own layers): an EAGLE head added to it, and a draft model cut from it, both give
    AR's tokens, which are HF generate's."""
    from tests.test_blip2 import EOS, MAX_NEW

    checkpoint, prompts, hf_tokens, ar, _ = converted
    model = VLM(checkpoint.config)
    spec = DecodeSpec("ssd", capacity=MAX_NEW, eos_ids=(EOS,), policy=DraftPolicy(draft_len=3))
    if drafter == "eagle":
        config = checkpoint.config.with_draft(eagle_layers=1)
        model = VLM(config)
        params = {**checkpoint.params, "eagle": model.init_eagle(jax.random.key(4))}
        out = generate(model, params, prompts, dataclasses.replace(spec, drafter=EagleDrafter()), MAX_NEW)
    else:
        small, small_params = _truncated(model, checkpoint.params, 2)
        out = generate(
            model,
            checkpoint.params,
            prompts,
            dataclasses.replace(spec, drafter=ModelDrafter(small)),
            MAX_NEW,
            draft_params=small_params,
        )
        assert int(out.accepted.sum()) > 0
    assert _tokens(out) == _tokens(ar) == hf_tokens
