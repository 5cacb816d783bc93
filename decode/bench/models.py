"""What the benchmark runs: the model under test (a checkpoint, `demo`, or a random preset),
its variants at other exit layers, the prompt batches it decodes, and one decode of them."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from decode.engine import DecodeOutput, DecodeSpec, Prompts, RoundStats, generate
from decode.engine.captioner import check_same_tokenizer
from decode.engine.drafters import EagleDrafter, ImitationDrafter, ModelDrafter
from fastvlm_jax import demo
from fastvlm_jax.ckpt.checkpoint import CheckpointError, load_checkpoint
from fastvlm_jax.data.synthetic import make_example
from fastvlm_jax.image.processing import load_image, preprocess_image
from fastvlm_jax.nn.config import DraftConfig, TextConfig, VisionConfig
from fastvlm_jax.nn.families import build_prompt_ids, default_question, stop_ids
from fastvlm_jax.nn.llava import LlavaConfig
from fastvlm_jax.nn.model import VLM, cast_params, params_dtype
from fastvlm_jax.nn.quant import QuantizationError, quantize_model

# The vision tower of the two larger random presets: only the text decoder differs.
_PRESET_VISION = VisionConfig(
    image_size=64, patch_size=8, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4
)

# Random-weight presets for speed measurements (acceptance of an untrained draft is low).
RANDOM_PRESETS = {
    "tiny": LlavaConfig(
        vision=VisionConfig(
            image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4
        ),
        text=TextConfig(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=4
        ),
        draft=DraftConfig(exit_layer=1),
        image_token_id=511,
    ),
    "50m": LlavaConfig(
        vision=_PRESET_VISION,
        text=TextConfig(
            vocab_size=32064, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=8
        ),
        draft=DraftConfig(exit_layer=2),
        image_token_id=32000,
    ),
    "150m": LlavaConfig(
        vision=_PRESET_VISION,
        text=TextConfig(
            vocab_size=32064, hidden_size=768, intermediate_size=2048, num_layers=16, num_heads=12, num_kv_heads=12
        ),
        draft=DraftConfig(exit_layer=4),
        image_token_id=32000,
    ),
}


@dataclasses.dataclass
class BenchModel:
    """A loaded model: its config and params, and (checkpoints only) the tokenizer and
    image processor config that real prompts need. source: where it came from."""

    config: LlavaConfig
    params: object
    tokenizer: object = None
    image_config: object = None
    source: str = ""

    @property
    def dtype(self):
        """The compute dtype: the params' own (see load_bench_model's dtype)."""
        return params_dtype(self.params)


def load_bench_model(spec: str, seed: int = 0, dtype=None, quantize: str | None = None) -> BenchModel:
    """`random:PRESET`, `demo`, or a checkpoint directory; dtype: cast the params (None: keep
    the checkpoint's own dtype; random presets are float32); quantize: 'int8' quantizes the
    decoding weights after the cast (fastvlm_jax.nn.quant). Errors exit with one line."""
    bench = _load(spec, seed)
    if dtype is not None:
        bench.params = cast_params(bench.params, dtype)
    if quantize is not None:
        try:
            bench.config, bench.params = quantize_model(bench.config, bench.params, quantize)
        except QuantizationError as err:
            raise SystemExit(f"error: --quantize {quantize}: {err}") from None
    return bench


def _load(spec: str, seed: int) -> BenchModel:
    if spec.startswith("random:"):
        preset = spec.split(":", 1)[1]
        if preset not in RANDOM_PRESETS:
            raise SystemExit(f"error: unknown random preset {preset!r}; choose from {sorted(RANDOM_PRESETS)}")
        config = RANDOM_PRESETS[preset]
        # One jitted init (an eager init compiles every op on its own: seconds).
        return BenchModel(config, jax.jit(VLM(config).init)(jax.random.key(seed)), source=spec)
    try:
        path = demo.resolve(spec)
    except demo.DemoMissingError as err:
        raise SystemExit(f"error: {err}") from None
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}") from None
    return BenchModel(ckpt.config, ckpt.params, ckpt.tokenizer, ckpt.image_config, source=str(path))


@dataclasses.dataclass(frozen=True)
class BenchDrafter:
    """A drafter to benchmark: the engine's drafter, its own params (or None), its name."""

    drafter: Any
    params: Any = None
    name: str = "imitation"


def load_drafter(bench: BenchModel, name: str) -> BenchDrafter:
    """--drafter imitation | eagle | model:CKPT (CKPT a folder or demo-draft); errors exit
    with one line."""
    if name == "imitation":
        return BenchDrafter(ImitationDrafter())
    if name == "eagle":
        if not bench.config.draft.eagle_layers:
            raise SystemExit(
                f"error: --drafter eagle: {bench.source} has no EAGLE head (train one with the "
                "'eagle' stage of train.run)"
            )
        return BenchDrafter(EagleDrafter(), name="eagle")
    kind, _, path = name.partition(":")
    if kind != "model" or not path:
        raise SystemExit(f"error: unknown --drafter {name!r}: use imitation, eagle or model:CKPT")
    small = _load(path, 0)
    if bench.tokenizer is not None:
        try:
            check_same_tokenizer(bench.tokenizer, small.tokenizer, path)
        except CheckpointError as err:
            raise SystemExit(f"error: --drafter {name}: {err}") from None
    drafter = ModelDrafter(VLM(small.config, bench.dtype))
    try:
        drafter.check(VLM(bench.config, bench.dtype))
    except ValueError as err:
        raise SystemExit(f"error: --drafter {name}: {err}") from None
    return BenchDrafter(drafter, cast_params(small.params, bench.dtype), name=name)


def eos_ids(bench: BenchModel) -> tuple[int, ...]:
    """The ids that end a caption (none for random presets: they decode their full budget)."""
    return stop_ids(bench.config, bench.tokenizer) if bench.tokenizer is not None else ()


@functools.cache
def fresh_imitation(config: LlavaConfig, dtype) -> dict:
    """The untrained imitation network of `config` (the identity draft), in `dtype`.

    Cached because a sweep asks for the same exit layer at every batch size and draft
    length; the result depends on the (frozen, hashable) config and the dtype alone.
    """
    return cast_params(jax.jit(VLM(config).init_imitation)(jax.random.key(0)), dtype)


def with_exit_layer(bench: BenchModel, exit_layer: int) -> tuple[LlavaConfig, dict, bool]:
    """(config, params, reset): the model with another exit layer. Its imitation network is
    reset to the identity (an untrained early exit, reset=True) when the layer differs from
    the one it was trained for; the other params are the loaded ones, not copies."""
    if exit_layer == bench.config.draft.exit_layer:
        return bench.config, bench.params, False
    config = bench.config.with_draft(exit_layer=exit_layer)
    return config, {**bench.params, "imitation": fresh_imitation(config, bench.dtype)}, True


def make_prompts(
    bench: BenchModel, batch: int, images: list[str], prompt: str | None, seed: int, offset: int = 0
) -> Prompts:
    """`batch` prompts, all of one length (no padding): real images through the checkpoint's
    processor, else random pixels and text ids.

    images: file paths, or ['synthetic'] (the default for checkpoints with a tokenizer and
      image processor): test-split scenes of the synthetic caption data, rendered in memory,
      one distinct scene per batch row (what the demo model was trained to describe);
      ['random']: random pixels and text ids even when the checkpoint has a tokenizer.
    prompt: the question, in the model family's prompt layout (None: the family's default).
    offset: the first scene / image / random seed offset, so prompt sets can differ.
    Returns Prompts with input_ids [batch, prompt_len] and pixels [batch, size, size, 3].
    """
    config = bench.config
    if bench.tokenizer is not None and bench.image_config is not None and images != ["random"]:
        if not images or images == ["synthetic"]:
            chosen = [make_example("test", offset + i)[0] for i in range(batch)]
        else:
            chosen = [load_image(images[(offset + i) % len(images)]) for i in range(batch)]
        pixels = np.stack([preprocess_image(p, bench.image_config) for p in chosen])
        question = default_question(config.model_type) if prompt is None else prompt
        ids = build_prompt_ids(config, bench.tokenizer, question)
        input_ids = np.asarray([ids] * batch, np.int32)
        return Prompts(jnp.asarray(input_ids), jnp.full((batch,), len(ids), jnp.int32), jnp.asarray(pixels))
    rng = np.random.RandomState(seed + offset)
    text = rng.randint(3, min(config.image_token_id, config.text.vocab_size - 1), (batch, 12))
    image = np.full((batch, config.num_image_tokens), config.image_token_id)
    input_ids = np.concatenate([np.ones((batch, 1)), image, text], axis=1).astype(np.int32)
    size = config.vision.image_size
    pixels = rng.randn(batch, size, size, 3).astype(np.float32)
    return Prompts(jnp.asarray(input_ids), jnp.full((batch,), input_ids.shape[1], jnp.int32), jnp.asarray(pixels))


def decode_sets(
    model: VLM, params, prompt_sets: list[Prompts], spec: DecodeSpec, max_new: int, draft_params=None, rng=None
) -> DecodeOutput:
    """generate on each prompt set in turn (sampling key rng, None: generate's default),
    waiting for each; the outputs joined as numpy arrays: rows stacked in order,
    per-draft-position counters summed."""
    outs = [
        jax.tree.map(
            np.asarray,
            jax.block_until_ready(generate(model, params, p, spec, max_new, rng, draft_params=draft_params)),
        )
        for p in prompt_sets
    ]
    if len(outs) == 1:
        return outs[0]
    stack = {f: np.concatenate([getattr(o.stats, f) for o in outs]) for f in ("rounds", "drafted", "accepted")}
    sums = {f: np.sum([getattr(o.stats, f) for o in outs], axis=0) for f in ("position_attempts", "position_accepts")}
    return DecodeOutput(
        tokens=np.concatenate([o.tokens for o in outs]),
        num_tokens=np.concatenate([o.num_tokens for o in outs]),
        stats=RoundStats(**stack, **sums),
    )
