"""Gemma 3 27B (google/gemma-3-27b-it): the draft stages of configs/gemma3_4b.py, sized for 27B.

    python -m fastvlm_jax.convert --hf GEMMA3_27B_HF_DIR --out checkpoints/gemma-3-27b \
        --exit-layer 16 --dtype bfloat16
    python -m train.run --config configs/gemma3_27b.py[:refine|:eagle]

62 decoder layers of width 5376; the draft exits after layer 16. The frozen VLM (27.4B
parameters, ~55 GB in bf16) is FSDP-sharded over 16 chips (~3.4 GB each); the imitation
network (one GeGLU block of width 21504) trains in float32.
"""

from configs import gemma3_4b
from fastvlm_jax.runtime.sharding import MeshConfig
from train.config import TrainConfig


def get_config(arg: str = "imitation") -> TrainConfig:
    return gemma3_4b.get_config(
        arg,
        checkpoint="checkpoints/gemma-3-27b",
        workdir="workdirs/gemma3_27b",
        batch_size=256,
        mesh=MeshConfig(data=-1, fsdp=16, tensor=1),
        architecture="gemma3_27b",
    )
