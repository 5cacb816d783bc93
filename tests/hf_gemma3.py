"""Tiny random Hugging Face Gemma 3 (image + text) folders built in-process: the model
(Gemma3ForConditionalGeneration), a GemmaTokenizer trained here, the image processor and a
chat template, saved as transformers saves them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
TURN_TOKENS = ["<start_of_turn>", "<end_of_turn>"]
BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"

# Our own template in Gemma 3's chat format (user / model turns, an image item becomes
# <start_of_image>, text is trimmed, the generation prompt opens the model's turn).
GEMMA_STYLE_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# A structurally different one: a fixed instruction line before the user's items.
INSTRUCTION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + message['role'] + '\\nLook carefully.\\n' }}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] | trim }} {% else %}{{ '<start_of_image>' }}{% endif %}"
    "{% endfor %}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

_CORPUS = [
    "a photo of a red car parked on the street",
    "two dogs play in the green park near a lake",
    "describe this image in one sentence please",
    "what is in the picture? a cat sleeping on a sofa",
    "the quick brown fox jumps over the lazy dog",
    "Look carefully. Answer the question about the image.",
]


def make_gemma_tokenizer(vocab_size: int = 400):
    """A GemmaTokenizer (BPE with byte fallback) trained on a few sentences, with Gemma 3's
    special and image tokens; ids: specials 0-4, byte tokens, merges, then added tokens."""
    from tokenizers import Tokenizer, models, normalizers, trainers
    from transformers import GemmaTokenizer

    bytes_alphabet = [f"<0x{i:02X}>" for i in range(256)]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS + bytes_alphabet, show_progress=False, min_frequency=1
    )
    backend.train_from_iterator(_CORPUS * 4, trainer)
    model_json = json.loads(backend.to_str())["model"]
    vocab = model_json["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": SOFT},
    )
    tokenizer.add_special_tokens({"additional_special_tokens": TURN_TOKENS + [BOI, EOI, SOFT]})
    return tokenizer


def tiny_gemma3_config(
    tokenizer,
    *,
    layers: int = 4,
    layer_types=None,
    sliding_window: int = 8,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    hidden: int = 64,
    image_size: int = 28,
    patch_size: int = 7,
    mm_tokens: int = 4,
    rope_parameters=None,
    query_pre_attn_scalar: int = 16,
):
    from transformers import Gemma3Config, SiglipVisionConfig
    from transformers.models.gemma3.configuration_gemma3 import Gemma3TextConfig

    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        query_pre_attn_scalar=query_pre_attn_scalar,
        sliding_window=sliding_window,
        layer_types=layer_types,
        rope_parameters=rope_parameters,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = SiglipVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=mm_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(SOFT),
        boi_token_index=tokenizer.convert_tokens_to_ids(BOI),
        eoi_token_index=tokenizer.convert_tokens_to_ids(EOI),
    )


def build_tiny_gemma3(folder: Path, seed: int = 0, template: str = GEMMA_STYLE_TEMPLATE, **config_kwargs):
    """Saves a random Gemma3ForConditionalGeneration + tokenizer + processor to `folder`.

    Norm weights and the projection (zeros in transformers' init) are drawn at random too, so
    every part of the model shows in its outputs. Returns (model, processor).
    """
    import torch
    from transformers import Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    tokenizer = make_gemma_tokenizer()
    config = tiny_gemma3_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "mm_input_projection" in name:
                param.normal_(0.0, 0.3)
    size = config.vision_config.image_size
    image_processor = Gemma3ImageProcessor(size={"height": size, "width": size}, do_pan_and_scan=False)
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        image_seq_length=config.mm_tokens_per_image,
    )
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return model, processor


def random_image(rng: np.random.RandomState, height: int = 40, width: int = 52):
    from PIL import Image

    return Image.fromarray(rng.randint(0, 255, (height, width, 3), np.uint8))
