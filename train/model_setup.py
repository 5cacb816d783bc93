"""The model a training config names, before any parameter exists: its tokenizer and
its resolved config (shared by train.run and train.compile_only)."""

from __future__ import annotations

import dataclasses

from fastvlm_jax.data import synthetic
from fastvlm_jax.image.processing import ImageProcessorConfig, pixel_value_table
from fastvlm_jax.image.qwen_vl import DEFAULT_MIN_PIXELS, QwenImageProcessorConfig
from fastvlm_jax.nn.llava import LlavaConfig
from fastvlm_jax.nn.model import VLM
from fastvlm_jax.text.prompts import check_image_token_id
from fastvlm_jax.text.tokenizer import Tokenizer, load_tokenizer
from train import input as input_lib
from train import params as param_lib
from train import step as step_lib
from train.config import DRAFT_STAGE_PARAMS, ConfigError, TrainConfig


def make_tokenizer(cfg: TrainConfig, init_ckpt_tokenizer) -> Tokenizer:
    """The configured tokenizer folder, else the init checkpoint's, else one trained on the
    synthetic caption corpus (deterministic, so every host trains the same one)."""
    if cfg.tokenizer.path:
        return load_tokenizer(cfg.tokenizer.path)
    if init_ckpt_tokenizer is not None:
        return init_ckpt_tokenizer
    if cfg.init_from:
        raise ConfigError(f"{cfg.init_from} has no tokenizer/ folder: set tokenizer.path")
    corpus = synthetic.caption_corpus(cfg.tokenizer.train_corpus_size)
    return input_lib.train_caption_tokenizer(
        corpus,
        cfg.tokenizer.train_vocab_size,
        cfg.tokenizer.byte_fallback,
        prompt_lines=[input_lib.prompt_text(cfg.data.question)],
    )


def resolve_model_config(model: LlavaConfig, tokenizer: Tokenizer) -> LlavaConfig:
    """vocab_size 0 -> the tokenizer's size rounded up to 128 (and its image token id)."""
    if model.text.vocab_size == 0:
        vocab = -(-tokenizer.vocab_size // 128) * 128
        model = model.replace(
            text=dataclasses.replace(model.text, vocab_size=vocab), image_token_id=tokenizer.image_token_id
        )
    if tokenizer.vocab_size > model.text.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {model.text.vocab_size}"
        )
    check_image_token_id(tokenizer, model.image_token_id, ConfigError)
    return model


def with_eagle_head(cfg: TrainConfig, model: LlavaConfig, where: str) -> LlavaConfig:
    """The eagle stage's model: `model` with the head of cfg.eagle added when it has none
    (or cfg.eagle.reinit); one that has a head must already have those settings
    (ConfigError). Other stages: `model` unchanged."""
    if cfg.stage != "eagle":
        return model
    wanted = cfg.eagle.head_settings()
    if model.draft.eagle_layers and not cfg.eagle.reinit:
        have = {k: getattr(model.draft, k) for k in wanted}
        if have != wanted:
            raise ConfigError(
                f"{where} has an EAGLE head with {have}; this run asks for {wanted}: set "
                "eagle.hidden_size, eagle.image_pool and eagle.compressor to the checkpoint's "
                "to train its head further"
            )
        return model
    return model.replace(draft=cfg.eagle.head(model.draft))


def step_spec(
    cfg: TrainConfig, loss_start: int, image_config: ImageProcessorConfig | QwenImageProcessorConfig
) -> step_lib.StepSpec:
    """The static settings of `cfg`'s train step; loss_start: the first position that can
    carry loss (the longest prompt's length - 1); image_config: what turns the batch's uint8
    pixels into the model's input. Images that keep their size (a QwenImageProcessorConfig)
    make prompts of several lengths: each row then has its own loss window."""
    return step_lib.StepSpec(
        cfg.stage,
        cfg.loss,
        cfg.grad_accum,
        cfg.remat,
        loss_start,
        cfg.refine.disagreement_weight,
        cfg.eagle,
        pixel_table=pixel_table(image_config),
        row_windows=isinstance(image_config, QwenImageProcessorConfig),
    )


def pixel_table(
    image_config: ImageProcessorConfig | QwenImageProcessorConfig,
) -> tuple[tuple[float, float, float], ...]:
    """pixel_value_table as nested tuples (hashable, for the static StepSpec); a Qwen
    processor's rescale and normalize steps are processing.py's (its `_pixel_steps`)."""
    if isinstance(image_config, QwenImageProcessorConfig):
        image_config = image_config._pixel_steps()
    return tuple(tuple(float(v) for v in row) for row in pixel_value_table(image_config))  # type: ignore[return-value]


def default_image_config(cfg: TrainConfig, model) -> ImageProcessorConfig | QwenImageProcessorConfig:
    """The image preprocessing of a model without a checkpoint's preprocessor file (from
    scratch, or `--compile-only` from an architecture): the image_preset at the vision
    tower's size, or, for a family whose images keep their size, a Qwen2-VL processor of
    the tower's patch sizes with max_pixels at the model's max_image_tokens (HF's other
    defaults)."""
    if step_lib.uses_patch_images(VLM(model)):
        vision = model.vision
        factor = vision.patch_size * vision.spatial_merge_size
        most = model.max_image_tokens * factor**2
        return QwenImageProcessorConfig(
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
            min_pixels=min(DEFAULT_MIN_PIXELS, most),
            max_pixels=most,
        )
    return input_lib.default_image_config(cfg.image_preset, model.vision.image_size)


def image_patches(cfg: TrainConfig, model) -> int:
    """The run's patch rows per image: data.image_patches, or (0) the model's
    max_image_tokens x merge_size^2, the processor's largest image; 0 for fixed-size images."""
    if not step_lib.uses_patch_images(VLM(model)):
        return 0
    return cfg.data.image_patches or model.max_image_tokens * model.vision.spatial_merge_size**2


def plan_training(cfg: TrainConfig, model, mesh, abstract):
    """What a run trains and how it is laid out, for train.run and its compile-only twin:
    (trainable paths, optimizer, learning-rate schedule, shardings).

    abstract: the model's unboxed abstract params. ConfigError for a draft stage that would
    train more than its drafter (imitation/* or eagle/*), or a micro-batch the mesh's data
    shards cannot split.
    """
    try:
        trainable_paths = param_lib.trainable_paths(abstract, cfg.trainable_patterns)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    drafter = DRAFT_STAGE_PARAMS.get(cfg.stage)
    if drafter and any(not p.startswith(f"{drafter}/") for p in trainable_paths):
        # The draft stages promise an untouched full model (the LM head is shared with it).
        raise ConfigError(
            f"stage {cfg.stage!r} may only train {drafter}/* parameters; "
            f"trainable={cfg.trainable_patterns} selects others too"
        )
    tx = step_lib.make_optimizer(cfg.optim, cfg.steps)
    schedule = step_lib.make_schedule(cfg.optim, cfg.steps)
    shardings = step_lib.make_shardings(model, mesh, trainable_paths, tx)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if (cfg.batch_size // cfg.grad_accum) % data_parallel:
        raise ConfigError(
            f"micro-batch {cfg.batch_size // cfg.grad_accum} is not divisible by the "
            f"{data_parallel} data-parallel shards of mesh {dict(mesh.shape)}"
        )
    return trainable_paths, tx, schedule, shardings
