"""`decode.bench --compile-only TOPOLOGY`: the decoding programs compiled for a TPU slice,
and the SSD speedup their compiled costs predict. Nothing runs; no weights are needed.

    python -m decode.bench --ckpt shapes:llava15_7b --compile-only v5e:2x2 [--mesh data=1,tensor=4] \
        --batch-size 1 8 [--draft-len 5] [--acceptance 0.6|STATS.json] --json OUT.json

Per batch size and draft length it compiles the pieces of a decoding round: the engine's
own functions (decode/engine/steps.py, and each drafter's calls), as the engine runs them,
layer scans included: the AR step (one token through layers [0, L) + head), the draft
step (layers [0, k) + imitation network + head), the shallow pass alone (layers [0, k)),
the verification pass (draft_len + 1 exit-layer states through [k, L) + head), and both
whole generate programs (prefill + while loop), whose peak memory holds the params, the
KV cache and the loop state. Params and caches are sharded by the library's logical-axis
rules over `--mesh` (default: tensor parallel over every device).

Counting loop bodies. XLA's cost analysis counts a while loop's body once, whatever its
trip count, so a piece whose layers run as one `lax.scan` reports one layer's FLOPs for
the whole range. Each piece with a layer scan is therefore compiled twice: as the engine
runs it (scanned: its memory, fits, collectives and while loops are reported from this
program, and its own static FLOPs and bytes are kept under `scanned_program`), and as its
unrolled twin, the same function on a model with `unroll_layers=True` (the same
arithmetic on the same shapes, as straight-line code), whose FLOPs, bytes and
transcendentals are the piece's `flops_per_device` / `bytes_per_device` and feed the time
bounds. The piece's JSON says which in `cost_counting`: "unrolled_twin", "straight_line"
(no layer scan: the EAGLE head's calls, the tree's path move) or, for the whole generate
programs, "static_loop_bodies_once" (their figures are for memory). `collectives` and
`while_loops` are read from the scanned program's HLO text, where a loop body's
collectives appear once (LLaVA-1.5-7B's AR step: 5 all-reduces in the text, 2 per layer
in the body, for the 67 of the unrolled program). Compiling one layer
and multiplying was tried and rejected: a one-layer program's bytes carry ~2.8x a layer's
marginal bytes of fixed per-program traffic (random:tiny on v5e:2x2: 4.39 MB for one
layer, 9.04 MB for four), so n times it overcounts; its FLOPs did match.

`--batching continuous` adds continuous batching's three programs over --batch-size slots
(slot_programs.py: the prefill of a quarter of the slots' prompts, the in-place insert and
the rounds' while loop, decode/engine/slots.py), for their memory and fit.

The package: programs.py (what to compile: model shapes, one builder per drafter kind,
the layer bodies, compiling), slot_programs.py, predict.py (acceptance profiles and the speedups the piece
times predict), report.py (one point's JSON, the printed lines, the CLI branch `run`),
explain.py (where a compiled program's bytes go).

Where the bytes go. Every piece's JSON has `bytes_accessed_per_device` (the compiler's),
`must_read_bytes_per_device` and `bytes_accessed_to_must_read`. `--explain [N]` adds
`explain`: the N biggest groups of HLO ops of the counted program (kind, instruction
name, named scope: the engine's pieces run under jax.named_scope, attention under
attend / kv_write), each with its bytes as the cost analysis counts them and in HBM only
(arrays outside on-chip memory S(n), an async copy or slice once), the HBM estimate
against must-read, and for a piece with one layer scan `engine_program`: the same for
the scanned program the engine runs, its loop body counted once per layer. The cost
analysis counts a weight staged into VMEM several times (explain.matmul_probe: one
matmul x[8, 4096] @ W[4096, 2752] on v5e reports 5.0x W's bytes, its HBM estimate 1.0x).

Step times are roofline lower bounds on one chip: max(FLOPs / peak FLOP/s, bytes / HBM
bandwidth). Two byte counts are reported: the compiler's `bytes accessed` (every op's
operands and results, which overcounts what HBM must deliver; BENCHMARKS.md shows both) and
the bytes a step must read at least (its layers' weight shards and KV cache shards, the
LM head, the imitation network), from the shapes. The prediction uses the latter:

    speedup = tokens_per_round * t_AR / (drafted_per_round * t_draft + t_shallow + t_verify)

with tokens and drafts per round from `--acceptance`: a per-position acceptance
probability a (independent positions: tokens = 1 + a + ... + a^G, drafted = G), or a
decode.run --stats / decode.bench JSON measured elsewhere (its mean_accepted_length and
acceptance_rate; per drafter from a decode.bench --drafter JSON of several drafters).
Every such number is a compiler-model prediction, not a measurement.

Images: every program that takes them gets `batch` rows of abstract images
(programs.abstract_images): pixels [batch, size, size, 3] for a vision tower with a fixed image
size, else (Qwen2.5-VL) PatchImages (patches [batch, N * merge^2, patch_dim] float32, grid
[batch, 3] int32), every row padded to the patch bucket of `--image-tokens N` image tokens
(default the most one image may become); the prompt is the image's tokens + 13 text tokens.
`--prefill` adds two pieces: the vision tower alone (`encode_images`) and the engine's prefill
(`prefill`: vision tower, every layer, the drafter's prefill), both compute-bound.

`--quantize int8` compiles the model with int8 decoding weights (fastvlm_jax.nn.quant): the
params' shapes and dtypes, and so the must-read bytes, are the int8 model's.

`--paper-speedup 1.55 1.85` (the default) adds, per point, the acceptance a published
speedup implies under the plain layer-count cost model (layer_count_acceptance) and what
the compiled pieces predict at that acceptance.

`--drafter imitation eagle eagle:pool=N model:SPEC` compares drafters (decode/engine/drafters.py;
each kind's programs come from its builder in programs.DRAFTER_PROGRAMS);
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
as the engine's tree rounds run them (decode/engine/steps.py tree_step, verify, move_path),
with the tree attention mask: the root pass (one node through [0, k) + imitation network + head), one drafting
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

from decode.bench.compile_only.predict import (
    Acceptance,
    Acceptances,
    TreeAcceptance,
    layer_count_acceptance,
    parse_acceptance,
    parse_acceptances,
    parse_tree_acceptance,
    parse_trees,
)
from decode.bench.compile_only.programs import CompileOnlyError, ModelShapes, load_shapes
from decode.bench.compile_only.report import compile_point, run

__all__ = [
    "Acceptance",
    "Acceptances",
    "CompileOnlyError",
    "ModelShapes",
    "TreeAcceptance",
    "compile_point",
    "layer_count_acceptance",
    "load_shapes",
    "parse_acceptance",
    "parse_acceptances",
    "parse_tree_acceptance",
    "parse_trees",
    "run",
]
