"""Qwen2.5-VL 3B (Qwen/Qwen2.5-VL-3B-Instruct): the draft stages of configs/qwen25vl_7b.py, sized for 3B.

    python -m fastvlm_jax.convert --hf QWEN25VL_3B_HF_DIR --out checkpoints/qwen2.5-vl-3b \
        --exit-layer 9 --dtype bfloat16
    python -m train.run --config configs/qwen25vl_3b.py[:refine|:eagle]

36 decoder layers of width 2048, the draft exits after layer 9; the same vision tower and image
budget as the 7B (640 tokens per image, seq_len 736: see configs/qwen25vl_7b.py). The frozen
VLM (3.75B parameters, ~7.5 GB in bf16, embedding tied to the LM head) is FSDP-sharded over
4 chips (~1.9 GB each); the imitation network (one SwiGLU block of width 11008) trains in float32.
"""

from configs import qwen25vl_7b
from fastvlm_jax.runtime.sharding import MeshConfig
from train.config import TrainConfig


def get_config(arg: str = "imitation") -> TrainConfig:
    return qwen25vl_7b.get_config(
        arg,
        checkpoint="checkpoints/qwen2.5-vl-3b",
        workdir="workdirs/qwen25vl_3b",
        batch_size=256,
        mesh=MeshConfig(data=-1, fsdp=4, tensor=1),
        architecture="qwen25vl_3b",
    )
