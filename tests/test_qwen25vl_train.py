"""Training the draft paths of a Qwen2.5-VL checkpoint: images that keep their size.

A tiny random HF Qwen2.5-VL folder (tests/hf_qwen25vl.py), converted by `fastvlm_jax.convert`,
trained by train.run on a few captioned images of different sizes (each its own token count,
so each row its own prompt length and loss window), one of them larger than the run's patch
budget (resized down within it):

- the input pipeline: uint8 patches + grid looked up on device equal the processor's float32
  patches bit for bit, prompts carry the image's own token count, an oversized image is
  resized by the processor's rule or refused with its name;
- the imitation stage: the base stays bit-identical, the imitation network moves, and greedy
  SSD with the trained draft equals AR on an image of a size not in the training data;
- the refine and eagle stages run on the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate
from fastvlm_jax import convert
from fastvlm_jax.ckpt import checkpoint
from fastvlm_jax.image.patches import stack_patch_images
from fastvlm_jax.image.qwen_vl import QwenImageProcessorConfig, preprocess
from fastvlm_jax.nn.families import prompt_ids_for
from fastvlm_jax.nn.model import VLM
from tests import train_helpers as th
from tests.hf_qwen25vl import QWEN_TEMPLATE, build_tiny_qwen25vl, make_qwen_tokenizer, random_image
from train import input as input_lib
from train import step as step_lib
from train.model_setup import pixel_table

# (height, width): eight sizes, 4 to 40 tokens at 16-pixel merged patches; the last one
# becomes 40 tokens, more than the runs' budget of 24 (IMAGE_PATCHES).
TRAIN_SIZES = [(50, 70), (90, 40), (64, 64), (32, 48), (40, 100), (20, 20), (80, 60), (160, 160)]
IMAGE_PATCHES = 96  # 24 tokens of 2x2 patches
CAPTIONS = [
    "a photo of a red car parked on the street",
    "two dogs play in the green park near a lake",
    "the quick brown fox jumps over the lazy dog",
    "a red car near a lake",
]
QUESTION = "Describe this image."


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(checkpoint, its folder, the data dir of a local_captions/mixed set of TRAIN_SIZES)."""
    root = tmp_path_factory.mktemp("qwen_train")
    build_tiny_qwen25vl(root / "hf", seed=1)
    ckpt_dir = convert.convert(root / "hf", root / "ckpt", exit_layer=2, progress=False)
    images = root / "images"
    images.mkdir()
    rng = np.random.RandomState(0)
    lines = []
    for index, (height, width) in enumerate(TRAIN_SIZES):
        random_image(rng, height, width).save(images / f"im{index}.png")
        lines.append(json.dumps({"image": f"im{index}.png", "captions": CAPTIONS[index % 2 :: 2]}))
    (images / "train.jsonl").write_text("\n".join(lines) + "\n")
    from fastvlm_jax.data import tfds_builders

    tfds_builders.build_dataset(
        "local_captions/mixed", str(root / "data"), image_dir=images, annotations=images / "train.jsonl"
    )
    return checkpoint.load_checkpoint(ckpt_dir), ckpt_dir, root / "data"


def _config(stage, qwen, **overrides):
    _, ckpt_dir, data_dir = qwen
    settings = {
        "steps": 4,
        "init_from": ckpt_dir,
        "seq_len": 64,
        "data.name": "local_captions/mixed",
        "data.data_dir": data_dir,
        "data.image_patches": IMAGE_PATCHES,
        "data.question": QUESTION,
        "checkpoint.export": True,
        "mesh.data": 1,
    }
    return th.tiny_config(stage, **{**settings, **overrides})


def _train(config, workdir):
    from train.run import train

    result = functools.partial(train, devices=jax.devices()[:1])(config, workdir, progress=False)
    assert result.status == "done"
    losses = th.losses(workdir)
    assert len(losses) == config.steps and all(np.isfinite(list(losses.values())))
    return result


def test_patch_rows_prompts_and_oversized_images(tmp_path):
    """The pipeline's rows: uint8 patches looked up on device equal `preprocess` bit for bit
    (padding zero), each prompt has its image's token count, an oversized image is resized
    by the processor's rule within the budget (or refused by name), and the per-row loss
    window holds every caption position."""
    from fastvlm_jax.text.tokenizer import load_tokenizer

    hf_tokenizer = make_qwen_tokenizer()
    hf_tokenizer.chat_template = QWEN_TEMPLATE
    hf_tokenizer.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    # The tiny checkpoints' processor (tests/hf_qwen25vl.py): 8-pixel patches, 4 to 40 tokens.
    config = QwenImageProcessorConfig(patch_size=8, min_pixels=16 * 16 * 4, max_pixels=16 * 16 * 40)
    transform = input_lib.CaptionExample(tokenizer, config, QUESTION, 40, 64, 0, "qwen2_5_vl", IMAGE_PATCHES)
    rng = np.random.RandomState(1)
    rows, lengths = [], set()
    for height, width in TRAIN_SIZES:
        image = random_image(rng, height, width)
        row = transform.random_map({"image": image, "captions": CAPTIONS}, np.random.default_rng(0))
        patches, grid = preprocess(image, config)
        if patches.shape[0] > IMAGE_PATCHES:  # resized down by the processor's own rule
            budget = dataclasses.replace(config, max_pixels=IMAGE_PATCHES * config.patch_size**2)
            patches, grid = preprocess(image, budget)
            assert patches.shape[0] <= IMAGE_PATCHES
        want = stack_patch_images([(patches, grid)], IMAGE_PATCHES)
        got = step_lib.device_patches(
            jnp.asarray(row["pixels"][None]), jnp.asarray(row["image_grid"][None]), pixel_table(config)
        )
        assert np.array_equal(np.asarray(got.patches), want.patches)
        assert np.array_equal(np.asarray(got.grid), want.grid)
        tokens = patches.shape[0] // config.merge_size**2
        prompt = prompt_ids_for("qwen2_5_vl", tokenizer, QUESTION, tokens)
        assert row["input_ids"][: len(prompt)].tolist() == prompt and row["prompt_len"] == len(prompt)
        rows.append(row)
        lengths.add(len(prompt))
    assert len(lengths) >= 5
    batch = input_lib.collate(rows)
    input_lib.check_loss_window(batch, transform.text.prompt_len - 1, per_row=True)

    strict = input_lib.PatchInput(config, IMAGE_PATCHES, "error")
    with pytest.raises(input_lib.ImageOverflowError, match="big.png.*data.image_patches=96"):
        strict(random_image(rng, 160, 160), "big.png")


@pytest.mark.slow
def test_imitation_stage_trains_the_draft_and_ssd_stays_exact(qwen, tmp_path):
    """train.run's imitation stage on a converted Qwen2.5-VL checkpoint with images of eight
    sizes: the base model stays bit-identical, the imitation network moves, and greedy SSD with
    it equals AR on an image of a size not in the training data."""
    ckpt, _, _ = qwen
    result = _train(_config("imitation", qwen), tmp_path / "imitation")
    trained = checkpoint.load_checkpoint(result.export_dir)
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
    rows = []
    for height, width in [(45, 77), (100, 30)]:  # not among TRAIN_SIZES
        patches, grid = preprocess(random_image(np.random.RandomState(5), height, width), trained.image_config)
        ids = prompt_ids_for("qwen2_5_vl", trained.tokenizer, QUESTION, patches.shape[0] // 4)
        rows.append((ids, patches, grid))
    width = max(len(ids) for ids, _, _ in rows)
    images = stack_patch_images([(p, g) for _, p, g in rows], max(p.shape[0] for _, p, _ in rows))
    prompts = Prompts(
        jnp.asarray([ids + [0] * (width - len(ids)) for ids, _, _ in rows], jnp.int32),
        jnp.asarray([len(ids) for ids, _, _ in rows], jnp.int32),
        jax.tree.map(jnp.asarray, images),
    )
    ar = generate(model, trained.params, prompts, DecodeSpec("ar", capacity=12, eos_ids=()), 12)
    ssd_spec = DecodeSpec("ssd", capacity=12, eos_ids=(), policy=DraftPolicy(draft_len=3))
    ssd = generate(model, trained.params, prompts, ssd_spec, 12)
    assert np.asarray(ssd.tokens).tolist() == np.asarray(ar.tokens).tolist()


@pytest.mark.slow
def test_refine_and_eagle_stages_run(qwen, tmp_path):
    """The refine stage (the full model's own greedy captions of each image, then the imitation
    loss on them) and the eagle stage (a fresh EAGLE head) train on the Qwen2.5-VL checkpoint;
    neither changes the base model."""
    ckpt, _, _ = qwen
    refine = _train(_config("refine", qwen, steps=2, batch_size=4), tmp_path / "refine")
    stored = json.loads((tmp_path / "refine" / "refine_sequences" / "complete.json").read_text())
    assert stored["stats"]["batches"] == 2
    eagle = _train(_config("eagle", qwen, steps=2, batch_size=4, **{"eagle.image_pool": 2}), tmp_path / "eagle")
    for result in (refine, eagle):
        trained = dict(jax.tree_util.tree_flatten_with_path(checkpoint.load_checkpoint(result.export_dir).params)[0])
        for path, value in jax.tree_util.tree_flatten_with_path(ckpt.params)[0]:
            if not jax.tree_util.keystr(path).startswith("['imitation']"):
                assert np.array_equal(np.asarray(value), np.asarray(trained[path])), jax.tree_util.keystr(path)
    assert any(jax.tree_util.keystr(path).startswith("['eagle']") for path in trained)
