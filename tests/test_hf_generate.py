"""End to end against HF: image file + prompt -> the same 20 greedy tokens as
LlavaProcessor + LlavaForConditionalGeneration.generate, through our converter."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate
from fastvlm_jax import convert
from fastvlm_jax.ckpt import checkpoint
from fastvlm_jax.image.processing import load_image, preprocess_image
from fastvlm_jax.nn.model import VLM
from fastvlm_jax.text.prompts import build_llava_input_ids
from tests.hf_models import build_tiny_llava
from tests.sp_fixtures import make_hf_llama_tokenizer_dir, train_tiny_sentencepiece


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        dict(image_size=32, feature_layer=-2, strategy="default", num_kv_heads=2),
        dict(image_size=48, feature_layer=-1, strategy="full", num_kv_heads=4),
    ],
)
def test_greedy_20_tokens_match_hf_processor_and_generate(tmp_path, case):
    import torch
    from transformers import CLIPImageProcessor, LlavaProcessor

    hf_dir = tmp_path / "hf"
    sp_model = train_tiny_sentencepiece(tmp_path / "sp")
    hf_tokenizer = make_hf_llama_tokenizer_dir(hf_dir, sp_model)
    image_token = hf_tokenizer.convert_tokens_to_ids("<image>")
    hf_model = build_tiny_llava(hf_dir, seed=5, vocab_size=len(hf_tokenizer), image_token_index=image_token, **case)
    size = case["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=hf_tokenizer,
        patch_size=8,
        vision_feature_select_strategy=case["strategy"],
        num_additional_image_tokens=1,
    )

    image_path = tmp_path / "photo.png"
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 255, (50, 70, 3), np.uint8)).save(image_path)
    question = "What is in the picture?"
    prompt = f"USER: <image>\n{question} ASSISTANT:"
    inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")
    hf_model.generation_config.eos_token_id = None  # generate all 20 tokens in both
    hf_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        hf_out = hf_model.generate(**inputs, max_new_tokens=20, do_sample=False)
    hf_new = hf_out[0, inputs["input_ids"].shape[1] :].tolist()

    ckpt_dir = convert.convert(hf_dir, tmp_path / "ckpt", exit_layer=2, progress=False)
    ckpt = checkpoint.load_checkpoint(ckpt_dir)
    ids = build_llava_input_ids(ckpt.tokenizer, question, ckpt.config.num_image_tokens)
    assert ids == inputs["input_ids"][0].tolist()
    pixels = preprocess_image(load_image(image_path), ckpt.image_config)
    np.testing.assert_allclose(pixels, inputs["pixel_values"][0].numpy().transpose(1, 2, 0), atol=1e-6)

    prompts = Prompts(jnp.asarray([ids], jnp.int32), jnp.asarray([len(ids)], jnp.int32), jnp.asarray(pixels[None]))
    model = VLM(ckpt.config)
    for spec in [
        DecodeSpec("ar", capacity=20, eos_ids=()),
        DecodeSpec("ssd", capacity=20, eos_ids=(), policy=DraftPolicy(draft_len=3)),
    ]:
        out = generate(model, ckpt.params, prompts, spec, 20)
        assert np.asarray(out.tokens[0]).tolist() == hf_new, spec.mode
    if case["image_size"] != 32:
        return
    # `fastvlm_jax.convert --quantize int8` on the same HF folder: int8 decoding weights whose
    # greedy SSD equals their own AR (int8 may move a token or two away from HF's float output).
    int8_dir = tmp_path / "int8"
    assert convert.main(["--hf", str(hf_dir), "--out", str(int8_dir), "--exit-layer", "2", "--quantize", "int8"]) == 0
    int8 = checkpoint.load_checkpoint(int8_dir)
    assert int8.config.quantization == "int8"
    assert int8.params["language_model"]["lm_head"]["kernel"].dtype == jnp.int8
    int8_model = VLM(int8.config)
    ar, ssd = (
        np.asarray(generate(int8_model, int8.params, prompts, spec, 20).tokens[0]).tolist()
        for spec in (
            DecodeSpec("ar", capacity=20, eos_ids=()),
            DecodeSpec("ssd", capacity=20, eos_ids=(), policy=DraftPolicy(draft_len=3)),
        )
    )
    assert ssd == ar
