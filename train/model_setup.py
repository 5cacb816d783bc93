"""The model a training config names, before any parameter exists: its tokenizer and
its resolved config (shared by train.run and train.compile_only)."""

from __future__ import annotations

import dataclasses

from fastvlm_jax.config import VLMConfig
from fastvlm_jax.tokenizer import Tokenizer, check_image_token_id, load_tokenizer
from train import input as input_lib
from train.config import ConfigError, TrainConfig


def make_tokenizer(cfg: TrainConfig, init_ckpt_tokenizer) -> Tokenizer:
    """The configured tokenizer folder, else the init checkpoint's, else one trained on the
    synthetic caption corpus (deterministic, so every host trains the same one)."""
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    if init_ckpt_tokenizer is not None:
        return init_ckpt_tokenizer
    if cfg.init_from:
        raise ConfigError(f"{cfg.init_from} has no tokenizer/ folder: set tokenizer.path")
    from fastvlm_jax.data import synthetic

    corpus = synthetic.caption_corpus(cfg.tokenizer.train_corpus_size)
    return input_lib.train_caption_tokenizer(corpus, cfg.tokenizer.train_vocab_size,
                                             cfg.tokenizer.byte_fallback,
                                             prompt_lines=[input_lib.prompt_text(cfg.data.question)])


def resolve_model_config(model: VLMConfig, tokenizer: Tokenizer) -> VLMConfig:
    """vocab_size 0 -> the tokenizer's size rounded up to 128 (and its image token id)."""
    if model.text.vocab_size == 0:
        vocab = -(-tokenizer.vocab_size // 128) * 128
        model = model.replace(text=dataclasses.replace(model.text, vocab_size=vocab),
                              image_token_id=tokenizer.image_token_id)
    if tokenizer.vocab_size > model.text.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                          f"{model.text.vocab_size}")
    check_image_token_id(tokenizer, model.image_token_id, ConfigError)
    return model
