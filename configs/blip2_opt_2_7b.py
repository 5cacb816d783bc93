"""BLIP-2 OPT-2.7b (Salesforce/blip2-opt-2.7b), the paper's second model family.

Sizes are those of the released checkpoint (3,744,761,856 parameters without the
imitation network): EVA ViT-g/14 at 224px (39 layers, width 1408), a 12-layer Q-Former
(width 768, cross-attention every 2nd layer, 32 queries) and OPT-2.7b (32 layers, width
2560, FFN 10240, vocab 50304 with the image token at 50265; captions end at "\\n", id 50118).

Get the weights by converting the HF folder (the converter reads the same sizes from its
config.json):

    python -m fastvlm_jax.convert --hf PATH/blip2-opt-2.7b --out ckpts/blip2_opt_2_7b --exit-layer 8

`get_model_config()` builds the same config without a checkpoint (shapes, sharding plans,
abstract params). `get_config` (train.run) trains the draft on COCO captions from the
converted checkpoint, which carries BLIP-2's own GPT-2 BPE tokenizer; prompts are laid out as
Blip2Processor does (32 image tokens, then BOS, no question: plain captioning):

    python -m train.run --config configs/blip2_opt_2_7b.py            # imitation stage
    python -m train.run --config configs/blip2_opt_2_7b.py:refine     # then imitation learning

The frozen model is bf16 and FSDP-sharded over 8 chips; only the imitation network (one
FFN block of width 10240 after layer 8 of 32) has float32 master weights.
"""

from configs import llava15_7b
from fastvlm_jax.nn.architectures import BLIP2_OPT_EOS_NEWLINE_ID as EOS_NEWLINE_ID  # noqa: F401
from fastvlm_jax.nn.architectures import blip2_opt_2_7b
from fastvlm_jax.nn.blip2 import Blip2Config
from fastvlm_jax.runtime.sharding import MeshConfig
from train.config import CheckpointConfig, DataConfig, TrainConfig


def get_model_config(exit_layer: int = 8, kind: str = "ffn", draft_hidden: int = 0) -> Blip2Config:
    # One definition of the sizes, in the library (decode.bench --ckpt shapes:blip2_opt_2_7b uses it).
    return blip2_opt_2_7b(exit_layer, kind, draft_hidden)


CHECKPOINT = "checkpoints/blip2_opt_2_7b"
WORKDIR = "workdirs/blip2_opt_2_7b"


def get_config(
    arg: str = "imitation",
    *,
    checkpoint: str = CHECKPOINT,
    workdir: str = WORKDIR,
    batch_size: int = 256,
    mesh: MeshConfig = MeshConfig(data=-1, fsdp=8, tensor=1),
) -> TrainConfig:
    stage = arg or "imitation"
    common = dict(
        stage=stage,
        workdir=f"{workdir}/{stage}",
        init_from=checkpoint if stage == "imitation" else f"{workdir}/imitation/export",
        data=DataConfig(name="coco_captions/karpathy", split="train", question="", worker_count=8, read_threads=16),
        batch_size=batch_size,
        seq_len=96,  # 32 query tokens + BOS + a COCO caption (< 40 BPE tokens) + "\n"
        compute_dtype="bfloat16",
        mesh=mesh,
        checkpoint=CheckpointConfig(save_every=500, keep=3, async_save=True),
        log_every=20,
    )
    # The draft stages' schedules and loss weights are the LLaVA-1.5-7B config's.
    return llava15_7b.draft_stage(stage, common)
