"""The offline `demo` model: a tiny LLaVA-style VLM trained from scratch on synthetic captions.

Four stages, one config each (ARG = "stage[,ROOT]", ROOT default workdirs/demo):

    python -m train.run --config configs/demo.py:base        # -> ROOT/base/export (8 layers)
    python -m train.run --config configs/demo.py:deepen      # -> ROOT/deepen/export (16 layers)
    python -m train.run --config configs/demo.py:imitation   # -> ROOT/imitation/export
    python -m train.run --config configs/demo.py:refine      # -> ROOT/refine/export (the demo)

or all four in one process: `python -m train.recipes.demo --root ROOT`.

demo-draft, the demo's separate draft model (its first DRAFT_MODEL_LAYERS = 3 layers,
fine-tuned with plain cross-entropy on the same captions; same tokenizer and images):

    python -m train.recipes.make_draft_model --from ROOT/refine/export --layers 3 --out ROOT/draft_init
    python -m train.run --config configs/demo.py:draft_model   # -> ROOT/draft_model/export

or after the demo's four stages in one process: `python -m train.recipes.demo --root ROOT
--draft-model`; `python -m fastvlm_jax.demo --package-draft ROOT/draft_model/export` ships it.
3 layers: a drafted token then costs 3 of the demo's 16 layers (plus the shared-size head),
as the demo's own draft path does (2 layers + a one-layer imitation network).

A fifth stage gives the shipped demo its EAGLE head (fastvlm_jax.nn.eagle), a second drafter:

    python -m train.run --config configs/demo.py:eagle        # -> ROOT/eagle/export
    python -m train.run --config configs/demo.py:eagle_pool4  # -> ROOT/eagle_pool4/export

It starts from the shipped demo checkpoint (fastvlm_jax/assets/demo), not ROOT/refine/export,
so it runs on a fresh clone without the hour-long recipe; the VLM is frozen, so the
result's base params are the asset's, bit for bit. The head is always a fresh one
(eagle.reinit: the shipped asset already holds the head this stage trained): FFN width 512,
every image token its own head cache slot; eagle_pool4 pools 4 image tokens per slot (36
image tokens -> 9 slots), the visual compressor comparison. `python -m train.recipes.demo_eagle`
runs either and records its cost to a JSON (benchmarks/eagle_train/).

Sizes: the 64x64 scenes are resized to 96x96 and cut into 16x16 patches, a 6x6 grid
aligned with the scenes' 3x3 cells (2x2 patches per cell), so every image token belongs
to exactly one cell: 36 image tokens from a 4-layer ViT of width 192 (coarser grids,
with image tokens that straddle cells, trained worse).

Depth: the decoder (width 256) is trained with 8 layers, then grown to 16 (`deepen`:
train.deepen puts 8 identity-initialised layers between and after layers 2-7, so training resumes
from exactly the 8-layer model, and trains all 16 for DEEPEN_STEPS more steps). The
draft path exits after layer 2 into a one-layer imitation network (kind "layer": its own
attention can read the image tokens' exit-layer states), about 3 of 16 layers per drafted
token. Depth is what self-speculative decoding trades on: the fewer of the full model's
layers a drafted token costs, the more a verification pass that accepts it saves.
The word-level tokenizer (510 sentencepiece pieces + <image> + <pad> = 512 ids) is
trained on the synthetic caption corpus.

Compute is bfloat16 with float32 master weights and optimizer state: on CPUs with bf16
matmuls (oneDNN on AVX-512) a step is faster than in float32 at the same loss curve.
"""

from fastvlm_jax.demo import ASSET_DIR
from fastvlm_jax.nn.config import DraftConfig, TextConfig, VisionConfig
from fastvlm_jax.nn.llava import LlavaConfig
from fastvlm_jax.runtime.sharding import MeshConfig
from train.config import (
    CheckpointConfig,
    DataConfig,
    EagleStageConfig,
    ImitationLossConfig,
    OptimConfig,
    RefineConfig,
    TokenizerConfig,
    TrainConfig,
)

DEFAULT_ROOT = "workdirs/demo"
DEEP_LAYERS = 16
DEEPEN_STEPS = 600
DRAFT_MODEL_LAYERS = 3  # demo-draft: the demo's first 3 layers (see draft_model below)
DRAFT_MODEL_STEPS = 300
# The eagle stage's steps: about 10 minutes on the 2-core CPU (benchmarks/eagle_train/).
EAGLE_STEPS = 240
# Passes per step on the head's own predictions (EagleStageConfig.unroll_steps): a head
# trained with one pass is accepted far less often at the later draft positions, where
# drafting feeds it its own predictions.
EAGLE_UNROLL_STEPS = 3


def demo_model() -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(
            kind="clip", image_size=96, patch_size=16, hidden_size=192, intermediate_size=768, num_layers=4, num_heads=4
        ),
        text=TextConfig(
            vocab_size=0,
            hidden_size=256,
            intermediate_size=512,
            num_layers=8,
            num_heads=4,
            num_kv_heads=2,
            max_position_embeddings=512,
        ),
        draft=DraftConfig(exit_layer=2, kind="layer", hidden_size=512),
        vision_feature_layer=-2,
        image_token_id=-1,  # vocab_size 0: both come from the tokenizer
    )


def get_config(arg: str = "base") -> TrainConfig:
    stage, _, root = arg.partition(",")
    root = root or DEFAULT_ROOT
    previous = {"deepen": "base", "imitation": "deepen", "refine": "imitation"}.get(stage)
    init_from = f"{root}/{previous}/export" if previous else None
    if stage == "draft_model":
        init_from = f"{root}/draft_init"  # written by train.recipes.make_draft_model (see the docstring)
    elif stage in ("eagle", "eagle_pool4"):
        init_from = str(ASSET_DIR)
    common = dict(
        workdir=f"{root}/{stage}",
        init_from=init_from,
        model=demo_model() if stage == "base" else None,
        # 20000 training scenes; the base stage sees 2.4 epochs.
        # One answer style for the question: the long multi-sentence description
        # (reference 1: a count sentence, then one sentence per object and its position).
        data=DataConfig(name="synthetic_captions/default", read_threads=4, caption_index=1),
        tokenizer=TokenizerConfig(train_vocab_size=510, byte_fallback=True, train_corpus_size=20000),
        seq_len=112,  # 47-token prompt (36 image tokens) + the longest caption with its EOS (64)
        compute_dtype="bfloat16",
        mesh=MeshConfig(data=-1),
        checkpoint=CheckpointConfig(save_every=100, keep=2),
        log_every=10,
        seed=0,
    )
    if stage == "base":
        return TrainConfig(
            stage="base",
            batch_size=32,
            steps=1500,
            optim=OptimConfig(
                learning_rate=2e-3, warmup_steps=30, end_lr_factor=0.05, weight_decay=0.01, grad_clip_norm=1.0
            ),
            **common,
        )
    if stage == "deepen":
        return TrainConfig(
            stage="base",
            deepen_to=DEEP_LAYERS,
            batch_size=32,
            steps=DEEPEN_STEPS,
            optim=OptimConfig(
                learning_rate=1e-3, warmup_steps=20, end_lr_factor=0.05, weight_decay=0.01, grad_clip_norm=1.0
            ),
            **common,
        )
    if stage == "imitation":
        return TrainConfig(
            stage="imitation",
            batch_size=32,
            steps=600,
            optim=OptimConfig(learning_rate=2e-3, warmup_steps=10, end_lr_factor=0.1),
            loss=ImitationLossConfig(cos=1.0, kd=1.0, ce=0.1, temperature=1.0),
            **common,
        )
    if stage == "refine":
        return TrainConfig(
            stage="refine",
            batch_size=32,
            steps=150,
            optim=OptimConfig(learning_rate=5e-4, warmup_steps=5, end_lr_factor=0.1),
            loss=ImitationLossConfig(cos=1.0, kd=1.0, ce=0.1, temperature=1.0),
            refine=RefineConfig(max_new_tokens=64, disagreement_weight=4.0),
            **common,
        )
    if stage == "draft_model":
        # demo-draft, a separate draft model for the demo: plain cross-entropy on the demo's
        # own data, starting from its truncated copy. The vision tower stays frozen (the
        # truncation keeps the demo's, already trained on these images), so the step only
        # backpropagates through the 3 decoder layers and the projector.
        return TrainConfig(
            stage="base",
            batch_size=32,
            steps=DRAFT_MODEL_STEPS,
            trainable=("projector/.*", "language_model/.*"),
            optim=OptimConfig(
                learning_rate=1e-3, warmup_steps=20, end_lr_factor=0.05, weight_decay=0.01, grad_clip_norm=1.0
            ),
            **common,
        )
    if stage in ("eagle", "eagle_pool4"):
        return TrainConfig(
            stage="eagle",
            batch_size=32,
            steps=EAGLE_STEPS,
            optim=OptimConfig(learning_rate=2e-3, warmup_steps=10, end_lr_factor=0.1),
            eagle=EagleStageConfig(
                hidden_size=512,
                image_pool=4 if stage == "eagle_pool4" else 1,
                compressor="pool",
                reinit=True,
                ce_weight=1.0,
                feature_weight=0.1,
                temperature=1.0,
                unroll_steps=EAGLE_UNROLL_STEPS,
            ),
            **common,
        )
    raise ValueError(
        f"unknown demo stage {stage!r}: use base, deepen, imitation, refine, draft_model, eagle or eagle_pool4"
    )
