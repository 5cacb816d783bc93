"""Prompt building, in one place: how each model family lays out a one-image prompt (what
its Hugging Face processor builds), and the LLaVA prompt helpers.

- LLaVA-1.5: "USER: <image>*N\\n{question} ASSISTANT:" with the tokenizer's special tokens
  (BOS first for llava-hf) (`fastvlm_jax.text.prompts.build_llava_input_ids`, as LlavaProcessor
  + the llava-1.5 template).
- BLIP-2 OPT: N image tokens, then the question text as typed with the tokenizer's special
  tokens (BOS for OPT), exactly as Blip2Processor lays them out (image tokens before BOS, no
  chat template). An empty question is plain captioning (what HF BLIP-2 does with no text);
  VQA prompts look like "Question: what is on the table? Answer:".

- Gemma 3: the folder's chat template rendered for one user turn of [image, question] with the
  generation prompt, then `<start_of_image>` expanded to "\n\n<start_of_image>" + N soft
  tokens + "<end_of_image>\n\n", as Gemma3Processor does; BOS comes from the template, so the
  tokenizer adds no special tokens when the text starts with it (ProcessorMixin's rule).

- Qwen2.5-VL: the folder's chat template rendered the same way (Qwen's own when the folder has
  none), its `<|image_pad|>` repeated N times as Qwen2VLProcessor does; N varies per image (the
  image's own grid), so the caller passes each image's count.

N is the config's `num_image_tokens` (LLaVA: image patches; BLIP-2: Q-Former queries; Gemma 3:
soft tokens). The family registry (`fastvlm_jax.nn.families`) holds one layout per family.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jinja2
import jinja2.sandbox

from fastvlm_jax.text.base import DEFAULT_IMAGE_TOKEN, Tokenizer


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


@dataclasses.dataclass(frozen=True)
class Gemma3Prompts(PromptLayout):
    default_question: str = "Describe this image."

    def prompt_ids(self, tokenizer, question, num_image_tokens):
        image_token = image_prompt_token(tokenizer, question, num_image_tokens)
        if GEMMA_BOI in question or GEMMA_EOI in question:
            raise ValueError(f"the question must not contain {GEMMA_BOI!r} or {GEMMA_EOI!r}")
        tokenizer.token_id(GEMMA_BOI)  # both must be added tokens: each must stay one id
        tokenizer.token_id(GEMMA_EOI)
        text = render_chat_prompt(tokenizer, question)
        if text.count(GEMMA_BOI) != 1:
            raise ValueError(f"the chat template must place {GEMMA_BOI!r} once for one image, got: {text!r}")
        text = text.replace(GEMMA_BOI, f"\n\n{GEMMA_BOI}{image_token * num_image_tokens}{GEMMA_EOI}\n\n")
        bos = tokenizer.id_to_piece(tokenizer.bos_id) if tokenizer.bos_id is not None else None
        return tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))

    def answer_ids(self, tokenizer, question, answer):
        # The answer starts the model's turn, right after "<start_of_turn>model\n".
        return tokenizer.encode(answer.strip(), add_special_tokens=False)

    def stop_ids(self, tokenizer, config):
        # Instruction-tuned Gemma ends its turn with <end_of_turn> (its generation config stops
        # there and at <eos>).
        stops = [int(tokenizer.eos_id)]
        if GEMMA_END_OF_TURN in tokenizer.added_tokens:
            stops.append(tokenizer.token_id(GEMMA_END_OF_TURN))
        return tuple(dict.fromkeys(stops))


@dataclasses.dataclass(frozen=True)
class QwenPrompts(PromptLayout):
    default_question: str = "Describe this image."

    def prompt_ids(self, tokenizer, question, num_image_tokens):
        image_token = image_prompt_token(tokenizer, question, num_image_tokens)
        for marker in (QWEN_VISION_START, QWEN_VISION_END):
            if marker in question:
                raise ValueError(f"the question must not contain {marker!r}")
        text = render_chat_prompt(tokenizer, question, default=_default_qwen_chat)
        if text.count(image_token) != 1:
            raise ValueError(f"the chat template must place {image_token!r} once for one image, got: {text!r}")
        return tokenizer.encode(text.replace(image_token, image_token * num_image_tokens))

    def answer_ids(self, tokenizer, question, answer):
        # The answer opens the assistant's turn, right after "<|im_start|>assistant\n".
        return tokenizer.encode(answer.strip(), add_special_tokens=False)

    def stop_ids(self, tokenizer, config):
        # Qwen's generation config stops at <|im_end|> (the end of a turn) and <|endoftext|>.
        stops = [int(tokenizer.eos_id)]
        stops += [tokenizer.token_id(t) for t in (QWEN_END_OF_TURN, QWEN_END_OF_TEXT) if t in tokenizer.added_tokens]
        return tuple(dict.fromkeys(stops))


QWEN_VISION_START = "<|vision_start|>"
QWEN_VISION_END = "<|vision_end|>"
QWEN_END_OF_TURN = "<|im_end|>"
QWEN_END_OF_TEXT = "<|endoftext|>"


def _default_qwen_chat(bos: str, question: str) -> str:
    # Qwen2.5-VL's released template, for one user turn of [image, text] + the generation prompt.
    del bos
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"{QWEN_VISION_START}<|image_pad|>{QWEN_VISION_END}{question}<|im_end|>\n<|im_start|>assistant\n"
    )


GEMMA_BOI = "<start_of_image>"
GEMMA_EOI = "<end_of_image>"
GEMMA_END_OF_TURN = "<end_of_turn>"


def _default_gemma_chat(bos: str, question: str) -> str:
    # Gemma 3's released template, for one user turn of [image, text] + the generation prompt.
    return f"{bos}<start_of_turn>user\n{GEMMA_BOI}{question.strip()}<end_of_turn>\n<start_of_turn>model\n"


def render_chat_prompt(tokenizer: Tokenizer, question: str, default=None) -> str:
    """One user turn holding an image and `question`, with the generation prompt, rendered by
    the tokenizer's chat template as transformers renders it (a sandboxed Jinja environment
    with trim_blocks and lstrip_blocks); when the folder has none, `default(bos, question)`
    (Gemma 3's template unless given)."""
    specials = {}
    for name, idx in (
        ("bos_token", tokenizer.bos_id),
        ("eos_token", tokenizer.eos_id),
        ("pad_token", tokenizer.pad_id),
    ):
        if idx is not None:
            specials[name] = tokenizer.id_to_piece(idx)
    if tokenizer.chat_template is None:
        return (default or _default_gemma_chat)(specials.get("bos_token") or "", question)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return (
        _chat_environment()
        .from_string(tokenizer.chat_template)
        .render(messages=messages, add_generation_prompt=True, **specials)
    )


def _chat_environment() -> jinja2.Environment:
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    return env


# ------------------------------------------------------------------------------------------
# LLaVA prompts


def format_llava_prompt(question: str, image_token: str = DEFAULT_IMAGE_TOKEN) -> str:
    """LLaVA-1.5's single-turn prompt: "USER: <image>\\n{question} ASSISTANT:"."""
    return f"USER: {image_token}\n{question} ASSISTANT:"


def num_image_tokens(
    image_size: int | tuple[int, int],
    patch_size: int,
    num_additional_image_tokens: int = 0,
    select_strategy: str = "default",
) -> int:
    """How many `<image>` ids one image takes, as HF's LlavaProcessor counts them.

    (H // patch) * (W // patch) + num_additional_image_tokens, minus 1 for the "default"
    strategy (which drops the CLS feature). llava-hf checkpoints store
    num_additional_image_tokens=1 (the CLS token) in processor_config.json: 576 for 336 / 14.
    """
    if select_strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy must be 'default' or 'full', got {select_strategy!r}")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    count = (height // patch_size) * (width // patch_size) + num_additional_image_tokens
    if select_strategy == "default":
        count -= 1
    if count <= 0:
        raise ValueError(f"image of {height}x{width} with patch {patch_size} gives {count} image tokens")
    return count


def image_prompt_token(tokenizer: Tokenizer, question: str, num_image_tokens: int) -> str:
    """The tokenizer's image token, after checking that a one-image prompt can hold it
    `num_image_tokens` times around `question` (every family's prompt builder asks this)."""
    image_token = tokenizer.image_token
    if image_token is None:
        raise ValueError("the tokenizer has no image token")
    if image_token in question:
        raise ValueError(f"the question must not contain the image token {image_token!r}")
    if num_image_tokens <= 0:
        raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
    return image_token


def check_image_token_id(
    tokenizer: Tokenizer, image_token_id: int, error: type[Exception], model_side: str = "the model's image_token_id"
) -> None:
    """Raises `error` unless the tokenizer's image token has the id the model replaces by
    image features (`model_side` names where that id comes from, for the message).

    A mismatch would leave the image out of every prompt without any other error.
    """
    got = tokenizer.image_token_id if tokenizer.image_token is not None else None
    if got != image_token_id:
        raise error(f"the tokenizer's image token id ({got}) differs from {model_side} ({image_token_id})")


def build_llava_input_ids(tokenizer: Tokenizer, question: str, num_image_tokens: int) -> list[int]:
    """Prompt ids for one image and one question, with the image placeholder expanded.

    Like HF's LlavaProcessor, the placeholder is repeated `num_image_tokens` times in the text
    before tokenizing (each copy is an added token, so each becomes one id), and the tokenizer
    adds its special tokens (BOS for llava-hf checkpoints).
    """
    image_token = image_prompt_token(tokenizer, question, num_image_tokens)
    prompt = format_llava_prompt(question, image_token)
    return tokenizer.encode(prompt.replace(image_token, image_token * num_image_tokens))
