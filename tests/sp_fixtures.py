"""Tiny sentencepiece / Hugging Face tokenizer fixtures, built in-process with no network.

`train_tiny_sentencepiece` trains a LLaMA-like BPE model (byte fallback, identity
normalization, bos=1 / eos=2 / unk=0) on a built-in caption corpus in a few milliseconds.
`make_hf_llama_tokenizer_dir` turns it into a Hugging Face tokenizer folder like llava-hf's,
with `<image>` and `<pad>` added as special tokens right after the sentencepiece vocabulary.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import sentencepiece as spm

# Caption- and VQA-like English, with digits, punctuation and the LLaVA prompt words, so that the
# merges cover what the tests encode. Non-ASCII text is left to byte fallback on purpose.
CORPUS: tuple[str, ...] = (
    "A man riding a wave on top of a surfboard.",
    "Two dogs are playing with a red ball in the park.",
    "A plate of food with broccoli, rice and chicken.",
    "The cat is sleeping on the couch next to a window.",
    "A group of people standing around a kitchen counter.",
    "An old train traveling down the tracks near a station!",
    "A woman holding an umbrella while walking in the rain.",
    "A black and white photo of a city street with cars.",
    "Three giraffes standing in a field under a blue sky.",
    "A little boy is eating a slice of pizza at the table.",
    "A bathroom with a white sink, a mirror and a toilet.",
    "Several boats are parked in the harbor at sunset.",
    "A bowl of fruit: apples, bananas and oranges.",
    "A person on skis going down a snowy hill.",
    "A clock tower in the middle of a busy town square.",
    "What is shown in this image? Describe it briefly.",
    "USER: What color is the bus? ASSISTANT: The bus is yellow.",
    "USER: How many people are there? ASSISTANT: There are 3 people.",
    "Describe the image in detail. Provide a one-sentence caption.",
    "A close-up of a pizza with cheese, tomatoes & basil; it's 12 inches wide.",
    "Is there a person in the picture? Yes, there is (a man) near the door.",
    'The sign says "STOP" - it was taken in 2019 at 10:30 am.',
    "A laptop computer sitting on top of a wooden desk.",
    "A herd of sheep grazing on a green hillside.",
)

LLAMA_SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2}


def train_tiny_sentencepiece(
    directory: str | os.PathLike, vocab_size: int = 512, model_type: str = "bpe", byte_fallback: bool = True
) -> Path:
    """Train a tiny LLaMA-style sentencepiece model; returns the path of `tokenizer.model`.

    Args:
      directory: where to write `tokenizer.model` (created if needed).
      vocab_size: upper bound on the vocabulary; 256 byte pieces + 3 specials + the corpus
        characters come first, merges fill the rest (hard_vocab_limit=False lets a small corpus
        end below the bound).
      model_type: "bpe" (LLaMA; HF converts it exactly) or "unigram".
      byte_fallback: False leaves characters outside the corpus without any piece.

    Settings follow LLaMA's tokenizer.model: byte_fallback, identity normalization, no removal
    of extra whitespace, a dummy prefix, split digits, whitespace-only pieces, ids unk=0, bos=1,
    eos=2 and no pad piece.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=byte_fallback,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
        **LLAMA_SPECIAL_IDS,
    )
    path = out / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def make_hf_llama_tokenizer_dir(
    directory: str | os.PathLike,
    sp_model_path: str | os.PathLike,
    *,
    image_token: str = "<image>",
    pad_token: str = "<pad>",
    legacy: bool = False,
    add_prefix_space: bool | None = None,
):
    """Write a Hugging Face LLaMA tokenizer folder like llava-hf's and return the HF tokenizer.

    The folder holds `tokenizer.model` (copied), `tokenizer.json` and `tokenizer_config.json`
    (from `save_pretrained`). `image_token` and `pad_token` are special added tokens with ids
    sp_vocab_size and sp_vocab_size + 1 (32000 / 32001 in llava-hf), `add_bos_token=True`.
    Load it back with `LlamaTokenizer.from_pretrained(directory)` or use the returned object;
    `LlavaProcessor(image_processor, tokenizer, patch_size=..., vision_feature_select_strategy=...)`
    accepts it.
    """
    from transformers import AddedToken, LlamaTokenizer

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if Path(sp_model_path).resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(sp_model_path, out / "tokenizer.model")
    kwargs = {"add_bos_token": True, "add_eos_token": False, "legacy": legacy}
    if add_prefix_space is not None:
        kwargs["add_prefix_space"] = add_prefix_space
    tokenizer = LlamaTokenizer.from_pretrained(str(out), **kwargs)
    tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": AddedToken(pad_token, special=True, normalized=False)})
    tokenizer.save_pretrained(str(out))
    # transformers 5.x save_pretrained drops `legacy` and `add_bos_token` from the config (the
    # BOS lives in tokenizer.json's post-processor); llava-hf folders state both, so do we.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config.update(legacy=legacy, add_bos_token=True, add_eos_token=False)
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return tokenizer
