"""Qwen2.5-VL 32B (Qwen/Qwen2.5-VL-32B-Instruct): the draft stages of configs/qwen25vl_7b.py,
sized for 32B (for planning: `--compile-only` from the architecture).

    python -m fastvlm_jax.convert --hf QWEN25VL_32B_HF_DIR --out checkpoints/qwen2.5-vl-32b \
        --exit-layer 16 --dtype bfloat16
    python -m train.run --config configs/qwen25vl_32b.py[:refine|:eagle]

64 decoder layers of width 5120, the draft exits after layer 16; the same vision tower and image
budget as the 7B (640 tokens per image, seq_len 736: see configs/qwen25vl_7b.py). The frozen
VLM (33.5B parameters, ~67 GB in bf16) is FSDP-sharded over 16 chips (~4.2 GB each); the
imitation network (one SwiGLU block of width 27648, 0.4B parameters) trains in float32.
"""

from configs import qwen25vl_7b
from fastvlm_jax.runtime.sharding import MeshConfig
from train.config import TrainConfig


def get_config(arg: str = "imitation") -> TrainConfig:
    return qwen25vl_7b.get_config(
        arg,
        checkpoint="checkpoints/qwen2.5-vl-32b",
        workdir="workdirs/qwen25vl_32b",
        batch_size=256,
        mesh=MeshConfig(data=-1, fsdp=16, tensor=1),
        architecture="qwen25vl_32b",
    )
