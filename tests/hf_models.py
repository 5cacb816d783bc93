"""Tiny random Hugging Face LLaVA models built in-process (the reference implementation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def tiny_llava_config(
    *,
    vocab_size=128,
    image_token_index=None,
    num_kv_heads=2,
    feature_layer=-2,
    strategy="default",
    image_size=32,
    patch_size=8,
    vision="clip",
    text_layers=4,
    attention_bias=False,
    tie=False,
    rope_theta=10000.0,
):
    """A LlavaConfig small enough for CPU tests; image token defaults to the last id."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, SiglipVisionConfig

    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        attention_bias=attention_bias,
        tie_word_embeddings=tie,
        rope_theta=rope_theta,
        rms_norm_eps=1e-5,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    vision_cls = CLIPVisionConfig if vision == "clip" else SiglipVisionConfig
    vision_cfg = vision_cls(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
    )
    return LlavaConfig(
        text_config=text,
        vision_config=vision_cfg,
        image_token_index=vocab_size - 1 if image_token_index is None else image_token_index,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=tie,
    )


def build_tiny_llava(folder: Path, seed: int = 0, **config_kwargs):
    """Saves a random tiny LlavaForConditionalGeneration (+ CLIP preprocessor config) to folder."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_llava_config(**config_kwargs)
    model = LlavaForConditionalGeneration(config).eval()
    # Random-init norms are all ones; perturb them so parity also checks norm weights.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    size = config.vision_config.image_size
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "resample": 3,
    }
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return model


def random_prompt_ids(config, rng: np.random.RandomState, text_len: int = 6):
    """[bos, image tokens..., random text tokens] as HF LLaVA expects them."""
    n_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    if config.vision_config.model_type == "clip_vision_model":
        n_image += 1
    if config.vision_feature_select_strategy == "default":
        n_image -= 1
    text = rng.randint(3, config.image_token_index, size=text_len).tolist()
    return [1] + [config.image_token_index] * n_image + text
