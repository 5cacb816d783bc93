"""Sampling: SamplingConfig validation, and speculative sampling is lossless.

The chi-square tests compare SSD samples with the full model's exact joint distribution
over a few new tokens, enumerated on a 6-token vocabulary. Each case has
steps == draft_len + 2, so a row whose first round accepts every draft token ends with
that round's bonus token: the bonus branch shapes the tested distribution, and the tests
check from the output counters that it happened often. Mutated acceptance rules,
monkeypatched into the engine, must fail the same check: that shows it has power.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate, loop
from decode.engine import sampling as sampling_lib
from decode.engine.sampling import SamplingConfig, sample, warp
from fastvlm_jax.nn.model import VLM
from tests.tiny import tiny_config

# --- SamplingConfig validation -------------------------------------------------------------

BAD_VALUES = [
    ("temperature", -0.5),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", float("inf")),
    ("top_p", 0.0),
    ("top_p", -0.1),
    ("top_p", 1.5),
    ("top_p", float("nan")),
    ("top_p", float("inf")),
]


@pytest.mark.parametrize("field,value", BAD_VALUES)
def test_sampling_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError) as info:
        SamplingConfig(**{"temperature": 1.0, field: value})
    message = str(info.value)
    assert message.startswith(f"{field} must be") and repr(value) in message and "\n" not in message
    # dataclasses.replace re-runs the check, so a valid config cannot be edited into a bad one.
    with pytest.raises(ValueError, match=f"^{field} must be"):
        dataclasses.replace(SamplingConfig(temperature=1.0), **{field: value})


def test_sampling_config_accepts_the_edges_of_the_valid_ranges():
    assert SamplingConfig().greedy and SamplingConfig(temperature=0.0, top_k=0, top_p=1.0).greedy
    assert not SamplingConfig(temperature=1e-3, top_k=1, top_p=1e-3).greedy
    # NumPy scalars (e.g. from a config file or a sweep) are numbers too.
    assert SamplingConfig(temperature=np.float32(0.7), top_k=np.int64(4), top_p=np.float64(0.9)).top_k == 4


def test_tiny_top_p_keeps_only_the_likeliest_token():
    """The useful limit top_p -> 0 is greedy; top_p = 0 itself, now rejected, kept no
    token and so drew uniformly from the whole vocabulary."""
    probs = warp(jnp.asarray([[1.0, 3.0, 2.0, -1.0]]), SamplingConfig(temperature=1.0, top_p=1e-3))
    np.testing.assert_array_equal(np.asarray(probs), [[0.0, 1.0, 0.0, 0.0]])


def _warp_by_full_sort(logits, config):
    """The warp as it was before top-p learned to rank only the top-k values: top-p sorts
    the whole vocabulary. The reference the cheaper warp must equal."""
    logits = logits.astype(jnp.float32) / max(config.temperature, 1e-6)
    neg = jnp.finfo(jnp.float32).min
    if config.top_k > 0:
        kth = jax.lax.top_k(logits, config.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if config.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        threshold = jnp.min(jnp.where(mass_before < config.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return jax.nn.softmax(logits, axis=-1)


def _primitives(jaxpr):
    """(primitive name, input shapes) of every equation of a jaxpr, nested ones included."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name, [tuple(v.aval.shape) for v in eqn.invars]
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)  # a ClosedJaxpr's jaxpr, or a Jaxpr
            if hasattr(inner, "eqns"):
                yield from _primitives(inner)


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (1, 0.5), (5, 0.3), (5, 0.9), (20, 0.9), (49, 0.95)])
def test_top_p_over_the_top_k_values_equals_the_full_sort(top_k, top_p):
    vocab = 50
    # Logits on a coarse grid: ties, also at the k-th value, where the kept set has more
    # than k tokens (as with bfloat16 logits).
    logits = jnp.round(jax.random.normal(jax.random.key(top_k), (64, vocab)) * 4) / 4
    config = SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p)
    want, got = _warp_by_full_sort(logits, config), warp(logits, config)
    np.testing.assert_array_equal(np.asarray(got) > 0, np.asarray(want) > 0)  # the same tokens kept
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    # With top-k, nothing sorts the vocabulary: one top_k picks the k candidates and
    # top-p's running mass is over those k values.
    ops = list(_primitives(jax.make_jaxpr(lambda x: warp(x, config))(logits).jaxpr))
    names = [name for name, _ in ops]
    if top_k == 0:  # top-p alone ranks the whole vocabulary: the one sort
        assert names.count("sort") == 1 and "top_k" not in names, names
    else:
        assert "sort" not in names and names.count("top_k") == 1, names
        assert [shapes[0] for name, shapes in ops if name == "cumsum"] == [(64, top_k)]


def test_top_k_at_or_above_the_vocabulary_is_off():
    """top_k >= vocab keeps every token: the same as top_k = 0 (it used to fail at trace
    for top_k > vocab, as lax.top_k cannot take more values than there are)."""
    logits = jax.random.normal(jax.random.key(0), (4, 6)) * 3
    for top_p in (1.0, 0.8):
        off = warp(logits, SamplingConfig(temperature=1.0, top_p=top_p))
        for top_k in (6, 7, 100):
            np.testing.assert_array_equal(warp(logits, SamplingConfig(temperature=1.0, top_k=top_k, top_p=top_p)), off)


@pytest.mark.parametrize(
    "flag,value,field",
    [
        ("--temperature", "-1", "temperature"),
        ("--temperature", "nan", "temperature"),
        ("--top-k", "-2", "top_k"),
        ("--top-p", "0", "top_p"),
        ("--top-p", "inf", "top_p"),
    ],
)
def test_run_cli_reports_bad_sampling_values_in_one_line(tmp_path, capsys, flag, value, field):
    from decode import run

    # The values are checked before the checkpoint or the images are looked at.
    argv = [
        "--ckpt",
        str(tmp_path / "no-ckpt"),
        "--images",
        str(tmp_path / "no.png"),
        "--out",
        str(tmp_path / "out.jsonl"),
        flag,
        value,
    ]
    assert run.main(argv) == run.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m decode.run: error: {field} must be"), err
    assert not (tmp_path / "out.jsonl").exists()


def test_bench_cli_reports_a_bad_temperature_in_one_line(tmp_path, capsys):
    from decode.bench import cli

    # Checked before the model is built: argparse's usage, then one error line.
    with pytest.raises(SystemExit) as info:
        cli.main(["--ckpt", "random:tiny", "--json", str(tmp_path / "b.json"), "--temperature", "nan"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("python -m decode.bench: error: temperature must be"), err
    assert not (tmp_path / "b.json").exists()


# --- speculative sampling reproduces the full model's distribution -------------------------

VOCAB = 6
PROMPT = [1, 3, 4]
ROWS = 20_000  # sampled sequences per generate call, all in one batch
PLAIN = SamplingConfig(temperature=1.0)
WARPED = SamplingConfig(temperature=0.7, top_k=4, top_p=0.9)
CASES = [(1, 3, PLAIN), (2, 4, WARPED)]  # (draft_len, steps, sampling)


def sampling_model():
    """(model, params, cache of exact joints): the `tiny` fixture (tests/conftest.py), built
    once per test process. With this seed the draft path (layer 0,
    then the fresh imitation network, which starts as the identity) is close enough to
    the full model that well over half the draft tokens are accepted: both the rejection
    and the bonus branch are frequent (the tests assert it)."""
    config = tiny_config(vocab_size=VOCAB, num_layers=3, exit_layer=1, hidden_size=32)
    model = VLM(config)
    params = jax.jit(model.init)(jax.random.key(11))  # eager init compiles op by op: seconds more
    # Bigger logits than the 0.02 init gives, so distributions are far from uniform.
    params["language_model"]["lm_head"]["kernel"] = params["language_model"]["lm_head"]["kernel"] * 12
    return model, params, {}


def _exact_joint(tiny, steps, sampling):
    """P(t_1..t_steps | PROMPT) under the warped full-model distributions, [VOCAB] * steps,
    from one cache-free forward pass over every possible prefix of steps - 1 tokens."""
    model, params, joints = tiny
    if (steps, sampling) not in joints:
        prefixes = np.array(list(itertools.product(range(VOCAB), repeat=steps - 1)), np.int32)
        ids = np.concatenate([np.tile(PROMPT, (len(prefixes), 1)), prefixes], axis=1)
        logits = jax.jit(model.forward)(params, jnp.asarray(ids))[:, len(PROMPT) - 1 :]  # [n, steps, vocab]
        probs = np.asarray(warp(logits, sampling), np.float64)
        rows = np.arange(len(prefixes))
        joint = probs[:, -1]
        for i in range(steps - 1):
            joint = joint * probs[rows, i, prefixes[:, i]][:, None]
        # itertools.product enumerates prefixes in C order, matching this reshape.
        joints[steps, sampling] = joint.reshape((VOCAB,) * steps)
    return joints[steps, sampling]


def _chi_square(tokens, joint):
    """Pearson chi-square test of sampled sequences [rows, steps] against the exact joint.

    Returns (p-value over the possible sequences, number of impossible samples): a sample
    of probability 0 (outside top-k / top-p) is a failure outright, which a few such
    samples pooled into a chi-square cell could hide.
    """
    flat = np.ravel_multi_index(tuple(tokens.T), joint.shape)
    observed = np.bincount(flat, minlength=joint.size).astype(np.float64)
    possible = joint.ravel() > 0
    impossible = int(observed[~possible].sum())
    observed = observed[possible]
    expected = joint.ravel()[possible] / joint.sum() * observed.sum()
    # Cells expected to hold fewer than 5 samples are pooled into one, so the chi-square
    # approximation holds.
    small = expected < 5
    obs, exp = observed[~small], expected[~small]
    if small.any():
        obs, exp = np.append(obs, observed[small].sum()), np.append(exp, expected[small].sum())
    return stats.chisquare(obs, exp).pvalue, impossible


def _generate(tiny, mode, draft_len, steps, sampling, seed, capacity=None):
    model, params, _ = tiny
    prompts = Prompts(jnp.asarray([PROMPT] * ROWS, jnp.int32), jnp.full((ROWS,), len(PROMPT), jnp.int32))
    # No EOS: every row samples exactly `steps` tokens. A larger capacity than `steps`
    # changes no token, only the compiled program (the mutation tests rely on that).
    spec = DecodeSpec(
        mode, capacity=capacity or steps, sampling=sampling, eos_ids=(), policy=DraftPolicy(draft_len=draft_len)
    )
    out = generate(model, params, prompts, spec, steps, jax.random.key(seed))
    assert np.all(np.asarray(out.num_tokens) == steps)
    return out, np.asarray(out.tokens)[:, :steps]  # (output, sampled tokens [ROWS, steps])


def _bonus_rows(out, draft_len):
    """Fraction of rows whose first round accepted all draft_len tokens, after checking
    that such rounds were counted. With steps == draft_len + 2 such a row is done after
    one round, and its last sampled token is that round's bonus token."""
    # A static policy proposes draft_len tokens every round, and acceptance is a prefix,
    # so the last position's accepts are the rounds where every draft token was accepted.
    assert np.all(np.asarray(out.position_attempts) == np.asarray(out.position_attempts)[0])
    assert int(out.position_accepts[draft_len - 1]) > 0, "no round accepted every draft token"
    return float(np.mean(np.asarray(out.rounds) == 1))


@pytest.mark.slow
@pytest.mark.parametrize("draft_len,steps,sampling", CASES, ids=["draft1-plain", "draft2-warped"])
def test_speculative_sampling_matches_exact_distribution(tiny, draft_len, steps, sampling):
    joint = _exact_joint(tiny, steps, sampling)
    out, tokens = _generate(tiny, "ssd", draft_len, steps, sampling, seed=0)
    # Both branches of the acceptance rule shaped these samples: bonus tokens in many
    # rows, rejections (replacements drawn from the residual) in many others.
    assert _bonus_rows(out, draft_len) > 0.2
    assert int(out.accepted.sum()) < 0.9 * int(out.drafted.sum())
    pvalue, impossible = _chi_square(tokens, joint)
    print(f"SSD draft_len {draft_len}, {steps} steps, {sampling}: p = {pvalue:.3g}")  # pytest -rP shows it
    assert impossible == 0, f"{impossible} SSD samples have probability 0"
    assert pvalue > 1e-3, f"SSD samples differ from the exact distribution: p = {pvalue:.3g}"


@pytest.mark.slow
def test_plain_sampling_matches_exact_distribution(tiny):
    """The reference itself: AR sampling from the cached engine matches the enumeration
    (cache-free forward passes), so a failure above is SSD's, not the enumeration's."""
    joint = _exact_joint(tiny, 4, WARPED)
    _, tokens = _generate(tiny, "ar", draft_len=1, steps=4, sampling=WARPED, seed=1)  # draft_len unused
    pvalue, impossible = _chi_square(tokens, joint)
    print(f"AR, 4 steps, {WARPED}: p = {pvalue:.3g}")
    assert impossible == 0, f"{impossible} AR samples have probability 0"
    assert pvalue > 1e-3, f"AR samples differ from the exact distribution: p = {pvalue:.3g}"


# --- the check has power: broken acceptance rules fail it ----------------------------------


def _bonus_from_residual(original):
    """The bonus token (every draft accepted) drawn from norm(max(p - q, 0)) instead of p,
    with q the last draft distribution: e.g. q indexed by a clipped position where the
    correct rule pads q with zeros past the draft."""

    def rule(rng, target_probs, draft_probs, draft_tokens, draft_lens):
        accepted, token = original(rng, target_probs, draft_probs, draft_tokens, draft_lens)
        rows = jnp.arange(accepted.shape[0])
        p = target_probs[rows, accepted]
        q = draft_probs[rows, jnp.maximum(accepted - 1, 0)]
        residual = jnp.maximum(p - q, 0.0)
        mass = jnp.sum(residual, axis=-1, keepdims=True)
        residual = jnp.where(mass > 0, residual / jnp.maximum(mass, 1e-30), p)
        bonus = sample(jax.random.fold_in(rng, 1), residual)
        return accepted, jnp.where(accepted == draft_lens, bonus, token)

    return rule


def _always_accept(original):
    """Every draft token accepted (as if p == q at the drafted positions); the bonus
    token still comes from p."""

    def rule(rng, target_probs, draft_probs, draft_tokens, draft_lens):
        draft_len = draft_probs.shape[1]
        return original(rng, target_probs.at[:, :draft_len].set(draft_probs), draft_probs, draft_tokens, draft_lens)

    return rule


def _resample_from_p(original):
    """The right acceptance test, but a rejected token replaced by a draw from p instead
    of norm(max(p - q, 0))."""

    def rule(rng, target_probs, draft_probs, draft_tokens, draft_lens):
        accepted, token = original(rng, target_probs, draft_probs, draft_tokens, draft_lens)
        p = target_probs[jnp.arange(accepted.shape[0]), accepted]
        replacement = sample(jax.random.fold_in(rng, 1), p)
        return accepted, jnp.where(accepted < draft_lens, replacement, token)

    return rule


# Each on a case of CASES (the same samples but for the rule) where its branch is frequent.
MUTATIONS = [
    (_bonus_from_residual, *CASES[0]),
    (_always_accept, *CASES[1]),
    (_resample_from_p, *CASES[0]),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "mutation,draft_len,steps,sampling", MUTATIONS, ids=[m[0].__name__.strip("_") for m in MUTATIONS]
)
def test_broken_acceptance_rule_is_detected(tiny, monkeypatch, mutation, draft_len, steps, sampling):
    joint = _exact_joint(tiny, steps, sampling)
    traced = []
    broken = mutation(sampling_lib.accept_speculative)

    def recording(*args):
        traced.append(True)  # runs while jax traces the program, not per call
        return broken(*args)

    # The engine imported the rule by name, so the patch goes on decode.engine. generate's
    # jit cache would reuse a program compiled for the same (model, spec) with the correct
    # rule, so this spec gets a capacity of its own (no token changes), and `traced`
    # proves the patched rule went into the program that ran.
    monkeypatch.setattr(loop, "accept_speculative", recording)
    capacity = steps + 1 + [m[0] for m in MUTATIONS].index(mutation)
    try:
        out, tokens = _generate(tiny, "ssd", draft_len, steps, sampling, seed=0, capacity=capacity)
    finally:
        # Nor may a later test with this spec get the broken program from the cache: generate's
        # jit cache is the only one that holds it (the rule is traced inside generate's own
        # closures; jax.clear_caches() would also drop every other test's programs).
        loop._generate_jit.clear_cache()
    assert traced, "the patched acceptance rule was not traced"
    assert _bonus_rows(out, draft_len) > 0.2
    pvalue, impossible = _chi_square(tokens, joint)
    print(
        f"{mutation.__name__}, draft_len {draft_len}, {steps} steps: p = {pvalue:.3g}, {impossible} impossible samples"
    )
    assert impossible > 0 or pvalue < 1e-6, f"{mutation.__name__} went undetected: p = {pvalue:.3g}"
