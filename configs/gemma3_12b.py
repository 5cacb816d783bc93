"""Gemma 3 12B (google/gemma-3-12b-it): the draft stages of configs/gemma3_4b.py, sized for 12B.

    python -m fastvlm_jax.convert --hf GEMMA3_12B_HF_DIR --out checkpoints/gemma-3-12b \
        --exit-layer 12 --dtype bfloat16
    python -m train.run --config configs/gemma3_12b.py[:refine|:eagle]

48 decoder layers of width 3840; the draft exits after layer 12. The frozen VLM (12.2B
parameters, ~24 GB in bf16) is FSDP-sharded over 8 chips (~3 GB each); the imitation network
(one GeGLU block of width 15360, 177M parameters) trains in float32.
"""

from configs import gemma3_4b
from fastvlm_jax.runtime.sharding import MeshConfig
from train.config import TrainConfig


def get_config(arg: str = "imitation") -> TrainConfig:
    return gemma3_4b.get_config(
        arg,
        checkpoint="checkpoints/gemma-3-12b",
        workdir="workdirs/gemma3_12b",
        batch_size=256,
        mesh=MeshConfig(data=-1, fsdp=8, tensor=1),
        architecture="gemma3_12b",
    )
