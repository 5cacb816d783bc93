"""Parity of image preprocessing, tokenizer and LLaVA prompts with Hugging Face transformers.

Everything is built in-process (tiny sentencepiece model, random images); no network.
The references are transformers' PIL-backend image processors (torchvision is not installed,
and `CLIPImageProcessor` itself falls back to `CLIPImageProcessorPil`), `LlamaTokenizer` and
`LlavaProcessor`. The LLaMA tokenizer tests run both implementations on the same folder: the
sentencepiece one (tokenizer.model) and the `tokenizers` one (tokenizer.json).
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastvlm_jax.image.processing import (
    MAX_IMAGE_PIXELS,
    OPENAI_CLIP_MEAN,
    ImageLoadError,
    ImageProcessorConfig,
    load_image,
    preprocess_batch,
    preprocess_image,
)
from fastvlm_jax.text.prompts import build_llava_input_ids, format_llava_prompt, num_image_tokens
from fastvlm_jax.text.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, from_hf_dir, load_tokenizer
from tests.sp_fixtures import make_hf_llama_tokenizer_dir, train_tiny_sentencepiece

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    LlamaTokenizer,
    LlavaImageProcessorPil,
    LlavaProcessor,
    SiglipImageProcessorPil,
)
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()


# ---------------------------------------------------------------------------------------------
# Images


def _random_image(width: int, height: int, mode: str, seed: int = 0) -> Image.Image:
    """Random-content image of a given PIL mode (noise stresses the resampling arithmetic)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    if mode == "RGB":
        return Image.fromarray(a[..., :3], "RGB")
    if mode == "L":
        return Image.fromarray(a[..., 0], "L")
    if mode == "LA":
        return Image.fromarray(a[..., :2], "LA")
    if mode == "RGBA":
        return Image.fromarray(a, "RGBA")
    if mode == "CMYK":
        return Image.fromarray(a, "CMYK")
    if mode == "1":
        return Image.fromarray(a[..., 0] > 127)
    if mode == "P":
        return Image.fromarray(a[..., :3], "RGB").quantize(16)
    if mode == "P+transparency":
        image = Image.fromarray(a[..., :3], "RGB").quantize(16)
        image.info["transparency"] = 3  # palette index 3 is transparent
        return image
    raise ValueError(mode)


IMAGE_CASES = [
    (640, 480, "RGB"),  # landscape
    (480, 640, "RGB"),  # portrait
    (5, 7, "RGB"),  # tiny: upsampled
    (336, 336, "RGB"),  # already the target size
    (1000, 20, "RGB"),  # extreme aspect ratio
    (300, 200, "L"),
    (123, 321, "RGBA"),
    (90, 60, "LA"),
    (200, 100, "P"),
    (200, 100, "P+transparency"),
    (90, 60, "CMYK"),
    (64, 48, "1"),
]

HF_PROCESSORS = {
    # llava-hf/llava-1.5-7b-hf preprocessor_config.json, through CLIPImageProcessor.
    "clip336": lambda: CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        resample=3,
        rescale_factor=0.00392156862745098,
    ),
    "siglip224": lambda: SiglipImageProcessorPil(size={"height": 224, "width": 224}),
    "llava_pad64": lambda: LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 64}, crop_size=64),
    "blip": lambda: BlipImageProcessorPil(size={"height": 96, "width": 128}),
    # crop bigger than the resized image: HF zero-pads, then crops.
    "clip_longest_edge": lambda: CLIPImageProcessorPil(
        size={"shortest_edge": 100, "longest_edge": 150}, crop_size={"height": 120, "width": 120}
    ),
}


def _hf_pixels(processor, images) -> np.ndarray:
    """HF pixel_values [B, 3, H, W] -> ours [B, H, W, 3]."""
    return np.transpose(processor(images, return_tensors="np")["pixel_values"], (0, 2, 3, 1))


def _assert_same(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape
    # Bit-exact in practice; the stated contract is 1e-5.
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    assert np.array_equal(ours, ref), f"not bit-exact, max diff {np.abs(ours - ref).max()}"


@pytest.mark.parametrize("name", sorted(HF_PROCESSORS))
def test_image_parity_with_hf(name):
    processor = HF_PROCESSORS[name]()
    config = ImageProcessorConfig.from_hf_dict(processor.to_dict())
    for seed, (width, height, mode) in enumerate(IMAGE_CASES):
        image = _random_image(width, height, mode, seed)
        ref = _hf_pixels(processor, image)[0]
        ours = preprocess_image(image, config)
        _assert_same(ours, ref)
        if config.do_center_crop or config.resize_height is not None:
            assert ours.shape[:2] == config.output_size


def test_batch_and_array_inputs_match_hf():
    processor = HF_PROCESSORS["clip336"]()
    config = ImageProcessorConfig.from_hf_dict(processor.to_dict())
    images = [_random_image(w, h, m, i) for i, (w, h, m) in enumerate(IMAGE_CASES[:4])]
    batch = preprocess_batch(images, config)
    assert batch.shape == (4, 336, 336, 3)
    _assert_same(batch, _hf_pixels(processor, images))
    # uint8 channels-last arrays (RGB, and RGBA blended with HF's numpy formula).
    rng = np.random.default_rng(7)
    for channels in (3, 4):
        array = rng.integers(0, 256, (50, 70, channels), dtype=np.uint8)
        _assert_same(preprocess_image(array, config), _hf_pixels(processor, array)[0])


def test_default_hf_classes_and_path_inputs(tmp_path):
    """`CLIPImageProcessor` / `SiglipImageProcessor` as converters will build them, and file paths.

    Without torchvision both fall back to the PIL backend, which is what we reproduce.
    """
    clip = transformers.CLIPImageProcessor(size={"shortest_edge": 48}, crop_size=48)
    siglip = transformers.SiglipImageProcessor(size={"height": 40, "width": 40})
    for processor in (clip, siglip):
        if processor.backend != "pil":
            pytest.skip(f"transformers picked the {processor.backend} backend; parity is with the PIL one")
        config = ImageProcessorConfig.from_hf_dict(processor.to_dict())
        image = _random_image(77, 55, "RGB", 5)
        path = tmp_path / "image.png"
        image.save(path)
        _assert_same(preprocess_image(image, config), _hf_pixels(processor, image)[0])
        # HF loads a path string with its own load_image (EXIF + convert("RGB")).
        _assert_same(preprocess_image(path, config), _hf_pixels(processor, str(path))[0])


def test_llava_hf_style_configs():
    """Old-style int sizes and the documented processor types, each against HF."""
    image = _random_image(400, 300, "RGB", 3)
    legacy_clip = {
        "crop_size": 224,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": 224,
    }
    config = ImageProcessorConfig.from_hf_dict(legacy_clip)
    assert (config.shortest_edge, config.output_size) == (224, (224, 224))
    hf = CLIPImageProcessorPil(**{k: v for k, v in legacy_clip.items() if k != "feature_extractor_type"})
    _assert_same(preprocess_image(image, config), _hf_pixels(hf, image)[0])

    for suffix in ("", "Fast", "Pil"):
        cfg = ImageProcessorConfig.from_hf_dict({"image_processor_type": f"SiglipImageProcessor{suffix}"})
        assert cfg == ImageProcessorConfig.siglip(224)
    assert ImageProcessorConfig.from_hf_dict(
        {"image_processor_type": "CLIPImageProcessorFast", "size": {"shortest_edge": 336}, "crop_size": 336}
    ) == ImageProcessorConfig.clip(336)
    # No type: keys decide.
    assert ImageProcessorConfig.from_hf_dict({"size": {"height": 32, "width": 48}}).output_size == (32, 48)
    assert ImageProcessorConfig.from_hf_dict({"size": {"shortest_edge": 40}, "crop_size": 40}).kind == "clip"
    with pytest.raises(ValueError, match="unsupported image_processor_type 'Qwen2VLImageProcessor'"):
        ImageProcessorConfig.from_hf_dict({"image_processor_type": "Qwen2VLImageProcessor"})


def test_config_roundtrip_and_validation():
    for config in (
        ImageProcessorConfig.clip(336),
        ImageProcessorConfig.siglip(384),
        ImageProcessorConfig.from_hf_dict(HF_PROCESSORS["llava_pad64"]().to_dict()),
    ):
        as_json = json.loads(json.dumps(config.to_dict()))
        assert ImageProcessorConfig.from_dict(as_json) == config
    assert ImageProcessorConfig.siglip(384).output_size == (384, 384)
    with pytest.raises(ValueError, match="unknown ImageProcessorConfig keys"):
        ImageProcessorConfig.from_dict({**ImageProcessorConfig.clip().to_dict(), "crop": 3})
    with pytest.raises(ValueError, match="exactly one of shortest_edge"):
        ImageProcessorConfig(shortest_edge=224, resize_height=224, resize_width=224)
    with pytest.raises(ValueError, match="depends on the input image"):
        _ = ImageProcessorConfig(do_center_crop=False, crop_height=None, crop_width=None).output_size


def test_paths_bytes_and_exif(tmp_path):
    config = ImageProcessorConfig.clip(64)
    image = _random_image(120, 80, "RGBA", 11)
    path = tmp_path / "a.png"
    image.save(path)
    expected = preprocess_image(image, config)
    np.testing.assert_array_equal(preprocess_image(path, config), expected)
    np.testing.assert_array_equal(preprocess_image(str(path), config), expected)
    np.testing.assert_array_equal(preprocess_image(path.read_bytes(), config), expected)

    # EXIF orientation 6 (rotate 90 clockwise) is applied to files.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated_path = tmp_path / "rotated.jpg"
    _random_image(40, 20, "RGB").save(rotated_path, exif=exif.tobytes())
    assert load_image(rotated_path).size == (20, 40)


def test_image_modes():
    assert load_image(_random_image(8, 6, "L")).mode == "RGB"
    # Fully transparent pixels become white, opaque ones keep their colour (HF composites onto white).
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    out = np.asarray(load_image(Image.fromarray(rgba, "RGBA")))
    assert out[0, 0].tolist() == [10, 20, 30] and out[1, 1].tolist() == [255, 255, 255]
    palette = _random_image(8, 8, "P+transparency")
    transparent = np.asarray(palette) == 3
    assert transparent.any()
    assert (np.asarray(load_image(palette))[transparent] == 255).all()
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(load_image(cmyk))[0, 0].tolist() == [255, 0, 0]
    # 16-bit grayscale is scaled to 8 bits (PIL's convert, used by HF, would clip to white).
    values = np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000
    sixteen = Image.fromarray(values)
    assert sixteen.mode == "I;16"
    got = np.asarray(load_image(sixteen))[..., 0]
    np.testing.assert_array_equal(got, np.round(values / 257.0).astype(np.uint8))
    buf = io.BytesIO()
    sixteen.save(buf, "PNG")
    np.testing.assert_array_equal(np.asarray(load_image(buf.getvalue()))[..., 0], got)


def test_large_image_and_fast_decode(tmp_path):
    # 10000x10000 (100M pixels) is above PIL's default bomb limit (89M) but must load.
    big = Image.linear_gradient("L").resize((10000, 10000), Image.Resampling.NEAREST)
    path = tmp_path / "big.jpg"
    big.save(path, "JPEG", quality=30)
    del big
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        loaded = load_image(path)
    assert loaded.size == (10000, 10000) and loaded.mode == "RGB"
    del loaded
    config = ImageProcessorConfig.clip(336)
    fast = preprocess_image(path, config, fast_decode=True)
    assert fast.shape == (336, 336, 3)
    assert load_image(path, fast_decode_size=(672, 672)).size == (1250, 1250)  # JPEG draft at 1/8

    # fast_decode stays close to the exact path (here on a mid-size photo-like image).
    mid = Image.linear_gradient("L").resize((2000, 1500)).convert("RGB")
    mid_bytes = io.BytesIO()
    mid.save(mid_bytes, "JPEG", quality=90)
    exact = preprocess_image(mid_bytes.getvalue(), config)
    approx = preprocess_image(mid_bytes.getvalue(), config, fast_decode=True)
    assert np.abs(exact - approx).mean() < 0.02


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height; its pixel data is a few bytes."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns, we refuse
def test_load_image_errors(tmp_path):
    good = io.BytesIO()
    _random_image(64, 64, "RGB").save(good, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(ImageLoadError) as err:
        load_image(truncated)
    _assert_one_line(err, "truncated.png", "truncated")
    jpeg = io.BytesIO()
    _random_image(64, 64, "RGB").save(jpeg, "JPEG")
    for keep, name in ((0.6, "cut_data.jpg"), (0.05, "cut_header.jpg")):
        (tmp_path / name).write_bytes(jpeg.getvalue()[: int(len(jpeg.getvalue()) * keep)])
        with pytest.raises(ImageLoadError) as err:
            load_image(tmp_path / name)
        _assert_one_line(err, name, "truncated")

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError) as err:
        load_image(empty)
    _assert_one_line(err, "empty.jpg", "empty")

    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError) as err:
        load_image(text)
    _assert_one_line(err, "notes.jpg", "not a recognised image")

    with pytest.raises(ImageLoadError) as err:
        load_image(tmp_path / "missing.png")
    _assert_one_line(err, "missing.png", "not found")

    with pytest.raises(ImageLoadError) as err:
        load_image(tmp_path)
    _assert_one_line(err, "directory")

    with pytest.raises(ImageLoadError) as err:
        load_image(b"\x00\x01garbage")
    _assert_one_line(err, "<9 bytes>", "not a recognised image")

    # Decompression bomb: a header claiming 20000 x 20000 pixels is refused before decoding.
    assert MAX_IMAGE_PIXELS < 20000 * 20000
    with pytest.raises(ImageLoadError) as err:
        load_image(_png_claiming(20000, 20000))
    _assert_one_line(err, "decompression bomb")

    assert issubclass(ImageLoadError, ValueError)
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, sp_model) -> Path:
    directory = tmp_path_factory.mktemp("hf_tok")
    make_hf_llama_tokenizer_dir(directory, sp_model)
    return directory


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return LlamaTokenizer.from_pretrained(str(hf_dir))


# The folder has tokenizer.model and tokenizer.json: each implementation reads its own file.
IMPLEMENTATIONS = {"sentencepiece": SentencePieceTokenizer, "tokenizers": HFTokenizer}


@pytest.fixture(scope="module", params=sorted(IMPLEMENTATIONS))
def tok(request, hf_dir) -> Tokenizer:
    return IMPLEMENTATIONS[request.param].from_hf_dir(hf_dir)


PROMPTS = [
    format_llava_prompt("What is shown in this image?"),
    format_llava_prompt("Describe the image in detail."),
    "USER: <image>\nWhat color is the bus? ASSISTANT: The bus is yellow.",
    "<image>\nhello",  # text right after a special token gets no "▁" prefix
    "\nhello",
    "hello",
    " hello",  # a leading space replaces the prefix instead of adding a second one
    "  two leading spaces",
    "trailing spaces   ",
    " ",
    "",
    "a\n\nb\tc\r\nd",
    "Punctuation!? (yes) [no] {maybe}; 'quotes' \"double\" - dash... #$%^&*_+=~`|\\/<>",
    "Digits 1234567890 and 3.14, 10:30 am",
    "héllo wörld — naïve café, Ünïcödé ß ñ",
    "日本語のキャプション 中文 한국어",
    "emoji 🙂👍🏽 family 👨\u200d👩\u200d👧",
    "e\u0301 (combining) vs é (precomposed)",  # no normalization: they stay different
    "\u2581literal metaspace",
    "x <image> y",
    "x<image>y<image><image>",
    "</s> inside <s> text <unk> <pad>",
    "<ima ge> not a token <imag",
]


def test_tokenizer_properties(tok, hf_tok):
    assert tok.vocab_size == len(hf_tok)
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    assert tok.image_token_id == hf_tok.convert_tokens_to_ids("<image>") == 512
    assert tok.pad_id == hf_tok.pad_token_id == 513


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_parity(tok, hf_tok, add_special_tokens):
    for text in PROMPTS:
        expected = hf_tok(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert tok.encode(text, add_special_tokens=add_special_tokens) == expected, repr(text)


def test_decode_parity(tok, hf_tok):
    for text in PROMPTS:
        ids = hf_tok.encode(text)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip), (
                repr(text),
                skip,
            )
    # Arbitrary id sequences, as a model may generate them: specials, lone byte pieces (invalid
    # UTF-8), and ids past the vocabulary (skipped by both).
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.integers(0, tok.vocab_size + 3, rng.integers(0, 12)).tolist()
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("implementation", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("legacy,add_prefix_space", [(False, None), (True, None), (False, False)])
def test_encode_fuzz_and_prefix_schemes(tmp_path, sp_model, legacy, add_prefix_space, implementation):
    """Random texts under the three HF prefix schemes ("first", "always", "never")."""
    make_hf_llama_tokenizer_dir(tmp_path, sp_model, legacy=legacy, add_prefix_space=add_prefix_space)
    hf = LlamaTokenizer.from_pretrained(str(tmp_path))
    scheme = hf.backend_tokenizer.pre_tokenizer.prepend_scheme
    assert (
        scheme == {(False, None): "first", (True, None): "always", (False, False): "never"}[(legacy, add_prefix_space)]
    )
    ours = IMPLEMENTATIONS[implementation].from_hf_dir(tmp_path)
    pool = list("abcxyzABC  \n\t.,!?'-:0129éü日🙂▁") + ["<image>", "<pad>", "<s>", "</s>", " the ", "ing", "<im"]
    rng = np.random.default_rng(1)
    for _ in range(200):
        text = "".join(pool[i] for i in rng.integers(0, len(pool), rng.integers(0, 12)))
        ids = hf.encode(text)
        assert ours.encode(text) == ids, repr(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), repr(text)


def test_llava_hf_style_folder_without_tokenizer_json(tmp_path, sp_model, hf_tok):
    """A folder as llava-hf ships it: tokenizer.model + tokenizer_config.json + special map."""
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    entry = lambda content: {  # noqa: E731
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "added_tokens_decoder": {
            "0": entry("<unk>"),
            "1": entry("<s>"),
            "2": entry("</s>"),
            "512": entry("<image>"),
            "513": entry("<pad>"),
        },
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "tokenizer_class": "LlamaTokenizer",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>"},
                "eos_token": {"content": "</s>"},
                "pad_token": "<pad>",
                "unk_token": "<unk>",
            }
        )
    )
    hf = LlamaTokenizer.from_pretrained(str(tmp_path))
    ours = from_hf_dir(tmp_path)
    assert isinstance(ours, SentencePieceTokenizer)
    assert (ours.pad_id, ours.image_token_id, ours.vocab_size) == (513, 512, len(hf))
    for text in PROMPTS:
        assert ours.encode(text) == hf.encode(text) == hf_tok.encode(text), repr(text)


def test_save_load_pickle(tmp_path, tok, hf_dir):
    tok.save(tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted([tok.MODEL_FILE, "tokenizer_config.json"])
    assert type(load_tokenizer(tmp_path / "ours")) is type(tok)
    for other in (load_tokenizer(tmp_path / "ours"), load_tokenizer(hf_dir), pickle.loads(pickle.dumps(tok))):
        assert other.added_tokens == tok.added_tokens
        assert (other.bos_id, other.eos_id, other.pad_id, other.image_token_id) == (
            tok.bos_id,
            tok.eos_id,
            tok.pad_id,
            tok.image_token_id,
        )
        for text in PROMPTS:
            ids = tok.encode(text)
            assert other.encode(text) == ids and other.decode(ids) == tok.decode(ids)


def test_constructor_and_errors(tmp_path, sp_model, tok):
    direct = SentencePieceTokenizer(
        sp_model, {"<image>": 512, "<pad>": 513}, bos_id=1, eos_id=2, pad_id=513, image_token="<image>"
    )
    for text in PROMPTS:
        assert direct.encode(text) == tok.encode(text)
    plain = SentencePieceTokenizer(sp_model)  # no added tokens: no image token, pad falls back to <unk>
    assert (plain.image_token, plain.pad_id, plain.vocab_size) == (None, 0, 512)
    ids = plain.encode("a <image>")
    assert 512 not in ids and plain.decode(ids) == "a <image>"  # plain text for this one
    with pytest.raises(ValueError, match="no image token"):
        _ = plain.image_token_id
    with pytest.raises(FileNotFoundError, match="sentencepiece"):
        SentencePieceTokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    with pytest.raises(ValueError, match="not supported"):
        from_hf_dir(tmp_path)
    with pytest.raises(ValueError, match="collides|is the sentencepiece piece"):
        SentencePieceTokenizer(sp_model, {"<image>": 5})
    with pytest.raises(ValueError, match="not an added token"):
        SentencePieceTokenizer(sp_model, {}, image_token="<image>")


# ---------------------------------------------------------------------------------------------
# LLaVA prompts


def test_format_and_count():
    assert format_llava_prompt("Hi?") == "USER: <image>\nHi? ASSISTANT:"
    assert num_image_tokens(336, 14, 1, "default") == 576  # llava-hf 1.5 settings
    assert num_image_tokens(336, 14, 0, "default") == 575  # HF's default num_additional_image_tokens=0
    assert num_image_tokens(336, 14, 1, "full") == 577
    assert num_image_tokens((224, 448), 16, 0, "full") == 14 * 28
    with pytest.raises(ValueError):
        num_image_tokens(336, 14, 1, "cls")


@pytest.mark.parametrize(
    "crop,patch,extra,strategy", [(336, 14, 1, "default"), (56, 14, 0, "full"), (64, 16, 1, "full")]
)
def test_llava_processor_input_ids(hf_tok, tok, crop, patch, extra, strategy):
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=hf_tok,
        patch_size=patch,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra,
    )
    count = num_image_tokens(crop, patch, extra, strategy)
    image = _random_image(80, 60, "RGB")
    config = ImageProcessorConfig.from_hf_dict(image_processor.to_dict())
    for question in ["What is shown in this image?", "  Describe it, briefly!  ", "Qu'est-ce que c'est ? 🙂", ""]:
        out = processor(images=image, text=format_llava_prompt(question), return_tensors="np")
        expected = out["input_ids"][0].tolist()
        ids = build_llava_input_ids(tok, question, count)
        assert ids == expected, repr(question)
        assert ids.count(tok.image_token_id) == count
        _assert_same(preprocess_image(image, config), np.transpose(out["pixel_values"], (0, 2, 3, 1))[0])
    with pytest.raises(ValueError, match="must not contain"):
        build_llava_input_ids(tok, "two <image> images", count)
