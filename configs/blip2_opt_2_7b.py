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

from fastvlm_jax.architectures import BLIP2_OPT_EOS_NEWLINE_ID as EOS_NEWLINE_ID  # noqa: F401
from fastvlm_jax.architectures import blip2_opt_2_7b
from fastvlm_jax.blip2 import Blip2Config


def get_model_config(exit_layer: int = 8, kind: str = "ffn", draft_hidden: int = 0) -> Blip2Config:
    # One definition of the sizes, in the library (decode.bench --ckpt shapes:blip2_opt_2_7b uses it).
    return blip2_opt_2_7b(exit_layer, kind, draft_hidden)


def get_config(arg: str = ""):
    from train.config import ConfigError

    raise ConfigError("training BLIP-2 is not supported yet: train.run needs a tokenizer, and BLIP-2 "
                      "OPT's GPT-2 BPE tokenizer is not supported by fastvlm_jax.tokenizer "
                      "(use get_model_config() for the model itself)")
