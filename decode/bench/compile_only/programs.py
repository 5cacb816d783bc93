"""What `--compile-only` compiles: model shapes without weights, and the programs of a
point (batch, draft length): the AR step, one builder per drafter kind (DRAFTER_PROGRAMS)
and the draft trees, each a piece of the engine's own round (decode/engine/steps.py, the
drafters' calls) with the bytes a call must read at least. `compile_programs` compiles
them for a topology and counts their layer scans (the package docstring: a scanned
program plus (n - 1) one-layer bodies per scan of n layers).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from decode.bench.compile_only.explain import explain_hlo
from decode.bench.models import RANDOM_PRESETS
from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate, steps
from decode.engine.drafters import EagleCarry, EagleDrafter, ImitationDrafter, ModelCarry, ModelDrafter, RoundContext
from decode.engine.loop import _prefill
from decode.engine.tree import TreeShape, tree_slots
from fastvlm_jax import tpu
from fastvlm_jax.ckpt.checkpoint import CheckpointError, load_without_params
from fastvlm_jax.demo import DemoMissingError, demo_checkpoint
from fastvlm_jax.image.patches import PatchImages
from fastvlm_jax.nn.architectures import architecture
from fastvlm_jax.nn.config import ConfigError
from fastvlm_jax.nn.kv_cache import KVCache
from fastvlm_jax.nn.model import VLM
from fastvlm_jax.nn.quant import quantize_params
from fastvlm_jax.runtime import sharding

# Text tokens of the benchmark's random prompts besides the image tokens: BOS + 12
# (decode.bench.models.make_prompts), about a LLaVA chat prompt's length.
PROMPT_TEXT_TOKENS = 13

KV_CACHE_AXES = ("layers", "batch", "kv_heads", "length", None)


class CompileOnlyError(ValueError):
    """Bad input for a compile-only run (one line)."""


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    """A model without weights: its config, its params as ShapeDtypeStructs in the dtypes
    they would be loaded in, and the compute dtype (the widest float param dtype, as the
    benchmark's BenchModel.dtype)."""

    config: Any
    params: Any
    dtype: Any
    source: str


def load_shapes(spec: str, dtype: str | None = None, quantize: str | None = None) -> ModelShapes:
    """`shapes:NAME` (bfloat16 unless `dtype`), `random:PRESET` (float32), `demo` or a
    checkpoint dir (its saved dtypes; its params are not read). quantize: 'int8' gives the
    weight-only quantized model's shapes (fastvlm_jax.nn.quant)."""
    if spec.startswith("shapes:") or spec.startswith("random:"):
        kind, name = spec.split(":", 1)
        if kind == "random":
            if name not in RANDOM_PRESETS:
                raise CompileOnlyError(f"unknown random preset {name!r}; choose from {sorted(RANDOM_PRESETS)}")
            config = RANDOM_PRESETS[name]
        else:
            try:
                config = architecture(name)
            except ConfigError as err:
                raise CompileOnlyError(str(err)) from None
        config = config.replace(quantization=quantize)
        params = nn.meta.unbox(VLM(config).abstract_params())
        dtype = dtype or ("bfloat16" if kind == "shapes" else "float32")
        source = spec
    else:
        path = spec
        if spec == "demo":
            try:
                path = demo_checkpoint()
            except DemoMissingError as err:
                raise CompileOnlyError(str(err)) from None
        try:
            ckpt = load_without_params(path)
        except CheckpointError as err:
            raise CompileOnlyError(str(err)) from None
        config, params, source = ckpt.config, ckpt.params, str(path)
        if quantize is not None:
            if config.quantization is not None:
                raise CompileOnlyError(f"--quantize {quantize}: {path} is already {config.quantization}-quantized")
            config = config.replace(quantization=quantize)
            params = jax.eval_shape(lambda p: quantize_params(p, quantize), params)
    if dtype is not None:
        params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(
                x.shape, jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
            ),
            params,
        )
    floats = [jnp.dtype(x.dtype) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    compute = max(floats, key=lambda d: d.itemsize) if floats else jnp.dtype(jnp.float32)
    return ModelShapes(config, params, compute, source)


@dataclasses.dataclass(frozen=True)
class DrafterShapes:
    """A `--drafter` of a compile-only run. kind: imitation | eagle | model; pool: the EAGLE
    head's visual compressor (None: the checkpoint's); small: the draft VLM's shapes."""

    name: str
    kind: str
    pool: int | None = None
    small: ModelShapes | None = None


DRAFTER_FORMS = "imitation, eagle, eagle:pool=N or model:shapes:NAME|random:PRESET|CKPT"


def parse_drafter(name: str, shapes: ModelShapes) -> DrafterShapes:
    """One --drafter word; CompileOnlyError (one line) for anything else."""
    if name == "imitation":
        return DrafterShapes(name, "imitation")
    if name == "eagle" or name.startswith("eagle:"):
        pool = None
        if name != "eagle":
            key, _, value = name[len("eagle:") :].partition("=")
            if key != "pool" or not value.isdigit() or int(value) < 1:
                raise CompileOnlyError(f"--drafter {name!r}: the EAGLE head takes eagle or eagle:pool=N (N >= 1)")
            pool = int(value)
        return DrafterShapes(name, "eagle", pool=pool)
    kind, _, spec = name.partition(":")
    if kind != "model" or not spec:
        raise CompileOnlyError(f"unknown --drafter {name!r}: use {DRAFTER_FORMS}")
    # The engine runs the small model in the full model's dtype (decode.bench.models.load_drafter).
    small = load_shapes(spec, shapes.dtype.name)
    config, small_config = shapes.config, small.config
    if (small_config.text.vocab_size, small_config.image_token_id, small_config.num_image_tokens) != (
        config.text.vocab_size,
        config.image_token_id,
        config.num_image_tokens,
    ):
        raise CompileOnlyError(
            f"--drafter {name}: a draft VLM needs the model's vocabulary, image token and image token "
            f"count ({config.text.vocab_size}, {config.image_token_id}, {config.num_image_tokens}); it has "
            f"({small_config.text.vocab_size}, {small_config.image_token_id}, {small_config.num_image_tokens})"
        )
    return DrafterShapes(name, "model", small=small)


def with_eagle_head(shapes: ModelShapes) -> tuple[ModelShapes, bool]:
    """`shapes` with an EAGLE head (draft.eagle_layers=1, FFN width the config's or the
    decoder's) when it has none: a compile-only run needs the head's shapes, not weights.
    Returns (shapes, whether a head was added)."""
    if shapes.config.draft.eagle_layers:
        return shapes, False
    config = shapes.config.with_draft(eagle_layers=1)
    eagle = nn.meta.unbox(VLM(config).abstract_params())["eagle"]
    eagle = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, shapes.dtype), eagle)
    return dataclasses.replace(shapes, config=config, params={**shapes.params, "eagle": eagle}), True


def _sds(shape, dtype, mesh, logical):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding.logical_to_sharding(logical, shape, mesh))


def fixed_image_size(config) -> int | None:
    """The side of the vision tower's square pixel input, or None for a tower without a fixed
    size (Qwen2.5-VL's: an image becomes as many patches as its size gives, fed as PatchImages)."""
    try:
        return config.vision.image_size
    except ConfigError:
        return None


def prompt_image_tokens(config, image_tokens: int | None = None) -> int:
    """Image tokens in each prompt row of a compile-only point. A fixed-size tower's images
    always give config.num_image_tokens; a patch-image tower's give `image_tokens` (its patch
    bucket: image_tokens * merge^2 patches per row), by default the most one image may become
    (config.num_image_tokens). CompileOnlyError (one line) for a count the model cannot take."""
    most = config.num_image_tokens
    if image_tokens is None:
        return most
    if fixed_image_size(config) is not None:
        if image_tokens != most:
            raise CompileOnlyError(
                f"--image-tokens {image_tokens}: this model's images have a fixed size and always give {most} tokens"
            )
        return most
    if not 1 <= image_tokens <= most:
        raise CompileOnlyError(f"--image-tokens {image_tokens} must be in [1, {most}] (the most one image may become)")
    return image_tokens


def abstract_images(config, batch: int, mesh, image_tokens: int | None = None) -> Any:
    """ShapeDtypeStructs of `batch` rows of images as the model's vision tower takes them, the
    rows sharded over the batch axes like every other per-row input: pixels [batch, size, size,
    3] float32 for a tower with a fixed image size; else PatchImages (patches [batch, image_tokens
    * merge^2, patch_dim] float32, grid [batch, 3] int32), every row padded to one patch bucket
    of `image_tokens` tokens (prompt_image_tokens)."""
    size = fixed_image_size(config)
    if size is not None:
        return _sds((batch, size, size, 3), jnp.float32, mesh, ("batch", None, None, None))
    vision = config.vision
    patches = prompt_image_tokens(config, image_tokens) * vision.merge_unit
    return PatchImages(
        patches=_sds((batch, patches, vision.patch_dim), jnp.float32, mesh, ("batch", None, None)),
        grid=_sds((batch, 3), jnp.int32, mesh, ("batch", None)),
    )


def abstract_cache(num_layers: int, batch: int, slots: int, config, dtype, mesh) -> KVCache:
    """KVCache of ShapeDtypeStructs: [num_layers, batch, kv_heads, slots, head_dim], sharded
    over the batch (data) and the kv heads (tensor) where they divide."""
    text = config.text
    shape = (num_layers, batch, text.num_kv_heads, slots, text.resolved_head_dim)
    return KVCache(
        keys=_sds(shape, dtype, mesh, KV_CACHE_AXES),
        values=_sds(shape, dtype, mesh, KV_CACHE_AXES),
        pos=_sds((batch,), jnp.int32, mesh, ("batch",)),
        rope_offset=_sds((batch,), jnp.int32, mesh, ("batch",)),
    )


@dataclasses.dataclass(frozen=True)
class ReadBytes:
    """Bytes one device must read at least, by part of the model (from shard shapes)."""

    layers: int  # every decoder layer's weight shards
    cache: int  # the whole KV cache shard (attention reads every slot, masked)
    head: int  # final norm + LM head (the tied embedding table when tied)
    imitation: int  # the imitation network, with its own cache if it has one
    eagle: int = 0  # the EAGLE head's weights (its cache is counted by the caller)
    vision: int = 0  # the vision tower's and projector's weights (everything outside the decoder)

    def span(self, start: int, stop: int, num_layers: int) -> float:
        return (self.layers + self.cache) * (stop - start) / num_layers


def read_bytes(params, config, cache: KVCache, draft_cache: KVCache | None) -> ReadBytes:
    def size(x):
        return tpu.shard_bytes(x.shape, x.dtype, x.sharding)

    parts = {"layers": 0, "head": 0, "imitation": 0, "eagle": 0, "vision": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [str(getattr(k, "key", k)) for k in path]
        if keys[0] in ("imitation", "eagle"):
            parts[keys[0]] += size(leaf)
        elif keys[0] == "language_model" and keys[1] == "layers":
            parts["layers"] += size(leaf)
        elif keys[0] == "language_model" and keys[1].startswith("embed"):
            # A gather of one row per token, unless the table is also the LM head.
            if keys[1] == "embed_tokens" and config.text.tie_word_embeddings:
                parts["head"] += size(leaf)
        elif keys[0] == "language_model":
            parts["head"] += size(leaf)
        else:
            parts["vision"] += size(leaf)
    cache_bytes = size(cache.keys) + size(cache.values)
    if draft_cache is not None:
        parts["imitation"] += size(draft_cache.keys) + size(draft_cache.values)
    return ReadBytes(cache=cache_bytes, **parts)


def _place(abstract, model_config, mesh):
    """ShapeDtypeStructs of `abstract` (params) with the library's shardings for `mesh`."""
    shardings = sharding.param_shardings(VLM(model_config).abstract_params(), mesh)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shardings)


# ---------------------------------------------------------------------------------------
# Programs
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Program:
    """One program to compile: fn(*args) -> outputs, with `donate` arg indices donated.

    must_read: bytes per device a call must read at least (None for the whole generate
    programs); scanned: fn runs a layer scan, whose body the compiler's cost analysis
    counts once (see compile_programs); scan_trips: its layers, when known.
    """

    fn: Callable
    donate: tuple[int, ...]
    args: tuple
    must_read: float | None
    scanned: bool = False
    scan_trips: int = 0  # the layer scan's trip count (for the engine program's HBM estimate)


def _argmax(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _chain_positions(cache: KVCache, n: int):
    """Positions [batch, n] from each row's cache.pos on, as a round's verification scores them."""
    return cache.pos[:, None] + jnp.arange(n, dtype=jnp.int32)[None]


@dataclasses.dataclass(frozen=True)
class Point:
    """What every builder of one (batch, draft_len) point shares: the full model (placed
    params), its chain caches mid-generation and the inputs of a round."""

    shapes: ModelShapes
    mesh: Any
    model: VLM
    params: Any
    batch: int
    draft_len: int
    max_new: int
    image_tokens: int  # image tokens per prompt row (prompt_image_tokens)
    prompt_len: int
    generate: bool  # also compile the whole generate programs
    ssd_spec: DecodeSpec
    cache: KVCache  # the SSD chain's cache (cache_slots of ssd_spec)
    draft_cache: KVCache | None  # the imitation network's own
    reads: ReadBytes
    token: Any  # [batch] int32
    states: Any  # [batch, draft_len + 1, embed]
    chain: Any  # [batch, draft_len + 1] int32

    @property
    def num_layers(self) -> int:
        return self.model.config.text.num_layers

    @property
    def exit_layer(self) -> int:
        return self.model.config.draft.exit_layer

    def vlm(self, config) -> VLM:
        """A model of `config` in this point's dtype and layer form (scanned or unrolled)."""
        return VLM(config, self.model.dtype, unroll_layers=self.model.unroll_layers)

    def prompts(self, rows: int) -> Prompts:
        """`rows` prompts of prompt_len tokens with their images (abstract_images), sharded by rows."""
        return Prompts(
            input_ids=_sds((rows, self.prompt_len), jnp.int32, self.mesh, ("batch", None)),
            lengths=_sds((rows,), jnp.int32, self.mesh, ("batch",)),
            pixels=abstract_images(self.model.config, rows, self.mesh, self.image_tokens),
        )

    def generate_program(self, model: VLM, spec: DecodeSpec, draft_params=None) -> Program:
        """The whole generate program (prefill + while loop) for `spec`."""
        prompts = self.prompts(self.batch)
        max_new = self.max_new

        def whole(params, draft_params, prompts):
            return generate(model, params, prompts, spec, max_new, draft_params=draft_params)

        return Program(whole, (), (self.params, draft_params, prompts), None)


def make_point(
    shapes: ModelShapes,
    mesh,
    batch: int,
    draft_len: int,
    max_new: int,
    generate: bool,
    unroll: bool = False,
    image_tokens: int | None = None,
) -> Point:
    """The point's shared inputs; unroll: its models run their layers as straight-line code
    (the counting twin of the engine's scanned programs, see compile_programs); image_tokens:
    a patch-image model's tokens per image (prompt_image_tokens; default its most)."""
    config = shapes.config
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % data_parallel:
        raise CompileOnlyError(
            f"--batch-size {batch} is not divisible by the {data_parallel} data-parallel "
            f"shards of mesh {dict(mesh.shape)}"
        )
    params = _place(shapes.params, config, mesh)
    image_tokens = prompt_image_tokens(config, image_tokens)
    prompt_len = image_tokens + PROMPT_TEXT_TOKENS
    ssd_spec = DecodeSpec(mode="ssd", capacity=max_new, eos_ids=(), policy=DraftPolicy(draft_len=draft_len))
    slots = ssd_spec.cache_slots(prompt_len)
    # A step in the middle of a generation: the caches the engine's programs carry.
    cache = abstract_cache(config.text.num_layers, batch, slots, config, shapes.dtype, mesh)
    draft_cache = abstract_cache(1, batch, slots, config, shapes.dtype, mesh) if config.draft.kind == "layer" else None
    width = config.text.hidden_size
    return Point(
        shapes=shapes,
        mesh=mesh,
        model=VLM(config, shapes.dtype, unroll_layers=unroll),
        params=params,
        batch=batch,
        draft_len=draft_len,
        max_new=max_new,
        image_tokens=image_tokens,
        prompt_len=prompt_len,
        generate=generate,
        ssd_spec=ssd_spec,
        cache=cache,
        draft_cache=draft_cache,
        reads=read_bytes(params, config, cache, draft_cache),
        token=_sds((batch,), jnp.int32, mesh, ("batch",)),
        states=_sds((batch, draft_len + 1, width), shapes.dtype, mesh, ("batch", None, None)),
        chain=_sds((batch, draft_len + 1), jnp.int32, mesh, ("batch", None)),
    )


def ar_programs(point: Point) -> tuple[dict[str, Program], dict[str, Any]]:
    """The AR step (steps.ar_step + argmax) on the AR program's own cache, and generate_ar.
    Returns ({name: Program}, sizes)."""
    model, config, mesh = point.model, point.model.config, point.mesh
    ar_spec = DecodeSpec(mode="ar", capacity=point.max_new, eos_ids=())
    ar_cache = abstract_cache(
        point.num_layers, point.batch, ar_spec.cache_slots(point.prompt_len), config, model.dtype, mesh
    )
    ar_reads = read_bytes(point.params, config, ar_cache, None)

    def ar_step(params, cache, token):
        logits, cache = steps.ar_step(model, params, cache, token)
        return cache, _argmax(logits)

    programs = {
        "ar_step": Program(
            ar_step,
            (1,),
            (point.params, ar_cache, point.token),
            ar_reads.span(0, point.num_layers, point.num_layers) + ar_reads.head,
            scanned=True,
            scan_trips=point.num_layers,
        )
    }
    if point.generate:
        programs["generate_ar"] = point.generate_program(model, ar_spec)
    return programs, {"ar_kv_cache_bytes_per_device": ar_reads.cache}


def prefill_programs(point: Point) -> dict[str, Program]:
    """`--prefill`: the prompts' prefill and its vision tower, for their FLOPs, time bound and memory.

    encode_images(params, images) -> image tokens: the vision tower (and projector) alone on the
      point's batch of images (abstract_images), straight-line code (the towers loop in Python);
    prefill(params, prompts) -> loop state: the engine's own prefill (decode.engine.loop._prefill
      with the imitation drafter's SSD spec: vision tower, every layer, the LM head on each row's
      last token, the drafter's prefill) into caches of the chain's slots.

    Must read: the weights they use (and the caches prefill writes); both are compute-bound, so
    their bound is FLOPs / peak.
    """
    model, spec, reads, batch = point.model, point.ssd_spec, point.reads, point.batch
    prompts = point.prompts(batch)

    def encode_images(params, images):
        return model.encode_images(params, images)

    def prefill(params, prompts):
        ctx = RoundContext(model, params, None, spec.draft_depth)
        budgets = jnp.full((batch,), point.max_new, jnp.int32)
        return _prefill(ctx, prompts, spec, jax.random.key(0), budgets, point.cache.slots)

    return {
        "encode_images": Program(encode_images, (), (point.params, prompts.pixels), reads.vision),
        "prefill": Program(
            prefill,
            (),
            (point.params, prompts),
            reads.vision + reads.span(0, point.num_layers, point.num_layers) + reads.head + reads.imitation,
            scanned=True,
        ),
    }


@dataclasses.dataclass(frozen=True)
class DrafterPrograms:
    """A drafter's programs: roles {role: program name} (names may be shared between
    drafters: verify_tokens), the programs by name, and its sizes for the JSON."""

    roles: dict[str, str]
    programs: dict[str, Program]
    extra: dict[str, Any]


def _verify_tokens_program(point: Point) -> Program:
    """steps.verify_tokens + argmax: verification from the tokens (eagle, model drafters)."""
    model, n = point.model, point.draft_len + 1

    def verify_tokens(params, cache, tokens):
        logits, _, cache = steps.verify_tokens(model, params, cache, tokens, _chain_positions(cache, n))
        return cache, _argmax(logits)

    return Program(
        verify_tokens,
        (1,),
        (point.params, point.cache, point.chain),
        point.reads.span(0, point.num_layers, point.num_layers) + point.reads.head,
        scanned=True,
    )


def _drafter_calls(drafter, model: VLM, draft_len: int, own_params: bool):
    """A chain drafter's start and step as the engine calls them (the full model's cache
    passes through them untouched, so None stands for it):
    start(params, carry, last_token [batch], pos [batch]) -> (carry, argmax [batch]);
    step(params, carry, token [batch], position [batch]) -> (carry, argmax).
    own_params: `params` are the drafter's own (a draft model's), not the full model's."""

    def context(params):
        return RoundContext(model, None if own_params else params, params if own_params else None, draft_len)

    def start(params, carry, last_token, pos):
        out = drafter.start(context(params), None, carry, last_token, pos)
        return out.carry, _argmax(out.logits)

    def step(params, carry, token, position):
        out = drafter.step(context(params), None, carry, token, position)
        return out.carry, _argmax(out.logits)

    return start, step


def imitation_programs(point: Point, d: DrafterShapes) -> DrafterPrograms:
    """draft_step (steps.draft_step), shallow_step (steps.shallow_pass: the last draft's
    pass) and verify (steps.verify from the exit layer), under their names of before drafters."""
    model, reads, k, layers = point.model, point.reads, point.exit_layer, point.num_layers
    n = point.draft_len + 1

    def draft_step(params, cache, draft_cache, token):
        logits, _, cache, draft_cache = steps.draft_step(model, params, cache, draft_cache, token, cache.pos)
        return cache, draft_cache, _argmax(logits)

    def shallow_step(params, cache, token):
        hidden, cache = steps.shallow_pass(model, params, cache, token[:, None], cache.pos[:, None])
        return cache, hidden

    def verify(params, cache, states):
        logits, _, cache = steps.verify(model, params, cache, states, _chain_positions(cache, n), k)
        return cache, _argmax(logits)

    programs = {
        "draft_step": Program(
            draft_step,
            (1, 2),
            (point.params, point.cache, point.draft_cache, point.token),
            reads.span(0, k, layers) + reads.imitation + reads.head,
            scanned=True,
            scan_trips=k,
        ),
        "shallow_step": Program(
            shallow_step,
            (1,),
            (point.params, point.cache, point.token),
            reads.span(0, k, layers),
            scanned=True,
            scan_trips=k,
        ),
        "verify": Program(
            verify,
            (1,),
            (point.params, point.cache, point.states),
            reads.span(k, layers, layers) + reads.head,
            scanned=True,
            scan_trips=layers - k,
        ),
    }
    roles = {role: role for role in programs}
    if point.generate:
        programs["generate_ssd"] = point.generate_program(
            model, dataclasses.replace(point.ssd_spec, drafter=ImitationDrafter())
        )
        roles["generate_ssd"] = "generate_ssd"
    return DrafterPrograms(roles, programs, {"draft_bytes_per_device": reads.imitation})


def eagle_programs(point: Point, d: DrafterShapes) -> DrafterPrograms:
    """The EAGLE head's catch-up pass (its start: the draft_len + 1 pending pairs) and
    one-pair step, each with the LM head; verification from the tokens."""
    config, mesh, batch = point.model.config, point.mesh, point.batch
    d_config = config.with_draft(eagle_image_pool=d.pool) if d.pool else config
    head_model = point.vlm(d_config)
    eagle_slots = EagleDrafter().cache_slots(head_model, point.cache.slots)
    eagle_cache = abstract_cache(1, batch, eagle_slots, config, point.model.dtype, mesh)
    row = _sds((batch,), jnp.int32, mesh, ("batch",))
    carry = EagleCarry(
        cache=eagle_cache,
        removed=row,
        features=point.states,
        tokens=point.chain,
        base=row,
        count=row,
        feature=_sds((batch, config.text.hidden_size), point.model.dtype, mesh, ("batch", None)),
    )
    cache_bytes = 2 * tpu.shard_bytes(eagle_cache.keys.shape, eagle_cache.keys.dtype, eagle_cache.keys.sharding)
    must = point.reads.eagle + cache_bytes + point.reads.head
    start, step = _drafter_calls(EagleDrafter(), head_model, point.draft_len, own_params=False)
    names = {"catchup": f"{d.name}/catchup", "step": f"{d.name}/step", "verify": "verify_tokens"}
    programs = {
        names["catchup"]: Program(start, (1,), (point.params, carry, point.token, point.token), must),
        names["step"]: Program(step, (1,), (point.params, carry, point.token, point.token), must),
        "verify_tokens": _verify_tokens_program(point),
    }
    if point.generate:
        names["generate_ssd"] = f"{d.name}/generate_ssd"
        programs[names["generate_ssd"]] = point.generate_program(
            head_model, dataclasses.replace(point.ssd_spec, drafter=EagleDrafter())
        )
    return DrafterPrograms(
        names,
        programs,
        {
            "eagle_image_pool": d_config.draft.eagle_image_pool,
            "eagle_cache_slots": eagle_slots,
            "draft_cache_bytes_per_device": cache_bytes,
            "draft_bytes_per_device": point.reads.eagle,
        },
    )


def model_programs(point: Point, d: DrafterShapes) -> DrafterPrograms:
    """A draft VLM's start (two tokens) and one-token step, each through all its layers
    and its head; verification from the tokens."""
    small_config, mesh, batch = d.small.config, point.mesh, point.batch
    small_params = _place(d.small.params, small_config, mesh)
    small_layers = small_config.text.num_layers
    small_cache = abstract_cache(small_layers, batch, point.cache.slots, small_config, point.model.dtype, mesh)
    small_reads = read_bytes(small_params, small_config, small_cache, None)
    carry = ModelCarry(
        cache=small_cache,
        prev_token=point.token,
        refeed=_sds((batch,), jnp.bool_, mesh, ("batch",)),
        fed=_sds((batch,), jnp.int32, mesh, ("batch",)),
    )
    must = small_reads.span(0, small_layers, small_layers) + small_reads.head
    small_model = point.vlm(small_config)
    start, step = _drafter_calls(ModelDrafter(small_model), small_model, point.draft_len, own_params=True)

    names = {"start": f"{d.name}/start", "step": f"{d.name}/step", "verify": "verify_tokens"}
    programs = {
        names["start"]: Program(start, (1,), (small_params, carry, point.token, point.token), must, scanned=True),
        names["step"]: Program(step, (1,), (small_params, carry, point.token, point.token), must, scanned=True),
        "verify_tokens": _verify_tokens_program(point),
    }
    if point.generate:
        names["generate_ssd"] = f"{d.name}/generate_ssd"
        programs[names["generate_ssd"]] = point.generate_program(
            point.model, dataclasses.replace(point.ssd_spec, drafter=ModelDrafter(small_model)), small_params
        )
    return DrafterPrograms(
        names,
        programs,
        {
            "draft_model": d.small.source,
            "draft_param_bytes_per_device": sum(
                tpu.shard_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(small_params)
            ),
            "draft_cache_bytes_per_device": small_reads.cache,
            "draft_bytes_per_device": small_reads.layers + small_reads.head,
        },
    )


# One builder per drafter kind: its programs by role, their must-read bytes, its sizes.
DRAFTER_PROGRAMS: dict[str, Callable[[Point, DrafterShapes], DrafterPrograms]] = {
    "imitation": imitation_programs,
    "eagle": eagle_programs,
    "model": model_programs,
}


def tree_programs(point: Point, shape: TreeShape) -> DrafterPrograms:
    """A draft tree's round pieces, as the engine's tree rounds run them (size = shape.size;
    n: the nodes of one pass):

    root / step(params, cache, draft_cache, tokens, ids, depths [batch, n] int32, ancestors
      [batch, n, size] bool) -> (cache, draft_cache, children [batch, n, width]): steps.tree_step
      (n = 1: the root, n = width: a drafting step), then each node's `width` best children
      (the greedy proposal; the table bookkeeping of decode.engine.tree's propose_children /
      grow, on [batch, size * width] arrays, is left out).
    verify(params, cache, states [batch, size, embed], depths [batch, size], ancestors
      [batch, size, size]) -> (cache, argmax [batch, size]): steps.verify from the exit layer.
    move(cache, draft_cache, path [batch, steps + 1]) -> (cache, draft_cache): steps.move_path.
    """
    model, config, mesh, batch = point.model, point.model.config, point.mesh, point.batch
    k, layers = point.exit_layer, point.num_layers
    tree_spec = DecodeSpec(mode="ssd", capacity=point.max_new, eos_ids=(), tree=shape)
    # A tree round looks further ahead than a chain (size slots): its own cache size.
    slots = tree_spec.cache_slots(point.prompt_len)
    cache = abstract_cache(layers, batch, slots, config, model.dtype, mesh)
    draft_cache = abstract_cache(1, batch, slots, config, model.dtype, mesh) if config.draft.kind == "layer" else None
    reads = read_bytes(point.params, config, cache, draft_cache)
    draft_bytes = (
        0
        if draft_cache is None
        else 2 * tpu.shard_bytes(draft_cache.keys.shape, draft_cache.keys.dtype, draft_cache.keys.sharding)
    )

    def step(params, cache, draft_cache, tokens, ids, depths, ancestors):
        pos = cache.pos
        layout = tree_slots(pos, ids, ancestors, cache.slots)
        logits, _, cache, draft_cache = steps.tree_step(
            model, params, cache, draft_cache, tokens, pos[:, None] + depths, layout
        )
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return cache, draft_cache, jax.lax.top_k(logprobs, shape.width)[1]

    def verify(params, cache, states, depths, ancestors):
        pos = cache.pos
        ids = jnp.broadcast_to(jnp.arange(shape.size, dtype=jnp.int32), depths.shape)
        layout = tree_slots(pos, ids, ancestors, cache.slots)
        logits, _, cache = steps.verify(model, params, cache, states, pos[:, None] + depths, k, layout)
        return cache, _argmax(logits)

    def move(cache, draft_cache, path):
        return steps.move_path(cache, draft_cache, cache.pos, path)

    def nodes(n):  # tokens, ids, depths [batch, n]; ancestors [batch, n, size]
        ints = _sds((batch, n), jnp.int32, mesh, ("batch", None))
        return ints, ints, ints, _sds((batch, n, shape.size), jnp.bool_, mesh, ("batch", None, None))

    label = f"{shape.nodes}x{shape.width}"
    names = {role: f"tree:{label}/{role}" for role in ("root", "step", "verify", "move")}
    draft_must = reads.span(0, k, layers) + reads.imitation + reads.head
    states = _sds((batch, shape.size, config.text.hidden_size), model.dtype, mesh, ("batch", None, None))
    path = _sds((batch, shape.steps + 1), jnp.int32, mesh, ("batch", None))
    programs = {
        names["root"]: Program(step, (1, 2), (point.params, cache, draft_cache, *nodes(1)), draft_must, scanned=True),
        names["step"]: Program(
            step, (1, 2), (point.params, cache, draft_cache, *nodes(shape.width)), draft_must, scanned=True
        ),
        names["verify"]: Program(
            verify,
            (1,),
            (point.params, cache, states, *nodes(shape.size)[2:]),
            reads.span(k, layers, layers) + reads.head,
            scanned=True,
        ),
        # The move reads and writes the path's steps + 1 entries of each row, every layer:
        # that fraction of the caches, twice (the compiler's bytes accessed may count more
        # if the scatter is not done in place).
        names["move"]: Program(
            move, (0, 1), (cache, draft_cache, path), 2 * (shape.steps + 1) / slots * (reads.cache + draft_bytes)
        ),
    }
    if point.generate:
        names["generate_ssd"] = f"tree:{label}/generate_ssd"
        programs[names["generate_ssd"]] = point.generate_program(model, tree_spec)
    return DrafterPrograms(
        names,
        programs,
        {
            "nodes": shape.nodes,
            "width": shape.width,
            "steps": shape.steps,
            "size": shape.size,
            "cache_slots": slots,
            "kv_cache_bytes_per_device": reads.cache,
        },
    )


# ---------------------------------------------------------------------------------------
# Compiling, with the layer scans counted
# ---------------------------------------------------------------------------------------


def _piece_entry(
    program: Program,
    report: tpu.CompileReport,
    twin: tpu.CompileReport | None,
    topology: tpu.Topology,
    explain: int = 0,
) -> dict[str, Any]:
    """A compiled piece as JSON: its memory, collectives and loops from the engine's own
    (scanned) program; its FLOPs and bytes from the unrolled twin when it has layer scans
    (see compile_programs); the must-read bytes, the time bound they give and the ratio of
    the compiler's bytes to them. explain > 0: also where the bytes go (explain.py), its
    `explain` rows the `explain` biggest groups of ops of the program the bytes come from."""
    if program.must_read is None:
        entry = tpu.report_dict(report, topology)
        entry["cost_counting"] = "static_loop_bodies_once"
        entry["note"] = (
            "memory is the program's; FLOPs and bytes are the compiler's static cost, each loop "
            "body (a round, a layer) counted once"
        )
        return entry
    counted = report
    if twin is not None:
        counted = dataclasses.replace(
            report,
            flops=twin.flops,
            bytes_accessed=twin.bytes_accessed,
            transcendentals=twin.transcendentals,
            step_time_lower_bound_s=twin.step_time_lower_bound_s,
            flops_time_s=twin.flops_time_s,
            bytes_time_s=twin.bytes_time_s,
        )
    entry = tpu.report_dict(counted, topology)
    entry["cost_counting"] = "unrolled_twin" if twin is not None else "straight_line"
    entry["scanned_program"] = {
        "flops_per_device": report.flops,
        "bytes_per_device": report.bytes_accessed,
        "transcendentals_per_device": report.transcendentals,
        "compile_seconds": report.compile_seconds,
    }
    if twin is not None:
        entry["twin_compile_seconds"] = twin.compile_seconds
    bound, _, memory = tpu.roofline_seconds(counted.flops, program.must_read, topology)
    entry.update(
        must_read_bytes_per_device=program.must_read,
        must_read_time_s=memory,
        time_lower_bound_s=bound,
        bytes_accessed_per_device=counted.bytes_accessed,
        bytes_accessed_to_must_read=counted.bytes_accessed / program.must_read if program.must_read else None,
    )
    source = twin if twin is not None else report
    if explain and source.hlo_text is not None:
        where = explain_hlo(source.hlo_text, explain)
        where["hbm_to_must_read"] = where["hbm_bytes"] / program.must_read if program.must_read else None
        where["counted_to_compiler"] = (
            where["counted_bytes"] / counted.bytes_accessed if counted.bytes_accessed else None
        )
        if twin is not None and program.scan_trips and report.while_loops == 1 and report.hlo_text is not None:
            # The program the engine runs (layers scanned): its loop body times the layers.
            engine = explain_hlo(report.hlo_text, explain, loop_trips=program.scan_trips)
            engine["hbm_to_must_read"] = engine["hbm_bytes"] / program.must_read if program.must_read else None
            where["engine_program"] = engine
        entry["explain"] = where
    return entry


def _compile(name: str, program: Program, mesh, topology, failed: dict[str, str], batch: int):
    """tpu.compile_program, with a program JAX cannot trace (a bug in the engine or a
    drafter) booked in `failed` (the run goes on and exits 1): (report, refusal)."""
    try:
        return tpu.compile_program(
            name, jax.jit(program.fn, donate_argnums=program.donate), program.args, mesh, topology
        )
    except (TypeError, ValueError) as err:
        failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
        print(f"error: batch {batch}: {name} could not be traced: {failed[name]}", file=sys.stderr, flush=True)
        return None, None


def compile_programs(
    programs: dict[str, Program],
    twins: dict[str, Program],
    mesh,
    topology: tpu.Topology,
    batch: int,
    explain: int = 0,
):
    """Compiles every program as the engine runs it and, for those with a layer scan, its
    unrolled twin (twins[name]: the same function on a model with unroll_layers=True),
    whose FLOPs and bytes count every layer. explain: see _piece_entry.
    Returns ({name: piece JSON}, {name: CompileReport}, refusals, {name: trace error})."""
    pieces, reports, refusals, failed = {}, {}, [], {}
    for name, program in programs.items():
        report, refusal = _compile(name, program, mesh, topology, failed, batch)
        if report is None:
            if refusal is not None:
                refusals.append(refusal)
            continue
        twin = None
        if program.scanned and program.must_read is not None:
            twin, refusal = _compile(f"{name} (unrolled twin)", twins[name], mesh, topology, failed, batch)
            if refusal is not None:
                refusals.append(refusal)
        reports[name] = report
        pieces[name] = _piece_entry(program, report, twin, topology, explain)
    return pieces, reports, refusals, failed
