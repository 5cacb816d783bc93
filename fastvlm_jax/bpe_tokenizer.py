"""Byte-level BPE tokenizer (GPT-2 style, as BLIP-2 OPT uses), matching Hugging Face's GPT2Tokenizer.

The BPE itself runs in the `tokenizers` library (Hugging Face's Rust tokenizers, the same engine
transformers uses); this module reproduces how transformers 5.x `GPT2Tokenizer` sets it up and
offers the interface of `fastvlm_jax.tokenizer.Tokenizer` (encode, decode, ids, save / load).

What transformers 5.x does, and we do too:
- The pipeline is rebuilt from the vocabulary and merges alone: a BPE model without unknown
  token or subword affixes, a ByteLevel pre-tokenizer (`add_prefix_space` from
  tokenizer_config.json, default False), a ByteLevel decoder, no normalizer. The rest of a
  tokenizer.json (its pre-tokenizer, decoder, post-processor) is not read.
- Added tokens (`</s>`, `<pad>`, `<image>`, ...) keep their ids and flags (special, lstrip,
  rstrip, single_word, normalized); the tokenizer's named special tokens (bos/eos/unk/pad)
  become special added tokens. Text between added tokens is encoded on its own.
- Encoding: BOS is prepended when asked. OPT's tokenizer always adds it (bos is `</s>`, id 2:
  tokenizer_config.json's `add_bos_token` in older files, a TemplateProcessing post-processor
  in tokenizer.json in newer ones); the callers (fastvlm_jax.prompts) decide, as for LLaMA.
- Decoding: ids outside the vocabulary are skipped, special added tokens dropped when asked,
  bytes joined and decoded as UTF-8 (invalid bytes become U+FFFD). transformers 5 never applies
  `clean_up_tokenization_spaces` to BPE tokenizers, so neither do we.

Reads tokenizer.json (the BPE model's vocab and merges) or vocab.json + merges.txt, plus
tokenizer_config.json / special_tokens_map.json / added_tokens.json when present. Only GPT-2
style classes (`GPT2Tokenizer`, `GPT2TokenizerFast`, the ones OPT and BLIP-2 OPT name) are
accepted: other BPE tokenizers (Qwen2, LLaMA-3) set up their pipelines differently.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken as HFAddedToken
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from fastvlm_jax.tokenizer import DEFAULT_IMAGE_TOKEN, _read_json, _token_content

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
FORMAT_TAG = "fastvlm_jax.bpe_tokenizer/1"
GPT2_CLASSES = {"GPT2Tokenizer", "GPT2TokenizerFast"}
_ADDED_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")


def _read_merges(merges: Sequence[Any]) -> list[tuple[str, str]]:
    """tokenizer.json merges ("a b" strings or [a, b] pairs) or merges.txt lines -> pairs."""
    pairs = []
    for merge in merges:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(parts) != 2:
            raise ValueError(f"malformed BPE merge {merge!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def _vocab_and_merges(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    tokenizer_json = folder / TOKENIZER_FILE
    if tokenizer_json.is_file():
        model = _read_json(tokenizer_json).get("model") or {}
        if model.get("type", "BPE") != "BPE":
            raise ValueError(f"{tokenizer_json}: model type {model.get('type')!r} is not BPE")
        return dict(model["vocab"]), _read_merges(model["merges"])
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        lines = merges_file.read_text(encoding="utf-8").splitlines()
        lines = [line for line in lines if line and not line.startswith("#version")]
        return dict(_read_json(vocab_file)), _read_merges(lines)
    raise FileNotFoundError(f"{folder}: no {TOKENIZER_FILE} and no vocab.json + merges.txt: "
                            "not a byte-level BPE tokenizer folder")


def _added(entry: Mapping[str, Any]) -> HFAddedToken:
    """A `tokenizers` AddedToken from a HF record ({"content", "special", "lstrip", ...})."""
    flags = {k: bool(entry[k]) for k in _ADDED_FLAGS if k in entry}
    flags.setdefault("normalized", not flags.get("special", False))  # HF's default
    return HFAddedToken(str(entry["content"]), **flags)


def _added_record(token: HFAddedToken, idx: int) -> dict[str, Any]:
    return {"id": idx, "content": token.content, **{k: bool(getattr(token, k)) for k in _ADDED_FLAGS}}


class BPETokenizer:
    """A byte-level BPE tokenizer with added tokens (see the module docstring for the rules).

    Args:
      backend: a `tokenizers.Tokenizer` holding the whole pipeline and the added tokens.
      bos_id, eos_id, pad_id, unk_id: special ids (pad defaults to eos, unk to None).
      image_token: the image placeholder; it must be an added token. None picks "<image>" when
        that is an added token (else the tokenizer has no image token).
    """

    def __init__(self, backend: Backend, bos_id: int, eos_id: int, pad_id: int | None = None,
                 unk_id: int | None = None, image_token: str | None = None) -> None:
        self._backend = backend
        self._added: dict[int, HFAddedToken] = dict(backend.get_added_tokens_decoder())
        self._added_ids = {t.content: i for i, t in self._added.items()}
        self._vocab_size = max([backend.get_vocab_size(with_added_tokens=False) - 1, *self._added]) + 1
        for name, idx in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id), ("unk_id", unk_id)):
            if idx is not None and not 0 <= idx < self._vocab_size:
                raise ValueError(f"{name}={idx} is outside the vocabulary (size {self._vocab_size})")
        self._bos_id, self._eos_id = int(bos_id), int(eos_id)
        self._pad_id = int(eos_id if pad_id is None else pad_id)
        self._unk_id = None if unk_id is None else int(unk_id)
        if image_token is None and DEFAULT_IMAGE_TOKEN in self._added_ids:
            image_token = DEFAULT_IMAGE_TOKEN
        if image_token is not None and image_token not in self._added_ids:
            raise ValueError(f"image token {image_token!r} is not an added token")
        self._image_token = image_token

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_vocab(cls, vocab: Mapping[str, int], merges: Sequence[Any],
                   added_tokens: Sequence[Mapping[str, Any]] = (), *, bos_token: str, eos_token: str,
                   pad_token: str | None = None, unk_token: str | None = None,
                   image_token: str | None = None, add_prefix_space: bool = False) -> "BPETokenizer":
        """GPT-2's pipeline over `vocab` and `merges`, plus `added_tokens` (HF records with "id").

        bos/eos/pad/unk tokens that are not among `added_tokens` are added as special tokens
        (they must be in the vocabulary), as HF does with a tokenizer's named special tokens.
        """
        backend = Backend(models.BPE(vocab=dict(vocab), merges=_read_merges(merges), dropout=None,
                                     continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        backend.decoder = decoders.ByteLevel()
        records = {str(r["content"]): dict(r) for r in added_tokens}
        for content in (bos_token, eos_token, pad_token, unk_token):
            if content is not None and content not in records:
                if content not in vocab:
                    raise ValueError(f"special token {content!r} is neither in the vocabulary nor added")
                records[content] = {"id": vocab[content], "content": content, "special": True,
                                    "normalized": False}
        # In id order, so that a token new to the vocabulary gets the next free id, as recorded.
        for record in sorted(records.values(), key=lambda r: int(r["id"])):
            token = _added(record)
            if token.special:
                backend.add_special_tokens([token])
            else:
                backend.add_tokens([token])
            got = backend.token_to_id(token.content)
            if got != int(record["id"]):
                raise ValueError(f"added token {token.content!r} should have id {record['id']} but got "
                                 f"{got}: the added tokens leave gaps after the vocabulary")

        def id_of(content: str | None) -> int | None:
            return None if content is None else backend.token_to_id(content)

        return cls(backend, id_of(bos_token), id_of(eos_token), id_of(pad_token), id_of(unk_token),
                   image_token)

    @classmethod
    def from_hf_dir(cls, directory: str | os.PathLike) -> "BPETokenizer":
        """Build from a Hugging Face GPT-2 style tokenizer folder (e.g. a BLIP-2 OPT checkpoint)."""
        folder = Path(directory)
        config = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
        special_map = (_read_json(folder / "special_tokens_map.json")
                       if (folder / "special_tokens_map.json").is_file() else {})
        tok_class = config.get("tokenizer_class")
        if tok_class is not None and tok_class not in GPT2_CLASSES:
            raise ValueError(f"{folder}: tokenizer_class {tok_class!r} is not supported; only GPT-2 style "
                             f"byte-level BPE tokenizers ({', '.join(sorted(GPT2_CLASSES))}) are")
        vocab, merges = _vocab_and_merges(folder)

        def special_token(name: str, default: str | None) -> str | None:
            value = _token_content(config.get(name))
            if value is None:
                value = _token_content(special_map.get(name))
            return default if value is None else value

        # Added tokens, later sources overriding earlier ones (tokenizer.json is the most complete).
        found: dict[str, dict[str, Any]] = {}
        if (folder / "added_tokens.json").is_file():
            for content, idx in _read_json(folder / "added_tokens.json").items():
                found[content] = {"id": int(idx), "content": content, "special": False}
        for idx, entry in (config.get("added_tokens_decoder") or {}).items():
            found[entry["content"]] = {**entry, "id": int(idx)}
        if (folder / TOKENIZER_FILE).is_file():
            for entry in _read_json(folder / TOKENIZER_FILE).get("added_tokens") or []:
                found[entry["content"]] = dict(entry)
        names = [special_token(n, None) for n in ("bos_token", "eos_token", "unk_token", "pad_token")]
        extra = config.get("additional_special_tokens") or special_map.get("additional_special_tokens") or []
        for content in [*names, *map(_token_content, extra)]:
            if content is not None and content in found:
                found[content]["special"] = True

        image_token = _token_content(config.get("image_token"))
        extra_special = config.get("extra_special_tokens")
        if image_token is None and isinstance(extra_special, Mapping):
            image_token = _token_content(extra_special.get("image_token"))
        if image_token is not None and image_token not in found:
            raise ValueError(f"{folder}: image token {image_token!r} is not among the added tokens")
        return cls.from_vocab(
            vocab, merges, list(found.values()),
            bos_token=special_token("bos_token", "<|endoftext|>"),  # GPT2Tokenizer's defaults
            eos_token=special_token("eos_token", "<|endoftext|>"),
            pad_token=special_token("pad_token", None), unk_token=special_token("unk_token", "<|endoftext|>"),
            image_token=image_token, add_prefix_space=bool(config.get("add_prefix_space", False)))

    # -- properties --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids: BPE vocabulary plus added tokens (HF's `len(tokenizer)`)."""
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def unk_id(self) -> int | None:
        return self._unk_id

    @property
    def image_token(self) -> str | None:
        return self._image_token

    @property
    def image_token_id(self) -> int:
        if self._image_token is None:
            raise ValueError("this tokenizer has no image token")
        return self._added_ids[self._image_token]

    @property
    def added_tokens(self) -> dict[str, int]:
        """content -> id of every added token."""
        return dict(self._added_ids)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that `decode(skip_special_tokens=True)` drops."""
        return frozenset(i for i, t in self._added.items() if t.special)

    @property
    def backend(self) -> Backend:
        """The underlying `tokenizers.Tokenizer` (do not modify it)."""
        return self._backend

    def id_to_piece(self, idx: int) -> str | None:
        """The token string of an id (byte-level form, e.g. "Ġcat"); None if unknown."""
        return self._backend.id_to_token(int(idx)) if idx >= 0 else None

    # -- encoding / decoding -----------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Text -> ids, added tokens in the text becoming single ids; BOS first if `add_bos`."""
        ids = list(self._backend.encode(text, add_special_tokens=False).ids)
        return ([self._bos_id] if add_bos else []) + ids + ([self._eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text, exactly as HF `tokenizer.decode(ids, skip_special_tokens=...)`."""
        kept = [int(i) for i in ids if 0 <= int(i) < self._vocab_size]
        return self._backend.decode(kept, skip_special_tokens=skip_special_tokens)

    # -- persistence -------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {"format": FORMAT_TAG, "bos_id": self._bos_id, "eos_id": self._eos_id,
                "pad_id": self._pad_id, "unk_id": self._unk_id, "image_token": self._image_token,
                "added_tokens": [_added_record(t, i) for i, t in sorted(self._added.items())]}

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` (the whole pipeline) and our `tokenizer_config.json`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / TOKENIZER_FILE).write_text(self._backend.to_str(), encoding="utf-8")
        (out / CONFIG_FILE).write_text(json.dumps(self._config(), indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")

    @classmethod
    def _from_saved(cls, tokenizer_json: str, cfg: Mapping[str, Any]) -> "BPETokenizer":
        return cls(Backend.from_str(tokenizer_json), cfg["bos_id"], cfg["eos_id"], cfg["pad_id"],
                   cfg.get("unk_id"), cfg.get("image_token"))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "BPETokenizer":
        """Read a folder written by `save` (a Hugging Face folder also works: see from_hf_dir)."""
        folder = Path(directory)
        cfg = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
        if cfg.get("format") != FORMAT_TAG:
            return cls.from_hf_dir(folder)
        tokenizer = cls._from_saved((folder / TOKENIZER_FILE).read_text(encoding="utf-8"), cfg)
        if tokenizer.added_tokens != {t["content"]: t["id"] for t in cfg["added_tokens"]}:
            raise ValueError(f"{folder}: {TOKENIZER_FILE} and {CONFIG_FILE} disagree on the added tokens")
        return tokenizer

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable (data-loader workers): rebuild from the serialized pipeline and our config.
        return (BPETokenizer._from_saved, (self._backend.to_str(), self._config()))


__all__ = ["BPETokenizer", "GPT2_CLASSES"]
