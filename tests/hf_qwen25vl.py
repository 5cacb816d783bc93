"""Tiny random Hugging Face Qwen2.5-VL folders built in-process: the model
(Qwen2_5_VLForConditionalGeneration), a Qwen2Tokenizer trained here, the image processor (small
min/max pixels, so images are a few dozen patches) and Qwen's chat template, saved as
transformers saves them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL's released template (images and text items of a user turn, a default system turn).
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# A structurally different one: no system turn, the question before the image.
QUESTION_FIRST_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }} {% endif %}"
    "{% endfor %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "a photo of a red car parked on the street",
    "two dogs play in the green park near a lake",
    "Describe this image. What is in the picture?",
    "the quick brown fox jumps over the lazy dog 123",
    "You are a helpful assistant.\n",
]


def make_qwen_tokenizer(vocab_size: int = 360):
    """A Qwen2Tokenizer (byte-level BPE) trained on a few sentences, with Qwen's special tokens
    after the vocabulary and <|im_end|> as EOS (as the instruct checkpoints set it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=1,
    )
    backend.train_from_iterator(_CORPUS * 4, trainer)
    import json

    model_json = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model_json["vocab"], merges=merges, eos_token="<|im_end|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS})
    return tokenizer


def tiny_qwen25vl_config(
    tokenizer,
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    mrope_section=(2, 3, 3),
    tie: bool = False,
    vision_depth: int = 2,
    fullatt: tuple[int, ...] = (1,),
    window_size: int = 32,
    patch_size: int = 8,
    merge: int = 2,
):
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # a multiple of 64: shards over any test mesh
        hidden_size=hidden,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-6,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section)},
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=tie,
    )
    vision = dict(
        depth=vision_depth,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        out_hidden_size=hidden,
        patch_size=patch_size,
        spatial_merge_size=merge,
        temporal_patch_size=2,
        window_size=window_size,
        fullatt_block_indexes=list(fullatt),
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=tie,
    )


def build_tiny_qwen25vl(
    folder: Path,
    seed: int = 0,
    template: str = QWEN_TEMPLATE,
    min_pixels: int = 16 * 16 * 4,
    max_pixels: int = 16 * 16 * 40,
    **config_kwargs,
):
    """Saves a random Qwen2_5_VLForConditionalGeneration + tokenizer (with the chat template) +
    image processor to `folder`.

    Norm weights (ones in transformers' init) are drawn at random too, so every part shows in
    the outputs. Returns (model, HFInputs): Qwen2_5_VLProcessor itself needs torchvision (for
    its video processor), which the test machine lacks; `HFInputs` does what it does for images.
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tokenizer = make_qwen_tokenizer()
    config = tiny_qwen25vl_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                param.normal_(1.0, 0.3)
            elif "language_model" in name and name.endswith("weight"):
                # Wider than transformers' 0.02, so that greedy captions vary instead of repeating.
                param.normal_(0.0, 0.12)
    vision = config.vision_config
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    tokenizer.chat_template = template
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)
    return model, HFInputs(tokenizer, image_processor)


class HFInputs:
    """Qwen2_5_VLProcessor's image path: the chat template rendered for [image, question], each
    <|image_pad|> repeated grid.prod() // merge**2 times, tokenized; the image processor's
    pixel_values and image_grid_thw."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    def prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, question: str, image):
        import torch

        images = self.image_processor(images=[image], return_tensors="pt")
        merge = self.image_processor.merge_size
        count = int(images["image_grid_thw"][0].prod()) // merge**2
        text = self.prompt(question).replace("<|image_pad|>", "<|image_pad|>" * count)
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        mm_types = (ids == self.tokenizer.convert_tokens_to_ids("<|image_pad|>")).to(torch.int32)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": mm_types,
            "pixel_values": images["pixel_values"],
            "image_grid_thw": images["image_grid_thw"],
        }


def random_image(rng: np.random.RandomState, height: int, width: int):
    from PIL import Image

    return Image.fromarray(rng.randint(0, 255, (height, width, 3), np.uint8))
