"""Prompt ids per model family: what the model's Hugging Face processor would build.

- 'llava' (LLaVA-1.5): "USER: <image>*N\\n{question} ASSISTANT:" with the tokenizer's special
  tokens (BOS first for llava-hf) (`fastvlm_jax.tokenizer.build_llava_input_ids`, as
  LlavaProcessor + the llava-1.5 template).
- 'blip-2' (BLIP-2 OPT): N image tokens, then the question text as typed with the tokenizer's
  special tokens (BOS for OPT), exactly as Blip2Processor lays them out (image tokens before
  BOS, no chat template). An empty question is plain captioning (what HF BLIP-2 does with no
  text); VQA prompts look like "Question: what is on the table? Answer:".

N is the config's `num_image_tokens` (LLaVA: image patches; BLIP-2: Q-Former queries).
"""

from __future__ import annotations

from typing import Any

from fastvlm_jax.tokenizer import Tokenizer, build_llava_input_ids, image_prompt_token

MODEL_TYPES = ("llava", "blip-2")

# The question asked when the user gives none: LLaVA answers a question (the training recipe's
# default one); BLIP-2 captions from the image alone.
DEFAULT_QUESTIONS = {"llava": "Describe the image.", "blip-2": ""}


def _check_model_type(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"no prompt format for model type {model_type!r}; known: {', '.join(MODEL_TYPES)}")


def default_question(model_type: str) -> str:
    _check_model_type(model_type)
    return DEFAULT_QUESTIONS[model_type]


def prompt_ids_for(model_type: str, tokenizer: Tokenizer, question: str,
                   num_image_tokens: int) -> list[int]:
    """Prompt ids for one image and `question` in `model_type`'s layout (module docstring)."""
    _check_model_type(model_type)
    if model_type == "llava":
        return build_llava_input_ids(tokenizer, question, num_image_tokens)
    image_prompt_token(tokenizer, question, num_image_tokens)
    return [tokenizer.image_token_id] * num_image_tokens + tokenizer.encode(question)


def build_prompt_ids(config: Any, tokenizer: Tokenizer, question: str) -> list[int]:
    """Prompt ids for one image and `question`, in the layout of `config.model_type`."""
    return prompt_ids_for(config.model_type, tokenizer, question, config.num_image_tokens)


def answer_ids(model_type: str, tokenizer: Tokenizer, question: str, answer: str) -> list[int]:
    """The ids of `answer` following the prompt for `question` (no EOS), for training targets.

    LLaVA: the sentencepiece "▁" prefix separates it from "ASSISTANT:". BLIP-2: byte-level BPE
    marks word starts with a space, so an answer after a question ("... Answer: a cat") is
    encoded with a leading space, and a caption right after BOS (empty question) without one.
    """
    _check_model_type(model_type)
    text = answer.strip()
    if model_type == "blip-2" and question:
        text = " " + text
    return tokenizer.encode(text, add_special_tokens=False)


def stop_ids(config: Any, tokenizer: Tokenizer) -> tuple[int, ...]:
    """Token ids that end a generation.

    LLaVA: the tokenizer's EOS. BLIP-2 OPT: the tokenizer's EOS ("</s>") and the language
    model's configured eos_token_id, which the released checkpoints set to "\\n" (50118): HF's
    `generate` stops there, and captions end with it.
    """
    ids = [tokenizer.eos_id]
    if config.model_type == "blip-2":
        ids.append(config.text.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


__all__ = ["DEFAULT_QUESTIONS", "MODEL_TYPES", "answer_ids", "build_prompt_ids", "default_question",
           "prompt_ids_for", "stop_ids"]
