"""BLIP-2 OPT-2.7b (Salesforce/blip2-opt-2.7b), the paper's second model family.

Sizes are those of the released checkpoint (3,744,761,856 parameters without the
imitation network): EVA ViT-g/14 at 224px (39 layers, width 1408), a 12-layer Q-Former
(width 768, cross-attention every 2nd layer, 32 queries) and OPT-2.7b (32 layers, width
2560, FFN 10240, vocab 50304 with the image token at 50265; captions end at "\\n", id 50118).

Get the weights by converting the HF folder (the converter reads the same sizes from its
config.json):

    python -m fastvlm_jax.convert --hf PATH/blip2-opt-2.7b --out ckpts/blip2_opt_2_7b --exit-layer 8

`get_model_config()` builds the same config without a checkpoint (shapes, sharding plans,
abstract params).

Not yet supported, so `get_config` (train.run) refuses: BLIP-2 OPT's GPT-2 BPE tokenizer
(fastvlm_jax.tokenizer reads sentencepiece only, so converted checkpoints carry no
tokenizer) and BLIP-2's prompt layout in the training input pipeline (image tokens before
BOS, no chat template).
"""

from fastvlm_jax.blip2 import Blip2Config, Blip2VisionConfig, OPTConfig, QFormerConfig
from fastvlm_jax.config import DraftConfig

EOS_NEWLINE_ID = 50118  # text_config.eos_token_id of the released BLIP-2 OPT models


def get_model_config(exit_layer: int = 8, kind: str = "ffn", draft_hidden: int = 0) -> Blip2Config:
    return Blip2Config(
        vision=Blip2VisionConfig(image_size=224, patch_size=14, hidden_size=1408, intermediate_size=6144,
                                 num_layers=39, num_heads=16, layer_norm_eps=1e-6, hidden_act="gelu",
                                 qkv_bias=True),
        qformer=QFormerConfig(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                              layer_norm_eps=1e-12, hidden_act="gelu", cross_attention_frequency=2),
        text=OPTConfig(vocab_size=50304, hidden_size=2560, intermediate_size=10240, num_layers=32,
                       num_heads=32, max_position_embeddings=2048, do_layer_norm_before=True,
                       hidden_act="relu", tie_word_embeddings=True, bos_token_id=2,
                       eos_token_id=EOS_NEWLINE_ID),
        draft=DraftConfig(exit_layer=exit_layer, kind=kind, hidden_size=draft_hidden),
        num_query_tokens=32,
        image_token_id=50265,
    )


def get_config(arg: str = ""):
    from train.config import ConfigError

    raise ConfigError("training BLIP-2 is not supported yet: train.run needs a tokenizer, and BLIP-2 "
                      "OPT's GPT-2 BPE tokenizer is not supported by fastvlm_jax.tokenizer "
                      "(use get_model_config() for the model itself)")
