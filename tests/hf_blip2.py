"""Tiny random Hugging Face BLIP-2 (OPT) models built in-process (the reference implementation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Caption / VQA-like text (with non-ASCII) for the tiny byte-level BPE tokenizer.
BPE_CORPUS = (
    "a photo of a cat sitting on a couch",
    "two dogs playing in the snow.",
    "Question: what is in the picture? Answer: a red car",
    "a man riding a horse on the beach",
    "the quick brown fox jumps over the lazy dog",
    "a plate of food with rice and chicken\n",
    "Héllo wörld, naïve café ☕ 日本語",
    "a group of people standing around a kitchen counter",
)


def tiny_blip2_config(
    *,
    vocab_size=96,
    num_query_tokens=4,
    image_size=32,
    patch_size=8,
    vision_layers=2,
    qkv_bias=True,
    qformer_layers=2,
    cross_attention_frequency=1,
    text_layers=4,
    tie=True,
    enable_bias=True,
    eos_token_id=2,
    image_token_index=None,
):
    """A Blip2Config small enough for CPU tests; the image token is the last id unless given."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    vision = Blip2VisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        qkv_bias=qkv_bias,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=qformer_layers,
        num_attention_heads=4,
        cross_attention_frequency=cross_attention_frequency,
    )
    text = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        ffn_dim=96,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        enable_bias=enable_bias,
        bos_token_id=2,
        eos_token_id=eos_token_id,
        pad_token_id=1,
    )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=vocab_size - 1 if image_token_index is None else image_token_index,
    )


def perturb_norms(model, scale: float = 0.1) -> None:
    """Random-init LayerNorms are ones/zeros; perturb them so parity also checks them."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name.lower():
                param.add_(scale * torch.randn_like(param))


def save_preprocessor(folder: Path, image_size: int) -> None:
    """A BlipImageProcessor config, as Salesforce/blip2-opt-* ship (fixed-size bicubic resize)."""
    preprocessor = {
        "image_processor_type": "BlipImageProcessor",
        "processor_class": "Blip2Processor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    }
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(preprocessor))


def build_tiny_blip2(
    folder: Path | None,
    seed: int = 0,
    text_init_std: float | None = None,
    deep_scale: float | None = None,
    exit_layer: int = 1,
    projection_std: float | None = None,
    vision_init_std: float | None = None,
    **config_kwargs,
):
    """A random tiny Blip2ForConditionalGeneration, saved to `folder` (with a preprocessor).

    text_init_std: re-draw the OPT matrices with this std (HF's 0.02 makes a tiny random
      model repeat one token forever; 0.15 gives varied greedy outputs).
    deep_scale: scale the residual branches of OPT layers >= exit_layer, so an early exit
      at exit_layer agrees with the full model often but not always (for SSD tests).
    vision_init_std, projection_std: re-draw the ViT and Q-Former matrices / the language
      projection with this std. With HF's init the query outputs hardly depend on the pixels
      (they differ by ~1e-7 between images) and are small next to the token embeddings, so
      different images give the same tokens; set both to make the image matter.
    """
    import torch
    from transformers import Blip2ForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_blip2_config(**config_kwargs)
    model = Blip2ForConditionalGeneration(config).eval()
    perturb_norms(model)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.5)  # HF initialises them to zero
        if text_init_std is not None:
            for param in model.language_model.parameters():
                if param.ndim == 2:
                    param.normal_(0.0, text_init_std)
        if vision_init_std is not None:
            for module in (model.vision_model, model.qformer):
                for param in module.parameters():
                    if param.ndim >= 2:
                        param.normal_(0.0, vision_init_std)
        if projection_std is not None:
            model.language_projection.weight.normal_(0.0, projection_std)
        if deep_scale is not None:
            for layer in model.language_model.model.decoder.layers[exit_layer:]:
                layer.self_attn.out_proj.weight.mul_(deep_scale)
                layer.fc2.weight.mul_(deep_scale)
    if folder is not None:
        model.save_pretrained(folder)
        save_preprocessor(folder, config.vision_config.image_size)
    return model


def prompt_ids(config, text_ids) -> list[int]:
    """Blip2Processor's layout: num_query_tokens image tokens, then BOS and the text."""
    image = [config.image_token_index] * config.num_query_tokens
    return image + [config.text_config.bos_token_id] + list(text_ids)


def random_prompt_ids(config, rng: np.random.RandomState, text_len: int = 6) -> list[int]:
    text = rng.randint(3, config.image_token_index, size=text_len).tolist()
    return prompt_ids(config, text)


def save_tiny_blip2_processor(folder: Path, num_query_tokens: int, image_size: int, vocab_size: int = 320):
    """A tiny OPT-style GPT-2 BPE tokenizer + BlipImageProcessor as a Blip2Processor folder.

    The BPE is trained with the `tokenizers` library (ByteLevel, OPT's specials "<s>" 0,
    "<pad>" 1, "</s>" 2, "<unk>" 3) and wrapped in transformers' GPT2Tokenizer the way
    blip2-opt's tokenizer_config.json sets it up (bos = eos = unk = "</s>", pad "<pad>",
    add_bos_token). Blip2Processor adds "<image>" right after the vocabulary. Saved with
    `save_pretrained` (tokenizer.json, tokenizer_config.json, processor_config.json), plus the
    preprocessor_config.json the converter reads. Returns the processor reloaded from `folder`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Blip2Processor, BlipImageProcessor, GPT2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(BPE_CORPUS) * 10, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = GPT2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        bos_token="</s>",
        eos_token="</s>",
        unk_token="</s>",
        pad_token="<pad>",
        add_bos_token=True,
        add_prefix_space=False,
    )
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens).save_pretrained(folder)
    save_preprocessor(folder, image_size)
    return Blip2Processor.from_pretrained(folder)
