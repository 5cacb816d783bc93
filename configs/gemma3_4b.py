"""Gemma 3 4B (google/gemma-3-4b-it): train its draft paths on COCO captions, on a TPU slice.

Inputs, prepared once:

    python -m fastvlm_jax.convert --hf GEMMA3_4B_HF_DIR --out checkpoints/gemma-3-4b \
        --exit-layer 9 --dtype bfloat16
    # COCO captions as TFDS (see configs/llava15_7b.py and fastvlm_jax/data/tfds_builders.py)

Run on every host of the slice:

    python -m train.run --config configs/gemma3_4b.py            # imitation stage
    python -m train.run --config configs/gemma3_4b.py:refine     # then imitation learning
    python -m train.run --config configs/gemma3_4b.py:eagle      # the EAGLE head (a second drafter)

34 decoder layers of width 2560 (5 local layers with a 1024-token window per global one);
the draft exits after layer 9. The frozen VLM (4.3B parameters, ~8.6 GB in bf16) is
FSDP-sharded over 4 chips (~2.2 GB each); the imitation network (one GeGLU block of width
10240, 79M parameters) trains in float32. Prompts are the chat template's user turn: 256
image soft tokens and ~20 prompt tokens, then the caption.
"""

from configs import llava15_7b
from fastvlm_jax.runtime.sharding import MeshConfig
from train.config import (
    CheckpointConfig,
    DataConfig,
    EagleStageConfig,
    OptimConfig,
    TrainConfig,
)

CHECKPOINT = "checkpoints/gemma-3-4b"
WORKDIR = "workdirs/gemma3_4b"
QUESTION = "Write a one-sentence caption for this image."


def get_config(
    arg: str = "imitation",
    *,
    checkpoint: str = CHECKPOINT,
    workdir: str = WORKDIR,
    batch_size: int = 256,
    mesh: MeshConfig = MeshConfig(data=-1, fsdp=4, tensor=1),
    architecture: str = "gemma3_4b",
) -> TrainConfig:
    stage = arg or "imitation"
    common = dict(
        architecture=architecture,  # what `--compile-only` builds where the checkpoint is absent
        workdir=f"{workdir}/{stage}",
        init_from=checkpoint if stage in ("imitation", "eagle") else f"{workdir}/imitation/export",
        data=DataConfig(
            name="coco_captions/karpathy", split="train", question=QUESTION, worker_count=8, read_threads=16
        ),
        batch_size=batch_size,
        seq_len=352,  # 256 soft tokens + ~25 chat-template and prompt tokens + captions (< 64)
        compute_dtype="bfloat16",
        mesh=mesh,
        checkpoint=CheckpointConfig(save_every=500, keep=3, async_save=True),
        log_every=20,
    )
    if stage == "eagle":
        return TrainConfig(
            stage="eagle",
            steps=4000,
            # The head's loss reads the full model's distribution over 262k tokens at every
            # loss position: 4 micro-batches keep those logits within a v5e chip's 16 GiB.
            grad_accum=4,
            optim=OptimConfig(learning_rate=5e-4, warmup_steps=200, end_lr_factor=0.05, weight_decay=0.0),
            # One Gemma-width layer; the visual compressor keeps one head cache entry per 4
            # soft tokens (256 -> 64), as SpecVLM's elastic compressor at its middle setting.
            eagle=EagleStageConfig(hidden_size=0, image_pool=4, compressor="pool", unroll_steps=2),
            **common,
        )
    if stage in ("imitation", "refine"):
        return llava15_7b.draft_stage(stage, {**common, "stage": stage})
    raise ValueError(f"stage {stage!r}: this config has the stages 'imitation', 'refine' and 'eagle'")
