"""Gemma 3 against transformers: tiny random Gemma3ForConditionalGeneration folders built
in-process, converted by `fastvlm_jax.convert`, run by our engine.

- logits at every position of a prompt with an image (two structurally different configs;
  the sliding window binds inside the prompt), and controls showing that the bidirectional
  image block and the window both matter to that comparison;
- prompt ids (the folder's chat template + Gemma3Processor's image expansion) and pixels;
- greedy tokens equal to transformers' `generate` for AR and for every drafter (imitation
  chains at several exit layers and lengths, a tree, the EAGLE head, a small draft model),
  batch 2 with different prompt lengths, the window binding within prompt + caption;
- speculative sampling exact in distribution (chi-square) on a Gemma 3 model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate
from decode.engine.drafters import EagleDrafter, ModelDrafter
from decode.engine.slots import Request, SlotEngine, SlotStats
from decode.engine.tree import TreeShape
from fastvlm_jax import convert
from fastvlm_jax.ckpt import checkpoint
from fastvlm_jax.ckpt.convert import gemma3 as gemma3_convert
from fastvlm_jax.image.processing import preprocess_image
from fastvlm_jax.nn.families import build_prompt_ids, stop_ids
from fastvlm_jax.nn.model import VLM
from tests.hf_gemma3 import INSTRUCTION_TEMPLATE, build_tiny_gemma3, random_image
from train.recipes.make_draft_model import truncated_config, truncated_params

MIXED = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
LINEAR_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
}
# Two structurally different models: (A) 4 layers, mixed local / global, window 8, linearly
# scaled global RoPE, 4 soft tokens; (B) 7 layers in Gemma's 5:1 pattern, window 16, one KV
# head of 8 dims, 16 soft tokens from an 8x8 patch grid, an instruction-line template.
CONFIGS = {
    "A": dict(layer_types=MIXED, sliding_window=8, rope_parameters=LINEAR_ROPE),
    "B": dict(
        layers=7,
        sliding_window=16,
        heads=8,
        kv_heads=1,
        head_dim=8,
        query_pre_attn_scalar=12,
        image_size=56,
        mm_tokens=16,
        template=INSTRUCTION_TEMPLATE,
    ),
}
QUESTIONS = ["What is in the picture?", "Describe this image in one sentence please."]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def folder(request, tmp_path_factory):
    """(config name, HF model, processor, converted checkpoint, its folder) for one tiny Gemma 3
    folder."""
    root = tmp_path_factory.mktemp(f"gemma3_{request.param}")
    hf_model, processor = build_tiny_gemma3(root / "hf", seed=3, **CONFIGS[request.param])
    ckpt_dir = convert.convert(root / "hf", root / "ckpt", exit_layer=2, progress=False)
    return request.param, hf_model, processor, checkpoint.load_checkpoint(ckpt_dir), ckpt_dir


def _hf_inputs(processor, image, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=text, images=image, return_tensors="pt", add_special_tokens=False)


def test_prompt_ids_pixels_and_logits_match_transformers(folder):
    import torch

    name, hf_model, processor, ckpt, _ = folder
    image = random_image(np.random.RandomState(1))
    model = VLM(ckpt.config)
    for question in QUESTIONS:
        inputs = _hf_inputs(processor, image, question)
        ids = build_prompt_ids(ckpt.config, ckpt.tokenizer, question)
        assert ids == inputs["input_ids"][0].tolist(), (name, question)
        pixels = preprocess_image(image, ckpt.image_config)
        np.testing.assert_allclose(pixels, inputs["pixel_values"][0].numpy().transpose(1, 2, 0), atol=1e-6)
        assert len(ids) > 2 * ckpt.config.text.sliding_window  # the window binds inside the prompt
        with torch.no_grad():
            want = hf_model(**inputs).logits[0].numpy()
        got = np.asarray(model.forward(ckpt.params, jnp.asarray([ids]), jnp.asarray(pixels[None])))[0]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

    # Controls: the comparison sees both the image block and the window.
    ids_array, pixel_array = jnp.asarray([ids]), jnp.asarray(pixels[None])
    causal = _logits_without_image_block(model, ckpt.params, ids_array, pixel_array)
    assert np.abs(causal - want).max() > 1e-3
    no_window = ckpt.config.replace(
        text=dataclasses.replace(ckpt.config.text, layer_types=("full_attention",) * ckpt.config.text.num_layers)
    )
    wide = np.asarray(VLM(no_window).forward(ckpt.params, ids_array, pixel_array))[0]
    assert np.abs(wide - want).max() > 1e-3


def _logits_without_image_block(model, params, ids, pixels):
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    hidden = model.embed(params, ids, model.encode_images(params, pixels), positions)
    hidden, _, _ = model.run_layers(params, hidden, positions, 0, model.config.text.num_layers)
    return np.asarray(model.logits(params, hidden))[0]


def _hf_greedy(hf_model, inputs, steps):
    import torch

    hf_model.generation_config.eos_token_id = None  # all `steps` tokens in both
    hf_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


STEPS = 14


@pytest.mark.slow
def test_greedy_captions_match_transformers_for_ar_and_every_drafter(folder):
    """Batch 2 (prompts of different lengths): AR and SSD equal HF generate, per row, and so do
    the same prompts under continuous batching."""
    name, hf_model, processor, ckpt, _ = folder
    rng = np.random.RandomState(2)
    images = [random_image(rng, 40, 52), random_image(rng, 61, 33)]
    want, rows = [], []
    for image, question in zip(images, QUESTIONS):
        want.append(_hf_greedy(hf_model, _hf_inputs(processor, image, question), STEPS))
        rows.append(
            (build_prompt_ids(ckpt.config, ckpt.tokenizer, question), preprocess_image(image, ckpt.image_config))
        )
    width = max(len(ids) for ids, _ in rows)
    assert len({len(ids) for ids, _ in rows}) == 2
    prompts = Prompts(
        jnp.asarray([ids + [0] * (width - len(ids)) for ids, _ in rows], jnp.int32),
        jnp.asarray([len(ids) for ids, _ in rows], jnp.int32),
        jnp.asarray(np.stack([pixels for _, pixels in rows])),
    )
    config = ckpt.config.with_draft(eagle_layers=1)
    model = VLM(config)
    params = {**ckpt.params, "eagle": model.init_eagle(jax.random.key(4))}
    small = truncated_config(config, 2)
    small_params = truncated_params(params, 2)
    cases = [
        ("ar", DecodeSpec("ar", capacity=STEPS, eos_ids=()), model, None),
        (
            "ssd exit 2, draft 3",
            DecodeSpec("ssd", capacity=STEPS, eos_ids=(), policy=DraftPolicy(draft_len=3)),
            model,
            None,
        ),
        (
            "ssd exit 1, draft 5",
            DecodeSpec("ssd", capacity=STEPS, eos_ids=(), policy=DraftPolicy(draft_len=5)),
            VLM(config.with_draft(exit_layer=1)),
            None,
        ),
        ("tree", DecodeSpec("ssd", capacity=STEPS, eos_ids=(), tree=TreeShape(nodes=6, width=2)), model, None),
        (
            "eagle",
            DecodeSpec("ssd", capacity=STEPS, eos_ids=(), policy=DraftPolicy(draft_len=3), drafter=EagleDrafter()),
            model,
            None,
        ),
        (
            "model drafter",
            DecodeSpec(
                "ssd", capacity=STEPS, eos_ids=(), policy=DraftPolicy(draft_len=2), drafter=ModelDrafter(VLM(small))
            ),
            model,
            small_params,
        ),
    ]
    if name == "B":  # every drafter runs on A; B (another structure) keeps AR, a chain and a tree
        cases = [case for case in cases if case[0] in ("ar", "ssd exit 2, draft 3", "tree")]
    for label, spec, run_model, draft_params in cases:
        out = generate(run_model, params, prompts, spec, STEPS, draft_params=draft_params)
        got = [np.asarray(out.tokens[row, :STEPS]).tolist() for row in range(2)]
        assert got == want, (name, label)
    # Continuous batching: both prompts at two budgets through 2 slots, one prefill row at a
    # time, so a slot is refilled while the other keeps decoding.
    spec = DecodeSpec("ssd", capacity=STEPS, eos_ids=(), policy=DraftPolicy(draft_len=3))
    requests = [
        Request(tuple(ids), pixels, jax.random.key(0), budget, tag=(row, budget))
        for budget in (5, STEPS)
        for row, (ids, pixels) in enumerate(rows)
    ]
    stats = SlotStats(2)
    engine = SlotEngine(model, params, spec, 2, prompt_len=width, prefill_rows=1)
    got = {f.request.tag: list(f.token_ids) for f in engine.stream(requests, stats)}
    assert got == {(row, budget): want[row][:budget] for row in range(2) for budget in (5, STEPS)}, name
    assert stats.inserts == 4 and stats.prefills == 4


def test_converter_reads_both_rope_layouts_and_refuses_what_it_cannot_run():
    # transformers 4.x wrote rope_theta / rope_local_base_freq / rope_scaling at the top level.
    old = gemma3_convert.text_config_from_hf(
        {
            "num_hidden_layers": 12,
            "rope_theta": 1e6,
            "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "sliding_window_pattern": 6,
        }
    )
    assert (old.rope_theta, old.rope_scaling_factor, old.rope_local_theta) == (1e6, 8.0, 1e4)
    assert old.layer_types.count("full_attention") == 2 and old.layer_types[5] == "full_attention"
    with pytest.raises(gemma3_convert.ConversionError, match="rope type 'yarn'"):
        gemma3_convert.text_config_from_hf({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(gemma3_convert.ConversionError, match="use_bidirectional_attention"):
        gemma3_convert.text_config_from_hf({"use_bidirectional_attention": True})
    with pytest.raises(gemma3_convert.ConversionError, match="not Gemma 3"):
        gemma3_convert.config_from_hf({"model_type": "llava"})


def test_stop_ids_include_end_of_turn(folder):
    _, _, processor, ckpt, _ = folder
    want = {processor.tokenizer.eos_token_id, processor.tokenizer.convert_tokens_to_ids("<end_of_turn>")}
    assert set(stop_ids(ckpt.config, ckpt.tokenizer)) == want


# --- speculative sampling on Gemma 3 -------------------------------------------------------

SAMPLING_VOCAB = 6
IMAGE_ID = SAMPLING_VOCAB  # past the vocabulary, as in the released models: never sampled
SAMPLING_PROMPT = [2, IMAGE_ID, IMAGE_ID, IMAGE_ID, IMAGE_ID, 3]


def _sampling_model():
    """A 6-token Gemma 3 whose window (3) binds inside every sampled sequence."""
    from fastvlm_jax.nn.config import DraftConfig, VisionConfig
    from fastvlm_jax.nn.gemma3 import Gemma3Config, Gemma3TextConfig

    config = Gemma3Config(
        vision=VisionConfig(
            kind="siglip", image_size=14, patch_size=7, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2
        ),
        text=Gemma3TextConfig(
            vocab_size=SAMPLING_VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_layers=3,
            num_heads=2,
            num_kv_heads=1,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=3,
            layer_types=("sliding_attention", "full_attention", "sliding_attention"),
        ),
        draft=DraftConfig(exit_layer=1),
        mm_tokens_per_image=4,
        image_token_id=IMAGE_ID,
    )
    model = VLM(config)
    params = jax.jit(model.init)(jax.random.key(7))
    # Gemma's norms start at 0 (a scale of 1); a larger final scale makes the distributions
    # far from uniform.
    params["language_model"]["norm"]["scale"] = params["language_model"]["norm"]["scale"] + 30.0
    pixels = jax.random.uniform(jax.random.key(8), (1, 14, 14, 3))
    return model, params, pixels


@pytest.mark.slow
def test_speculative_sampling_is_exact_on_gemma3():
    import itertools

    from decode.engine.sampling import SamplingConfig, warp
    from tests.test_sampling import _chi_square

    model, params, pixels = _sampling_model()
    steps, draft_len, rows = 4, 2, 20_000
    sampling = SamplingConfig(temperature=1.0)
    prefixes = np.array(list(itertools.product(range(SAMPLING_VOCAB), repeat=steps - 1)), np.int32)
    ids = np.concatenate([np.tile(SAMPLING_PROMPT, (len(prefixes), 1)), prefixes], axis=1)

    def exact_joint(forward_model):
        """P(t_1..t_steps | prompt, image) [VOCAB] * steps, by cache-free passes over every prefix."""
        batch_pixels = jnp.broadcast_to(pixels, (len(ids), *pixels.shape[1:]))
        logits = jax.jit(forward_model.forward)(params, jnp.asarray(ids), batch_pixels)
        probs = np.asarray(warp(logits[:, len(SAMPLING_PROMPT) - 1 :], sampling), np.float64)
        joint = probs[:, -1]
        for i in range(steps - 1):
            joint = joint * probs[np.arange(len(prefixes)), i, prefixes[:, i]][:, None]
        return joint.reshape((SAMPLING_VOCAB,) * steps)

    joint = exact_joint(model)
    text = model.config.text
    unwindowed = VLM(model.config.replace(text=dataclasses.replace(text, layer_types=("full_attention",) * 3)))

    prompts = Prompts(
        jnp.asarray([SAMPLING_PROMPT] * rows, jnp.int32),
        jnp.full((rows,), len(SAMPLING_PROMPT), jnp.int32),
        jnp.broadcast_to(pixels, (rows, *pixels.shape[1:])),
    )
    spec = DecodeSpec("ssd", capacity=steps, sampling=sampling, eos_ids=(), policy=DraftPolicy(draft_len=draft_len))
    out = generate(model, params, prompts, spec, steps, jax.random.key(0))
    accepted, drafted = int(out.accepted.sum()), int(out.drafted.sum())
    assert 0.1 * drafted < accepted < 0.9 * drafted, (accepted, drafted)  # both branches shape the samples
    pvalue, impossible = _chi_square(np.asarray(out.tokens)[:, :steps], joint)
    print(f"Gemma 3 SSD draft_len {draft_len}, {steps} steps: p = {pvalue:.3g}")
    assert impossible == 0 and pvalue > 1e-3, pvalue
    # Power: the same samples tell the windowed model from the one without a window.
    wrong_pvalue, _ = _chi_square(np.asarray(out.tokens)[:, :steps], exact_joint(unwindowed))
    assert wrong_pvalue < 1e-6, wrong_pvalue


# --- training the draft of a Gemma 3 checkpoint ---------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["A"], indirect=True)
def test_imitation_stage_trains_the_draft_and_ssd_stays_exact(folder, tmp_path):
    """train.run's imitation stage on a converted Gemma 3 checkpoint: the base model stays
    bit-identical, the imitation network moves, and greedy SSD with it equals AR."""
    import functools

    from fastvlm_jax.ckpt.checkpoint import load_checkpoint
    from tests import train_helpers as th
    from train.run import train

    _, _, _, ckpt, ckpt_dir = folder
    th.build_tiny_data(tmp_path / "data")
    config = th.tiny_config(
        "imitation",
        steps=4,
        init_from=ckpt_dir,
        seq_len=96,
        **{"data.data_dir": tmp_path / "data", "checkpoint.export": True, "mesh.data": 1},
    )
    result = functools.partial(train, devices=jax.devices()[:1])(config, tmp_path / "imitation", progress=False)
    assert result.status == "done"
    losses = th.losses(tmp_path / "imitation")
    assert len(losses) == 4 and all(np.isfinite(list(losses.values())))
    trained = load_checkpoint(result.export_dir)
    before = jax.tree_util.tree_flatten_with_path(ckpt.params)[0]
    after = dict(jax.tree_util.tree_flatten_with_path(trained.params)[0])
    moved = 0
    for path, value in before:
        if jax.tree_util.keystr(path).startswith("['imitation']"):
            moved += not np.array_equal(np.asarray(value), np.asarray(after[path]))
        else:
            assert np.array_equal(np.asarray(value), np.asarray(after[path])), jax.tree_util.keystr(path)
    assert moved

    model = VLM(trained.config)
    ids = build_prompt_ids(trained.config, trained.tokenizer, QUESTIONS[0])
    pixels = preprocess_image(random_image(np.random.RandomState(5)), trained.image_config)
    prompts = Prompts(jnp.asarray([ids], jnp.int32), jnp.asarray([len(ids)], jnp.int32), jnp.asarray(pixels[None]))
    ar = generate(model, trained.params, prompts, DecodeSpec("ar", capacity=12, eos_ids=()), 12)
    ssd_spec = DecodeSpec("ssd", capacity=12, eos_ids=(), policy=DraftPolicy(draft_len=3))
    ssd = generate(model, trained.params, prompts, ssd_spec, 12)
    assert np.asarray(ssd.tokens).tolist() == np.asarray(ar.tokens).tolist()
