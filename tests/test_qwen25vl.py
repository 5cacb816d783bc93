"""Qwen2.5-VL against transformers: tiny random Qwen2_5_VLForConditionalGeneration folders built
in-process, converted by `fastvlm_jax.convert`, run by our engine.

- the tokenizer (Qwen2Tokenizer's pipeline), prompt ids (the folder's chat template + the
  processor's <|image_pad|> expansion) and patches for images of several sizes and aspect
  ratios;
- logits at every position of a batch of differently sized images padded to one patch count
  (two structurally different configs), and a control showing that M-RoPE's image-shaped
  positions matter to that comparison;
- greedy tokens equal to transformers' `generate` for AR and for every drafter (imitation
  chains, a tree, the EAGLE head, a small draft model) with images of three sizes in one
  batch, and under continuous batching;
- speculative sampling exact in distribution (chi-square) with an image whose rope offset binds;
- decode.run over a folder of mixed sizes: one program per patch bucket, captions equal to the
  engine's.
"""

from __future__ import annotations

import json
from pathlib import Path

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
from fastvlm_jax.ckpt.convert import qwen25vl as qwen_convert
from fastvlm_jax.ckpt.convert.common import ConversionError
from fastvlm_jax.image.patches import batch_pixels, padded_image, stack_patch_images
from fastvlm_jax.image.qwen_vl import QwenImageProcessorConfig, preprocess
from fastvlm_jax.nn.families import prompt_ids_for, stop_ids
from fastvlm_jax.nn.model import VLM
from tests.hf_qwen25vl import QUESTION_FIRST_TEMPLATE, build_tiny_qwen25vl, random_image
from train.recipes.make_draft_model import truncated_config, truncated_params

# Two structurally different models: (A) 4 layers, untied head, M-RoPE sections (2, 3, 3),
# 8-pixel patches, windows of 2x2 merged tokens, full attention in vision block 1;
# (B) 5 layers, tied head, one KV head, sections (4, 4, 4), 6-pixel patches, windows of 2x2,
# three vision blocks with full attention in 0 and 2, the question before the image.
CONFIGS = {
    "A": dict(),
    "B": dict(
        layers=5,
        hidden=48,
        heads=2,
        kv_heads=1,
        mrope_section=(4, 4, 4),
        tie=True,
        vision_depth=3,
        fullatt=(0, 2),
        window_size=24,
        patch_size=6,
        template=QUESTION_FIRST_TEMPLATE,
        min_pixels=12 * 12 * 4,
        max_pixels=12 * 12 * 40,
    ),
}
QUESTIONS = ["What is in the picture?", "Describe this image.", "a photo"]
# (height, width): wide, tall, square, one below min_pixels, one above max_pixels.
SIZES = [(50, 70), (90, 40), (64, 64), (10, 13), (300, 120)]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def folder(request, tmp_path_factory):
    """(config name, HF model, HF inputs, converted checkpoint, its folder)."""
    root = tmp_path_factory.mktemp(f"qwen25vl_{request.param}")
    hf_model, hf_inputs = build_tiny_qwen25vl(root / "hf", seed=1, **CONFIGS[request.param])
    ckpt_dir = convert.convert(root / "hf", root / "ckpt", exit_layer=2, progress=False)
    return request.param, hf_model, hf_inputs, checkpoint.load_checkpoint(ckpt_dir), ckpt_dir


def _ours(ckpt, question, image):
    """(prompt ids, patches, grid) as our pipeline makes them."""
    patches, grid = preprocess(image, ckpt.image_config)
    merge = ckpt.config.vision.spatial_merge_size
    ids = prompt_ids_for("qwen2_5_vl", ckpt.tokenizer, question, int(np.prod(grid)) // merge**2)
    return ids, patches, grid


def _batch(rows):
    """Prompts for (ids, patches, grid) rows: right-padded ids, patches padded to the longest."""
    width = max(len(ids) for ids, _, _ in rows)
    images = stack_patch_images([(p, g) for _, p, g in rows], max(p.shape[0] for _, p, _ in rows))
    return Prompts(
        jnp.asarray([ids + [0] * (width - len(ids)) for ids, _, _ in rows], jnp.int32),
        jnp.asarray([len(ids) for ids, _, _ in rows], jnp.int32),
        jax.tree.map(jnp.asarray, images),
    )


def test_tokenizer_prompts_patches_and_logits_match_transformers(folder):
    import torch

    name, hf_model, hf_inputs, ckpt, _ = folder
    texts = ["a photo of a red car", "Describe this image.\n", "  two  dogs 123 éè <|im_end|>x", ""]
    for text in texts:
        assert ckpt.tokenizer.encode(text) == hf_inputs.tokenizer(text)["input_ids"], (name, text)
    assert set(stop_ids(ckpt.config, ckpt.tokenizer)) == {
        hf_inputs.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")
    }

    rng = np.random.RandomState(0)
    rows, want = [], []
    for (height, width), question in zip(SIZES, QUESTIONS * 2):
        image = random_image(rng, height, width)
        inputs = hf_inputs(question, image)
        ids, patches, grid = _ours(ckpt, question, image)
        assert ids == inputs["input_ids"][0].tolist(), (name, height, width)
        assert np.array_equal(patches, inputs["pixel_values"].numpy()), (name, height, width)
        assert list(grid) == inputs["image_grid_thw"][0].tolist()
        with torch.no_grad():
            want.append(hf_model(**inputs).logits[0].numpy())
        rows.append((ids, patches, grid))
    assert len({g for _, _, g in rows}) == len(SIZES)  # every image its own grid

    model = VLM(ckpt.config)
    prompts = _batch(rows)
    logits = np.asarray(jax.jit(model.forward)(ckpt.params, prompts.input_ids, prompts.pixels))
    for row, (ids, _, _) in enumerate(rows):
        np.testing.assert_allclose(logits[row, : len(ids)], want[row], atol=1e-4, rtol=0)

    # Control: plain RoPE on slots (no image-shaped positions, no offset) is measurably wrong.
    def plain_rope(params, input_ids, pixels):
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        hidden = model.embed(params, input_ids, model.encode_images(params, pixels), positions)
        hidden, _, _ = model.run_layers(params, hidden, positions, 0, model.config.text.num_layers)
        return model.logits(params, hidden)

    plain = np.asarray(jax.jit(plain_rope)(ckpt.params, prompts.input_ids, prompts.pixels))
    assert np.abs(plain[0, : len(rows[0][0])] - want[0]).max() > 1e-2


STEPS = 12


def _hf_greedy(hf_model, inputs, steps):
    import torch

    hf_model.generation_config.eos_token_id = None  # all `steps` tokens in both
    hf_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.slow
def test_greedy_captions_match_transformers_for_ar_and_every_drafter(folder):
    """Images of three sizes in one batch: AR and SSD equal HF generate, per row, and so do the
    same prompts under continuous batching (two patch buckets in one slot engine)."""
    name, hf_model, hf_inputs, ckpt, _ = folder
    rng = np.random.RandomState(2)
    want, rows = [], []
    for (height, width), question in zip(SIZES[:3], QUESTIONS):
        image = random_image(rng, height, width)
        want.append(_hf_greedy(hf_model, hf_inputs(question, image), STEPS))
        rows.append(_ours(ckpt, question, image))
    prompts = _batch(rows)
    config = ckpt.config.with_draft(eagle_layers=1)
    model = VLM(config)
    params = {**ckpt.params, "eagle": model.init_eagle(jax.random.key(4))}
    small = truncated_config(config, 2)
    small_params = truncated_params(params, 2)
    chain = DraftPolicy(draft_len=3)
    cases = [
        ("ar", DecodeSpec("ar", capacity=STEPS, eos_ids=()), model, None),
        ("ssd exit 2, draft 3", DecodeSpec("ssd", capacity=STEPS, eos_ids=(), policy=chain), model, None),
        ("tree", DecodeSpec("ssd", capacity=STEPS, eos_ids=(), tree=TreeShape(nodes=6, width=2)), model, None),
        ("eagle", DecodeSpec("ssd", capacity=STEPS, eos_ids=(), policy=chain, drafter=EagleDrafter()), model, None),
        (
            "model drafter",
            DecodeSpec(
                "ssd", capacity=STEPS, eos_ids=(), policy=DraftPolicy(draft_len=2), drafter=ModelDrafter(VLM(small))
            ),
            model,
            small_params,
        ),
    ]
    if name == "B":  # every drafter runs on A; B (another structure) keeps AR and a tree
        cases = [case for case in cases if case[0] in ("ar", "tree")]
    for label, spec, run_model, draft_params in cases:
        out = generate(run_model, params, prompts, spec, STEPS, draft_params=draft_params)
        got = [np.asarray(out.tokens[row, :STEPS]).tolist() for row in range(len(rows))]
        assert got == want, (name, label)
        if label not in ("ar", "eagle"):  # (the EAGLE head is untrained: its drafts are rejected)
            assert int(np.asarray(out.accepted).sum()) > 0, (name, label)  # the drafts were used

    # Continuous batching: two slots, one prefill row at a time, images padded to their own
    # patch bucket (two buckets here), so each prefill carries its own shape.
    counts = sorted(p.shape[0] for _, p, _ in rows)
    buckets = (counts[0], counts[-1])
    spec = DecodeSpec("ssd", capacity=STEPS, eos_ids=(), policy=chain)
    requests = [
        Request(tuple(ids), padded_image(p, g, buckets), jax.random.key(0), budget, tag=(row, budget))
        for budget in (5, STEPS)
        for row, (ids, p, g) in enumerate(rows)
    ]
    assert len({r.pixels.patches.shape for r in requests}) == 2
    stats = SlotStats(2)
    engine = SlotEngine(model, params, spec, 2, prompt_len=max(len(ids) for ids, _, _ in rows), prefill_rows=1)
    got = {f.request.tag: list(f.token_ids) for f in engine.stream(requests, stats)}
    assert got == {(row, budget): want[row][:budget] for row in range(len(rows)) for budget in (5, STEPS)}, name
    assert stats.inserts == 6


def test_patch_batches_pad_to_the_largest_bucket_and_repeat_the_first_row():
    buckets = (16, 32, 64)
    small = padded_image(np.ones((12, 5), np.float32), (1, 3, 4), buckets)
    large = padded_image(np.full((40, 5), 2.0, np.float32), (1, 5, 8), buckets)
    assert small.patches.shape == (16, 5) and large.patches.shape == (64, 5)
    batch = batch_pixels([small, large], 3)
    assert batch.patches.shape == (3, 64, 5)
    assert batch.grid.tolist() == [[1, 3, 4], [1, 5, 8], [1, 3, 4]]
    assert np.all(batch.patches[0, :12] == 1) and np.all(batch.patches[0, 12:] == 0)
    assert np.all(batch.patches[1, :40] == 2) and np.all(batch.patches[1, 40:] == 0)
    with pytest.raises(ValueError, match="larger than the largest bucket"):
        padded_image(np.ones((65, 5), np.float32), (1, 5, 13), buckets)


def test_converter_reads_the_released_layout_and_refuses_what_it_cannot_run():
    image_config = QwenImageProcessorConfig(patch_size=8, merge_size=2, temporal_patch_size=2)
    text = {
        "vocab_size": 400,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 1024,
    }
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_heads": 2,
        "out_hidden_size": 64,
        "patch_size": 8,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 32,
        "fullatt_block_indexes": [1],
    }
    # The released files: decoder keys at the top level, rope_scaling {type: mrope}.
    flat = {
        "model_type": "qwen2_5_vl",
        **text,
        "rope_theta": 5000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vision_config": vision,
        "image_token_id": 7,
    }
    config = qwen_convert.config_from_hf(flat, image_config)
    assert config.mrope_section == (2, 3, 3) and config.text.rope_theta == 5000.0
    assert config.text.qkv_bias and config.text.num_layers == 4 and config.image_token_id == 7
    nested = {
        "model_type": "qwen2_5_vl",
        "text_config": {**text, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}},
        "vision_config": vision,
    }
    assert qwen_convert.config_from_hf(nested, image_config).text == dataclass_replace(config.text, rope_theta=1e6)
    with pytest.raises(ConversionError, match="mrope_section"):
        qwen_convert.config_from_hf({**flat, "rope_scaling": {"type": "mrope"}}, image_config)
    with pytest.raises(ConversionError, match="sliding"):
        qwen_convert.config_from_hf({**flat, "use_sliding_window": True}, image_config)
    with pytest.raises(ConversionError, match="not Qwen2.5-VL"):
        qwen_convert.config_from_hf({**flat, "model_type": "qwen2_vl"}, image_config)
    with pytest.raises(ConversionError, match="patch"):
        qwen_convert.config_from_hf({**flat, "vision_config": {**vision, "patch_size": 14}}, image_config)


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


# --- speculative sampling with M-RoPE --------------------------------------------------------

SAMPLING_VOCAB = 6
IMAGE_ID = SAMPLING_VOCAB  # past the vocabulary: never sampled


def _sampling_model():
    """A 6-token Qwen2.5-VL and an image of 3x3 tokens (rope offset 3 - 9 = -6 on every sampled
    token)."""
    from fastvlm_jax.nn.config import DraftConfig, TextConfig
    from fastvlm_jax.nn.qwen25vl import Qwen25VLConfig
    from fastvlm_jax.nn.qwen_vision import QwenVisionConfig

    config = Qwen25VLConfig(
        vision=QwenVisionConfig(
            hidden_size=16,
            depth=1,
            num_heads=2,
            intermediate_size=24,
            out_hidden_size=32,
            patch_size=4,
            window_size=16,
            fullatt_block_indexes=(0,),
        ),
        text=TextConfig(
            vocab_size=SAMPLING_VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_layers=3,
            num_heads=2,
            num_kv_heads=1,
            rope_theta=100.0,
            qkv_bias=True,
        ),
        draft=DraftConfig(exit_layer=1),
        mrope_section=(2, 3, 3),
        max_image_tokens=16,
        image_token_id=IMAGE_ID,
    )
    model = VLM(config)
    params = jax.jit(model.init)(jax.random.key(7))
    # A larger final scale makes the distributions far from uniform.
    params["language_model"]["norm"]["scale"] = params["language_model"]["norm"]["scale"] * 30.0
    # Sharp attention, so that where RoPE puts each token shows in the distributions.
    attention = params["language_model"]["layers"]["self_attn"]
    for name in ("q_proj", "k_proj"):
        attention[name]["kernel"] = attention[name]["kernel"] * 8.0
    patch_dim = config.vision.patch_dim
    patches = np.asarray(jax.random.normal(jax.random.key(8), (36, patch_dim)), np.float32)
    image = padded_image(patches, (1, 6, 6), (36,))
    return model, params, image


@pytest.mark.slow
def test_speculative_sampling_is_exact_with_mrope():
    import itertools

    from decode.engine.sampling import SamplingConfig, warp
    from tests.test_sampling import _chi_square

    model, params, image = _sampling_model()
    prompt = [2] + [IMAGE_ID] * 9 + [3]
    steps, draft_len, rows = 4, 2, 8_000
    sampling = SamplingConfig(temperature=1.0)
    prefixes = np.array(list(itertools.product(range(SAMPLING_VOCAB), repeat=steps - 1)), np.int32)
    ids = np.concatenate([np.tile(prompt, (len(prefixes), 1)), prefixes], axis=1)
    many = batch_pixels([image], len(prefixes))

    def exact_joint(shift: int):
        """P(t_1..t_steps | prompt, image) by cache-free passes over every prefix; shift: added
        to every position after the image (0: the model's own M-RoPE)."""

        def forward(p, input_ids, pixels):
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
            span = model.image_span(input_ids, pixels)
            hidden = model.embed(p, input_ids, model.encode_images(p, pixels), positions)
            positions_seen = jnp.where(positions >= len(prompt), positions + shift, positions)
            hidden, _, _ = model.run_layers(p, hidden, positions_seen, 0, 3, image_span=span)
            return model.logits(p, hidden)

        logits = jax.jit(forward)(params, jnp.asarray(ids), jax.tree.map(jnp.asarray, many))
        probs = np.asarray(warp(logits[:, len(prompt) - 1 :], sampling), np.float64)
        joint = probs[:, -1]
        for i in range(steps - 1):
            joint = joint * probs[np.arange(len(prefixes)), i, prefixes[:, i]][:, None]
        return joint.reshape((SAMPLING_VOCAB,) * steps)

    joint = exact_joint(0)
    prompts = Prompts(
        jnp.asarray([prompt] * rows, jnp.int32),
        jnp.full((rows,), len(prompt), jnp.int32),
        jax.tree.map(jnp.asarray, batch_pixels([image], rows)),
    )
    spec = DecodeSpec("ssd", capacity=steps, sampling=sampling, eos_ids=(), policy=DraftPolicy(draft_len=draft_len))
    out = generate(model, params, prompts, spec, steps, jax.random.key(0))
    accepted, drafted = int(out.accepted.sum()), int(out.drafted.sum())
    assert 0.1 * drafted < accepted < 0.9 * drafted, (accepted, drafted)  # both branches shape the samples
    tokens = np.asarray(out.tokens)[:, :steps]
    pvalue, impossible = _chi_square(tokens, joint)
    print(f"Qwen2.5-VL SSD draft_len {draft_len}, {steps} steps: p = {pvalue:.3g}")
    assert impossible == 0 and pvalue > 1e-3, pvalue
    # Power: the same samples tell the model from one whose sampled tokens sit at plain slots
    # (without the rope offset).
    wrong_pvalue, _ = _chi_square(tokens, exact_joint(6))
    print(f"against plain slots: p = {wrong_pvalue:.3g}")
    assert wrong_pvalue < 1e-6, wrong_pvalue


# --- decode.run over a folder of mixed sizes -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["A"], indirect=True)
@pytest.mark.parametrize("batching, mesh", [("static", None), ("continuous", "data=4,tensor=2")])
def test_decode_run_captions_a_folder_of_mixed_sizes(folder, tmp_path, batching, mesh):
    """decode.run on images of five sizes (two patch buckets), on one device and on a mesh:
    every caption equals the engine's greedy AR caption of that image alone, and the run
    reports its programs."""
    from decode import run

    _, _, _, ckpt, ckpt_dir = folder
    rng = np.random.RandomState(3)
    images = tmp_path / "images"
    images.mkdir()
    for index, (height, width) in enumerate(SIZES):
        random_image(rng, height, width).save(images / f"im{index}.png")
    out, stats_file = tmp_path / "captions.jsonl", tmp_path / "stats.json"
    argv = [
        "--ckpt",
        str(ckpt_dir),
        "--images",
        str(images),
        "--out",
        str(out),
        "--stats",
        str(stats_file),
        "--batch-size",
        "4" if mesh else "2",
        "--max-new-tokens",
        "6",
        "--batching",
        batching,
        "--no-progress",
        *(["--mesh", mesh] if mesh else []),
    ]
    assert run.main(argv) == 0
    lines = {Path(json.loads(line)["image"]).name: json.loads(line) for line in out.read_text().splitlines()}
    assert len(lines) == len(SIZES)
    stats = json.loads(stats_file.read_text())
    assert stats["images"] == len(SIZES) and stats["failed"] == 0
    # Bounded by the buckets, not the images: a prefill per bucket and prefill row count, plus
    # (continuous) the empty state, insert and rounds.
    from decode.engine.captioner import Captioner

    buckets = len(Captioner(ckpt_dir).patch_buckets)
    assert 1 <= stats["compiled_programs"] <= 2 * buckets + 4, (stats["compiled_programs"], buckets)

    model = VLM(ckpt.config)
    question = "Describe this image."
    for index in range(len(SIZES)):
        from PIL import Image

        ids, patches, grid = _ours(ckpt, question, Image.open(images / f"im{index}.png"))
        spec = DecodeSpec("ar", capacity=6, eos_ids=stop_ids(ckpt.config, ckpt.tokenizer))
        alone = generate(model, ckpt.params, _batch([(ids, patches, grid)]), spec, 6)
        want = np.asarray(alone.tokens[0, : int(alone.num_tokens[0])]).tolist()
        assert lines[f"im{index}.png"]["token_ids"] == want, index


def test_named_qwen_architectures_have_the_released_sizes():
    """The parameter counts of Qwen/Qwen2.5-VL-3B/7B/32B-Instruct (transformers' model on the
    meta device from the released configs), imitation network excluded."""
    import flax.linen as nn

    from fastvlm_jax.nn.architectures import architecture
    from fastvlm_jax.nn.model import param_count

    released = {"qwen25vl_3b": 3_754_622_976, "qwen25vl_7b": 8_292_166_656, "qwen25vl_32b": 33_452_718_336}
    for name, count in released.items():
        abstract = nn.meta.unbox(VLM(architecture(name)).abstract_params())
        assert param_count({k: v for k, v in abstract.items() if k != "imitation"}) == count, name
    assert architecture("qwen25vl_7b").num_image_tokens == 1280


def test_group_by_size_batches_similar_sizes_and_loses_nothing():
    from decode.engine.captioner import group_by_size

    sizes = [5, 100, 7, 90, 6, 95, 8, 99, 4, 97]
    # A window of one batch keeps arrival order.
    assert list(group_by_size(range(10), 2, 2, lambda i: sizes[i])) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    batches = list(group_by_size(range(10), 2, 6, lambda i: sizes[i]))
    assert sorted(i for batch in batches for i in batch) == list(range(10))
    assert all(len(batch) == 2 for batch in batches)
    # Each batch pads to its largest: grouping pads far less than arrival order here.
    padded = sum(2 * max(sizes[i] for i in batch) for batch in batches)
    assert padded < sum(2 * max(sizes[i], sizes[i + 1]) for i in range(0, 10, 2)) * 0.8
