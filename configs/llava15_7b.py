"""LLaVA-1.5-7B: train the draft (imitation network) on COCO captions, on a TPU pod slice.

Inputs, prepared once:

    python -m fastvlm_jax.convert --hf llava-hf/llava-1.5-7b-hf(local folder) \
        --out checkpoints/llava-1.5-7b --exit-layer 8 --dtype bfloat16
    # COCO files under MANUAL_DIR (see fastvlm_jax/data/tfds_builders.py), then
    python -c "from fastvlm_jax.data.tfds_builders import build_dataset; \
               build_dataset('coco_captions/karpathy', manual_dir='MANUAL_DIR')"

Run on every host of the slice (JAX finds the other hosts by itself on Cloud TPU):

    python -m train.run --config configs/llava15_7b.py            # imitation stage
    python -m train.run --config configs/llava15_7b.py:refine     # then imitation learning
    python -m train.run --config configs/llava15_7b.py:eagle      # the EAGLE head (a second drafter)

Optionally first `configs/llava15_7b.py:base`, the paper's stage 1: a plain cross-entropy
fine-tune of the VLM on the captions (projector and language model; the vision tower stays
frozen, as in LLaVA-1.5's own fine-tune), then `init_from=workdirs/llava15_7b/base/export`
for the imitation stage. All 6.7B trained parameters have float32 master weights and Adam
moments (81 GB), so this stage shards them over the whole slice (FSDP over every chip)
and recomputes each decoder layer in the backward pass (remat="full").

The VLM stays frozen (bf16, FSDP-sharded over 8 chips: ~1.7 GB each); only the
imitation network (one SwiGLU block of width 11008 after layer 8 of 32, 135M params)
has float32 master weights and Adam moments. Layers 0-7 run once per step and feed
both the frozen layers 8-31 (the teacher) and the imitation network.
"""

from fastvlm_jax.runtime.sharding import MeshConfig
from train.config import (
    CheckpointConfig,
    DataConfig,
    EagleStageConfig,
    ImitationLossConfig,
    OptimConfig,
    RefineConfig,
    TrainConfig,
)

CHECKPOINT = "checkpoints/llava-1.5-7b"
WORKDIR = "workdirs/llava15_7b"
# LLaVA-1.5's own short-caption instruction for COCO.
QUESTION = "Provide a one-sentence caption for the provided image."


def get_config(
    arg: str = "imitation",
    *,
    checkpoint: str = CHECKPOINT,
    workdir: str = WORKDIR,
    batch_size: int = 256,
    mesh: MeshConfig = MeshConfig(data=-1, fsdp=8, tensor=1),
    architecture: str = "llava15_7b",
) -> TrainConfig:
    stage = arg or "imitation"
    if stage == "base":
        return base_stage(checkpoint, workdir, architecture)
    common = dict(
        stage=stage,
        architecture=architecture,  # what `--compile-only` builds where the checkpoint is absent
        workdir=f"{workdir}/{stage}",
        init_from=checkpoint if stage in ("imitation", "eagle") else f"{workdir}/imitation/export",
        data=DataConfig(
            name="coco_captions/karpathy", split="train", question=QUESTION, worker_count=8, read_threads=16
        ),
        batch_size=batch_size,
        seq_len=640,  # 576 image tokens + ~20 prompt tokens + captions (COCO: < 40 tokens)
        compute_dtype="bfloat16",
        mesh=mesh,
        checkpoint=CheckpointConfig(save_every=500, keep=3, async_save=True),
        log_every=20,
    )
    if stage == "eagle":
        return eagle_stage(common)
    return draft_stage(stage, common)


def eagle_stage(common: dict) -> TrainConfig:
    """The EAGLE head (one decoder layer of the model's width) on the frozen VLM, with its
    visual compressor at 4 image tokens per head cache slot (576 -> 144), as the Gemma 3
    configs; the head's LM head runs on the loss window only (train/eagle.py)."""
    return TrainConfig(
        steps=4000,
        optim=OptimConfig(learning_rate=5e-4, warmup_steps=200, end_lr_factor=0.05, weight_decay=0.0),
        eagle=EagleStageConfig(hidden_size=0, image_pool=4, compressor="pool", unroll_steps=2),
        **common,
    )


def base_stage(checkpoint: str, workdir: str, architecture: str) -> TrainConfig:
    """Stage 1: cross-entropy fine-tune of the projector and language model on the captions,
    with LLaVA-1.5's fine-tune settings (batch 128, peak lr 2e-5, 3% warmup, cosine to 0, no
    weight decay, and the Hugging Face Trainer's AdamW defaults it keeps: betas (0.9, 0.999),
    eps 1e-8, gradient norm clipped at 1) for one epoch of COCO Karpathy train (113k images /
    128 = 885 steps).

    Numerics: the master weights and Adam moments are float32 but the compute is bfloat16,
    and on TPU the gradients are reduced across chips in bfloat16 before the cast to float32
    (as in MaxText's bf16 runs; seen as bf16 all-reduces in the optimized HLO of a v5e:2x4
    compile of the tiny base stage with fsdp=8)."""
    return TrainConfig(
        stage="base",
        architecture=architecture,
        workdir=f"{workdir}/base",
        init_from=checkpoint,
        trainable=("projector/.*", "language_model/.*"),
        data=DataConfig(
            name="coco_captions/karpathy", split="train", question=QUESTION, worker_count=8, read_threads=16
        ),
        batch_size=128,
        seq_len=640,
        steps=900,
        compute_dtype="bfloat16",
        remat="full",
        optim=OptimConfig(learning_rate=2e-5, warmup_steps=27, end_lr_factor=0.0, b2=0.999, weight_decay=0.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(save_every=200, keep=2, async_save=True),
        log_every=10,
    )


def draft_stage(stage: str, common: dict) -> TrainConfig:
    """The two draft stages (imitation, then refine) with the schedules and loss weights of
    these 7B-scale runs; `common` holds everything else (the BLIP-2 config uses it too)."""
    if stage == "imitation":
        return TrainConfig(
            steps=6000,
            optim=OptimConfig(learning_rate=3e-4, warmup_steps=300, end_lr_factor=0.05, weight_decay=0.0),
            loss=ImitationLossConfig(cos=1.0, kd=1.0, ce=0.1, temperature=1.0),
            **common,
        )
    if stage == "refine":
        return TrainConfig(
            steps=1500,
            optim=OptimConfig(learning_rate=1e-4, warmup_steps=100, end_lr_factor=0.1),
            loss=ImitationLossConfig(cos=1.0, kd=1.0, ce=0.1, temperature=1.0),
            refine=RefineConfig(max_new_tokens=48, disagreement_weight=4.0),
            **common,
        )
    raise ValueError(f"stage {stage!r}: this config has the stages 'base', 'imitation', 'refine' and 'eagle'")
