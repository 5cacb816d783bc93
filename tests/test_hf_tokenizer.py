"""Tokenizers run by the `tokenizers` library (fastvlm_jax.text.hf_tokenizer) against transformers.

1. Hugging Face folders built in-process whose tokenizer.json differs from what sentencepiece
   would do, each as a LLaVA checkpoint (config.json model_type "llava": transformers runs
   tokenizer.json as it is) and as a bare LlamaTokenizer folder (transformers rebuilds the
   pipeline): a post-processor without BOS, a model without byte fallback, extra added and
   special tokens, a legacy-style normalizer. Our ids must equal AutoTokenizer's and our LLaVA
   prompt ids AutoProcessor's.
2. BLIP-2 OPT's GPT-2 byte-level BPE (GPT2Tokenizer): folders written by transformers 5 and in
   the older hub layout, persistence, `load_tokenizer` dispatch, and the per-family prompt
   helpers (fastvlm_jax.nn.families).
"""

import json
import pickle
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from fastvlm_jax.nn.families import answer_ids, build_prompt_ids, prompt_ids_for, stop_ids
from fastvlm_jax.text.prompts import build_llava_input_ids, format_llava_prompt
from fastvlm_jax.text.tokenizer import HFTokenizer, SentencePieceTokenizer, from_hf_dir, load_tokenizer
from tests.hf_blip2 import save_tiny_blip2_processor
from tests.sp_fixtures import make_hf_llama_tokenizer_dir, train_tiny_sentencepiece

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

PIECES = [
    "a",
    " photo",
    " of",
    " cat",
    "Question:",
    " Answer:",
    " ",
    "  ",
    "\n",
    "\t",
    ".",
    "?",
    "!",
    "'s",
    "42",
    "é",
    "ö",
    "☕",
    "日本",
    "🙂",
    "<image>",
    "</s>",
    "<pad>",
    "<s>",
    " <image>",
    "<mask>",
    "xyz",
    "Hello",
    " world",
]


def _random_texts(count: int, seed: int = 0, pieces=PIECES) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randrange(0, 10))) for _ in range(count)]


def _check_parity(ours, hf, texts, seed: int = 0) -> None:
    """Same ids with and without special tokens, same decoding of arbitrary ids."""
    assert ours.vocab_size == len(hf)
    for text in texts:
        assert ours.encode(text) == hf(text)["input_ids"], repr(text)
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"], text
    rng = random.Random(seed)
    for _ in range(300):  # random ids, including past the vocabulary (padded embedding rows)
        ids = [rng.randrange(0, ours.vocab_size + 8) for _ in range(rng.randrange(0, 14))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
    for text in texts:  # round trips through both
        ids = hf(text)["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# 1. LLaMA / LLaVA folders whose tokenizer.json is not sentencepiece's defaults

# A tiny image processor: 32 px crops, 16 px patches, every patch kept: 4 image tokens.
CROP, PATCH = 32, 16
QUESTIONS = [
    "What is shown in this image?",
    "  Describe it, briefly!  ",
    "Qu'est-ce que c'est ? 🙂 日本",
    "",
    "a <grounding> b <|im_start|>",
]
LLAVA_TEXTS = [
    format_llava_prompt("What is shown in this image?"),
    "USER: <image>\nWhat color is the bus? ASSISTANT: The bus is yellow.",
    "<image>\nhello",
    "\nhello",
    "hello",
    " hello",
    "  two leading spaces",
    "trailing   ",
    " ",
    "",
    "a\n\nb\tc\r\nd",
    "héllo wörld — naïve café",
    "日本語 中文 한국어 🙂👍🏽",
    "\u2581literal metaspace",
    "x<image>y<image><image>",
    "</s> inside <s> text <unk> <pad>",
    "<ima ge> not a token <imag",
    "a <grounding> b<grounding>c <|im_start|>user\nhi<|im_end|> <box> the<box>x <video>",
]
LLAVA_PIECES = list("abcxyzABC  \n\t.,!?'-:0129éü日🙂▁") + [
    "<image>",
    "<pad>",
    "<s>",
    "</s>",
    " the ",
    "ing",
    "<im",
    "<grounding>",
    " <grounding> ",
    "<|im_start|>",
    "<|im_end|>",
    "<box>",
    " <box>",
    "<video>",
]


def _no_bos(tokenizer_json):
    """(a) The post-processor adds nothing (tokenizer_config.json still says add_bos_token)."""
    tokenizer_json["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {},
    }


def _no_byte_fallback(tokenizer_json):
    """(b) No byte fallback and no unknown token: characters without a piece are dropped."""
    tokenizer_json["model"].update(byte_fallback=False, unk_token=None)


def _legacy_normalizer(tokenizer_json):
    """(d) The older conversion of LLaMA tokenizers (as early llava-hf folders ship): a normalizer
    prepends "▁" to every text segment and replaces spaces, no pre-tokenizer."""
    tokenizer_json["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    tokenizer_json["pre_tokenizer"] = None


def _extra_tokens(tokenizer):
    """(c) More added tokens: a normal one that swallows surrounding spaces, special ones, a
    single-word one. tokenizer_config.json also names a <video> token no file has yet."""
    from transformers import AddedToken

    tokenizer.add_tokens(
        [
            AddedToken("<grounding>", lstrip=True, rstrip=True, special=False, normalized=False),
            AddedToken("<box>", single_word=True, special=False, normalized=False),
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken("<|im_start|>", special=True, normalized=False),
            AddedToken("<|im_end|>", special=True, normalized=False),
        ],
        special_tokens=True,
    )


# case -> (byte_fallback of the sentencepiece model, tokenizer.json edit, tokenizer edit, config additions)
LLAVA_CASES = {
    "no_bos": (True, _no_bos, None, {}),
    "no_byte_fallback": (False, _no_byte_fallback, None, {}),
    "extra_tokens": (
        True,
        None,
        _extra_tokens,
        {"image_token": "<image>", "video_token": "<video>", "extra_special_tokens": ["<|im_start|>", "<|im_end|>"]},
    ),
    "legacy_normalizer": (True, _legacy_normalizer, None, {}),
}
# Where our sentencepiece implementation (tokenizer.model) would give other ids than the folder's
# tokenizer.json: what makes these folders worth testing. (In a bare LlamaTokenizer folder,
# transformers rebuilds the pre-tokenizer, so the legacy normalizer has no effect there.)
DIFFERS_FROM_SENTENCEPIECE = {
    ("no_bos", True),
    ("no_bos", False),
    ("no_byte_fallback", True),
    ("no_byte_fallback", False),
    ("legacy_normalizer", True),
}


def _build_llava_folder(folder, case: str, checkpoint: bool) -> None:
    """A LLaVA processor folder written by transformers, then edited per `case`; `checkpoint`
    adds a config.json with model_type "llava" as a whole llava-hf checkpoint has."""
    from transformers import AddedToken, CLIPImageProcessorPil, LlamaTokenizer, LlavaProcessor

    byte_fallback, edit_json, edit_tokenizer, config_extra = LLAVA_CASES[case]
    sp_model = train_tiny_sentencepiece(folder / "sp", byte_fallback=byte_fallback)
    shutil.copyfile(sp_model, folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True, add_eos_token=False, legacy=False)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    if edit_tokenizer is not None:
        edit_tokenizer(tokenizer)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": CROP}, crop_size={"height": CROP, "width": CROP})
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
    ).save_pretrained(str(folder))
    shutil.rmtree(folder / "sp")
    if edit_json is not None:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        edit_json(data)
        (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    # llava-hf's tokenizer_config.json states these (transformers 5 ignores them next to tokenizer.json).
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(add_bos_token=True, add_eos_token=False, legacy=False, **config_extra)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if checkpoint:
        (folder / "config.json").write_text(json.dumps({"model_type": "llava"}))


@pytest.fixture(
    scope="module",
    params=[(case, checkpoint) for case in LLAVA_CASES for checkpoint in (True, False)],
    ids=lambda p: f"{p[0]}-{'checkpoint' if p[1] else 'tokenizer_only'}",
)
def llava_folder(request, tmp_path_factory):
    from transformers import AutoProcessor, AutoTokenizer

    case, checkpoint = request.param
    folder = tmp_path_factory.mktemp(case)
    _build_llava_folder(folder, case, checkpoint)
    hf = AutoTokenizer.from_pretrained(str(folder))
    processor = AutoProcessor.from_pretrained(str(folder))
    # The folders take the two routes through transformers that we reproduce.
    assert type(hf).__name__ == ("TokenizersBackend" if checkpoint else "LlamaTokenizer")
    assert type(processor.tokenizer) is type(hf)
    return case, checkpoint, folder, hf, processor


def test_llava_folders_encode_decode_like_transformers(llava_folder):
    case, checkpoint, folder, hf, _ = llava_folder
    ours = from_hf_dir(folder)
    assert isinstance(ours, HFTokenizer)
    assert ours.added_tokens == {str(t): i for i, t in hf.added_tokens_decoder.items()}
    assert ours.special_ids == {i for i, t in hf.added_tokens_decoder.items() if t.special}
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.image_token_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
        hf.convert_tokens_to_ids("<image>"),
    )
    texts = LLAVA_TEXTS + _random_texts(200, seed=3, pieces=LLAVA_PIECES)
    _check_parity(ours, hf, texts, seed=3)
    # The folder really is one where tokenizer.model alone would mislead.
    if case != "extra_tokens":  # (sentencepiece refuses single_word tokens)
        sp = SentencePieceTokenizer.from_hf_dir(folder)
        differs = any(sp.encode(t) != hf(t)["input_ids"] for t in texts)
        assert differs == ((case, checkpoint) in DIFFERS_FROM_SENTENCEPIECE)
    if case == "no_byte_fallback":
        # "日" has no piece: transformers drops it, where sentencepiece gives <unk>.
        ids = ours.encode("a 日 b", add_special_tokens=False)
        assert ids == hf("a 日 b", add_special_tokens=False)["input_ids"] and ours.unk_id not in ids
        assert ours.unk_id in sp.encode("a 日 b", add_special_tokens=False)
    # Saved in our format (and pickled), it keeps its ids.
    ours.save(folder / "ours")
    for other in (load_tokenizer(folder / "ours"), pickle.loads(pickle.dumps(ours))):
        assert isinstance(other, HFTokenizer) and other.added_tokens == ours.added_tokens
        for text in texts:
            assert other.encode(text) == ours.encode(text)
            assert other.decode(ours.encode(text), False) == ours.decode(ours.encode(text), False)


def test_llava_folders_prompt_ids_like_processor(llava_folder):
    case, _, folder, _, processor = llava_folder
    ours = from_hf_dir(folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8))
    for question in QUESTIONS:
        expected = processor(images=image, text=format_llava_prompt(question))["input_ids"][0]
        count = list(expected).count(ours.image_token_id)
        assert count == (CROP // PATCH) ** 2
        assert prompt_ids_for("llava", ours, question, count) == list(expected), (case, question)
        assert build_llava_input_ids(ours, question, count) == list(expected)
    assert (expected[0] == ours.bos_id) == (case != "no_bos")


# ---------------------------------------------------------------------------------------------
# 2. BLIP-2 OPT: GPT-2 byte-level BPE


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A Blip2Processor folder written by transformers (tokenizer.json layout of transformers 5)."""
    folder = tmp_path_factory.mktemp("processor")
    processor = save_tiny_blip2_processor(folder, num_query_tokens=4, image_size=32)
    return folder, processor.tokenizer


@pytest.fixture(scope="module")
def hub_style(saved, tmp_path_factory):
    """The same vocabulary in the older hub layout (vocab.json + merges.txt, transformers 4.x
    tokenizer_config.json with add_bos_token and added_tokens_decoder), plus a non-special
    added token with lstrip, for both add_prefix_space settings."""
    from transformers import AutoTokenizer

    folder, _ = saved
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    image_id = len(model["vocab"])
    out = {}
    for prefix in (False, True):
        hub = tmp_path_factory.mktemp(f"hub_prefix{int(prefix)}")
        (hub / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
        merges = ["#version: 0.2"] + [" ".join(m) for m in model["merges"]]
        (hub / "merges.txt").write_text("\n".join(merges) + "\n")

        def entry(content, special, lstrip=False):
            return {
                "content": content,
                "lstrip": lstrip,
                "normalized": not special,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }

        config = {
            "add_bos_token": True,
            "add_prefix_space": prefix,
            "errors": "replace",
            "added_tokens_decoder": {
                "1": entry("<pad>", True),
                "2": entry("</s>", True),
                str(image_id): entry("<image>", True),
                str(image_id + 1): entry("<mask>", False, lstrip=True),
            },
            "bos_token": "</s>",
            "eos_token": "</s>",
            "unk_token": "</s>",
            "pad_token": "<pad>",
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": 1000000000000000019884624838656,
        }
        (hub / "tokenizer_config.json").write_text(json.dumps(config))
        (hub / "special_tokens_map.json").write_text(
            json.dumps({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"})
        )
        (hub / "added_tokens.json").write_text(json.dumps({"<image>": image_id, "<mask>": image_id + 1}))
        out[prefix] = (hub, AutoTokenizer.from_pretrained(hub))
    return out


def test_matches_transformers_saved_folder(saved):
    folder, hf = saved
    ours = load_tokenizer(folder)
    assert isinstance(ours, HFTokenizer)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (2, 2, 1, 2)
    assert ours.image_token == "<image>" and ours.image_token_id == hf.convert_tokens_to_ids("<image>")
    assert ours.image_token_id == ours.vocab_size - 1  # added right after the BPE vocabulary
    assert ours.special_ids == {1, 2, ours.image_token_id}
    _check_parity(ours, hf, _random_texts(200))


@pytest.mark.parametrize("prefix", [False, True])
def test_matches_transformers_hub_layout(hub_style, prefix):
    folder, hf = hub_style[prefix]
    ours = HFTokenizer.from_hf_dir(folder)
    assert ours.added_tokens["<mask>"] == ours.image_token_id + 1 and ours.image_token_id not in {2, 1}
    # add_prefix_space: a leading word is encoded as after a space ("Ġa"), as HF does.
    same = ours.encode("a photo", add_special_tokens=False) == ours.encode(" a photo", add_special_tokens=False)
    assert same == prefix
    _check_parity(ours, hf, _random_texts(200, seed=1), seed=1)


@pytest.mark.parametrize("post_processor", ["bos", "none"])
def test_blip2_prompt_ids_like_processor(saved, tmp_path, post_processor):
    """A BLIP-2 checkpoint folder: Blip2Processor's ids (image tokens, then the text with what
    tokenizer.json's post-processor adds: BOS, or nothing)."""
    from transformers import AutoProcessor

    folder, _ = saved
    shutil.copytree(folder, tmp_path / "blip2")
    folder = tmp_path / "blip2"
    (folder / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    if post_processor == "none":
        data = json.loads((folder / "tokenizer.json").read_text())
        _no_bos(data)
        (folder / "tokenizer.json").write_text(json.dumps(data))
    processor = AutoProcessor.from_pretrained(str(folder))
    ours = from_hf_dir(folder)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), np.uint8))
    for question in ["", "Question: what is on the table? Answer:", "a photo of", " é日🙂 </s>"]:
        expected = list(processor(images=image, text=question)["input_ids"][0])
        assert prompt_ids_for("blip-2", ours, question, 4) == expected, question
        assert (expected[4:5] == [2]) == (post_processor == "bos")


def test_save_load_and_pickle(saved, tmp_path):
    folder, _ = saved
    ours = HFTokenizer.from_hf_dir(folder)
    ours.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert isinstance(again, HFTokenizer)
    copy = pickle.loads(pickle.dumps(ours))
    for other in (again, copy):
        assert (
            other.vocab_size,
            other.bos_id,
            other.eos_id,
            other.pad_id,
            other.unk_id,
            other.image_token_id,
            other.added_tokens,
        ) == (
            ours.vocab_size,
            ours.bos_id,
            ours.eos_id,
            ours.pad_id,
            ours.unk_id,
            ours.image_token_id,
            ours.added_tokens,
        )
        for text in _random_texts(30, seed=2):
            assert other.encode(text) == ours.encode(text)
            assert other.decode(ours.encode(text)) == ours.decode(ours.encode(text))


def test_refuses_other_tokenizer_classes(saved, tmp_path):
    folder, _ = saved
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "CLIPTokenizer"}))
    with pytest.raises(ValueError, match="CLIPTokenizer"):
        HFTokenizer.from_hf_dir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")


def test_load_tokenizer_dispatch(tmp_path):
    sp_path = train_tiny_sentencepiece(tmp_path / "sp")
    make_hf_llama_tokenizer_dir(tmp_path / "hf", sp_path)  # tokenizer.model and tokenizer.json
    assert isinstance(load_tokenizer(tmp_path / "hf"), HFTokenizer)
    (tmp_path / "sp" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    only_sp = load_tokenizer(tmp_path / "sp")  # only tokenizer.model
    assert isinstance(only_sp, SentencePieceTokenizer)
    only_sp.save(tmp_path / "ours")
    assert isinstance(load_tokenizer(tmp_path / "ours"), SentencePieceTokenizer)


class _Config:
    def __init__(self, model_type, num_image_tokens, eos=2):
        self.model_type, self.num_image_tokens = model_type, num_image_tokens
        self.text = type("Text", (), {"eos_token_id": eos})()


def test_prompt_helpers(saved, tmp_path):
    folder, hf = saved
    bpe = HFTokenizer.from_hf_dir(folder)
    img = bpe.image_token_id
    # BLIP-2: image tokens, BOS, the question as typed; empty question = captioning.
    assert build_prompt_ids(_Config("blip-2", 3), bpe, "") == [img] * 3 + [2]
    question = "Question: what is this? Answer:"
    assert build_prompt_ids(_Config("blip-2", 3), bpe, question) == [img] * 3 + hf(question)["input_ids"]
    with pytest.raises(ValueError, match="image token"):
        build_prompt_ids(_Config("blip-2", 3), bpe, "a <image> b")
    # An answer continues the prompt as HF would tokenize the joined text.
    joined = hf(question + " a red car")["input_ids"]
    assert hf(question)["input_ids"] + answer_ids("blip-2", bpe, question, " a red car ") == joined
    assert [2] + answer_ids("blip-2", bpe, "", "a red car") == hf("a red car")["input_ids"]
    # Stop ids: BLIP-2 adds the language model's eos ("\n" in the released models).
    newline = bpe.encode("\n", add_special_tokens=False)[0]
    assert stop_ids(_Config("blip-2", 3, eos=newline), bpe) == (2, newline)
    assert stop_ids(_Config("blip-2", 3, eos=2), bpe) == (2,)
    # LLaVA is unchanged.
    make_hf_llama_tokenizer_dir(tmp_path / "hf", train_tiny_sentencepiece(tmp_path / "sp"))
    sp = load_tokenizer(tmp_path / "hf")
    assert build_prompt_ids(_Config("llava", 5), sp, "Describe it.") == build_llava_input_ids(sp, "Describe it.", 5)
    assert answer_ids("llava", sp, "Q?", " a cat ") == sp.encode("a cat", add_special_tokens=False)
    assert stop_ids(_Config("llava", 5, eos=99), sp) == (sp.eos_id,)
    with pytest.raises(ValueError, match="no prompt format"):
        prompt_ids_for("paligemma", sp, "hi", 4)


def test_training_text_format_for_blip2(saved):
    """train.input builds BLIP-2 prompts and answers, and ships the tokenizer to workers."""
    from fastvlm_jax.image.processing import ImageProcessorConfig
    from train import input as input_lib

    folder, hf = saved
    bpe = HFTokenizer.from_hf_dir(folder)
    fmt = input_lib.TextFormat(bpe, "", num_image_tokens=4, seq_len=32, model_type="blip-2")
    assert fmt.prompt == [bpe.image_token_id] * 4 + [2]
    example = fmt("a red car.")
    n = fmt.prompt_len + len(hf("a red car.", add_special_tokens=False)["input_ids"]) + 1
    assert list(example["input_ids"][:n]) == [bpe.image_token_id] * 4 + hf("a red car.")["input_ids"] + [2]
    assert example["loss_mask"].sum() == n - fmt.prompt_len
    transform = input_lib.CaptionExample(bpe, ImageProcessorConfig(), "a photo of", 4, 32, model_type="blip-2")
    copy = pickle.loads(pickle.dumps(transform))
    assert isinstance(copy.tokenizer, HFTokenizer)
    assert copy.text.prompt == transform.text.prompt == [bpe.image_token_id] * 4 + hf("a photo of")["input_ids"]
    assert list(copy.text("a cat")["input_ids"]) == list(transform.text("a cat")["input_ids"])
