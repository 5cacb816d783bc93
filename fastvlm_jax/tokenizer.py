"""SentencePiece tokenizer with added special tokens, matching Hugging Face's LlamaTokenizer.

The reference is `transformers` 5.x `LlamaTokenizer` (a `tokenizers` BPE model built from the
sentencepiece file). Its behaviour, which we reproduce on top of the sentencepiece library:

- Added tokens (`<unk>`, `<s>`, `</s>`, `<image>`, `<pad>`, ...) are cut out of the text first,
  leftmost-longest, and become single ids. The text between them is encoded separately.
- No unicode normalization: whatever normalizer the .model file declares is ignored (HF sets
  `normalizer = None`), spaces simply become "▁".
- The "▁" prefix (sentencepiece's dummy prefix) is added by a Metaspace pre-tokenizer with
  `prepend_scheme="first"` (the default, `legacy=False`): only the text segment that starts at
  offset 0 of the input gets it, and only if it does not already start with a space. So
  `"USER: <image>\\nWhat"` encodes `"\\nWhat"` with no prefix, and `" hi"` encodes like `"hi"`.
  `legacy=True` gives `prepend_scheme="always"` (every segment), `add_prefix_space=False` never.
- A BOS id is prepended when asked (LLaVA checkpoints set `add_bos_token=true`); EOS is not.
- Decoding maps ids to pieces, drops special added tokens when asked, then runs HF's decoder
  chain: "▁" -> " ", byte-fallback pieces `<0xNN>` -> UTF-8 (an invalid run becomes one U+FFFD
  per byte), concatenate, strip one leading space. Ids outside the vocabulary are skipped.

We encode with a copy of the sentencepiece model whose normalizer is switched to "identity"
without dummy prefix; the prefix rule above is applied by us. This class covers LLaMA-style
(sentencepiece) tokenizers; GPT-2 style byte-level BPE (BLIP-2 OPT) is
`fastvlm_jax.bpe_tokenizer.BPETokenizer`, and `load_tokenizer(dir)` picks the class a folder needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sentencepiece as spm

if TYPE_CHECKING:
    from fastvlm_jax.bpe_tokenizer import BPETokenizer

SP_MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
FORMAT_TAG = "fastvlm_jax.tokenizer/1"
DEFAULT_IMAGE_TOKEN = "<image>"

# tokenizer_class values whose HF behaviour is the LLaMA one we reproduce.
_LLAMA_CLASSES = {"LlamaTokenizer", "LlamaTokenizerFast", "CodeLlamaTokenizer", "CodeLlamaTokenizerFast"}
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class AddedToken:
    """A string that always maps to one id, cut out of the text before sentencepiece runs.

    special: dropped by `decode(skip_special_tokens=True)`.
    lstrip / rstrip: the match also swallows whitespace on its left / right (HF semantics).
    """

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False


def _no_prefix_model(model_bytes: bytes) -> tuple[bytes, list[int]]:
    """The same sentencepiece model with identity normalization and no dummy prefix.

    HF's LlamaTokenizer ignores the model's normalizer (normalizer=None) and adds the "▁" prefix
    itself, per segment; so we turn both off in sentencepiece and add the prefix ourselves.
    Also returns the ids of user-defined pieces, which HF treats as (non-special) added tokens.
    """
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf, a dependency of tfds/orbax

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.precompiled_charsmap = b""
    norm.add_dummy_prefix = False
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    proto.ClearField("denormalizer_spec")
    user_defined = [
        i for i, piece in enumerate(proto.pieces)
        if piece.type == sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    ]
    return proto.SerializeToString(), user_defined


def _token_content(value: Any) -> str | None:
    """HF stores special tokens as a string or as {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and "content" in value:
        return str(value["content"])
    raise ValueError(f"cannot read a token from {value!r}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


class Tokenizer:
    """A sentencepiece model plus added special tokens (see the module docstring for the rules).

    Args:
      sp_model: path to a sentencepiece `tokenizer.model`, or its bytes.
      added_tokens: content -> id for tokens matched as a whole (e.g. {"<image>": 32000,
        "<pad>": 32001}). They are special (skipped when decoding) unless `AddedToken` objects
        with special=False are given via `token_options`. The model's control pieces ("<s>",
        "</s>") and its unknown piece ("<unk>") are always added, as HF does.
      bos_id, eos_id, pad_id: special ids. pad_id defaults to the unknown id (what LLaVA used).
      image_token: the placeholder string for an image; it must be an added token. None picks
        "<image>" when that is an added token (else the tokenizer has no image token).
      unk_id: defaults to the model's unknown id.
      add_prefix_space, legacy: HF LlamaTokenizer flags (defaults True / False, as in HF).
      token_options: optional full `AddedToken` records (flags) for entries of added_tokens.
    """

    def __init__(
        self,
        sp_model: str | os.PathLike | bytes,
        added_tokens: Mapping[str, int] | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        image_token: str | None = None,
        *,
        unk_id: int | None = None,
        add_prefix_space: bool = True,
        legacy: bool = False,
        token_options: Sequence[AddedToken] = (),
    ) -> None:
        if isinstance(sp_model, bytes):
            self._model_bytes = sp_model
        else:
            path = Path(sp_model)
            if not path.is_file():
                raise FileNotFoundError(f"sentencepiece model not found: {path}")
            self._model_bytes = path.read_bytes()
        proto_bytes, user_defined = _no_prefix_model(self._model_bytes)
        self._sp = spm.SentencePieceProcessor(model_proto=proto_bytes)
        sp = self._sp
        self._sp_size = sp.get_piece_size()

        # Added tokens: the model's own pieces HF registers as added tokens first (control and
        # unknown pieces as special, user-defined ones as normal), then the caller's; explicit
        # options override.
        tokens: dict[str, AddedToken] = {}
        for i in range(self._sp_size):
            if sp.is_control(i) or sp.is_unknown(i):
                tokens[sp.id_to_piece(i)] = AddedToken(sp.id_to_piece(i), i)
        for i in user_defined:
            tokens[sp.id_to_piece(i)] = AddedToken(sp.id_to_piece(i), i, special=False)
        for content, idx in (added_tokens or {}).items():
            tokens[content] = AddedToken(content, int(idx))
        for option in token_options:
            tokens[option.content] = option
        for tok in tokens.values():
            if not tok.content:
                raise ValueError("an added token cannot be the empty string")
            if tok.id < 0:
                raise ValueError(f"added token {tok.content!r} has a negative id {tok.id}")
            if tok.id < self._sp_size and sp.id_to_piece(tok.id) != tok.content:
                raise ValueError(
                    f"added token {tok.content!r} has id {tok.id}, which is the sentencepiece piece "
                    f"{sp.id_to_piece(tok.id)!r}"
                )
        self._added: dict[str, AddedToken] = tokens
        self._added_by_id: dict[int, AddedToken] = {t.id: t for t in tokens.values()}
        # Leftmost match; among matches at one position the longest (alternation tries longer first).
        contents = sorted(tokens, key=len, reverse=True)
        self._split_re = re.compile("|".join(re.escape(c) for c in contents)) if contents else None

        self._unk_id = int(sp.unk_id() if unk_id is None else unk_id)
        self._bos_id = int(sp.bos_id() if bos_id is None else bos_id)
        self._eos_id = int(sp.eos_id() if eos_id is None else eos_id)
        self._pad_id = int(self._unk_id if pad_id is None else pad_id)
        if self._bos_id < 0 or self._eos_id < 0:
            raise ValueError("the sentencepiece model defines no bos/eos piece: pass bos_id and eos_id")
        if image_token is None and DEFAULT_IMAGE_TOKEN in tokens:
            image_token = DEFAULT_IMAGE_TOKEN
        if image_token is not None and image_token not in tokens:
            raise ValueError(f"image token {image_token!r} is not an added token")
        self._image_token = image_token
        self._add_prefix_space = bool(add_prefix_space)
        self._legacy = bool(legacy)

    # -- properties --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids: sentencepiece pieces plus added tokens (HF's `len(tokenizer)`).

        HF's `tokenizer.vocab_size` counts only the base pieces; embedding tables need this one.
        """
        return max([self._sp_size - 1, *self._added_by_id]) + 1

    @property
    def add_prefix_space(self) -> bool:
        """HF flag: text gets a "▁" prefix (per the `legacy` scheme) and decoding strips it."""
        return self._add_prefix_space

    @property
    def legacy(self) -> bool:
        """HF flag: True prefixes every text segment ("always"), False only the first ("first")."""
        return self._legacy

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
    def unk_id(self) -> int:
        return self._unk_id

    @property
    def image_token(self) -> str | None:
        return self._image_token

    @property
    def image_token_id(self) -> int:
        if self._image_token is None:
            raise ValueError("this tokenizer has no image token")
        return self._added[self._image_token].id

    @property
    def added_tokens(self) -> dict[str, int]:
        """content -> id of every added token (including <unk>, <s>, </s>)."""
        return {c: t.id for c, t in self._added.items()}

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that `decode(skip_special_tokens=True)` drops."""
        return frozenset(t.id for t in self._added.values() if t.special)

    def id_to_piece(self, idx: int) -> str | None:
        """The token string of an id (added token content or sentencepiece piece); None if unknown."""
        tok = self._added_by_id.get(idx)
        if tok is not None:
            return tok.content
        if 0 <= idx < self._sp_size:
            return self._sp.id_to_piece(idx)
        return None

    # -- encoding ----------------------------------------------------------------------------

    def _segments(self, text: str) -> Iterator[tuple[int, str | AddedToken]]:
        """Split `text` into (offset, plain text) and (offset, AddedToken) parts, in order."""
        if self._split_re is None:
            if text:
                yield 0, text
            return
        pos = 0
        for match in self._split_re.finditer(text):
            tok = self._added[match.group(0)]
            start, end = match.span()
            if start < pos:
                continue  # inside whitespace swallowed by the previous token's rstrip
            if tok.lstrip:
                while start > pos and text[start - 1].isspace():
                    start -= 1
            if start > pos:
                yield pos, text[pos:start]
            yield start, tok
            if tok.rstrip:
                while end < len(text) and text[end].isspace():
                    end += 1
            pos = end
        if pos < len(text):
            yield pos, text[pos:]

    def _encode_plain(self, text: str, offset: int) -> list[int]:
        """Sentencepiece ids for text containing no added token, with HF's "▁" prefix rule."""
        if not text:
            return []
        if self.add_prefix_space and not text.startswith((" ", "\u2581")):
            # Metaspace: "always" (legacy) prefixes every segment, "first" only the one at offset 0.
            if self.legacy or offset == 0:
                text = " " + text
        return list(self._sp.encode(text))

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Text -> ids, added tokens in the text becoming single ids; BOS first if `add_bos`."""
        ids: list[int] = [self._bos_id] if add_bos else []
        for offset, part in self._segments(text):
            if isinstance(part, AddedToken):
                ids.append(part.id)
            else:
                ids.extend(self._encode_plain(part, offset))
        if add_eos:
            ids.append(self._eos_id)
        return ids

    # -- decoding ----------------------------------------------------------------------------

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids -> text, exactly as HF `tokenizer.decode(ids, skip_special_tokens=...)`."""
        special = self.special_ids if skip_special_tokens else frozenset()
        pieces: list[str] = []
        for idx in ids:
            idx = int(idx)
            if idx in special:
                continue
            piece = self.id_to_piece(idx)
            if piece is not None:
                pieces.append(piece)
        out: list[str] = []
        pending: list[int] = []  # a run of byte-fallback pieces, decoded together

        def flush() -> None:
            if pending:
                try:
                    out.append(bytes(pending).decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(pending))  # HF: one replacement char per byte
                pending.clear()

        for piece in pieces:
            match = _BYTE_PIECE.match(piece)
            if match is not None:
                pending.append(int(match.group(1), 16))
                continue
            flush()
            out.append(piece.replace("\u2581", " "))
        flush()
        text = "".join(out)
        if self.add_prefix_space and text.startswith(" "):
            text = text[1:]  # undo the dummy prefix (HF's Strip(left=1) decoder)
        return text

    # -- persistence -------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "format": FORMAT_TAG,
            "added_tokens": [dataclasses.asdict(t) for t in sorted(self._added.values(), key=lambda t: t.id)],
            "bos_id": self._bos_id,
            "eos_id": self._eos_id,
            "pad_id": self._pad_id,
            "unk_id": self._unk_id,
            "image_token": self._image_token,
            "add_prefix_space": self.add_prefix_space,
            "legacy": self.legacy,
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.model` (the original bytes) and our `tokenizer_config.json`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / SP_MODEL_FILE).write_bytes(self._model_bytes)
        (out / CONFIG_FILE).write_text(json.dumps(self._config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def _from_config(cls, model: str | os.PathLike | bytes, cfg: Mapping[str, Any]) -> "Tokenizer":
        options = [AddedToken(**t) for t in cfg["added_tokens"]]
        return cls(
            model,
            added_tokens={t.content: t.id for t in options},
            bos_id=cfg["bos_id"],
            eos_id=cfg["eos_id"],
            pad_id=cfg["pad_id"],
            image_token=cfg.get("image_token"),
            unk_id=cfg["unk_id"],
            add_prefix_space=cfg.get("add_prefix_space", True),
            legacy=cfg.get("legacy", False),
            token_options=options,
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Read a folder written by `save` (a Hugging Face folder also works: see from_hf_dir)."""
        folder = Path(directory)
        config_path = folder / CONFIG_FILE
        cfg = _read_json(config_path) if config_path.is_file() else {}
        if cfg.get("format") != FORMAT_TAG:
            return cls.from_hf_dir(folder)
        model_path = folder / SP_MODEL_FILE
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: missing sentencepiece model")
        return cls._from_config(model_path, cfg)

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable (data-loader workers): rebuild from the model bytes and our config.
        return (Tokenizer._from_config, (self._model_bytes, self._config()))

    @classmethod
    def from_hf_dir(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Build from a Hugging Face tokenizer folder (LLaMA-style sentencepiece tokenizers).

        Reads `tokenizer.model` (required) and, when present, `tokenizer_config.json`
        (added_tokens_decoder, bos/eos/unk/pad tokens, legacy, add_prefix_space, image_token),
        `tokenizer.json` (added_tokens), `special_tokens_map.json` and `added_tokens.json`.
        """
        folder = Path(directory)
        model_path = folder / SP_MODEL_FILE
        if not model_path.is_file():
            raise FileNotFoundError(
                f"{folder}: no {SP_MODEL_FILE}: not a sentencepiece (LLaMA-style) tokenizer. GPT-2 "
                "style byte-level BPE folders load with fastvlm_jax.bpe_tokenizer.BPETokenizer "
                "(`load_tokenizer` picks the class)."
            )
        config = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
        special_map = (
            _read_json(folder / "special_tokens_map.json") if (folder / "special_tokens_map.json").is_file() else {}
        )
        tok_class = config.get("tokenizer_class")
        if tok_class is not None and tok_class not in _LLAMA_CLASSES:
            raise ValueError(
                f"{folder}: tokenizer_class {tok_class!r} is not supported; only LLaMA-style "
                f"sentencepiece tokenizers ({', '.join(sorted(_LLAMA_CLASSES))}) are"
            )

        def special_token(name: str, default: str | None) -> str | None:
            value = _token_content(config.get(name))
            if value is None:
                value = _token_content(special_map.get(name))
            return default if value is None else value

        bos, eos = special_token("bos_token", "<s>"), special_token("eos_token", "</s>")
        unk, pad = special_token("unk_token", "<unk>"), special_token("pad_token", None)
        special_names = {t for t in (bos, eos, unk, pad) if t is not None}
        for key in ("additional_special_tokens", "extra_special_tokens"):
            for source in (config, special_map):
                extra = source.get(key) or []
                values = extra.values() if isinstance(extra, Mapping) else extra
                special_names.update(c for c in map(_token_content, values) if c is not None)

        # Added tokens, later sources overriding earlier ones (tokenizer.json is the most complete).
        found: dict[str, AddedToken] = {}
        added_json = folder / "added_tokens.json"
        if added_json.is_file():
            for content, idx in _read_json(added_json).items():
                found[content] = AddedToken(content, int(idx), special=content in special_names)
        for idx, entry in (config.get("added_tokens_decoder") or {}).items():
            found[entry["content"]] = _added_from_hf(entry, int(idx))
        tokenizer_json = folder / "tokenizer.json"
        if tokenizer_json.is_file():
            for entry in _read_json(tokenizer_json).get("added_tokens") or []:
                found[entry["content"]] = _added_from_hf(entry, int(entry["id"]))

        image_token = _token_content(config.get("image_token"))
        extra = config.get("extra_special_tokens")
        if image_token is None and isinstance(extra, Mapping):
            image_token = _token_content(extra.get("image_token"))
        if image_token is None and DEFAULT_IMAGE_TOKEN in found:
            image_token = DEFAULT_IMAGE_TOKEN
        if image_token is not None and image_token not in found:
            raise ValueError(f"{folder}: image token {image_token!r} is not among the added tokens")

        probe = spm.SentencePieceProcessor(model_file=str(model_path))
        ids = {probe.id_to_piece(i): i for i in range(probe.get_piece_size())}
        ids.update({c: t.id for c, t in found.items()})

        def id_of(content: str | None, what: str) -> int | None:
            if content is None:
                return None
            if content not in ids:
                raise ValueError(f"{folder}: {what} {content!r} is neither a piece nor an added token")
            return ids[content]

        return cls(
            model_path,
            added_tokens={c: t.id for c, t in found.items()},
            bos_id=id_of(bos, "bos_token"),
            eos_id=id_of(eos, "eos_token"),
            pad_id=id_of(pad, "pad_token"),
            image_token=image_token,
            unk_id=id_of(unk, "unk_token"),
            add_prefix_space=True if config.get("add_prefix_space") is None else bool(config["add_prefix_space"]),
            legacy=bool(config.get("legacy", False)),
            token_options=list(found.values()),
        )


def _added_from_hf(entry: Mapping[str, Any], idx: int) -> AddedToken:
    if entry.get("single_word"):
        raise ValueError(f"added token {entry['content']!r} uses single_word=True, which is not supported")
    return AddedToken(
        content=str(entry["content"]),
        id=idx,
        special=bool(entry.get("special", False)),
        lstrip=bool(entry.get("lstrip", False)),
        rstrip=bool(entry.get("rstrip", False)),
    )


def load_tokenizer(directory: str | os.PathLike) -> "Tokenizer | BPETokenizer":
    """The tokenizer saved in `directory`, of the class its files call for.

    Our own folders carry a format tag (sentencepiece `Tokenizer` or byte-level BPE
    `BPETokenizer`); a Hugging Face folder is sentencepiece when it has tokenizer.model, else
    byte-level BPE when it has tokenizer.json or vocab.json + merges.txt.
    """
    from fastvlm_jax import bpe_tokenizer

    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    config_path = folder / CONFIG_FILE
    tag = _read_json(config_path).get("format") if config_path.is_file() else None
    if tag == FORMAT_TAG:
        return Tokenizer.load(folder)
    if tag == bpe_tokenizer.FORMAT_TAG:
        return bpe_tokenizer.BPETokenizer.load(folder)
    if (folder / SP_MODEL_FILE).is_file():
        return Tokenizer.from_hf_dir(folder)
    if (folder / "tokenizer.json").is_file() or (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        return bpe_tokenizer.BPETokenizer.from_hf_dir(folder)
    raise FileNotFoundError(f"{folder}: no tokenizer files (tokenizer.model, tokenizer.json or "
                            "vocab.json + merges.txt)")


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


def build_llava_input_ids(tokenizer: Tokenizer, question: str, num_image_tokens: int) -> list[int]:
    """Prompt ids for one image and one question, with the image placeholder expanded.

    Like HF's LlavaProcessor, the placeholder is repeated `num_image_tokens` times in the text
    before tokenizing (each copy is an added token, so each becomes one id); BOS is prepended.
    """
    image_token = tokenizer.image_token
    if image_token is None:
        raise ValueError("the tokenizer has no image token")
    if image_token in question:
        raise ValueError(f"the question must not contain the image token {image_token!r}")
    if num_image_tokens <= 0:
        raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
    prompt = format_llava_prompt(question, image_token)
    return tokenizer.encode(prompt.replace(image_token, image_token * num_image_tokens), add_bos=True)


__all__ = [
    "AddedToken",
    "Tokenizer",
    "build_llava_input_ids",
    "format_llava_prompt",
    "load_tokenizer",
    "num_image_tokens",
]
