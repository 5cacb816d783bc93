"""Engine contracts: inputs the fixed-shape program would otherwise get silently wrong,
per-row budgets, acceptance counted on emitted tokens only, bfloat16 decoding, and a KV
cache that the compiled program never copies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate
from fastvlm_jax.nn.blip2 import Blip2Config, Blip2VisionConfig, OPTConfig, QFormerConfig
from fastvlm_jax.nn.config import DraftConfig
from fastvlm_jax.nn.model import VLM, cast_params, param_bytes
from tests.test_decode import _near_identity_deep_layers, _prompts, _tokens
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config(num_layers=4, exit_layer=2)
    model = VLM(config)
    params = _near_identity_deep_layers(model.init(jax.random.key(11)), config, 0.3)
    return config, model, params


def test_budget_above_the_program_capacity_is_an_error(tiny):
    config, model, params = tiny
    prompts = _prompts(config, [config.num_image_tokens + 3])
    with pytest.raises(ValueError, match="exceeds the program's capacity of 8"):
        generate(model, params, prompts, DecodeSpec("ssd", capacity=8), 9)


def test_left_padded_prompts_are_rejected(tiny):
    config, model, params = tiny
    right = _prompts(config, [config.num_image_tokens + 5, config.num_image_tokens + 2], with_image=False)
    ids = np.asarray(right.input_ids).copy()
    length = int(right.lengths[1])
    ids[1] = np.concatenate([np.zeros(ids.shape[1] - length, np.int32), ids[1, :length]])  # left-padded
    left = Prompts(jnp.asarray(ids), right.lengths)
    with pytest.raises(ValueError, match="row 1 .* looks left-padded"):
        generate(model, params, left, DecodeSpec("ar", capacity=8), 8)
    with pytest.raises(ValueError, match=r"prompt lengths must lie in \[1, "):
        generate(model, params, Prompts(right.input_ids, jnp.asarray([0, 3])), DecodeSpec("ar", capacity=8), 8)


def test_learned_positions_past_the_table_are_an_error():
    config = Blip2Config(
        vision=Blip2VisionConfig(
            image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4
        ),
        qformer=QFormerConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4),
        text=OPTConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, max_position_embeddings=24
        ),
        draft=DraftConfig(exit_layer=1),
        num_query_tokens=2,
        image_token_id=63,
    )
    model = VLM(config)
    prompts = Prompts(jnp.full((1, 10), 5, jnp.int32), jnp.asarray([10]))
    with pytest.raises(ValueError, match="learned position table has 24"):
        generate(model, None, prompts, DecodeSpec("ssd", capacity=16, policy=DraftPolicy(3)), 16)


@pytest.mark.slow
def test_per_row_budgets_and_acceptance_counts_only_emitted_drafts(tiny):
    """Rows stop at their own budget; drafts the full model accepted past the budget or an
    EOS are not counted as accepted (every counted acceptance is an emitted token)."""
    config, model, _ = tiny
    # Deep layers off: the draft equals the full model, every draft is accepted.
    params = _near_identity_deep_layers(model.init(jax.random.key(12)), config, 0.0)
    n = config.num_image_tokens
    prompts = _prompts(config, [n + 4, n + 3, n + 6], seed=5)
    budgets = jnp.asarray([3, 7, 11], jnp.int32)
    spec = DecodeSpec("ssd", capacity=16, eos_ids=(), policy=DraftPolicy(draft_len=4))
    out = generate(model, params, prompts, spec, budgets)
    ar = generate(model, params, prompts, DecodeSpec("ar", capacity=16, eos_ids=()), 16)
    assert list(np.asarray(out.num_tokens)) == [3, 7, 11]
    for row, budget in enumerate([3, 7, 11]):
        assert _tokens(out)[row] == _tokens(ar)[row][:budget]
    # Emitted tokens = the prefill's token + per round (accepted drafts + the full model's own),
    # except where the budget cut a round short: accepted never exceeds emitted - 1.
    emitted_after_prefill = np.asarray(out.num_tokens) - 1
    accepted = np.asarray(out.accepted)
    assert np.all(accepted <= emitted_after_prefill)
    # Budget 3: one round drafts 4, all accepted by the full model, but only 2 are emitted.
    assert int(out.drafted[0]) == 4 and int(accepted[0]) == 2
    assert int(np.asarray(out.position_accepts).sum()) == int(accepted.sum())

    # An EOS that the draft proposes mid-round: drafts after it are not counted either.
    eos = int(ar.tokens[2, 2])
    with_eos = generate(
        model, params, prompts, DecodeSpec("ssd", capacity=16, eos_ids=(eos,), policy=DraftPolicy(draft_len=4)), 16
    )
    stop = _tokens(with_eos)[2]
    assert stop[-1] == eos and len(stop) <= 3
    assert int(with_eos.accepted[2]) <= len(stop) - 1


@pytest.mark.slow
def test_bfloat16_decoding_keeps_the_float32_tokens_where_margins_are_clear(tiny):
    """bf16 params and compute: half the param bytes, SSD == AR, and the float32 greedy
    tokens wherever float32's own top-1 margin is clear of bf16 rounding."""
    config, model, params = tiny
    n = config.num_image_tokens
    prompts = _prompts(config, [n + 4, n + 7], seed=9)
    steps = 16
    ar_spec = DecodeSpec("ar", capacity=steps, eos_ids=())
    ssd_spec = DecodeSpec("ssd", capacity=steps, eos_ids=(), policy=DraftPolicy(draft_len=3))
    want = _tokens(generate(model, params, prompts, ar_spec, steps))

    bf16_model, bf16_params = VLM(config, jnp.bfloat16), cast_params(params, jnp.bfloat16)
    assert param_bytes(bf16_params) * 2 == param_bytes(params)
    ar = generate(bf16_model, bf16_params, prompts, ar_spec, steps)
    ssd = generate(bf16_model, bf16_params, prompts, ssd_spec, steps)
    assert _tokens(ssd) == _tokens(ar)

    # float32 margins of each generated token (teacher-forced over prompt + tokens).
    for row in range(2):
        length = int(prompts.lengths[row])
        ids = jnp.asarray(np.concatenate([np.asarray(prompts.input_ids[row, :length]), want[row]]))[None]
        logits = model.forward(params, ids, prompts.pixels[row : row + 1])[0, length - 1 : -1]
        logits = np.asarray(logits)
        top2 = np.sort(logits, axis=-1)[:, -2:]
        # bf16 moves these logits by ~0.4% of their range (measured): 2% is clear of that.
        clear = top2[:, 1] - top2[:, 0] > 0.02 * (logits.max(-1) - logits.min(-1))
        first_unclear = int(np.argmin(clear)) if not clear.all() else steps
        assert first_unclear >= 4, "pick inputs with clear margins: the test must compare tokens"
        assert _tokens(ar)[row][:first_unclear] == want[row][:first_unclear]


@pytest.mark.slow
@pytest.mark.parametrize("min_confidence", [0.0, 0.5], ids=["static", "confidence"])
def test_compiled_ssd_program_never_copies_the_kv_cache(min_confidence):
    """The stacked cache is updated in place: the only cache-sized copy in the whole SSD
    program (prefill, draft loop, verification, while loop) is its zero initialisation.
    With a confidence stop, the draft's last pass sits in a conditional: in place too."""
    import re

    from decode.engine import loop

    config = tiny_config(num_layers=6, exit_layer=2, kind="layer")
    model = VLM(config)
    params = jax.jit(model.init)(jax.random.key(0))
    prompts = Prompts(jnp.full((2, 16), 5, jnp.int32), jnp.full((2,), 16, jnp.int32))
    spec = DecodeSpec("ssd", capacity=32, eos_ids=(), policy=DraftPolicy(draft_len=4, min_confidence=min_confidence))
    hlo = loop._generate_jit.lower(model, spec, params, prompts, jnp.int32(32), jax.random.key(0)).compile().as_text()
    shape = rf"f32\[6,2,2,{spec.cache_slots(16)},16\]"
    assert re.search(shape, hlo), "the cache shape should appear in the program"
    copies = re.findall("= " + shape + r"\{[^}]*\} copy\((\S+)\)", hlo)
    assert all("broadcast" in source for source in copies), copies
