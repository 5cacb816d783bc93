"""How each model family lays out a one-image prompt: what its Hugging Face processor builds.

- LLaVA-1.5: "USER: <image>*N\\n{question} ASSISTANT:" with the tokenizer's special tokens
  (BOS first for llava-hf) (`fastvlm_jax.tokenizer.build_llava_input_ids`, as LlavaProcessor
  + the llava-1.5 template).
- BLIP-2 OPT: N image tokens, then the question text as typed with the tokenizer's special
  tokens (BOS for OPT), exactly as Blip2Processor lays them out (image tokens before BOS, no
  chat template). An empty question is plain captioning (what HF BLIP-2 does with no text);
  VQA prompts look like "Question: what is on the table? Answer:".

N is the config's `num_image_tokens` (LLaVA: image patches; BLIP-2: Q-Former queries). The
family registry (`fastvlm_jax.families`) holds one layout per family.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastvlm_jax.tokenizer import Tokenizer, build_llava_input_ids, image_prompt_token


@dataclasses.dataclass(frozen=True)
class PromptLayout:
    """One family's prompt layout.

    default_question: what is asked when the user gives no question.
    """

    default_question: str

    def prompt_ids(self, tokenizer: Tokenizer, question: str, num_image_tokens: int) -> list[int]:
        """Prompt ids for one image and `question`."""
        raise NotImplementedError

    def answer_ids(self, tokenizer: Tokenizer, question: str, answer: str) -> list[int]:
        """The ids of `answer` following the prompt for `question` (no EOS), for training targets."""
        raise NotImplementedError

    def stop_ids(self, tokenizer: Tokenizer, config: Any) -> tuple[int, ...]:
        """Token ids that end a generation: the tokenizer's EOS."""
        return (int(tokenizer.eos_id),)


@dataclasses.dataclass(frozen=True)
class LlavaPrompts(PromptLayout):
    # The training recipe's default question.
    default_question: str = "Describe the image."

    def prompt_ids(self, tokenizer, question, num_image_tokens):
        return build_llava_input_ids(tokenizer, question, num_image_tokens)

    def answer_ids(self, tokenizer, question, answer):
        # Sentencepiece's "▁" prefix separates the answer from "ASSISTANT:".
        return tokenizer.encode(answer.strip(), add_special_tokens=False)


@dataclasses.dataclass(frozen=True)
class Blip2Prompts(PromptLayout):
    # BLIP-2 captions from the image alone.
    default_question: str = ""

    def prompt_ids(self, tokenizer, question, num_image_tokens):
        image_prompt_token(tokenizer, question, num_image_tokens)
        return [tokenizer.image_token_id] * num_image_tokens + tokenizer.encode(question)

    def answer_ids(self, tokenizer, question, answer):
        # Byte-level BPE marks word starts with a space: an answer after a question
        # ("... Answer: a cat") starts with one, a caption right after BOS does not.
        text = answer.strip()
        return tokenizer.encode(" " + text if question else text, add_special_tokens=False)

    def stop_ids(self, tokenizer, config):
        # The released OPT checkpoints set eos_token_id to "\n" (50118): HF's `generate`
        # stops there, and captions end with it; "</s>" ends them too.
        return tuple(dict.fromkeys((int(tokenizer.eos_id), int(config.text.eos_token_id))))
