"""LLaVA-1.5-13B: the draft stages of configs/llava15_7b.py, sized for the 13B model.

    python -m fastvlm_jax.convert --hf LLAVA_13B_HF_DIR --out checkpoints/llava-1.5-13b \
        --exit-layer 10 --dtype bfloat16
    python -m train.run --config configs/llava15_13b.py[:refine]
    python -m train.run --config configs/llava15_13b.py:base     # optional stage 1 (see llava15_7b.py)

40 decoder layers of width 5120; the draft exits after layer 10. The frozen VLM (~26 GB
in bf16) is FSDP-sharded over 16 chips (~1.7 GB each); the imitation network (one
SwiGLU block of width 13824, 212M params) trains in float32.
"""

from configs import llava15_7b
from fastvlm_jax.runtime.sharding import MeshConfig
from train.config import TrainConfig


def get_config(arg: str = "imitation") -> TrainConfig:
    return llava15_7b.get_config(
        arg,
        checkpoint="checkpoints/llava-1.5-13b",
        workdir="workdirs/llava15_13b",
        batch_size=256,
        mesh=MeshConfig(data=-1, fsdp=16, tensor=1),
        architecture="llava15_13b",
    )
