"""Refine stage input: the full model writes its own captions (greedy), on device.

Imitation learning in the DAgger sense: the draft is trained on the sequences that
verification will actually see at decode time (the full model's own greedy outputs),
not on human captions. The prompt and image of each example are kept; everything after
the prompt is replaced by the generated tokens (up to and including EOS).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from decode.engine import DecodeSpec, Prompts, generate
from fastvlm_jax.model import VLM
from train import params as param_lib
from train.step import Batch, Shardings

Array = jax.Array


def compose_sequences(input_ids: Array, prompt_len: Array, generated: Array, num_generated: Array,
                      pad_id: int) -> dict[str, Array]:
    """Prompt + generated tokens -> input_ids, targets, loss_mask of the same length.

    input_ids: [batch, seq]; prompt_len: [batch]; generated: [batch, capacity] (-1 padded);
    num_generated: [batch]. Tokens that do not fit in seq are dropped.
    """
    seq = input_ids.shape[1]
    capacity = generated.shape[1]
    t = jnp.arange(seq)[None, :]
    rel = t - prompt_len[:, None]
    from_gen = (rel >= 0) & (rel < num_generated[:, None])
    gen_tok = jnp.take_along_axis(generated, jnp.clip(rel, 0, capacity - 1), axis=1)
    ids = jnp.where(t < prompt_len[:, None], input_ids, jnp.where(from_gen, gen_tok, pad_id))
    ids = ids.astype(jnp.int32)
    pad_col = jnp.full((ids.shape[0], 1), pad_id, jnp.int32)
    targets = jnp.concatenate([ids[:, 1:], pad_col], axis=1)
    # Position t is trained iff its target (token t + 1) was generated.
    mask = jnp.concatenate([from_gen[:, 1:], jnp.zeros_like(from_gen[:, :1])], axis=1)
    return {"input_ids": ids, "targets": targets, "loss_mask": mask.astype(jnp.float32)}


def refine_program(model: VLM, shardings: Shardings, prompt_bucket: int, max_new_tokens: int,
                   eos_ids: tuple[int, ...], pad_id: int):
    """The jitted `(trainable, frozen, batch) -> batch` of make_refine_fn, to trace inside
    `jax.set_mesh(mesh)` (train.compile_only lowers it for a TPU topology)."""
    spec = DecodeSpec(mode="ar", capacity=max_new_tokens, eos_ids=tuple(eos_ids))

    def refine(trainable, frozen, batch):
        params = param_lib.merge(trainable, frozen)
        prompts = Prompts(input_ids=batch["input_ids"][:, :prompt_bucket],
                          lengths=batch["prompt_len"], pixels=batch["pixels"])
        out = generate(model, params, prompts, spec, max_new_tokens, jax.random.key(0))
        new = compose_sequences(batch["input_ids"], batch["prompt_len"], out.tokens, out.num_tokens,
                                pad_id)
        return dict(batch, **new)

    return jax.jit(refine, in_shardings=(shardings.state.params, shardings.frozen, shardings.batch),
                   out_shardings=shardings.batch)


def make_refine_fn(model: VLM, shardings: Shardings, mesh, prompt_bucket: int, max_new_tokens: int,
                   eos_ids: tuple[int, ...], pad_id: int) -> Callable[[object, object, Batch], Batch]:
    """`fn(trainable, frozen, batch) -> batch` with captions replaced by greedy generations.

    prompt_bucket: static prompt width (every prompt fits in it).
    eos_ids: the tokens that end a generation (fastvlm_jax.prompts.stop_ids: BLIP-2 OPT
      also stops at its configured "\n").
    """
    fn = refine_program(model, shardings, prompt_bucket, max_new_tokens, eos_ids, pad_id)

    def call(trainable, frozen, batch):
        with jax.set_mesh(mesh):
            return fn(trainable, frozen, batch)

    return call
