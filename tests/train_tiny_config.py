"""A tiny training config for tests (a config file: `--config tests/train_tiny_config.py:STAGE`).

Tiny model (2 text layers, exit after 1, 16x16 images -> 4 image tokens), the
synthetic_captions/tiny data and a small word-level tokenizer trained on the fly.
Tests set data.data_dir, workdir and init_from by overrides.
"""

from fastvlm_jax.nn.config import DraftConfig, TextConfig, VisionConfig
from fastvlm_jax.nn.llava import LlavaConfig
from train.config import CheckpointConfig, DataConfig, OptimConfig, TokenizerConfig, TrainConfig


def tiny_model() -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(
            image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4
        ),
        text=TextConfig(
            vocab_size=0,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=256,
        ),
        draft=DraftConfig(exit_layer=1, kind="ffn"),
        image_token_id=-1,  # vocab_size 0: both come from the tokenizer
    )


def get_config(stage: str = "base") -> TrainConfig:
    return TrainConfig(
        stage=stage,
        model=tiny_model() if stage == "base" else None,
        init_from=None if stage == "base" else "UNSET",
        data=DataConfig(name="synthetic_captions/tiny", read_threads=2),
        tokenizer=TokenizerConfig(train_vocab_size=256, byte_fallback=False, train_corpus_size=2000),
        batch_size=8,
        seq_len=48,
        steps=20,
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=3, grad_clip_norm=1.0),
        checkpoint=CheckpointConfig(save_every=0, keep=2, async_save=True, export=False),
        log_every=1,
        seed=0,
    )
