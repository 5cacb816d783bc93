"""Byte-level BPE tokenizer (BLIP-2 OPT): parity with transformers' GPT2Tokenizer, persistence,
`load_tokenizer` dispatch, and the per-family prompt helpers (fastvlm_jax.prompts)."""

import json
import pickle
import random

import pytest

from fastvlm_jax.bpe_tokenizer import BPETokenizer
from fastvlm_jax.prompts import answer_ids, build_prompt_ids, prompt_ids_for, stop_ids
from fastvlm_jax.tokenizer import Tokenizer, build_llava_input_ids, load_tokenizer
from tests.hf_blip2 import save_tiny_blip2_processor
from tests.sp_fixtures import make_hf_llama_tokenizer_dir, train_tiny_sentencepiece

PIECES = ["a", " photo", " of", " cat", "Question:", " Answer:", " ", "  ", "\n", "\t", ".", "?", "!",
          "'s", "42", "é", "ö", "☕", "日本", "🙂", "<image>", "</s>", "<pad>", "<s>", " <image>", "<mask>",
          "xyz", "Hello", " world"]


def _random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 10))) for _ in range(count)]


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
            return {"content": content, "lstrip": lstrip, "normalized": not special, "rstrip": False,
                    "single_word": False, "special": special}

        config = {
            "add_bos_token": True, "add_prefix_space": prefix, "errors": "replace",
            "added_tokens_decoder": {"1": entry("<pad>", True), "2": entry("</s>", True),
                                     str(image_id): entry("<image>", True),
                                     str(image_id + 1): entry("<mask>", False, lstrip=True)},
            "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>",
            "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1000000000000000019884624838656,
        }
        (hub / "tokenizer_config.json").write_text(json.dumps(config))
        (hub / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}))
        (hub / "added_tokens.json").write_text(json.dumps({"<image>": image_id, "<mask>": image_id + 1}))
        out[prefix] = (hub, AutoTokenizer.from_pretrained(hub))
    return out


def _check_parity(ours: BPETokenizer, hf, texts, seed: int = 0) -> None:
    assert ours.vocab_size == len(hf)
    for text in texts:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.encode(text, add_bos=False) == hf(text, add_special_tokens=False)["input_ids"], text
    rng = random.Random(seed)
    for _ in range(300):  # random ids, including past the vocabulary (padded embedding rows)
        ids = [rng.randrange(0, ours.vocab_size + 8) for _ in range(rng.randrange(0, 14))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), ids
    for text in texts:  # round trips through both
        ids = hf(text)["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_matches_transformers_saved_folder(saved):
    folder, hf = saved
    ours = load_tokenizer(folder)
    assert isinstance(ours, BPETokenizer)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (2, 2, 1, 2)
    assert ours.image_token == "<image>" and ours.image_token_id == hf.convert_tokens_to_ids("<image>")
    assert ours.image_token_id == ours.vocab_size - 1  # added right after the BPE vocabulary
    assert ours.special_ids == {1, 2, ours.image_token_id}
    _check_parity(ours, hf, _random_texts(200))


@pytest.mark.parametrize("prefix", [False, True])
def test_matches_transformers_hub_layout(hub_style, prefix):
    folder, hf = hub_style[prefix]
    ours = BPETokenizer.from_hf_dir(folder)
    assert ours.added_tokens["<mask>"] == ours.image_token_id + 1 and ours.image_token_id not in {2, 1}
    # add_prefix_space: a leading word is encoded as after a space ("Ġa"), as HF does.
    assert (ours.encode("a photo", add_bos=False) == ours.encode(" a photo", add_bos=False)) == prefix
    _check_parity(ours, hf, _random_texts(200, seed=1), seed=1)


def test_save_load_and_pickle(saved, tmp_path):
    folder, _ = saved
    ours = BPETokenizer.from_hf_dir(folder)
    ours.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert isinstance(again, BPETokenizer)
    copy = pickle.loads(pickle.dumps(ours))
    for other in (again, copy):
        assert (other.vocab_size, other.bos_id, other.eos_id, other.pad_id, other.unk_id,
                other.image_token_id, other.added_tokens) == (
                    ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id,
                    ours.image_token_id, ours.added_tokens)
        for text in _random_texts(30, seed=2):
            assert other.encode(text) == ours.encode(text)
            assert other.decode(ours.encode(text)) == ours.decode(ours.encode(text))


def test_refuses_other_tokenizer_classes(saved, tmp_path):
    folder, _ = saved
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "Qwen2Tokenizer"}))
    with pytest.raises(ValueError, match="Qwen2Tokenizer"):
        BPETokenizer.from_hf_dir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")


def test_load_tokenizer_dispatches_sentencepiece(tmp_path):
    sp_path = train_tiny_sentencepiece(tmp_path / "sp")
    make_hf_llama_tokenizer_dir(tmp_path / "hf", sp_path)  # tokenizer.model and tokenizer.json
    from_hf = load_tokenizer(tmp_path / "hf")
    assert isinstance(from_hf, Tokenizer)
    from_hf.save(tmp_path / "ours")
    assert isinstance(load_tokenizer(tmp_path / "ours"), Tokenizer)


class _Config:
    def __init__(self, model_type, num_image_tokens, eos=2):
        self.model_type, self.num_image_tokens = model_type, num_image_tokens
        self.text = type("Text", (), {"eos_token_id": eos})()


def test_prompt_helpers(saved, tmp_path):
    folder, hf = saved
    bpe = BPETokenizer.from_hf_dir(folder)
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
    newline = bpe.encode("\n", add_bos=False)[0]
    assert stop_ids(_Config("blip-2", 3, eos=newline), bpe) == (2, newline)
    assert stop_ids(_Config("blip-2", 3, eos=2), bpe) == (2,)
    # LLaVA is unchanged.
    make_hf_llama_tokenizer_dir(tmp_path / "hf", train_tiny_sentencepiece(tmp_path / "sp"))
    sp = load_tokenizer(tmp_path / "hf")
    assert build_prompt_ids(_Config("llava", 5), sp, "Describe it.") == build_llava_input_ids(sp, "Describe it.", 5)
    assert answer_ids("llava", sp, "Q?", " a cat ") == sp.encode("a cat", add_bos=False)
    assert stop_ids(_Config("llava", 5, eos=99), sp) == (sp.eos_id,)
    with pytest.raises(ValueError, match="no prompt format"):
        prompt_ids_for("paligemma", sp, "hi", 4)


def test_training_text_format_for_blip2(saved):
    """train.input builds BLIP-2 prompts and answers, and ships a BPE tokenizer to workers."""
    from fastvlm_jax.image_processing import ImageProcessorConfig
    from train import input as input_lib

    folder, hf = saved
    bpe = BPETokenizer.from_hf_dir(folder)
    fmt = input_lib.TextFormat(bpe, "", num_image_tokens=4, seq_len=32, model_type="blip-2")
    assert fmt.prompt == [bpe.image_token_id] * 4 + [2]
    example = fmt("a red car.")
    n = fmt.prompt_len + len(hf("a red car.", add_special_tokens=False)["input_ids"]) + 1
    assert list(example["input_ids"][:n]) == [bpe.image_token_id] * 4 + hf("a red car.")["input_ids"] + [2]
    assert example["loss_mask"].sum() == n - fmt.prompt_len
    transform = input_lib.CaptionExample(bpe, ImageProcessorConfig(), "a photo of", 4, 32, model_type="blip-2")
    copy = pickle.loads(pickle.dumps(transform))
    assert isinstance(copy.tokenizer, BPETokenizer)
    assert copy.text.prompt == transform.text.prompt == [bpe.image_token_id] * 4 + hf("a photo of")["input_ids"]
    assert list(copy.text("a cat")["input_ids"]) == list(transform.text("a cat")["input_ids"])
