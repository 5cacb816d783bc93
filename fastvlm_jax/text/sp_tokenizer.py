"""SentencePiece tokenizer with added tokens, matching transformers 5.x `LlamaTokenizer`.

Used for Hugging Face folders that have only `tokenizer.model` (with tokenizer.json,
`fastvlm_jax.text.hf_tokenizer.HFTokenizer` runs that file instead), and for the tokenizers we train
ourselves (train.input), saved in our checkpoints as tokenizer.model + tokenizer_config.json.

transformers 5.x converts the sentencepiece file into a `tokenizers` BPE pipeline; we reproduce
that pipeline's behaviour on top of the sentencepiece library:

- Added tokens (`<unk>`, `<s>`, `</s>`, `<image>`, `<pad>`, ...) are cut out of the text first,
  leftmost-longest, and become single ids. The text between them is encoded separately.
- No unicode normalization: whatever normalizer the .model file declares is ignored (HF sets
  `normalizer = None`), spaces simply become "▁".
- The "▁" prefix (sentencepiece's dummy prefix) is added by a Metaspace pre-tokenizer with
  `prepend_scheme="first"` (the default, `legacy=False`): only the text segment that starts at
  offset 0 of the input gets it, and only if it does not already start with a space. So
  `"USER: <image>\\nWhat"` encodes `"\\nWhat"` with no prefix, and `" hi"` encodes like `"hi"`.
  `legacy=True` gives `prepend_scheme="always"` (every segment), `add_prefix_space=False` never.
- With special tokens, BOS is prepended when `add_bos_token` and EOS appended when
  `add_eos_token`. transformers 5.x reads both from tokenizer_config.json and defaults both to
  False for such a folder (llava-hf's says add_bos_token=true); our own folders default to BOS.
- Decoding maps ids to pieces, drops special added tokens when asked, then runs HF's decoder
  chain: "▁" -> " ", byte-fallback pieces `<0xNN>` -> UTF-8 (an invalid run becomes one U+FFFD
  per byte), concatenate, strip one leading space. Ids outside the vocabulary are skipped.

One known difference: a character that no piece and no byte-fallback piece covers encodes as
<unk> here (sentencepiece) but is dropped by transformers (its BPE has no unknown token). LLaMA
tokenizers have byte fallback, so this only concerns models trained without it.

We encode with a copy of the sentencepiece model whose normalizer is switched to "identity"
without dummy prefix; the prefix rule above is applied by us.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece.sentencepiece_model_pb2 import ModelProto  # pyright: ignore[reportAttributeAccessIssue] protobuf-made

from fastvlm_jax.text.base import AddedToken, HFFolder, Tokenizer, read_json

SP_MODEL_FILE = "tokenizer.model"
FORMAT_TAG = "fastvlm_jax.tokenizer/1"  # an on-disk tag: kept when the module moved

# tokenizer_class values whose HF behaviour is the LLaMA one we reproduce (None: unnamed).
_LLAMA_CLASSES = {None, "LlamaTokenizer"}
_LLAMA_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _no_prefix_model(model_bytes: bytes) -> tuple[bytes, list[int]]:
    """The same sentencepiece model with identity normalization and no dummy prefix.

    HF's LlamaTokenizer ignores the model's normalizer (normalizer=None) and adds the "▁" prefix
    itself, per segment; so we turn both off in sentencepiece and add the prefix ourselves.
    Also returns the ids of user-defined pieces, which HF treats as (non-special) added tokens.
    """

    proto = ModelProto()
    proto.ParseFromString(model_bytes)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.precompiled_charsmap = b""
    norm.add_dummy_prefix = False
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    proto.ClearField("denormalizer_spec")
    user_defined = [i for i, piece in enumerate(proto.pieces) if piece.type == ModelProto.SentencePiece.USER_DEFINED]
    return proto.SerializeToString(), user_defined


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model plus added tokens (see the module docstring for the rules).

    Args:
      sp_model: path to a sentencepiece `tokenizer.model`, or its bytes.
      added_tokens: content -> id for tokens matched as a whole (e.g. {"<image>": 32000,
        "<pad>": 32001}). They are special (skipped when decoding) unless `AddedToken` records
        with special=False are given via `token_options`. The model's control pieces ("<s>",
        "</s>") and its unknown piece ("<unk>") are always added, as HF does.
      bos_id, eos_id, pad_id: special ids (default: the model's). pad_id defaults to the
        unknown id (what LLaVA used).
      image_token: the placeholder string for an image; it must be an added token. None picks
        "<image>" when that is an added token (else the tokenizer has no image token).
      unk_id: defaults to the model's unknown id.
      add_prefix_space, legacy: HF LlamaTokenizer flags (defaults True / False, as in HF).
      add_bos_token, add_eos_token: what `encode(text, add_special_tokens=True)` adds.
      token_options: optional full `AddedToken` records (flags) for entries of added_tokens.
    """

    FORMAT_TAGS = (FORMAT_TAG,)
    MODEL_FILE = SP_MODEL_FILE

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
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        token_options: Sequence[AddedToken] = (),
    ) -> None:
        if isinstance(sp_model, bytes):
            self._sp_bytes = sp_model
        else:
            path = Path(sp_model)
            if not path.is_file():
                raise FileNotFoundError(f"sentencepiece model not found: {path}")
            self._sp_bytes = path.read_bytes()
        proto_bytes, user_defined = _no_prefix_model(self._sp_bytes)
        self._sp = sp = spm.SentencePieceProcessor(model_proto=proto_bytes)
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
            if tok.single_word:
                raise ValueError(f"added token {tok.content!r} uses single_word=True, which is not supported")
            if tok.id < 0:
                raise ValueError(f"added token {tok.content!r} has a negative id {tok.id}")
            if tok.id < self._sp_size and sp.id_to_piece(tok.id) != tok.content:
                raise ValueError(
                    f"added token {tok.content!r} has id {tok.id}, which is the sentencepiece "
                    f"piece {sp.id_to_piece(tok.id)!r}"
                )
        self._by_id: dict[int, AddedToken] = {t.id: t for t in tokens.values()}
        # Leftmost match; among matches at one position the longest (alternation tries longer first).
        contents = sorted(tokens, key=len, reverse=True)
        self._split_re = re.compile("|".join(re.escape(c) for c in contents)) if contents else None

        bos_id = sp.bos_id() if bos_id is None else bos_id
        eos_id = sp.eos_id() if eos_id is None else eos_id
        if bos_id < 0 or eos_id < 0:
            raise ValueError("the sentencepiece model defines no bos/eos piece: pass bos_id and eos_id")
        unk_id = sp.unk_id() if unk_id is None else unk_id
        super().__init__(
            tokens.values(),
            max([self._sp_size - 1, *self._by_id]) + 1,
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            unk_id=unk_id,
            image_token=image_token,
        )
        self._add_prefix_space = bool(add_prefix_space)
        self._legacy = bool(legacy)
        self._add_bos_token = bool(add_bos_token)
        self._add_eos_token = bool(add_eos_token)

    def id_to_piece(self, idx: int) -> str | None:
        tok = self._by_id.get(idx)
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
        # Metaspace: "always" (legacy) prefixes every segment, "first" only the one at offset 0.
        if self._add_prefix_space and not text.startswith((" ", "\u2581")) and (self._legacy or offset == 0):
            text = " " + text
        return list(self._sp.encode(text))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        bos_id = self.bos_id  # never None here: __init__ requires a BOS piece
        ids: list[int] = [bos_id] if add_special_tokens and self._add_bos_token and bos_id is not None else []
        for offset, part in self._segments(text):
            if isinstance(part, AddedToken):
                ids.append(part.id)
            else:
                ids.extend(self._encode_plain(part, offset))
        if add_special_tokens and self._add_eos_token:
            ids.append(self.eos_id)
        return ids

    # -- decoding ----------------------------------------------------------------------------

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        special = self.special_ids if skip_special_tokens else frozenset()
        pieces = [self.id_to_piece(int(i)) for i in ids if int(i) not in special]
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
            if piece is None:
                continue  # outside the vocabulary
            match = _BYTE_PIECE.match(piece)
            if match is not None:
                pending.append(int(match.group(1), 16))
                continue
            flush()
            out.append(piece.replace("\u2581", " "))
        flush()
        text = "".join(out)
        if self._add_prefix_space and text.startswith(" "):
            text = text[1:]  # undo the dummy prefix (HF's Strip(left=1) decoder)
        return text

    # -- persistence -------------------------------------------------------------------------

    def _model_bytes(self) -> bytes:
        return self._sp_bytes

    def _settings(self) -> dict[str, Any]:
        return {
            **self._base_settings(),
            "add_prefix_space": self._add_prefix_space,
            "legacy": self._legacy,
            "add_bos_token": self._add_bos_token,
            "add_eos_token": self._add_eos_token,
        }

    @classmethod
    def _from_saved(cls, model: bytes, settings: Mapping[str, Any]) -> SentencePieceTokenizer:
        options = [AddedToken(**t) for t in settings["added_tokens"]]
        return cls(
            model,
            added_tokens={t.content: t.id for t in options},
            bos_id=settings["bos_id"],
            eos_id=settings["eos_id"],
            pad_id=settings["pad_id"],
            image_token=settings.get("image_token"),
            unk_id=settings["unk_id"],
            add_prefix_space=settings.get("add_prefix_space", True),
            legacy=settings.get("legacy", False),
            # Folders saved before these flags existed always added BOS and never EOS.
            add_bos_token=settings.get("add_bos_token", True),
            add_eos_token=settings.get("add_eos_token", False),
            token_options=options,
        )

    @classmethod
    def from_hf_dir(cls, directory: str | os.PathLike) -> SentencePieceTokenizer:
        """Build from a Hugging Face LLaMA-style folder with `tokenizer.model`.

        Reads, when present, tokenizer_config.json (added_tokens_decoder, bos/eos/unk/pad tokens,
        legacy, add_prefix_space, add_bos_token, add_eos_token, image_token),
        special_tokens_map.json, added_tokens.json and tokenizer.json's added tokens.
        """
        hf = HFFolder.read(directory)
        model_path = hf.path / SP_MODEL_FILE
        if not model_path.is_file():
            raise FileNotFoundError(f"{hf.path}: no {SP_MODEL_FILE}: not a sentencepiece tokenizer folder")
        if hf.tokenizer_class not in _LLAMA_CLASSES:
            raise ValueError(
                f"{hf.path}: tokenizer_class {hf.config.get('tokenizer_class')!r} is not supported "
                "with a sentencepiece model; only LlamaTokenizer is"
            )
        tokenizer_json = hf.path / "tokenizer.json"
        found = hf.added_tokens(read_json(tokenizer_json) if tokenizer_json.is_file() else None)
        for tok in found.values():
            if tok.single_word:
                raise ValueError(f"added token {tok.content!r} uses single_word=True, which is not supported")

        image_token = hf.image_token()
        if image_token is not None and image_token not in found:
            raise ValueError(f"{hf.path}: image token {image_token!r} is not among the added tokens")

        probe = spm.SentencePieceProcessor(model_file=str(model_path))
        ids = {probe.id_to_piece(i): i for i in range(probe.get_piece_size())}
        ids.update({c: t.id for c, t in found.items()})

        def id_of(name: str) -> int | None:
            content = hf.special_token(name, _LLAMA_DEFAULTS.get(name))
            if content is None:
                return None
            if content not in ids:
                raise ValueError(f"{hf.path}: {name} {content!r} is neither a piece nor an added token")
            return ids[content]

        config = hf.config
        return cls(
            model_path,
            added_tokens={c: t.id for c, t in found.items()},
            bos_id=id_of("bos_token"),
            eos_id=id_of("eos_token"),
            pad_id=id_of("pad_token"),
            image_token=image_token,
            unk_id=id_of("unk_token"),
            add_prefix_space=True if config.get("add_prefix_space") is None else bool(config["add_prefix_space"]),
            legacy=bool(config.get("legacy", False)),
            # transformers 5.x: a folder without tokenizer.json adds what these flags say, default none.
            add_bos_token=bool(config.get("add_bos_token", False)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            token_options=list(found.values()),
        )


__all__ = ["SentencePieceTokenizer"]
