"""How often a separate draft model's greedy next token equals its target's, on held-out captions.

    python -m train.recipes.draft_agreement --target demo --draft DIR [--data-dir TFDS_DIR] [--examples 256]

Greedy speculative decoding accepts a drafted token exactly when it is the target's
argmax, so this top-1 agreement is the per-token acceptance rate of a one-token draft
(longer drafts accept about agreement^k for k tokens). Two contexts, both teacher-forced
on one full forward pass of each model (same prompt, same image):

  reference: the held-out reference caption (the training answer style), as in
             train.step's `draft_agreement` metric;
  target_greedy: the target's own greedy caption, which is the text a drafter sees while
             speculative decoding runs (positions up to and including the target's EOS).

Each also reports `target_self_draft_agreement`: the same number for the target's own
self-speculative draft path (exit layer + imitation network), for comparison.

Both models must share the tokenizer (checked: same pieces) and image preprocessing
(the draft's pixels are the target's).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from configs import demo as demo_config
from decode.engine import DecodeSpec, Prompts, generate
from fastvlm_jax.ckpt.checkpoint import load_checkpoint
from fastvlm_jax.demo import demo_draft_checkpoint
from fastvlm_jax.image.processing import rescale_and_normalize
from fastvlm_jax.nn.families import stop_ids
from fastvlm_jax.nn.model import VLM
from train.input import CaptionExample, collate
from train.recipes.make_draft_model import resolve_source

# The demo's examples, as its training stages see them: data set, question, answer style
# (caption_index) and sequence length.
_DEMO = demo_config.get_config("base")
DATASET = _DEMO.data.name
QUESTION = _DEMO.data.question
CAPTION_INDEX = _DEMO.data.caption_index
SEQ_LEN = _DEMO.seq_len


def load_pair(target: str, draft: str):
    """(target Checkpoint, draft Checkpoint), float32; ValueError if their vocabularies differ."""

    def path(name):  # `demo`, `demo-draft` or a folder
        return demo_draft_checkpoint() if name == "demo-draft" else resolve_source(name)

    target_ckpt = load_checkpoint(path(target), dtype=jnp.float32)
    draft_ckpt = load_checkpoint(path(draft), dtype=jnp.float32)
    if vocabulary(target_ckpt.tokenizer) != vocabulary(draft_ckpt.tokenizer):
        raise ValueError(f"{draft} and {target} tokenize differently: a draft model must share its target's tokenizer")
    return target_ckpt, draft_ckpt


def vocabulary(tokenizer) -> list[str]:
    """Every id's piece, in id order (how two tokenizers are compared)."""
    return [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]


def load_examples(ckpt, data_dir: str | None, split: str, count: int) -> dict[str, np.ndarray]:
    """The first `count` records of `split` as the demo's training examples (stacked):
    input_ids / targets [count, SEQ_LEN], loss_mask [count, SEQ_LEN], pixels [count, H, W, 3]."""
    # Here, not at the top: tensorflow_datasets takes about a second to import (--help needs none).
    from fastvlm_jax.data.tfds_builders import open_split

    source = open_split(DATASET, split, data_dir, decode=False)
    transform = CaptionExample(
        ckpt.tokenizer,
        ckpt.image_config,
        QUESTION,
        ckpt.config.num_image_tokens,
        SEQ_LEN,
        CAPTION_INDEX,
        ckpt.config.model_type,
    )
    rng = np.random.default_rng(0)  # unused with a fixed caption_index, but the transform draws
    examples = collate([transform.random_map(source[i], rng) for i in range(min(count, len(source)))])
    # The transform's pixels are uint8 (training normalises them on device): the model's input here.
    examples["pixels"] = rescale_and_normalize(examples["pixels"], ckpt.image_config)
    return examples


def greedy(model, params, ids: np.ndarray, pixels: np.ndarray, batch: int) -> np.ndarray:
    """Teacher-forced argmax ids of `model` at every position: [n, seq] int32."""
    forward = jax.jit(lambda p, i, x: jnp.argmax(model.forward(p, i, x), axis=-1))
    return np.concatenate(
        [
            np.asarray(forward(params, jnp.asarray(ids[s : s + batch]), jnp.asarray(pixels[s : s + batch])))
            for s in range(0, len(ids), batch)
        ]
    )


def self_draft_greedy(model, params, ids: np.ndarray, pixels: np.ndarray, batch: int) -> np.ndarray:
    """Teacher-forced argmax ids of the target's own draft path (layers [0, exit_layer), the
    imitation network, the shared head), the drafter a separate model competes with: [n, seq]."""
    exit_layer = model.config.draft.exit_layer

    def draft_argmax(p, i, x):
        positions = jnp.broadcast_to(jnp.arange(i.shape[1]), i.shape)
        hidden = model.embed(p, i, model.encode_images(p, x), positions)
        hidden, _, _ = model.run_layers(p, hidden, positions, 0, exit_layer, image_span=model.image_span(i, x))
        hidden, _ = model.imitate(p, hidden, positions)
        return jnp.argmax(model.logits(p, hidden), axis=-1)

    forward = jax.jit(draft_argmax)
    return np.concatenate(
        [
            np.asarray(forward(params, jnp.asarray(ids[s : s + batch]), jnp.asarray(pixels[s : s + batch])))
            for s in range(0, len(ids), batch)
        ]
    )


def target_greedy_examples(
    model, params, tokenizer, examples: dict[str, np.ndarray], prompt_len: int, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """The target's greedy captions after each prompt: (input_ids [n, SEQ_LEN], mask [n, SEQ_LEN]),
    mask 1 where the next token is one of the target's generated tokens (its EOS included)."""
    capacity = SEQ_LEN - prompt_len
    spec = DecodeSpec("ar", capacity=capacity, eos_ids=tuple(stop_ids(model.config, tokenizer)))
    ids = np.full_like(examples["input_ids"], tokenizer.pad_id)
    mask = np.zeros(examples["input_ids"].shape, np.float32)
    for s in range(0, len(ids), batch):
        prompt = examples["input_ids"][s : s + batch, :prompt_len]
        out = generate(
            model,
            params,
            Prompts(
                jnp.asarray(prompt),
                jnp.full((len(prompt),), prompt_len, jnp.int32),
                jnp.asarray(examples["pixels"][s : s + batch]),
            ),
            spec,
            capacity,
        )
        tokens, counts = np.asarray(out.tokens), np.asarray(out.num_tokens)
        for row in range(len(prompt)):
            n = int(counts[row])
            ids[s + row, :prompt_len] = prompt[row]
            ids[s + row, prompt_len : prompt_len + n] = tokens[row, :n]
            mask[s + row, prompt_len - 1 : prompt_len - 1 + n] = 1.0
    return ids, mask


def agreement(
    target: str, draft: str, data_dir: str | None = None, split: str = "validation", count: int = 256, batch: int = 64
) -> dict[str, Any]:
    """Top-1 agreement of `draft` with `target` (and both models' accuracy on the references)."""
    target_ckpt, draft_ckpt = load_pair(target, draft)
    examples = load_examples(target_ckpt, data_dir, split, count)
    target_model, draft_model = VLM(target_ckpt.config), VLM(draft_ckpt.config)
    prompt_len = int(examples["prompt_len"][0])
    result: dict[str, Any] = {"split": split, "examples": len(examples["input_ids"])}

    mask = examples["loss_mask"] > 0
    t = greedy(target_model, target_ckpt.params, examples["input_ids"], examples["pixels"], batch)
    d = greedy(draft_model, draft_ckpt.params, examples["input_ids"], examples["pixels"], batch)
    own = self_draft_greedy(target_model, target_ckpt.params, examples["input_ids"], examples["pixels"], batch)
    result["reference"] = {
        "positions": int(mask.sum()),
        "agreement": float((t == d)[mask].mean()),
        "target_self_draft_agreement": float((t == own)[mask].mean()),
        "target_acc": float((t == examples["targets"])[mask].mean()),
        "draft_acc": float((d == examples["targets"])[mask].mean()),
    }

    ids, gen_mask = target_greedy_examples(
        target_model, target_ckpt.params, target_ckpt.tokenizer, examples, prompt_len, batch
    )
    gen_mask = gen_mask > 0
    t = greedy(target_model, target_ckpt.params, ids, examples["pixels"], batch)
    d = greedy(draft_model, draft_ckpt.params, ids, examples["pixels"], batch)
    own = self_draft_greedy(target_model, target_ckpt.params, ids, examples["pixels"], batch)
    result["target_greedy"] = {
        "positions": int(gen_mask.sum()),
        "agreement": float((t == d)[gen_mask].mean()),
        "target_self_draft_agreement": float((t == own)[gen_mask].mean()),
    }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.recipes.draft_agreement", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--target", default="demo", help="target checkpoint folder (or `demo`)")
    parser.add_argument("--draft", required=True, help="draft model checkpoint folder (or `demo-draft`)")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir holding synthetic_captions/default")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        result = agreement(args.target, args.draft, args.data_dir, args.split, args.examples, args.batch)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
