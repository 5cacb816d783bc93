"""Tiny random Hugging Face BLIP-2 (OPT) models built in-process (the reference implementation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def tiny_blip2_config(*, vocab_size=96, num_query_tokens=4, image_size=32, patch_size=8,
                      vision_layers=2, qkv_bias=True, qformer_layers=2, cross_attention_frequency=1,
                      text_layers=4, tie=True, enable_bias=True, eos_token_id=2):
    """A Blip2Config small enough for CPU tests; the image token is the last id."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    vision = Blip2VisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=32,
                               intermediate_size=48, num_hidden_layers=vision_layers,
                               num_attention_heads=4, qkv_bias=qkv_bias)
    qformer = Blip2QFormerConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=qformer_layers,
                                 num_attention_heads=4, cross_attention_frequency=cross_attention_frequency)
    text = OPTConfig(vocab_size=vocab_size, hidden_size=64, ffn_dim=96, num_hidden_layers=text_layers,
                     num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=tie,
                     enable_bias=enable_bias, bos_token_id=2, eos_token_id=eos_token_id, pad_token_id=1)
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                       text_config=text.to_dict(), num_query_tokens=num_query_tokens,
                       image_token_index=vocab_size - 1)


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
        "image_processor_type": "BlipImageProcessor", "processor_class": "Blip2Processor",
        "do_resize": True, "size": {"height": image_size, "width": image_size}, "resample": 3,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
    }
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(preprocessor))


def build_tiny_blip2(folder: Path | None, seed: int = 0, text_init_std: float | None = None,
                     deep_scale: float | None = None, exit_layer: int = 1, **config_kwargs):
    """A random tiny Blip2ForConditionalGeneration, saved to `folder` (with a preprocessor).

    text_init_std: re-draw the OPT matrices with this std (HF's 0.02 makes a tiny random
      model repeat one token forever; 0.15 gives varied greedy outputs).
    deep_scale: scale the residual branches of OPT layers >= exit_layer, so an early exit
      at exit_layer agrees with the full model often but not always (for SSD tests).
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
