"""The decoding engine, apart from the CLIs (decode.run, decode.bench, decode.eval).

loop.py       generate / prefill / decode_round: the jitted while loop over rounds,
              DecodeSpec, DraftPolicy, Prompts, DecodeOutput
steps.py      the pure functions a round is made of (AR step, shallow pass, draft
              step, verification, tree step, path move): what the loop runs, what
              decode.bench's cost model times and what --compile-only compiles
drafters.py   what proposes the drafts (imitation, EAGLE head, a small VLM)
tree.py       token trees in fixed shapes
sampling.py   warping, sampling and the acceptance rules
autodraft.py  choosing the draft length / tree per batch from measured acceptance
captioner.py  batched captioning on top of generate (used by decode.run)
"""

from decode.engine.loop import (
    DecodeOutput,
    DecodeSpec,
    DraftPolicy,
    Prompts,
    RoundStats,
    check_inputs,
    compiled_programs,
    decode_round,
    generate,
    prefill,
)

__all__ = [
    "DecodeOutput",
    "DecodeSpec",
    "DraftPolicy",
    "Prompts",
    "RoundStats",
    "check_inputs",
    "compiled_programs",
    "decode_round",
    "generate",
    "prefill",
]
