"""Tiny random configs shared by tests."""

from fastvlm_jax.nn.config import DraftConfig, TextConfig, VisionConfig
from fastvlm_jax.nn.llava import LlavaConfig


def tiny_config(
    *,
    vocab_size=64,
    num_layers=4,
    exit_layer=2,
    kind="ffn",
    num_kv_heads=2,
    image_size=16,
    hidden_size=64,
    draft_hidden=0,
) -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(
            image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4
        ),
        text=TextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_layers=num_layers,
            num_heads=4,
            num_kv_heads=num_kv_heads,
            max_position_embeddings=512,
        ),
        draft=DraftConfig(exit_layer=exit_layer, kind=kind, hidden_size=draft_hidden),
        image_token_id=vocab_size - 1,
    )
