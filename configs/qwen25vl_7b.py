"""Qwen2.5-VL 7B (Qwen/Qwen2.5-VL-7B-Instruct): train its draft paths on COCO captions, on a TPU slice.

Inputs, prepared once:

    python -m fastvlm_jax.convert --hf QWEN25VL_7B_HF_DIR --out checkpoints/qwen2.5-vl-7b \
        --exit-layer 7 --dtype bfloat16
    # COCO captions as TFDS (see configs/llava15_7b.py and fastvlm_jax/data/tfds_builders.py)

Run on every host of the slice:

    python -m train.run --config configs/qwen25vl_7b.py            # imitation stage
    python -m train.run --config configs/qwen25vl_7b.py:refine     # then imitation learning
    python -m train.run --config configs/qwen25vl_7b.py:eagle      # the EAGLE head (a second drafter)

28 decoder layers of width 3584 (M-RoPE), the draft exits after layer 7; a 32-block windowed
ViT over 14-pixel patches, 2x2 merged into one token. The frozen VLM (8.3B parameters, ~16.6 GB
in bf16) is FSDP-sharded over 8 chips (~2.1 GB each); the imitation network (one SwiGLU block
of width 18944, 204M parameters) trains in float32.

Images keep their size: each becomes as many tokens as its resized size gives, so prompts
differ per row and each row trains on its own loss window (train.step.StepSpec.row_windows).
The image budget, data.image_patches = 2560 patch rows = 640 tokens, is what a COCO run needs:
COCO images are at most 640 pixels on their long side, so at Qwen's 28-pixel merged patches a
640x480 image is 17x23 = 391 tokens and the largest (640x640) 23x23 = 529; 640 tokens hold
every one at the checkpoint's own resolution (nothing is resized beyond what decoding does),
where 512 would shrink the square ones and the processor's 1280 would double the vision
tower's work (its four full-attention blocks grow with the square of the patch count) for
padding. An image of another data set that is larger is resized down within the budget by
the processor's rule (data.image_overflow=resize; 'error' refuses it by name).
seq_len 736 = 640 image tokens + ~30 chat-template and prompt tokens + a 64-token caption
window (COCO captions are < 30 tokens; the refine stage generates up to 64).
4 micro-batches per step: the vision tower's full-attention blocks score 2560x2560 patches
per image and head, and the loss reads [rows, 65, 152064] logits.
"""

from configs import llava15_7b
from fastvlm_jax.runtime.sharding import MeshConfig
from train.config import (
    CheckpointConfig,
    DataConfig,
    EagleStageConfig,
    OptimConfig,
    RefineConfig,
    TrainConfig,
)

CHECKPOINT = "checkpoints/qwen2.5-vl-7b"
WORKDIR = "workdirs/qwen25vl_7b"
QUESTION = "Write a one-sentence caption for this image."
IMAGE_TOKENS = 640  # the image budget: every COCO image at full resolution (see above)
CAPTION_WINDOW = 64  # caption + EOS positions per row (the loss window)
PROMPT_TEXT = 32  # the chat template's tokens around the image (~30) + the question


def get_config(
    arg: str = "imitation",
    *,
    checkpoint: str = CHECKPOINT,
    workdir: str = WORKDIR,
    batch_size: int = 256,
    grad_accum: int = 4,
    mesh: MeshConfig = MeshConfig(data=-1, fsdp=8, tensor=1),
    architecture: str = "qwen25vl_7b",
    image_tokens: int = IMAGE_TOKENS,
) -> TrainConfig:
    stage = arg or "imitation"
    common = dict(
        architecture=architecture,  # what `--compile-only` builds where the checkpoint is absent
        workdir=f"{workdir}/{stage}",
        init_from=checkpoint if stage in ("imitation", "eagle") else f"{workdir}/imitation/export",
        data=DataConfig(
            name="coco_captions/karpathy",
            split="train",
            question=QUESTION,
            worker_count=8,
            read_threads=16,
            image_patches=image_tokens * 4,  # 2x2 patches per merged token
            image_overflow="resize",
        ),
        batch_size=batch_size,
        grad_accum=grad_accum,
        seq_len=image_tokens + PROMPT_TEXT + CAPTION_WINDOW,
        compute_dtype="bfloat16",
        mesh=mesh,
        checkpoint=CheckpointConfig(save_every=500, keep=3, async_save=True),
        log_every=20,
    )
    if stage == "eagle":
        return TrainConfig(
            stage="eagle",
            steps=4000,
            optim=OptimConfig(learning_rate=5e-4, warmup_steps=200, end_lr_factor=0.05, weight_decay=0.0),
            # One Qwen-width layer; the visual compressor keeps one head cache entry per 4
            # image tokens (391 -> 98 for a 640x480 image), as SpecVLM's elastic compressor.
            eagle=EagleStageConfig(hidden_size=0, image_pool=4, compressor="pool", unroll_steps=2),
            **common,
        )
    if stage == "imitation":
        return llava15_7b.draft_stage(stage, {**common, "stage": stage})
    if stage == "refine":
        # The full model's own captions, up to the caption window.
        config = llava15_7b.draft_stage(stage, {**common, "stage": stage})
        return config.replace(refine=RefineConfig(max_new_tokens=CAPTION_WINDOW - 1, disagreement_weight=4.0))
    raise ValueError(f"stage {stage!r}: this config has the stages 'imitation', 'refine' and 'eagle'")
