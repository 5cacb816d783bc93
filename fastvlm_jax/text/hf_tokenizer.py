"""Tokenizers run by Hugging Face's `tokenizers` library, set up as transformers 5.x sets them up.

For Hugging Face folders with `tokenizer.json` (LLaVA, LLaMA, BLIP-2 OPT, ...) or GPT-2 style
`vocab.json` + `merges.txt`. The `tokenizers` library is the engine transformers itself runs, so
what is left to reproduce is how transformers 5.x (checked against 5.24) builds the pipeline
from a local folder, as `AutoTokenizer` / `AutoProcessor` load it:

- Which pipeline. transformers picks a tokenizer class; some classes rebuild the pipeline from
  the vocabulary and merges alone, the others run tokenizer.json as it is:
  * config.json's model_type "llava" (also llava_next, vipllava): tokenizer.json as it is,
    whatever tokenizer_config.json's class says (transformers lists these models as having a
    wrong hub tokenizer class and uses its generic `TokenizersBackend`).
  * tokenizer_class LlamaTokenizer: rebuilt as LLaMA's (BPE with byte fallback and no unknown
    token, so an uncovered character is dropped; no normalizer; Metaspace with the prepend
    scheme from add_prefix_space / legacy; the matching decoder), unless tokenizer.json is
    byte-level (LLaMA-3 style), which runs as it is.
  * tokenizer_class GPT2Tokenizer (OPT, BLIP-2 OPT; also model_type blip-2 / opt with no
    class): rebuilt as GPT-2's (byte-level BPE, add_prefix_space from tokenizer_config.json).
  * tokenizer_class Qwen2Tokenizer (Qwen2, Qwen2.5-VL; also their model types with no class):
    rebuilt as Qwen2's (NFC, Qwen's pre-tokenizing split, byte-level BPE without prefix space).
  * TokenizersBackend, PreTrainedTokenizerFast or no class: tokenizer.json as it is.
  Other classes rebuild pipelines of their own, which we do not reproduce: refused.
- What `add_special_tokens` adds: tokenizer.json's post-processor (also for rebuilt pipelines).
  tokenizer_config.json's add_bos_token / add_eos_token are ignored when tokenizer.json exists;
  without it (vocab.json + merges.txt) they decide, both defaulting to False. A tokenizer.json
  without post-processor adds nothing.
- Added tokens: tokenizer.json's, plus tokenizer_config.json's added_tokens_decoder and
  added_tokens.json, plus every special token the settings name (bos/eos/unk/pad/...,
  model-specific ones such as image_token, extra special tokens) that is not one yet.
- Decoding: the pipeline's decoder, special added tokens dropped when asked.
  clean_up_tokenization_spaces is never applied to BPE models (transformers 5 skips it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken as BackendAddedToken
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from fastvlm_jax.text.base import AddedToken, HFFolder, Tokenizer, read_json

TOKENIZER_FILE = "tokenizer.json"
FORMAT_TAG = "fastvlm_jax.hf_tokenizer/1"  # an on-disk tag: kept when the module moved
# Saved by the GPT-2-only BPETokenizer this class replaced: same files, but its tokenizer.json
# has no post-processor because that class prepended BOS itself.
_BPE_FORMAT_TAG = "fastvlm_jax.bpe_tokenizer/1"

# config.json model types for which transformers runs tokenizer.json as it is.
_AS_IS_MODEL_TYPES = {"llava", "llava_next", "vipllava"}
# The tokenizer class transformers registers for a model type, used when the folder names none.
_CLASS_BY_MODEL_TYPE = {
    "blip-2": "GPT2Tokenizer",
    "opt": "GPT2Tokenizer",
    "llama": "LlamaTokenizer",
    "gemma": "GemmaTokenizer",
    "gemma3": "GemmaTokenizer",
    "qwen2": "Qwen2Tokenizer",
    "qwen2_vl": "Qwen2Tokenizer",
    "qwen2_5_vl": "Qwen2Tokenizer",
}
# Classes (without "Fast") that run tokenizer.json as it is.
_AS_IS_CLASSES = {None, "TokenizersBackend", "PreTrainedTokenizer"}
# The special tokens the rebuilding classes default to.
_DEFAULT_SPECIALS = {
    "llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "gpt2": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
    "gemma": {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
    },
    "qwen2": {"eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
    "as-is": {},
}
# The image placeholder a family's processor uses when the tokenizer settings name none.
_DEFAULT_IMAGE_TOKENS = {"qwen2": "<|image_pad|>"}
# Qwen2Tokenizer's split before byte-level BPE (contractions, letters, single digits,
# punctuation runs, newlines, spaces).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pipeline_kind(hf: HFFolder, tokenizer_json: str | None) -> str:
    """Which pipeline transformers runs for the folder (module docstring): "as-is" (tokenizer.json
    as it is), "llama" or "gpt2" (rebuilt from the vocabulary and merges)."""
    if hf.model_type in _AS_IS_MODEL_TYPES and tokenizer_json is not None:
        return "as-is"
    name = hf.tokenizer_class or _CLASS_BY_MODEL_TYPE.get(hf.model_type or "")
    if name == "LlamaTokenizer":
        # transformers' own test for a LLaMA-3 style (byte-level) file.
        return "as-is" if tokenizer_json is not None and '"ByteLevel"' in tokenizer_json else "llama"
    if name == "GPT2Tokenizer":
        return "gpt2"
    if name == "GemmaTokenizer":
        return "gemma"
    if name == "Qwen2Tokenizer":
        return "qwen2"
    if name in _AS_IS_CLASSES:
        # Without tokenizer.json, vocab.json + merges.txt can only be GPT-2's.
        return "as-is" if tokenizer_json is not None else "gpt2"
    raise ValueError(
        f"{hf.path}: tokenizer_class {hf.config.get('tokenizer_class')!r} is not supported: it "
        "builds its own pipeline; supported are LlamaTokenizer, GPT2Tokenizer and folders "
        "whose tokenizer.json runs as it is (TokenizersBackend, LLaVA checkpoints)"
    )


def _read_merges(merges: Sequence[Any]) -> list[tuple[str, str]]:
    """tokenizer.json merges ("a b" strings or [a, b] pairs) or merges.txt lines -> pairs."""
    pairs = []
    for merge in merges:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(parts) != 2:
            raise ValueError(f"malformed BPE merge {merge!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def _vocab_and_merges(folder: Path, tokenizer_json: Mapping[str, Any] | None) -> tuple[dict[str, int], list]:
    """The BPE vocabulary and merges, from tokenizer.json or vocab.json + merges.txt."""
    if tokenizer_json is not None:
        model = tokenizer_json.get("model") or {}
        if model.get("type", "BPE") != "BPE":
            raise ValueError(f"{folder / TOKENIZER_FILE}: model type {model.get('type')!r} is not BPE")
        return dict(model["vocab"]), _read_merges(model["merges"])
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        lines = merges_file.read_text(encoding="utf-8").splitlines()
        lines = [line for line in lines if line and not line.startswith("#version")]
        return dict(read_json(vocab_file)), _read_merges(lines)
    raise FileNotFoundError(f"{folder}: no {TOKENIZER_FILE} and no vocab.json + merges.txt")


def _llama_pipeline(vocab: dict[str, int], merges: list, add_prefix_space: bool, legacy: bool) -> Backend:
    """transformers 5.x LlamaTokenizer's pipeline over `vocab` and `merges`."""
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    backend.normalizer = None
    scheme = ("first" if not legacy else "always") if add_prefix_space else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _gemma_pipeline(vocab: dict[str, int], merges: list, unk_token: str) -> Backend:
    """transformers 5.x GemmaTokenizer's pipeline over `vocab` and `merges` (BPE with byte
    fallback; spaces become "\u2581" in the normalizer, no prefix space)."""
    backend = Backend(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk_token, byte_fallback=True, dropout=None)
    )
    backend.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    return backend


def _gpt2_pipeline(vocab: dict[str, int], merges: list, add_prefix_space: bool) -> Backend:
    """transformers 5.x GPT2Tokenizer's pipeline over `vocab` and `merges`."""
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    return backend


def _qwen2_pipeline(vocab: dict[str, int], merges: list, add_prefix_space: bool) -> Backend:
    """transformers 5.x Qwen2Tokenizer's pipeline over `vocab` and `merges`."""
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _special_template(
    bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None, add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing:
    """The post-processor transformers' `update_post_processor` builds from the BOS / EOS flags."""
    bos, eos = (bos if add_bos else None), (eos if add_eos else None)  # None: not added
    single = f"{(bos + ':0 ') if bos is not None else ''}$A:0{(' ' + eos + ':0') if eos is not None else ''}"
    pair = (
        f"{single}{(' ' + bos + ':1') if bos is not None else ''} $B:1{(' ' + eos + ':1') if eos is not None else ''}"
    )
    specials = ([(bos, bos_id)] if bos is not None else []) + ([(eos, eos_id)] if eos is not None else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _backend_token(token: AddedToken) -> BackendAddedToken:
    return BackendAddedToken(
        token.content,
        single_word=token.single_word,
        lstrip=token.lstrip,
        rstrip=token.rstrip,
        normalized=token.normalized,
        special=token.special,
    )


class HFTokenizer(Tokenizer):
    """A `tokenizers` pipeline with its added tokens (see the module docstring for the setup).

    Args:
      backend: a `tokenizers.Tokenizer` holding the whole pipeline (post-processor included)
        and the added tokens.
      bos_id, eos_id, pad_id, unk_id, image_token: see `fastvlm_jax.text.base.Tokenizer`.
      split_special_tokens: HF flag: added tokens in the text are encoded as plain text.
      chat_template: the folder's Jinja chat template, if it has one.
    """

    FORMAT_TAGS = (FORMAT_TAG, _BPE_FORMAT_TAG)
    MODEL_FILE = TOKENIZER_FILE

    def __init__(
        self,
        backend: Backend,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        image_token: str | None = None,
        split_special_tokens: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        self._split_special_tokens = bool(split_special_tokens)
        backend.encode_special_tokens = self._split_special_tokens  # not kept by tokenizer.json
        added = [
            AddedToken(
                t.content,
                i,
                special=t.special,
                lstrip=t.lstrip,
                rstrip=t.rstrip,
                single_word=t.single_word,
                normalized=t.normalized,
            )
            for i, t in backend.get_added_tokens_decoder().items()
        ]
        # HF's len(tokenizer) when the ids are contiguous (they are in real folders); the highest
        # id + 1 otherwise, which is what an embedding table needs.
        vocab_size = max([backend.get_vocab_size(with_added_tokens=False) - 1, *(t.id for t in added)]) + 1
        super().__init__(
            added,
            vocab_size,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            unk_id=unk_id,
            image_token=image_token,
            chat_template=chat_template,
        )

    @property
    def backend(self) -> Backend:
        """The underlying `tokenizers.Tokenizer` (do not modify it)."""
        return self._backend

    def id_to_piece(self, idx: int) -> str | None:
        """The token string of an id (e.g. "Ġcat" for byte-level BPE); None if unknown."""
        return self._backend.id_to_token(int(idx)) if idx >= 0 else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # The backend skips unknown ids itself; negative ones cannot even cross into it.
        kept = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._backend.decode(kept, skip_special_tokens=skip_special_tokens)

    # -- from a Hugging Face folder -----------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, directory: str | os.PathLike) -> HFTokenizer:
        """Build from a Hugging Face folder with tokenizer.json, or vocab.json + merges.txt.

        Reads tokenizer_config.json, special_tokens_map.json, added_tokens.json and (when the
        folder is a whole checkpoint) config.json's model_type, when present.
        """
        hf = HFFolder.read(directory)
        json_path = hf.path / TOKENIZER_FILE
        text = json_path.read_text(encoding="utf-8") if json_path.is_file() else None
        parsed = json.loads(text) if text is not None else None
        kind = _pipeline_kind(hf, text)
        config = hf.config

        if kind == "as-is":
            assert text is not None  # _pipeline_kind says "as-is" only when there is a tokenizer.json
            backend = Backend.from_str(text)
        else:
            vocab, merges = _vocab_and_merges(hf.path, parsed)
            if kind == "llama":
                prefix = config.get("add_prefix_space")  # LlamaTokenizer: None means True
                backend = _llama_pipeline(
                    vocab,
                    merges,
                    add_prefix_space=True if prefix is None else bool(prefix),
                    legacy=bool(config.get("legacy", False)),
                )
            elif kind == "gemma":
                backend = _gemma_pipeline(vocab, merges, hf.special_token("unk_token", "<unk>") or "<unk>")
            elif kind == "qwen2":
                backend = _qwen2_pipeline(vocab, merges, bool(config.get("add_prefix_space") or False))
            else:
                backend = _gpt2_pipeline(vocab, merges, bool(config.get("add_prefix_space", False)))
            if text is not None:
                backend.post_processor = Backend.from_str(text).post_processor
        # transformers pads and truncates only when a call asks, whatever tokenizer.json says.
        backend.no_padding()
        backend.no_truncation()

        # Added tokens the pipeline does not have yet, in id order (a token new to the vocabulary
        # takes the next free id), then the named special tokens that are not added tokens yet.
        defaults = _DEFAULT_SPECIALS[kind]
        records = sorted(hf.added_tokens(parsed).values(), key=lambda t: t.id)
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        new = [t for t in records if t.content not in present]
        present |= {t.content for t in new}
        new_tokens = [_backend_token(t) for t in new]
        for content in hf.named_special_tokens(defaults):
            if content not in present:
                new_tokens.append(BackendAddedToken(content, special=True))
                present.add(content)
        backend.add_tokens(new_tokens)
        for t in new:
            if backend.token_to_id(t.content) != t.id:
                raise ValueError(
                    f"{hf.path}: added token {t.content!r} should have id {t.id} but gets "
                    f"{backend.token_to_id(t.content)}: the added tokens leave gaps after the vocabulary"
                )

        if config.get("clean_up_tokenization_spaces") and type(backend.model).__name__ != "BPE":
            raise ValueError(
                f"{hf.path}: clean_up_tokenization_spaces with a {type(backend.model).__name__} model is not supported"
            )

        specials = {
            name: hf.special_token(name, defaults.get(name))
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        ids = {name: None if content is None else backend.token_to_id(content) for name, content in specials.items()}

        if text is None or backend.post_processor is None:
            # transformers builds the post-processor from the flags, which it only reads without
            # tokenizer.json (with one, a missing post-processor means no special tokens).
            flags = config if text is None else {}
            backend.post_processor = _special_template(
                specials["bos_token"],
                ids["bos_token"],
                specials["eos_token"],
                ids["eos_token"],
                bool(flags.get("add_bos_token", False)),
                bool(flags.get("add_eos_token", False)),
            )

        return cls(
            backend,
            bos_id=ids["bos_token"],
            eos_id=ids["eos_token"],
            pad_id=ids["pad_token"],
            unk_id=ids["unk_token"],
            image_token=hf.image_token() or _DEFAULT_IMAGE_TOKENS.get(kind),
            split_special_tokens=bool(config.get("split_special_tokens", False)),
            chat_template=hf.chat_template(),
        )

    # -- persistence -------------------------------------------------------------------------

    def _model_bytes(self) -> bytes:
        return self._backend.to_str().encode("utf-8")

    def _settings(self) -> dict[str, Any]:
        return {**self._base_settings(), "split_special_tokens": self._split_special_tokens}

    @classmethod
    def _from_saved(cls, model: bytes, settings: Mapping[str, Any]) -> HFTokenizer:
        backend = Backend.from_str(model.decode("utf-8"))
        if settings.get("format") == _BPE_FORMAT_TAG:
            # That class always prepended BOS when asked for special tokens, and never EOS.
            bos = backend.id_to_token(settings["bos_id"])
            backend.post_processor = _special_template(bos, settings["bos_id"], None, None, True, False)
        tokenizer = cls(
            backend,
            bos_id=settings["bos_id"],
            eos_id=settings["eos_id"],
            pad_id=settings["pad_id"],
            unk_id=settings.get("unk_id"),
            image_token=settings.get("image_token"),
            split_special_tokens=settings.get("split_special_tokens", False),
            chat_template=settings.get("chat_template"),
        )
        if tokenizer.added_tokens != {t["content"]: t["id"] for t in settings["added_tokens"]}:
            raise ValueError(f"the saved {TOKENIZER_FILE} and tokenizer_config.json disagree on the added tokens")
        return tokenizer


__all__ = ["HFTokenizer"]
