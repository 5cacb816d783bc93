"""`decode.bench --compile-only TOPOLOGY`: the decoding programs compiled for a TPU slice,
and the SSD speedup their compiled costs predict. Nothing runs; no weights are needed.

    python -m decode.bench --ckpt shapes:llava15_7b --compile-only v5e:2x2 [--mesh data=1,tensor=4] \
        --batch-size 1 8 [--draft-len 5] [--acceptance 0.6|STATS.json] --json OUT.json

Per batch size and draft length it compiles the pieces of a decoding round, each as the
engine runs it (decode/engine.py), with the layers unrolled so that the compiler's cost
analysis counts every layer (it counts a loop body once): the AR step (one token through layers [0, L) + head),
the draft step (layers [0, k) + imitation network + head), the shallow pass alone
(layers [0, k)), the verification pass (draft_len + 1 exit-layer states through [k, L) +
head), and both whole generate programs (prefill + while loop), whose peak memory holds
the params, the KV cache and the loop state. Params and caches are sharded by the
library's logical-axis rules over `--mesh` (default: tensor parallel over every device).

Step times are roofline lower bounds on one chip: max(FLOPs / peak FLOP/s, bytes / HBM
bandwidth). Two byte counts are reported: the compiler's `bytes accessed` (every op's
operands and results, which overcounts what HBM must deliver, DESIGN.md section 5) and
the bytes a step must read at least (its layers' weight shards and KV cache shards, the
LM head, the imitation network), from the shapes. The prediction uses the latter:

    speedup = tokens_per_round * t_AR / (drafted_per_round * t_draft + t_shallow + t_verify)

with tokens and drafts per round from `--acceptance`: a per-position acceptance
probability a (independent positions: tokens = 1 + a + ... + a^G, drafted = G), or a
decode.run --stats / decode.bench JSON measured elsewhere (its mean_accepted_length and
acceptance_rate; per drafter from a decode.bench --drafter JSON of several drafters).
Every such number is a compiler-model prediction, not a measurement.

`--paper-speedup 1.55 1.85` (the default) adds, per point, the acceptance a published
speedup implies under the plain layer-count cost model (layer_count_acceptance) and what
the compiled pieces predict at that acceptance.

`--drafter imitation eagle eagle:pool=N model:SPEC` compares drafters (decode/engine/drafters.py);
the lines above are the imitation drafter's. The EAGLE head's pieces are its catch-up
pass (the draft_len + 1 pairs a round starts with) and its one-pair step, each with the
LM head; `pool=N` overrides the checkpoint's visual compressor. A draft VLM (SPEC as
--ckpt: shapes:NAME, random:PRESET or a checkpoint) has its start (two tokens) and
one-token step. Both verify from the tokens (`verify_tokens`: layers [0, L) + head).
Must-read bytes: the head's (the draft model's) weights, its own cache, the LM head.

    eagle: speedup = tokens * t_AR / (t_catchup + (drafted - 1) * t_step + t_verify_tokens)
    model: speedup = tokens * t_AR / (t_start + (drafted - 1) * t_step + t_verify_tokens)

`--tree-nodes N [N ...] --tree-width K` adds the imitation drafter's draft trees
(decode/engine/tree.py TreeShape: steps = N / K drafting steps, N + 1 nodes verified), compiled
as decode/engine.py `_draft_tree` and `_tree_round` run them, with the tree attention
mask: the root pass (one node through [0, k) + imitation network + head), one drafting
step (K nodes, the same), the verification (N + 1 nodes through [k, L) + head) and the
move of the accepted path's K/V entries to contiguous slots (every layer, and the
imitation network's cache when it has one). Per tree:

    speedup = tokens_per_round * t_AR / (t_root + steps * t_step + t_tree_verify + t_move)

(the engine's last drafting step skips the head: `steps * t_step` counts one head read
too many, a slight overestimate of the round). Tokens per round: the mean_accepted_length
of a decode.bench JSON run with the same tree (its runs carry tree_nodes and tree_width),
else a model from a per-position acceptance a (the number, or the JSON's chain rate),
which is an assumption, not a measurement: every depth offers `width` independent tries
of probability a, so the path goes one deeper with p = 1 - (1 - a)^width, up to `steps`:
tokens = 1 + p + ... + p^steps. (A best-first tree is narrower than `width` at some
depths and its siblings are not independent; the demo's measured trees beat this model.)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from decode import engine
from decode.engine.drafters import EagleCarry, EagleDrafter, ImitationDrafter, ModelCarry, ModelDrafter, RoundContext
from decode.engine import DecodeSpec, DraftPolicy, Prompts
from decode.engine.tree import TreeShape, tree_slots
from fastvlm_jax import sharding, tpu
from fastvlm_jax.architectures import architecture
from fastvlm_jax.config import ConfigError
from fastvlm_jax.kv_cache import KVCache
from fastvlm_jax.model import VLM

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


def load_shapes(spec: str, dtype: str | None = None) -> ModelShapes:
    """`shapes:NAME` (bfloat16 unless `dtype`), `random:PRESET` (float32), `demo` or a
    checkpoint dir (its saved dtypes; its params are not read)."""
    from decode.bench.models import RANDOM_PRESETS

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
        params = nn.meta.unbox(VLM(config).abstract_params())
        dtype = dtype or ("bfloat16" if kind == "shapes" else "float32")
        source = spec
    else:
        from fastvlm_jax.checkpoint import CheckpointError, load_without_params

        path = spec
        if spec == "demo":
            from fastvlm_jax.demo import DemoMissingError, demo_checkpoint

            try:
                path = demo_checkpoint()
            except DemoMissingError as err:
                raise CompileOnlyError(str(err)) from None
        try:
            ckpt = load_without_params(path)
        except CheckpointError as err:
            raise CompileOnlyError(str(err)) from None
        config, params, source = ckpt.config, ckpt.params, str(path)
    if dtype is not None:
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype), params)
    floats = [jnp.dtype(x.dtype) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    compute = max(floats, key=lambda d: d.itemsize) if floats else jnp.dtype(jnp.float32)
    return ModelShapes(config, params, compute, source)


# ---------------------------------------------------------------------------------------
# Acceptance profile
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Acceptance:
    """rate: accepted / drafted. tokens_per_round: measured tokens per full-model call
    (None: derive it from `rate` as a per-position probability). source: where it came from."""

    rate: float
    tokens_per_round: float | None
    source: str

    def per_round(self, draft_len: int) -> tuple[float, float]:
        """(tokens emitted, tokens drafted) per round."""
        if self.tokens_per_round is not None:
            drafted = (self.tokens_per_round - 1) / self.rate if self.rate > 0 else float(draft_len)
            return self.tokens_per_round, drafted
        return sum(self.rate**j for j in range(draft_len + 1)), float(draft_len)


def parse_acceptance(text: str) -> Acceptance:
    """A number in [0, 1), or a decode.run --stats / decode.bench JSON file."""
    try:
        rate = float(text)
    except ValueError:
        path = Path(text)
        if not path.is_file():
            raise CompileOnlyError(f"--acceptance {text!r}: neither a number in [0, 1) nor a JSON file") from None
        data = json.loads(path.read_text())
        if "mean_accepted_length" not in data or "acceptance_rate" not in data:
            raise CompileOnlyError(f"--acceptance {text}: the JSON has no mean_accepted_length / acceptance_rate "
                                   "(use a decode.run --stats or decode.bench JSON)")
        return Acceptance(float(data["acceptance_rate"]), float(data["mean_accepted_length"]), str(path))
    if not 0.0 <= rate < 1.0:
        raise CompileOnlyError(f"--acceptance {text}: a per-position acceptance probability lies in [0, 1)")
    return Acceptance(rate, None, f"per-position probability {rate}")


@dataclasses.dataclass(frozen=True)
class Acceptances:
    """The acceptance profile of each drafter: `default` for all (a number, or a JSON of
    one drafter), or `by_drafter` from a decode.bench --drafter JSON of several."""

    default: Acceptance | None
    by_drafter: dict[str, Acceptance]

    def for_drafter(self, name: str) -> Acceptance:
        """By the drafter's name ('model:shapes:X'), else by its kind ('model') when the
        JSON has exactly one drafter of that kind (its own name, e.g. model:demo-draft)."""
        if self.default is not None:
            return self.default
        if name in self.by_drafter:
            return self.by_drafter[name]
        kind = name.split(":")[0]
        same_kind = [key for key in self.by_drafter if key.split(":")[0] == kind]
        if len(same_kind) == 1:
            return self.by_drafter[same_kind[0]]
        raise CompileOnlyError(f"--acceptance: no measured run of drafter {name!r} (the JSON has "
                               f"{', '.join(sorted(self.by_drafter))})")


def parse_acceptances(text: str) -> Acceptances:
    """parse_acceptance, or per drafter for a decode.bench JSON whose runs name several
    drafters (each drafter's first run: its mean_accepted_length and acceptance_rate)."""
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        runs = json.loads(path.read_text()).get("runs", [])
        by_drafter: dict[str, Acceptance] = {}
        for run in runs:
            name = run.get("drafter", "imitation")
            if name not in by_drafter and "mean_accepted_length" in run and "acceptance_rate" in run:
                by_drafter[name] = Acceptance(float(run["acceptance_rate"]), float(run["mean_accepted_length"]),
                                              f"{path} (drafter {name})")
        if len(by_drafter) > 1:
            return Acceptances(None, by_drafter)
    return Acceptances(parse_acceptance(text), {})


@dataclasses.dataclass(frozen=True)
class TreeAcceptance:
    """A draft tree's tokens per round (full-model calls: one per round), where they came
    from, and the per-position acceptance they were modelled from (None: measured)."""

    tokens_per_round: float
    source: str
    per_position: float | None = None


def tree_label(shape: TreeShape) -> str:
    return f"{shape.nodes}x{shape.width}"


def parse_tree_acceptance(text: str, shape: TreeShape, chain: Acceptance) -> TreeAcceptance:
    """The measured tokens per round of the first run with this tree in the decode.bench
    JSON `text`, else the module docstring's model from the chain acceptance `chain.rate`
    (the number given, or the JSON's rate)."""
    label = tree_label(shape)
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        for run in json.loads(path.read_text()).get("runs", []):
            if (run.get("tree_nodes"), run.get("tree_width")) == (shape.nodes, shape.width) \
                    and "mean_accepted_length" in run:
                return TreeAcceptance(float(run["mean_accepted_length"]),
                                      f"{path} (measured tree {label}, batch {run.get('batch_size')})")
    a = chain.rate
    deeper = 1.0 - (1.0 - a) ** shape.width
    tokens = sum(deeper**depth for depth in range(shape.steps + 1))
    return TreeAcceptance(tokens, f"modelled: per-position acceptance {a:.3f} from {chain.source}, "
                          f"each depth {shape.width} independent tries (an assumption)", a)


def parse_trees(nodes: list[int], width: int, drafters: list[str]) -> tuple[TreeShape, ...]:
    """The draft trees of --tree-nodes (0: none) and --tree-width; CompileOnlyError (one line)
    for a bad shape or without the imitation drafter, the only one that builds trees."""
    trees = []
    for n in nodes:
        if n == 0:
            continue
        try:
            trees.append(TreeShape(nodes=n, width=width))
        except ValueError as err:
            raise CompileOnlyError(f"--tree-nodes / --tree-width: {err}") from None
    if trees and "imitation" not in drafters:
        raise CompileOnlyError("--tree-nodes: draft trees are built by the imitation drafter only "
                               "(add imitation to --drafter)")
    return tuple(trees)


# ---------------------------------------------------------------------------------------
# Drafters
# ---------------------------------------------------------------------------------------


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
            key, _, value = name[len("eagle:"):].partition("=")
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
            config.text.vocab_size, config.image_token_id, config.num_image_tokens):
        raise CompileOnlyError(
            f"--drafter {name}: a draft VLM needs the model's vocabulary, image token and image token "
            f"count ({config.text.vocab_size}, {config.image_token_id}, {config.num_image_tokens}); it has "
            f"({small_config.text.vocab_size}, {small_config.image_token_id}, {small_config.num_image_tokens})")
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


# ---------------------------------------------------------------------------------------
# The pieces of a round, as the engine runs them
# ---------------------------------------------------------------------------------------


def _argmax(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def piece_functions(model: VLM, draft_len: int) -> dict[str, Any]:
    """{name: (fn, donated arg indices)}; each fn(params, caches..., x) -> (caches..., out).

    token: [batch] int32; states: [batch, draft_len + 1, embed]. Positions are the
    cache's own per-row positions, as in the engine.
    """
    cfg = model.config
    exit_layer, num_layers = cfg.draft.exit_layer, cfg.text.num_layers

    def shallow(params, cache, token):
        pos = cache.pos[:, None]
        hidden = model.embed(params, token[:, None], None, pos)
        hidden, cache, _ = model.run_layers(params, hidden, pos, 0, exit_layer, cache)
        return hidden, cache

    def ar_step(params, cache, token):
        pos = cache.pos[:, None]
        hidden = model.embed(params, token[:, None], None, pos)
        hidden, cache, _ = model.run_layers(params, hidden, pos, 0, num_layers, cache)
        return cache, _argmax(model.logits(params, hidden)[:, 0])

    def shallow_step(params, cache, token):
        hidden, cache = shallow(params, cache, token)
        return cache, hidden

    def draft_step(params, cache, draft_cache, token):
        hidden, cache = shallow(params, cache, token)
        drafted, draft_cache = model.imitate(params, hidden, cache.pos[:, None], draft_cache)
        return cache, draft_cache, _argmax(model.logits(params, drafted)[:, 0])

    def verify(params, cache, states):
        positions = cache.pos[:, None] + jnp.arange(draft_len + 1, dtype=jnp.int32)[None]
        hidden, cache, _ = model.run_layers(params, states, positions, exit_layer, num_layers, cache)
        return cache, _argmax(model.logits(params, hidden))

    return {"ar_step": (ar_step, (1,)), "draft_step": (draft_step, (1, 2)),
            "shallow_step": (shallow_step, (1,)), "verify": (verify, (1,))}


def tree_functions(model: VLM, shape: TreeShape) -> dict[str, Any]:
    """A draft tree's round pieces, as decode/engine.py `_draft_tree` and `_tree_round` run
    them: {name: (fn, donated arg indices)}. size = shape.size; n: the nodes of one pass.

    step(params, cache, draft_cache, tokens, ids, depths [batch, n] int32, ancestors
      [batch, n, size] bool) -> (cache, draft_cache, children [batch, n, width]): the nodes
      (n = 1: the root, n = width: a drafting step) through layers [0, exit) and the
      imitation network with the tree mask, then the head and each node's `width`
      best children (the greedy proposal; the table bookkeeping of decode.engine.tree's
      propose_children / grow, on [batch, size * width] arrays, is left out).
    verify(params, cache, states [batch, size, embed], depths [batch, size], ancestors
      [batch, size, size]) -> (cache, argmax [batch, size]): layers [exit, L) + head.
    move(cache, draft_cache, path [batch, steps + 1]) -> (cache, draft_cache): the accepted
      path's entries (slots pos + node) to slots pos + depth, every layer.
    """
    cfg = model.config
    exit_layer, num_layers = cfg.draft.exit_layer, cfg.text.num_layers

    def step(params, cache, draft_cache, tokens, ids, depths, ancestors):
        pos = cache.pos
        positions = pos[:, None] + depths
        layout = tree_slots(pos, ids, ancestors, cache.slots)
        hidden = model.embed(params, tokens, None, positions)
        hidden, cache, _ = model.run_layers(params, hidden, positions, 0, exit_layer, cache, tree=layout)
        drafted, draft_cache = model.imitate(params, hidden, positions, draft_cache, tree=layout)
        logprobs = jax.nn.log_softmax(model.logits(params, drafted).astype(jnp.float32), axis=-1)
        return cache, draft_cache, jax.lax.top_k(logprobs, shape.width)[1]

    def verify(params, cache, states, depths, ancestors):
        pos = cache.pos
        ids = jnp.broadcast_to(jnp.arange(shape.size, dtype=jnp.int32), depths.shape)
        layout = tree_slots(pos, ids, ancestors, cache.slots)
        hidden, cache, _ = model.run_layers(params, states, pos[:, None] + depths, exit_layer, num_layers, cache,
                                            tree=layout)
        return cache, _argmax(model.logits(params, hidden))

    def move(cache, draft_cache, path):
        pos = cache.pos[:, None]
        sources, targets = pos + path, pos + jnp.arange(shape.steps + 1)[None]
        cache = cache.move_slots(sources, targets)
        if draft_cache is not None:
            draft_cache = draft_cache.move_slots(sources, targets)
        return cache, draft_cache

    return {"step": (step, (1, 2)), "verify": (verify, (1,)), "move": (move, (0, 1))}


def verify_tokens_function(model: VLM, draft_len: int):
    """Verification from the tokens (eagle, model drafters): fn(params, cache, tokens
    [batch, draft_len + 1]) -> (cache, argmax [batch, draft_len + 1]): layers [0, L) + head."""

    def verify_tokens(params, cache, tokens):
        positions = cache.pos[:, None] + jnp.arange(draft_len + 1, dtype=jnp.int32)[None]
        hidden = model.embed(params, tokens, None, positions)
        hidden, cache, _ = model.run_layers(params, hidden, positions, 0, model.config.text.num_layers, cache)
        return cache, _argmax(model.logits(params, hidden))

    return verify_tokens


def drafter_functions(drafter, model: VLM, draft_len: int, own_params: bool) -> dict[str, Any]:
    """A chain drafter's calls as the engine makes them (decode.engine.drafters; the full model's
    cache passes through them untouched, so None stands for it):
    start(params, carry, last_token [batch], pos [batch]) -> (carry, argmax [batch]): the
      round's first call (EAGLE: the catch-up pass; a draft model: two tokens);
    step(params, carry, token [batch], position [batch]) -> (carry, argmax): one drafted token.
    own_params: `params` are the drafter's own (a draft model's), not the full model's."""

    def context(params):
        return RoundContext(model, None if own_params else params, params if own_params else None, draft_len)

    def start(params, carry, last_token, pos):
        logits, _, _, carry = drafter.start(context(params), None, carry, last_token, pos)
        return carry, _argmax(logits)

    def step(params, carry, token, position):
        logits, _, _, carry = drafter.step(context(params), None, carry, token, position)
        return carry, _argmax(logits)

    return {"start": (start, (1,)), "step": (step, (1,))}


def _sds(shape, dtype, mesh, logical):
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding.logical_to_sharding(logical, shape, mesh))


def abstract_cache(num_layers: int, batch: int, slots: int, config, dtype, mesh) -> KVCache:
    """KVCache of ShapeDtypeStructs: [num_layers, batch, kv_heads, slots, head_dim], sharded
    over the batch (data) and the kv heads (tensor) where they divide."""
    text = config.text
    shape = (num_layers, batch, text.num_kv_heads, slots, text.resolved_head_dim)
    return KVCache(keys=_sds(shape, dtype, mesh, KV_CACHE_AXES), values=_sds(shape, dtype, mesh, KV_CACHE_AXES),
                   pos=_sds((batch,), jnp.int32, mesh, ("batch",)))


@dataclasses.dataclass(frozen=True)
class ReadBytes:
    """Bytes one device must read at least, by part of the model (from shard shapes)."""

    layers: int  # every decoder layer's weight shards
    cache: int  # the whole KV cache shard (attention reads every slot, masked)
    head: int  # final norm + LM head (the tied embedding table when tied)
    imitation: int  # the imitation network, with its own cache if it has one
    eagle: int = 0  # the EAGLE head's weights (its cache is counted by the caller)

    def span(self, start: int, stop: int, num_layers: int) -> float:
        return (self.layers + self.cache) * (stop - start) / num_layers


def read_bytes(params, config, cache: KVCache, draft_cache: KVCache | None) -> ReadBytes:
    def size(x):
        return tpu.shard_bytes(x.shape, x.dtype, x.sharding)

    parts = {"layers": 0, "head": 0, "imitation": 0, "eagle": 0}
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
    cache_bytes = size(cache.keys) + size(cache.values)
    if draft_cache is not None:
        parts["imitation"] += size(draft_cache.keys) + size(draft_cache.values)
    return ReadBytes(cache=cache_bytes, **parts)


def _place(abstract, model_config, mesh):
    """ShapeDtypeStructs of `abstract` (params) with the library's shardings for `mesh`."""
    shardings = sharding.param_shardings(VLM(model_config).abstract_params(), mesh)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shardings)


def _must_read_entry(report: tpu.CompileReport, must_read: float, topology: tpu.Topology) -> dict[str, Any]:
    entry = tpu.report_dict(report, topology)
    bound, _, memory = tpu.roofline_seconds(report.flops, must_read, topology)
    entry.update(must_read_bytes_per_device=must_read, must_read_time_s=memory, time_lower_bound_s=bound)
    return entry


def compile_point(shapes: ModelShapes, topology: tpu.Topology, mesh, batch: int, draft_len: int,
                  max_new: int, acceptance: Acceptance | Acceptances,
                  drafters: tuple[DrafterShapes, ...] = (DrafterShapes("imitation", "imitation"),),
                  generate: bool = True, trees: dict[TreeShape, TreeAcceptance] | None = None) -> dict[str, Any]:
    """Every program of one (batch, draft_len) point, and the speedup they predict per drafter.

    `trees` (shape -> its tokens per round): the imitation drafter's draft trees, each
    under `trees["NxK"]` with its pieces and predicted speedup (see tree_functions).

    `pieces` holds the AR programs and the imitation drafter's (under their names of
    before drafters); `drafters` holds, per drafter, its own pieces (the imitation's
    again), its must-read bytes and its predicted speedup. The run-level
    `predicted_speedup` and `tokens_per_round` are the first drafter's.
    """
    if isinstance(acceptance, Acceptance):
        acceptance = Acceptances(acceptance, {})
    config = shapes.config
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % data_parallel:
        raise CompileOnlyError(f"--batch-size {batch} is not divisible by the {data_parallel} data-parallel "
                               f"shards of mesh {dict(mesh.shape)}")
    kinds = {d.kind for d in drafters}
    if "eagle" in kinds and not config.draft.eagle_layers:
        raise CompileOnlyError("--drafter eagle: the model has no EAGLE head (draft.eagle_layers=0)")
    model = VLM(config, shapes.dtype)
    # The pieces are compiled with their layers unrolled: XLA's cost analysis counts a loop
    # body once, so a layer scan would report one layer's FLOPs for the whole range.
    piece_model = VLM(config, shapes.dtype, unroll_layers=True)
    num_layers, exit_layer = config.text.num_layers, config.draft.exit_layer
    params = _place(shapes.params, config, mesh)
    prompt_len = config.num_image_tokens + PROMPT_TEXT_TOKENS
    ssd_spec = DecodeSpec(mode="ssd", capacity=max_new, eos_ids=(), policy=DraftPolicy(draft_len=draft_len))
    ar_spec = DecodeSpec(mode="ar", capacity=max_new, eos_ids=())
    slots = ssd_spec.cache_slots(prompt_len)
    # A step in the middle of a generation: the caches the engine's programs carry.
    cache = abstract_cache(num_layers, batch, slots, config, shapes.dtype, mesh)
    ar_cache = abstract_cache(num_layers, batch, ar_spec.cache_slots(prompt_len), config, shapes.dtype, mesh)
    draft_cache = (abstract_cache(1, batch, slots, config, shapes.dtype, mesh)
                   if config.draft.kind == "layer" else None)
    token = _sds((batch,), jnp.int32, mesh, ("batch",))
    width = config.text.hidden_size
    states = _sds((batch, draft_len + 1, width), shapes.dtype, mesh, ("batch", None, None))
    chain = _sds((batch, draft_len + 1), jnp.int32, mesh, ("batch", None))
    size = config.vision.image_size
    prompts = Prompts(input_ids=_sds((batch, prompt_len), jnp.int32, mesh, ("batch", None)),
                      lengths=_sds((batch,), jnp.int32, mesh, ("batch",)),
                      pixels=_sds((batch, size, size, 3), jnp.float32, mesh, ("batch", None, None, None)))

    def whole(model, spec, draft_params=None):
        if draft_params is None:
            return (lambda p, prompts: engine.generate(model, p, prompts, spec, max_new)), (), (params, prompts)
        return ((lambda p, dp, prompts: engine.generate(model, p, prompts, spec, max_new, draft_params=dp)),
                (), (params, draft_params, prompts))

    reads = read_bytes(params, config, cache, draft_cache)
    ar_reads = read_bytes(params, config, ar_cache, None)
    # name -> (fn, donated, args, must-read bytes or None)
    programs: dict[str, tuple] = {}
    fns = piece_functions(piece_model, draft_len)
    programs["ar_step"] = (*fns["ar_step"], (params, ar_cache, token),
                           ar_reads.span(0, num_layers, num_layers) + ar_reads.head)
    if generate:
        programs["generate_ar"] = (*whole(model, ar_spec), None)
    roles: dict[str, dict[str, str]] = {}  # drafter -> {role: program name}
    extra: dict[str, dict[str, Any]] = {}  # drafter -> its sizes
    for d in drafters:
        spec = dataclasses.replace(ssd_spec, drafter=ImitationDrafter())
        if d.kind == "imitation":
            programs["draft_step"] = (*fns["draft_step"], (params, cache, draft_cache, token),
                                      reads.span(0, exit_layer, num_layers) + reads.imitation + reads.head)
            programs["shallow_step"] = (*fns["shallow_step"], (params, cache, token),
                                        reads.span(0, exit_layer, num_layers))
            programs["verify"] = (*fns["verify"], (params, cache, states),
                                  reads.span(exit_layer, num_layers, num_layers) + reads.head)
            roles[d.name] = {"draft_step": "draft_step", "shallow_step": "shallow_step", "verify": "verify"}
            if generate:
                programs["generate_ssd"] = (*whole(model, spec), None)
                roles[d.name]["generate_ssd"] = "generate_ssd"
            extra[d.name] = {"draft_bytes_per_device": reads.imitation}
            continue
        # Eagle and the draft VLM: verification from the tokens' embeddings, all layers.
        programs["verify_tokens"] = (verify_tokens_function(piece_model, draft_len), (1,), (params, cache, chain),
                                     reads.span(0, num_layers, num_layers) + reads.head)
        if d.kind == "eagle":
            d_config = config.with_draft(eagle_image_pool=d.pool) if d.pool else config
            head_model = VLM(d_config, shapes.dtype, unroll_layers=True)
            eagle_slots = EagleDrafter().cache_slots(head_model, slots)
            eagle_cache = abstract_cache(1, batch, eagle_slots, config, shapes.dtype, mesh)
            row = _sds((batch,), jnp.int32, mesh, ("batch",))
            carry = EagleCarry(cache=eagle_cache, removed=row, features=states, tokens=chain, base=row, count=row,
                               feature=_sds((batch, width), shapes.dtype, mesh, ("batch", None)))
            cache_bytes = (tpu.shard_bytes(eagle_cache.keys.shape, eagle_cache.keys.dtype, eagle_cache.keys.sharding)
                           * 2)
            must = reads.eagle + cache_bytes + reads.head
            efns = drafter_functions(EagleDrafter(), head_model, draft_len, own_params=False)
            programs[f"{d.name}/catchup"] = (*efns["start"], (params, carry, token, token), must)
            programs[f"{d.name}/step"] = (*efns["step"], (params, carry, token, token), must)
            roles[d.name] = {"catchup": f"{d.name}/catchup", "step": f"{d.name}/step", "verify": "verify_tokens"}
            spec = dataclasses.replace(ssd_spec, drafter=EagleDrafter())
            if generate:
                programs[f"{d.name}/generate_ssd"] = (*whole(VLM(d_config, shapes.dtype), spec), None)
            extra[d.name] = {"eagle_image_pool": d_config.draft.eagle_image_pool, "eagle_cache_slots": eagle_slots,
                             "draft_cache_bytes_per_device": cache_bytes, "draft_bytes_per_device": reads.eagle}
        else:
            small_config = d.small.config
            small_params = _place(d.small.params, small_config, mesh)
            small_layers = small_config.text.num_layers
            small_cache = abstract_cache(small_layers, batch, slots, small_config, shapes.dtype, mesh)
            small_reads = read_bytes(small_params, small_config, small_cache, None)
            carry = ModelCarry(cache=small_cache, prev_token=token,
                               refeed=_sds((batch,), jnp.bool_, mesh, ("batch",)))
            must = small_reads.span(0, small_layers, small_layers) + small_reads.head
            small_model = VLM(small_config, shapes.dtype, unroll_layers=True)
            mfns = drafter_functions(ModelDrafter(small_model), small_model, draft_len, own_params=True)
            programs[f"{d.name}/start"] = (*mfns["start"], (small_params, carry, token, token), must)
            programs[f"{d.name}/step"] = (*mfns["step"], (small_params, carry, token, token), must)
            roles[d.name] = {"start": f"{d.name}/start", "step": f"{d.name}/step", "verify": "verify_tokens"}
            spec = dataclasses.replace(ssd_spec, drafter=ModelDrafter(VLM(small_config, shapes.dtype)))
            if generate:
                programs[f"{d.name}/generate_ssd"] = (*whole(model, spec, small_params), None)
            extra[d.name] = {
                "draft_model": d.small.source,
                "draft_param_bytes_per_device": sum(tpu.shard_bytes(x.shape, x.dtype, x.sharding)
                                                    for x in jax.tree.leaves(small_params)),
                "draft_cache_bytes_per_device": small_reads.cache,
                "draft_bytes_per_device": small_reads.layers + small_reads.head}
        if generate:
            roles[d.name]["generate_ssd"] = f"{d.name}/generate_ssd"

    tree_roles: dict[str, dict[str, str]] = {}  # "NxK" -> {role: program name}
    tree_extra: dict[str, dict[str, Any]] = {}
    for shape in trees or {}:
        label = tree_label(shape)
        tree_spec = DecodeSpec(mode="ssd", capacity=max_new, eos_ids=(), tree=shape)
        # A tree round looks further ahead than a chain (size slots): its own cache size.
        tree_cache_slots = tree_spec.cache_slots(prompt_len)
        t_cache = abstract_cache(num_layers, batch, tree_cache_slots, config, shapes.dtype, mesh)
        t_draft = (abstract_cache(1, batch, tree_cache_slots, config, shapes.dtype, mesh)
                   if config.draft.kind == "layer" else None)
        t_reads = read_bytes(params, config, t_cache, t_draft)
        t_draft_bytes = 0 if t_draft is None else 2 * tpu.shard_bytes(t_draft.keys.shape, t_draft.keys.dtype,
                                                                      t_draft.keys.sharding)
        tfns = tree_functions(piece_model, shape)

        def nodes(n):  # tokens, ids, depths [batch, n]; ancestors [batch, n, size]
            ints = _sds((batch, n), jnp.int32, mesh, ("batch", None))
            return ints, ints, ints, _sds((batch, n, shape.size), jnp.bool_, mesh, ("batch", None, None))

        names = {role: f"tree:{label}/{role}" for role in ("root", "step", "verify", "move")}
        draft_must = t_reads.span(0, exit_layer, num_layers) + t_reads.imitation + t_reads.head
        programs[names["root"]] = (*tfns["step"], (params, t_cache, t_draft, *nodes(1)), draft_must)
        programs[names["step"]] = (*tfns["step"], (params, t_cache, t_draft, *nodes(shape.width)), draft_must)
        tree_states = _sds((batch, shape.size, width), shapes.dtype, mesh, ("batch", None, None))
        programs[names["verify"]] = (*tfns["verify"], (params, t_cache, tree_states, *nodes(shape.size)[2:]),
                                     t_reads.span(exit_layer, num_layers, num_layers) + t_reads.head)
        # The move reads and writes the path's steps + 1 entries of each row, every layer:
        # that fraction of the caches, twice (the compiler's bytes accessed may count more
        # if the scatter is not done in place).
        path = _sds((batch, shape.steps + 1), jnp.int32, mesh, ("batch", None))
        moved = 2 * (shape.steps + 1) / tree_cache_slots * (t_reads.cache + t_draft_bytes)
        programs[names["move"]] = (*tfns["move"], (t_cache, t_draft, path), moved)
        if generate:
            names["generate_ssd"] = f"tree:{label}/generate_ssd"
            programs[names["generate_ssd"]] = (*whole(model, tree_spec), None)
        tree_roles[label] = names
        tree_extra[label] = {"nodes": shape.nodes, "width": shape.width, "steps": shape.steps, "size": shape.size,
                             "cache_slots": tree_cache_slots, "kv_cache_bytes_per_device": t_reads.cache}

    reports, refusals, failed = {}, [], {}
    for name, (fn, donate, args, _) in programs.items():
        try:
            report, refusal = tpu.compile_program(name, jax.jit(fn, donate_argnums=donate), args, mesh, topology)
        except (TypeError, ValueError) as err:
            # A program JAX cannot trace (a bug in the engine or a drafter): say so, compile
            # the others; the run exits 1 (see `run`).
            failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            print(f"error: batch {batch}: {name} could not be traced: {failed[name]}", file=sys.stderr, flush=True)
            continue
        if report is None:
            refusals.append(refusal)
        else:
            reports[name] = report

    pieces = {}
    for name, report in reports.items():
        must_read = programs[name][3]
        pieces[name] = (tpu.report_dict(report, topology) if must_read is None
                        else _must_read_entry(report, must_read, topology))
        if name.endswith("generate_ar") or name.endswith("generate_ssd"):
            pieces[name]["note"] = ("memory is the program's; FLOPs and bytes are the compiler's static "
                                    "cost, each loop body (a round, a layer) counted once")

    hbm = topology.hbm_bytes_per_device
    peak = max((r.memory.peak for r in reports.values()), default=0)
    over = [r for r in reports.values() if not tpu.fits(r.memory.peak, topology)]
    reason = refusals[0] if refusals else (
        f"{max(over, key=lambda r: r.memory.peak).name} needs {tpu.format_bytes(peak)} per device, more than "
        f"the {tpu.format_bytes(hbm)} of HBM of a {topology.device_kind} device" if over else None)
    per_drafter = {}
    for d in drafters:
        own = {role: pieces[name] for role, name in roles[d.name].items() if name in pieces}
        entry = {"kind": d.kind, **extra[d.name], "pieces": own,
                 "per_chip_peak_bytes": max((p["per_chip_peak_bytes"] for p in own.values()), default=0)}
        needed = [name for role, name in roles[d.name].items() if role != "generate_ssd"]
        if all(name in pieces for name in needed) and "ar_step" in pieces:
            acc = acceptance.for_drafter(d.name)
            entry["acceptance"] = dataclasses.asdict(acc)
            entry.update(predict_drafter(d.kind, pieces["ar_step"], own, acc, draft_len))
        per_drafter[d.name] = entry
    tree_entries = {}
    for shape, tree_acc in (trees or {}).items():
        label = tree_label(shape)
        own = {role: pieces[name] for role, name in tree_roles[label].items() if name in pieces}
        entry = {**tree_extra[label], "pieces": own, "acceptance": dataclasses.asdict(tree_acc)}
        if all(role in own for role in ("root", "step", "verify", "move")) and "ar_step" in pieces:
            entry.update(predict_tree(shape, pieces["ar_step"], own, tree_acc))
        tree_entries[label] = entry
    # The AR step and whole programs shared by all drafters stay at the top (with the
    # imitation drafter's pieces: the layout of before drafters).
    top = {name: p for name, p in pieces.items() if "/" not in name and name != "verify_tokens"}
    result = {
        **tpu.topology_summary(topology),
        "batch_size": batch, "draft_len": draft_len, "exit_layer": exit_layer, "prompt_len": prompt_len,
        "max_new_tokens": max_new,
        "kv_cache_bytes_per_device": reads.cache, "ar_kv_cache_bytes_per_device": ar_reads.cache,
        "param_bytes_per_device": sum(tpu.shard_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(params)),
        "per_chip_peak_bytes": peak * topology.devices_per_chip, "fits": not refusals and not over,
        "reason": reason, "pieces": top, "drafters": per_drafter, "trees": tree_entries, "failed": failed,
    }
    first = per_drafter[drafters[0].name]
    for key in ("tokens_per_round", "drafted_per_round", "predicted_speedup", "predicted_speedup_bytes_accessed"):
        if key in first:
            result[key] = first[key]
    return result


def predict_drafter(kind: str, ar: dict, own: dict, acceptance: Acceptance, draft_len: int) -> dict[str, Any]:
    """A drafter's predicted speedup from its pieces' lower-bound times, on two byte counts:

        tokens_per_round * t_AR / (per-round draft cost + t_verify)

    with the draft cost per round of drafted tokens G' (G' = draft_len for a per-position
    acceptance probability):
      imitation: G' * t_draft_step + t_shallow_step (the last draft's shallow pass)
      eagle:     t_catchup (draft_len + 1 pairs, the first draft) + (G' - 1) * t_step
      model:     t_start (2 tokens, the first draft) + (G' - 1) * t_step
    """
    tokens, drafted = acceptance.per_round(draft_len)

    def times(key):
        t = {role: p[key] for role, p in own.items() if role != "generate_ssd"}
        if kind == "imitation":
            draft = drafted * t["draft_step"] + t["shallow_step"]
        elif kind == "eagle":
            draft = t["catchup"] + max(drafted - 1, 0) * t["step"]
        else:
            draft = t["start"] + max(drafted - 1, 0) * t["step"]
        return draft, t["verify"], tokens * ar[key] / (draft + t["verify"])

    draft, verify, speedup = times("time_lower_bound_s")
    return {"tokens_per_round": tokens, "drafted_per_round": drafted, "draft_cost_s": draft, "verify_s": verify,
            "ar_step_s": ar["time_lower_bound_s"], "predicted_speedup": speedup,
            "predicted_speedup_bytes_accessed": times("step_time_lower_bound_s")[2]}


def layer_count_acceptance(speedup: float, draft_len: int, exit_layer: int, num_layers: int) -> float | None:
    """The per-position acceptance a at which a round of the plain layer-count cost model
    reaches `speedup` over AR decoding (None: not reachable at this draft length).

    The model is that of memory-bound batch-1 decoding, where a pass costs in proportion
    to the layers it reads: a draft step (and the last draft's shallow pass) k / L of an AR
    step, the verification (L - k) / L, so a round costs (G + 1) k / L + (L - k) / L AR
    steps and emits 1 + a + ... + a^G tokens. It turns a published speedup (the paper's
    1.55-1.85x) into the acceptance it implies for this exit layer and draft length; the
    compiled pieces then say what that acceptance gives on the slice.
    """
    cost = ((draft_len + 1) * exit_layer + (num_layers - exit_layer)) / num_layers
    needed = speedup * cost

    def tokens(a):
        return sum(a**j for j in range(draft_len + 1))

    if needed > draft_len + 1:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):  # bisection: tokens(a) increases with a
        mid = (low + high) / 2
        low, high = (mid, high) if tokens(mid) < needed else (low, mid)
    return (low + high) / 2


def paper_implied(point: dict, speedups: list[float], num_layers: int) -> list[dict[str, Any]]:
    """For each published speedup: the acceptance it implies (layer_count_acceptance) and
    the imitation drafter's prediction from the compiled pieces at that acceptance."""
    imitation = point["drafters"].get("imitation")
    if imitation is None or "predicted_speedup" not in imitation or "ar_step" not in point["pieces"]:
        return []
    entries = []
    for speedup in speedups:
        rate = layer_count_acceptance(speedup, point["draft_len"], point["exit_layer"], num_layers)
        if rate is None:
            entries.append({"paper_speedup": speedup, "per_position_acceptance": None})
            continue
        acc = Acceptance(rate, None, f"implied by {speedup}x under the layer-count model")
        predicted = predict_drafter("imitation", point["pieces"]["ar_step"], imitation["pieces"], acc,
                                    point["draft_len"])
        entries.append({"paper_speedup": speedup, "per_position_acceptance": rate,
                        "tokens_per_round": predicted["tokens_per_round"],
                        "predicted_speedup": predicted["predicted_speedup"],
                        "predicted_speedup_bytes_accessed": predicted["predicted_speedup_bytes_accessed"]})
    return entries


def predict_tree(shape: TreeShape, ar: dict, own: dict, acceptance: TreeAcceptance) -> dict[str, Any]:
    """A draft tree's predicted speedup from its pieces' lower-bound times, on two byte counts:

        tokens_per_round * t_AR / (t_root + steps * t_step + t_verify + t_move)
    """
    tokens = acceptance.tokens_per_round

    def times(key):
        draft = own["root"][key] + shape.steps * own["step"][key]
        return draft, tokens * ar[key] / (draft + own["verify"][key] + own["move"][key])

    draft, speedup = times("time_lower_bound_s")
    return {"tokens_per_round": tokens, "drafted_per_round": shape.nodes, "draft_cost_s": draft,
            "verify_s": own["verify"]["time_lower_bound_s"], "move_s": own["move"]["time_lower_bound_s"],
            "ar_step_s": ar["time_lower_bound_s"], "predicted_speedup": speedup,
            "predicted_speedup_bytes_accessed": times("step_time_lower_bound_s")[1]}


def run(args) -> int:
    """The CLI's compile-only branch (decode/bench/cli.py): 0 if every point fits, 1 if one
    does not or cannot be traced (with a one-line reason), 2 for bad input."""
    try:
        topology = tpu.get_topology(args.compile_only)
        mesh_config = sharding.parse_mesh(args.mesh) if args.mesh else sharding.MeshConfig(data=1, tensor=-1)
        mesh = sharding.make_mesh(mesh_config, topology.devices)
        acceptance = parse_acceptances(args.acceptance)
        shapes = load_shapes(args.ckpt, args.dtype)
        if args.exit_layer:
            shapes = dataclasses.replace(shapes, config=shapes.config.with_draft(exit_layer=args.exit_layer[0]))
        drafters = tuple(parse_drafter(name, shapes) for name in args.drafter)
        shape_list = parse_trees(args.tree_nodes, args.tree_width, list(args.drafter))
        trees = {shape: parse_tree_acceptance(args.acceptance, shape, acceptance.for_drafter("imitation"))
                 for shape in shape_list}
        notes = []
        if any(d.kind == "eagle" for d in drafters):
            shapes, added = with_eagle_head(shapes)
            if added:
                notes.append(f"{shapes.source} has no EAGLE head: compiled with a fresh one (one layer, FFN "
                             f"{shapes.config.draft.eagle_hidden_size or shapes.config.text.intermediate_size})")
                print(f"note: {notes[-1]}", flush=True)
        runs = []
        for batch in args.batch_size:
            for draft_len in args.draft_len:
                # Trees do not depend on the chain's draft length: compiled once per batch.
                point = compile_point(shapes, topology, mesh, batch, draft_len, args.max_new_tokens,
                                      acceptance, drafters, generate=not args.no_generate,
                                      trees=trees if draft_len == args.draft_len[0] else None)
                point["paper_implied"] = paper_implied(point, args.paper_speedup, shapes.config.text.num_layers)
                runs.append(point)
                for line in point_lines(point, topology):
                    print(line, flush=True)
    except (tpu.TopologyError, tpu.LibtpuMissingError, CompileOnlyError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {
        **tpu.topology_summary(topology), "model": shapes.source, "dtype": shapes.dtype.name,
        "mesh": dict(mesh.shape), "hbm_bytes_per_device": topology.hbm_bytes_per_device,
        "acceptance": (dataclasses.asdict(acceptance.default) if acceptance.default is not None
                       else {name: dataclasses.asdict(a) for name, a in acceptance.by_drafter.items()}),
        "drafter_names": [d.name for d in drafters], "notes": notes,
        "tree_acceptance": {tree_label(shape): dataclasses.asdict(acc) for shape, acc in trees.items()},
        "time_basis": "predicted_speedup: max(FLOPs/peak, must-read bytes/bandwidth) per piece; "
                      "predicted_speedup_bytes_accessed: the same with the compiler's bytes accessed; "
                      "compiler-model predictions, not measurements",
        "per_chip_peak_bytes": max(r["per_chip_peak_bytes"] for r in runs),
        "fits": all(r["fits"] for r in runs),
        "batch_size": runs[0]["batch_size"], "predicted_speedup": runs[0].get("predicted_speedup"),
        "argv": list(args.argv) if getattr(args, "argv", None) is not None else sys.argv[1:],
        "runs": runs,
    }
    bad = next((r for r in runs if not r["fits"]), None)
    broken = next((r for r in runs if r["failed"]), None)
    failure = None
    if bad is not None:
        failure = f"batch {bad['batch_size']} does not fit on {topology.name}: {bad['reason']}"
    elif broken is not None:
        name, message = next(iter(broken["failed"].items()))
        failure = f"batch {broken['batch_size']}: {name} could not be traced: {message}"
    return tpu.write_report(report, args.json, failure)


def point_lines(point: dict, topology: tpu.Topology) -> list[str]:
    lines = [f"batch {point['batch_size']} draft_len {point['draft_len']} exit {point['exit_layer']} on "
             f"{topology.name}: KV cache {tpu.format_bytes(point['kv_cache_bytes_per_device'])} and params "
             f"{tpu.format_bytes(point['param_bytes_per_device'])} per device"]
    for name, piece in point["pieces"].items():
        lines += tpu.program_lines(name, piece, topology.hbm_bytes_per_device)
        if "time_lower_bound_s" in piece:
            lines.append(f"  must read {tpu.format_bytes(piece['must_read_bytes_per_device'])} per device: "
                         f">= {1000 * piece['time_lower_bound_s']:.3f} ms")
    printed = {id(piece) for piece in point["pieces"].values()}  # the imitation drafter's are there
    for name, drafter in point["drafters"].items():
        for role, piece in drafter["pieces"].items():
            if id(piece) in printed:
                continue
            printed.add(id(piece))  # verify_tokens is shared by the eagle and model drafters
            lines += tpu.program_lines("verify_tokens" if role == "verify" else f"{name}/{role}", piece,
                                       topology.hbm_bytes_per_device)
            if "time_lower_bound_s" in piece:
                lines.append(f"  must read {tpu.format_bytes(piece['must_read_bytes_per_device'])} per device: "
                             f">= {1000 * piece['time_lower_bound_s']:.3f} ms")
    for name, drafter in point["drafters"].items():
        if "predicted_speedup" in drafter:
            lines.append(f"  {name}: predicted SSD/AR speedup {drafter['predicted_speedup']:.2f}x "
                         f"({drafter['tokens_per_round']:.2f} tokens per round, draft {1000 * drafter['draft_cost_s']:.3f} "
                         f"ms + verify {1000 * drafter['verify_s']:.3f} ms per round vs AR step "
                         f"{1000 * drafter['ar_step_s']:.3f} ms; "
                         f"{drafter['predicted_speedup_bytes_accessed']:.2f}x on the compiler's bytes accessed)")
    for label, tree in point.get("trees", {}).items():
        for role, piece in tree["pieces"].items():
            lines += tpu.program_lines(f"tree {label}/{role}", piece, topology.hbm_bytes_per_device)
            if "time_lower_bound_s" in piece:
                lines.append(f"  must read {tpu.format_bytes(piece['must_read_bytes_per_device'])} per device: "
                             f">= {1000 * piece['time_lower_bound_s']:.3f} ms")
    for label, tree in point.get("trees", {}).items():
        if "predicted_speedup" in tree:
            t = {role: 1000 * tree["pieces"][role]["time_lower_bound_s"] for role in ("root", "step", "verify", "move")}
            lines.append(f"  tree {label}: predicted SSD/AR speedup {tree['predicted_speedup']:.2f}x "
                         f"({tree['tokens_per_round']:.2f} tokens per round, root {t['root']:.3f} + {tree['steps']} x "
                         f"step {t['step']:.3f} + verify {t['verify']:.3f} + move {t['move']:.3f} ms per round vs "
                         f"AR step {1000 * tree['ar_step_s']:.3f} ms; "
                         f"{tree['predicted_speedup_bytes_accessed']:.2f}x on the compiler's bytes accessed)")
    for entry in point.get("paper_implied", []):
        if entry["per_position_acceptance"] is None:
            lines.append(f"  paper's {entry['paper_speedup']}x: not reachable at draft length {point['draft_len']} "
                         "under the layer-count model")
            continue
        lines.append(f"  paper's {entry['paper_speedup']}x implies acceptance {entry['per_position_acceptance']:.3f} "
                     f"(layer-count model): predicted {entry['predicted_speedup']:.2f}x here "
                     f"({entry['tokens_per_round']:.2f} tokens per round)")
    lines.append(f"  per-chip peak {tpu.format_bytes(point['per_chip_peak_bytes'])}: "
                 + ("fits" if point["fits"] else f"does not fit: {point['reason']}"))
    return lines
