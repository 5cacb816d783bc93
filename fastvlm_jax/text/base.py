"""The tokenizer interface of fastvlm_jax, and what its two implementations share.

`Tokenizer` is what the rest of the code uses (prompts, training input, decoding, checkpoints):

    encode(text, add_special_tokens=True) -> ids      decode(ids, skip_special_tokens=True) -> text
    vocab_size, bos_id, eos_id, pad_id, unk_id         image_token, image_token_id
    added_tokens, special_ids, id_to_piece(id)         save(dir), load(dir) (our own format)

Two implementations subclass it:
- `fastvlm_jax.text.hf_tokenizer.HFTokenizer`: a `tokenizers` library pipeline, for Hugging Face
  folders with tokenizer.json (or GPT-2 vocab.json + merges.txt), set up as transformers 5.x does.
- `fastvlm_jax.text.sp_tokenizer.SentencePieceTokenizer`: sentencepiece, for folders with only
  tokenizer.model, and for the tokenizers we train ourselves.
`fastvlm_jax.text.tokenizer.load_tokenizer` picks the one a folder needs. This module imports neither
implementation, so that both can import it.

It also holds the reading of Hugging Face's settings files (`HFFolder`), which both
implementations need to find special and added tokens.
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from fastvlm_jax.runtime.paths import as_path

CONFIG_FILE = "tokenizer_config.json"
DEFAULT_IMAGE_TOKEN = "<image>"

# transformers' named special tokens, in the order it registers them.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file's content; a malformed file is a ValueError that names it."""
    try:
        return json.loads(as_path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def token_content(value: Any) -> str | None:
    """HF stores a special token as a string or as {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "content" in value:
        return str(value["content"])
    raise ValueError(f"cannot read a token from {value!r}")


@dataclass(frozen=True)
class AddedToken:
    """A string that always maps to one id: it is cut out of the text before the model runs.

    special: dropped by `decode(skip_special_tokens=True)`.
    lstrip / rstrip: the match also swallows whitespace on its left / right.
    single_word: only matched as a whole word. normalized: matched on normalized text.
    (Hugging Face's flags, with its meanings.)
    """

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = False

    @classmethod
    def from_hf(cls, entry: Mapping[str, Any], idx: int | None = None) -> AddedToken:
        """From a Hugging Face record ({"content", "id", "special", "lstrip", ...})."""
        special = bool(entry.get("special", False))
        return cls(
            content=str(entry["content"]),
            id=int(entry["id"] if idx is None else idx),
            special=special,
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
            single_word=bool(entry.get("single_word", False)),
            normalized=bool(entry.get("normalized", not special)),  # HF's default
        )


@dataclass(frozen=True)
class HFFolder:
    """The settings files of a Hugging Face tokenizer folder, read once.

    config: tokenizer_config.json; special_map: special_tokens_map.json; model_type: config.json's
    (present when the folder is a whole checkpoint, as the converters get it). Missing files
    read as empty.
    """

    path: Path
    config: dict[str, Any]
    special_map: dict[str, Any]
    model_type: str | None

    @classmethod
    def read(cls, directory: str | os.PathLike) -> HFFolder:
        path = Path(directory)

        def optional(name: str) -> dict[str, Any]:
            return read_json(path / name) if (path / name).is_file() else {}

        return cls(
            path, optional(CONFIG_FILE), optional("special_tokens_map.json"), optional("config.json").get("model_type")
        )

    @property
    def tokenizer_class(self) -> str | None:
        """tokenizer_config.json's class, without the "Fast" suffix (transformers 5 has one kind)."""
        name = self.config.get("tokenizer_class")
        return None if name is None else str(name).removesuffix("Fast")

    def special_token(self, name: str, default: str | None = None) -> str | None:
        """The content of special token `name` ("bos_token", ...): config, special map, default."""
        value = token_content(self.config.get(name))
        if value is None:
            value = token_content(self.special_map.get(name))
        return default if value is None else value

    def named_special_tokens(self, defaults: Mapping[str, str] | None = None) -> list[str]:
        """Every special token the settings name, in the order transformers registers them.

        The standard names (bos, eos, unk, sep, pad, cls, mask; `defaults` fills in the ones a
        tokenizer class defaults), then model-specific "*_token" strings (e.g. image_token), then
        the extra / additional special tokens.
        """
        found = [self.special_token(name, (defaults or {}).get(name)) for name in SPECIAL_TOKEN_NAMES]
        found += [
            value
            for key, value in self.config.items()
            if key.endswith("_token") and key not in SPECIAL_TOKEN_NAMES and isinstance(value, str)
        ]
        for key in ("additional_special_tokens", "extra_special_tokens"):
            for source in (self.config, self.special_map):
                extra = source.get(key) or []
                found += map(token_content, extra.values() if isinstance(extra, Mapping) else extra)
        return list(dict.fromkeys(t for t in found if t is not None))

    def added_tokens(self, tokenizer_json: Mapping[str, Any] | None = None) -> dict[str, AddedToken]:
        """content -> added token, from added_tokens.json, tokenizer.json's added_tokens and
        tokenizer_config.json's added_tokens_decoder (later sources win; they agree in
        folders transformers wrote)."""
        found: dict[str, AddedToken] = {}
        if (self.path / "added_tokens.json").is_file():
            specials = set(self.named_special_tokens())
            for content, idx in read_json(self.path / "added_tokens.json").items():
                found[content] = AddedToken(
                    content, int(idx), special=content in specials, normalized=content not in specials
                )
        for entry in (tokenizer_json or {}).get("added_tokens") or []:
            found[entry["content"]] = AddedToken.from_hf(entry)
        for idx, entry in (self.config.get("added_tokens_decoder") or {}).items():
            found[entry["content"]] = AddedToken.from_hf(entry, int(idx))
        return found

    def chat_template(self) -> str | None:
        """The folder's chat template: chat_template.jinja, chat_template.json (a processor's) or
        tokenizer_config.json's chat_template, the first found (a named set of templates: its
        "default")."""
        template: Any = None
        if (self.path / "chat_template.jinja").is_file():
            template = (self.path / "chat_template.jinja").read_text(encoding="utf-8")
        elif (self.path / "chat_template.json").is_file():
            template = read_json(self.path / "chat_template.json").get("chat_template")
        else:
            template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {entry.get("name"): entry.get("template") for entry in template}
            template = named.get("default")
        return template if isinstance(template, str) else None

    def image_token(self) -> str | None:
        """The image placeholder the settings name (image_token), if any."""
        image_token = token_content(self.config.get("image_token"))
        extra = self.config.get("extra_special_tokens")
        if image_token is None and isinstance(extra, Mapping):
            image_token = token_content(extra.get("image_token"))
        return image_token


class Tokenizer(abc.ABC):
    """The tokenizer interface; subclasses implement encoding, decoding and their files.

    This base class keeps the special ids, the image token and the added tokens, and checks
    them once. encode / decode follow Hugging Face's `tokenizer(text)["input_ids"]` and
    `tokenizer.decode(ids, skip_special_tokens=...)`.

    Args (for subclasses):
      added: the added tokens (content and id; `special` ones are dropped by decode).
      vocab_size: number of ids (HF's `len(tokenizer)`: base vocabulary plus added tokens).
      bos_id: None when the tokenizer has no BOS token. eos_id: required (generation stops there).
      pad_id: None picks unk_id, else eos_id.
      image_token: the image placeholder; it must be an added token. None picks "<image>" when
        that is an added token (else the tokenizer has no image token).
      chat_template: the Jinja chat template of the Hugging Face folder, if any (the prompt
        layouts that follow a chat template render it: `fastvlm_jax.text.prompts`).
    """

    # Our saved format: the first tag is what `save` writes; the others are older tags `load`
    # still reads. MODEL_FILE is the model file saved next to tokenizer_config.json.
    FORMAT_TAGS: ClassVar[tuple[str, ...]]
    MODEL_FILE: ClassVar[str]

    def __init__(
        self,
        added: Iterable[AddedToken],
        vocab_size: int,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        image_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._added: dict[str, AddedToken] = {t.content: t for t in added}
        self._chat_template = chat_template
        self._vocab_size = int(vocab_size)
        if eos_id is None:
            raise ValueError("the tokenizer has no EOS token (generation and training need one)")
        if pad_id is None:
            pad_id = eos_id if unk_id is None else unk_id
        for name, idx in (
            ("bos_id", bos_id),
            ("eos_id", eos_id),
            ("pad_id", pad_id),
            ("unk_id", unk_id),
            *((f"added token {t.content!r}", t.id) for t in self._added.values()),
        ):
            if idx is not None and not 0 <= idx < self._vocab_size:
                raise ValueError(f"{name}={idx} is outside the vocabulary (size {self._vocab_size})")
        self._bos_id = None if bos_id is None else int(bos_id)
        self._eos_id, self._pad_id = int(eos_id), int(pad_id)
        self._unk_id = None if unk_id is None else int(unk_id)
        if image_token is None and DEFAULT_IMAGE_TOKEN in self._added:
            image_token = DEFAULT_IMAGE_TOKEN
        if image_token is not None and image_token not in self._added:
            raise ValueError(f"image token {image_token!r} is not an added token")
        self._image_token = image_token

    # -- what subclasses implement ------------------------------------------------------------

    @abc.abstractmethod
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids, added tokens in the text becoming single ids.

        add_special_tokens: add what the tokenizer adds around a text (BOS for LLaMA and OPT),
        as HF's `tokenizer(text, add_special_tokens=...)`.
        """

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text, as HF's `tokenizer.decode(ids, skip_special_tokens=...)`; ids outside the
        vocabulary are skipped."""

    @abc.abstractmethod
    def id_to_piece(self, idx: int) -> str | None:
        """The token string of an id (added token or model piece); None if there is none."""

    @abc.abstractmethod
    def _model_bytes(self) -> bytes:
        """The content of MODEL_FILE."""

    @abc.abstractmethod
    def _settings(self) -> dict[str, Any]:
        """What tokenizer_config.json saves besides the format tag (see `_base_settings`)."""

    @classmethod
    @abc.abstractmethod
    def _from_saved(cls, model: bytes, settings: Mapping[str, Any]) -> Tokenizer:
        """Rebuild from `_model_bytes()` and the saved settings (with their format tag)."""

    # -- shared properties --------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (HF's `len(tokenizer)`, not `tokenizer.vocab_size`);
        embedding tables need this one."""
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
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
    def chat_template(self) -> str | None:
        return self._chat_template

    def token_id(self, content: str) -> int:
        """The id of added token `content` (a ValueError naming it if there is none)."""
        if content not in self._added:
            raise ValueError(f"the tokenizer has no token {content!r}")
        return self._added[content].id

    @property
    def image_token_id(self) -> int:
        if self._image_token is None:
            raise ValueError("this tokenizer has no image token")
        return self._added[self._image_token].id

    @property
    def added_tokens(self) -> dict[str, int]:
        """content -> id of every added token."""
        return {c: t.id for c, t in self._added.items()}

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that `decode(skip_special_tokens=True)` drops."""
        return frozenset(t.id for t in self._added.values() if t.special)

    # -- our saved format ---------------------------------------------------------------------

    def _base_settings(self) -> dict[str, Any]:
        """The settings this base class keeps, for subclasses' `_settings`."""
        return {
            "added_tokens": [asdict(t) for t in sorted(self._added.values(), key=lambda t: t.id)],
            "bos_id": self._bos_id,
            "eos_id": self._eos_id,
            "pad_id": self._pad_id,
            "unk_id": self._unk_id,
            "image_token": self._image_token,
            "chat_template": self._chat_template,
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write MODEL_FILE and our tokenizer_config.json (tagged with our format) to `directory`."""
        out = as_path(directory)  # local or a bucket
        out.mkdir(parents=True, exist_ok=True)
        (out / self.MODEL_FILE).write_bytes(self._model_bytes())
        settings = {"format": self.FORMAT_TAGS[0], **self._settings()}
        (out / CONFIG_FILE).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read a folder written by `save` (Hugging Face folders: `fastvlm_jax.text.tokenizer.load_tokenizer`)."""
        folder = as_path(directory)
        settings = read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
        if settings.get("format") not in cls.FORMAT_TAGS:
            raise ValueError(f"{folder}: not a saved {cls.__name__} (format {settings.get('format')!r})")
        if not (folder / cls.MODEL_FILE).is_file():
            raise FileNotFoundError(f"{folder / cls.MODEL_FILE}: missing")
        return cls._from_saved((folder / cls.MODEL_FILE).read_bytes(), settings)

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable (data-loader worker processes): rebuilt from what `save` would write.
        return (type(self)._from_saved, (self._model_bytes(), {"format": self.FORMAT_TAGS[0], **self._settings()}))


__all__ = ["AddedToken", "CONFIG_FILE", "DEFAULT_IMAGE_TOKEN", "HFFolder", "Tokenizer", "read_json", "token_content"]
