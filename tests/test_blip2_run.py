"""BLIP-2 (OPT) end to end: a tiny HF BLIP-2 folder with its GPT-2 BPE tokenizer and
Blip2Processor, converted with `fastvlm_jax.convert`, captioned by `decode.run` in SSD and AR
mode. Prompts equal Blip2Processor's, SSD equals AR, and AR equals HF's greedy `generate`.

One module fixture builds, converts and runs everything (each decode.run compiles one
program at batch 3); the tests check its results.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from decode import run
from fastvlm_jax import convert
from fastvlm_jax.ckpt.checkpoint import load_checkpoint
from fastvlm_jax.image.processing import preprocess_image
from fastvlm_jax.nn.families import build_prompt_ids, stop_ids
from fastvlm_jax.text.tokenizer import HFTokenizer
from tests.hf_blip2 import build_tiny_blip2, save_tiny_blip2_processor
from tests.run_fixtures import write_image

EXIT_LAYER = 1
MAX_NEW = 10
QUERIES = 4
IMAGE_SIZE = 32
VQA_PROMPT = "Question: what is in the picture? Answer:"


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _hf_generate(processor, hf_model, path, eos_ids):
    """HF's greedy tokens (prompt excluded) for one image with no question."""
    import torch

    inputs = processor(images=Image.open(path), text="", return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=list(eos_ids))
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def blip2_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip2_run")
    hf_dir, ckpt = root / "hf", root / "ckpt"
    processor = save_tiny_blip2_processor(hf_dir, num_query_tokens=QUERIES, image_size=IMAGE_SIZE)
    hf_tokenizer = processor.tokenizer
    # The model's vocabulary is padded past the tokenizer's (50272 vs 50266 in blip2-opt); deep
    # layers scaled so that drafts get accepted; vision weights redrawn so that the image matters.
    hf_model = build_tiny_blip2(
        hf_dir,
        seed=3,
        text_init_std=0.15,
        deep_scale=0.3,
        exit_layer=EXIT_LAYER,
        vision_init_std=0.2,
        projection_std=0.5,
        vocab_size=len(hf_tokenizer) + 7,
        image_token_index=hf_tokenizer.convert_tokens_to_ids("<image>"),
        num_query_tokens=QUERIES,
        image_size=IMAGE_SIZE,
    )
    images = [write_image(root / "images" / f"im{i}.png", size=(40 + 8 * i, 36), seed=i) for i in range(3)]

    # The released checkpoints stop at "\n" (text_config.eos_token_id 50118) besides "</s>";
    # here the language model's eos is a token the tiny model emits for image 0 (the first one
    # new at position >= 3), so that decode.run's stop on the config's eos is exercised.
    free = _hf_generate(processor, hf_model, images[0], [2])
    stop = next(t for k, t in enumerate(free) if k >= 3 and t not in free[:k])
    config = json.loads((hf_dir / "config.json").read_text())
    config["text_config"]["eos_token_id"] = stop
    (hf_dir / "config.json").write_text(json.dumps(config))
    expected = {path.name: _hf_generate(processor, hf_model, path, [2, stop]) for path in images}

    assert convert.main(["--hf", str(hf_dir), "--out", str(ckpt), "--exit-layer", str(EXIT_LAYER)]) == 0
    outputs = {}
    for mode in ("ssd", "ar"):
        out = root / f"{mode}.jsonl"
        code = run.main(
            [
                "--ckpt",
                str(ckpt),
                "--images",
                str(root / "images"),
                "--out",
                str(out),
                "--mode",
                mode,
                "--batch-size",
                "3",
                "--max-new-tokens",
                str(MAX_NEW),
                "--no-progress",
            ]
        )
        assert code == 0
        outputs[mode] = {Path(line["image"]).name: line for line in _read_jsonl(out)}
    return processor, ckpt, images, outputs, expected, stop


@pytest.mark.slow
def test_checkpoint_has_the_bpe_tokenizer(blip2_run):
    processor, ckpt, images, _, _, stop = blip2_run
    checkpoint = load_checkpoint(ckpt)
    tokenizer = checkpoint.tokenizer
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.image_token_id == checkpoint.config.image_token_id
    assert tokenizer.vocab_size == len(processor.tokenizer) < checkpoint.config.text.vocab_size
    assert stop_ids(checkpoint.config, tokenizer) == (2, stop)
    image = Image.open(images[0])
    for question in ("", VQA_PROMPT, "a photo of"):
        expected = processor(images=image, text=question)["input_ids"][0]
        assert build_prompt_ids(checkpoint.config, tokenizer, question) == list(expected)
    assert build_prompt_ids(checkpoint.config, tokenizer, "")[-1] == 2  # image tokens, then BOS
    # decode.run's pixels are Blip2Processor's.
    for path in images:
        pixels = preprocess_image(path, checkpoint.image_config)
        reference = processor(images=Image.open(path), return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(pixels, reference.transpose(1, 2, 0), atol=1e-5)


def test_ssd_equals_ar(blip2_run):
    _, _, images, outputs, _, _ = blip2_run
    ssd, ar = outputs["ssd"], outputs["ar"]
    assert sorted(ssd) == sorted(ar) == sorted(p.name for p in images)
    for name in ar:
        assert ar[name]["caption"] and ssd[name]["caption"]
        assert ssd[name]["token_ids"] == ar[name]["token_ids"]
        assert ssd[name]["caption"] == ar[name]["caption"]
    assert sum(line["accepted"] for line in ssd.values()) > 0, "some drafts should be accepted"
    assert sum(line["rounds"] for line in ssd.values()) < sum(line["rounds"] for line in ar.values())


def test_ar_matches_hf_generate(blip2_run):
    processor, _, _, outputs, expected, stop = blip2_run
    ar = outputs["ar"]
    assert len({tuple(tokens) for tokens in expected.values()}) == len(expected), "the image should matter"
    assert len({t for tokens in expected.values() for t in tokens}) > 5, "a degenerate reference proves little"
    for name, tokens in expected.items():
        assert ar[name]["token_ids"] == tokens
        assert ar[name]["caption"] == processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        assert ar[name]["stop"] == ("eos" if tokens[-1] in (2, stop) else "length")
    assert {line["stop"] for line in ar.values()} == {"eos", "length"}


@pytest.mark.slow
def test_imitation_training_runs_and_the_export_decodes(blip2_run, tmp_path):
    """BLIP-2 OPT draft training: two imitation steps from the converted checkpoint (its BPE
    tokenizer, image tokens before BOS, no question), then the export decodes with SSD == AR."""
    from fastvlm_jax.data import tfds_builders
    from tests import train_helpers as th
    from train.run import train

    _, ckpt, images, _, _, _ = blip2_run
    data_dir = tmp_path / "data"
    tfds_builders.build_dataset("synthetic_captions/tiny", str(data_dir))
    cfg = th.tiny_config(
        "imitation",
        init_from=str(ckpt),
        steps=2,
        seq_len=40,
        **{"data.data_dir": str(data_dir), "data.question": "", "mesh.data": 1, "checkpoint.export": True},
    )
    result = train(cfg, tmp_path / "work", progress=False, devices=jax.devices()[:1])
    assert result.status == "done" and result.step == 2
    losses = th.losses(tmp_path / "work")
    assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
    outputs = {}
    for mode in ("ssd", "ar"):
        out = tmp_path / f"{mode}.jsonl"
        assert (
            run.main(
                [
                    "--ckpt",
                    str(result.export_dir),
                    "--images",
                    *map(str, images),
                    "--out",
                    str(out),
                    "--mode",
                    mode,
                    "--batch-size",
                    "3",
                    "--max-new-tokens",
                    str(MAX_NEW),
                    "--no-progress",
                ]
            )
            == 0
        )
        outputs[mode] = {line["image"]: line["token_ids"] for line in _read_jsonl(out)}
    assert outputs["ssd"] == outputs["ar"]
