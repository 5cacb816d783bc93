"""Image loading and preprocessing with exact parity to Hugging Face image processors.

The reference is the PIL backend of transformers 5.x (`CLIPImageProcessorPil`,
`SiglipImageProcessorPil`, `LlavaImageProcessorPil`, `BlipImageProcessorPil`), which is what
transformers uses when torchvision is not installed. Its pipeline, reproduced step by step here:

1. convert to RGB: images with an alpha band (or a palette transparency) are composited onto
   white with `PIL.Image.alpha_composite`, everything else goes through `Image.convert("RGB")`;
2. (LLaVA `do_pad` only) pad to a square filled with `int(mean * 255)`;
3. resize the uint8 image with PIL (bicubic by default, no `reducing_gap`): either the shortest
   edge to `shortest_edge` (CLIP, LLaVA) or to a fixed `height x width` (SigLIP, BLIP);
4. center crop (CLIP, LLaVA), zero-padding when the image is smaller than the crop;
5. rescale: `uint8 -> float64 * rescale_factor -> float32`;
6. normalize in float32: `(x - mean) / std`.

Every step uses the same arithmetic as the reference, so the output is bit-identical to
`np.transpose(hf_pixel_values, (0, 2, 3, 1))`. Our arrays are channels-last (JAX convention).

Deliberate differences from transformers (documented, tested):
- 16-bit grayscale ('I;16*' and 'I' holding 16-bit values) is scaled to 8 bits (`v / 257`);
  PIL's `convert("RGB")`, which transformers uses, clips every value above 255 to white.
- Files and bytes get their EXIF orientation applied and alpha composited onto white.
  (transformers' own `load_image(path)` applies EXIF but then drops alpha without compositing,
  so HF(path) and HF(PIL image) differ for transparent images; we always composite.)
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Largest image (in pixels) we agree to decode. PIL's default (~89M pixels) warns on a 10000x10000
# photo and refuses 2x that; 300M keeps real photos working while refusing decompression bombs
# (a few KB of PNG claiming billions of pixels).
MAX_IMAGE_PIXELS = 300_000_000

# Normalization constants used by the reference processors.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

BICUBIC = int(Image.Resampling.BICUBIC)  # 3, the value HF configs store as "resample"
BILINEAR = int(Image.Resampling.BILINEAR)  # 2, Gemma 3's default

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray


class ImageLoadError(ValueError):
    """An image could not be read: missing, empty, not an image, truncated or too large."""


# --------------------------------------------------------------------------------------------
# Loading


def _describe(source: Any) -> str:
    """A short name for `source` to put in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _why(error: BaseException) -> str:
    """`Type: message` of an exception, on one line (messages end up in logs and JSONL)."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def _check_pixels(image: Image.Image, name: str) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{name}: image has an empty size {width}x{height}")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageLoadError(
            f"{name}: image is {width}x{height} = {width * height} pixels, more than the "
            f"{MAX_IMAGE_PIXELS} allowed (possible decompression bomb)"
        )


def raise_pil_pixel_limit() -> None:
    """Lets PIL open images of up to MAX_IMAGE_PIXELS pixels; our own check then decides.

    PIL checks its process-wide `Image.MAX_IMAGE_PIXELS` inside `Image.open` (default ~89M
    pixels: it warns above that and refuses twice that), before we see the size. Every
    `Image.open` of ours calls this first. It only ever raises the limit, to the same value
    from every thread, and respects a caller who disabled the check (None) or set a larger one.
    """
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def _reduce_for_fast_decode(
    image: Image.Image, fast_decode_size: tuple[int, int] | None, *, use_jpeg_draft: bool
) -> Image.Image:
    """Cheaply shrink a large image so that it stays at least `fast_decode_size` (width, height).

    JPEG files can decode at 1/2, 1/4 or 1/8 scale (PIL's JPEG "draft" mode, `Image.draft`:
    only before decoding and only on images we opened ourselves, since it changes the object
    in place; `use_jpeg_draft` says which); then an integer box `reduce` brings any format
    down. Both change pixel values slightly, so this is opt-in and never used on the
    exact-parity path.
    """
    if fast_decode_size is None:
        return image
    want_w, want_h = max(int(fast_decode_size[0]), 1), max(int(fast_decode_size[1]), 1)
    if use_jpeg_draft and image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK"):
        image.draft(image.mode, (want_w, want_h))
    image.load()
    factor = min(image.width // want_w, image.height // want_h)
    if factor >= 2:
        image = image.reduce(factor)
    return image


def _open(source: Any, name: str, fast_decode_size: tuple[int, int] | None) -> Image.Image:
    """Open and fully decode a file path or bytes; every failure becomes ImageLoadError."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageLoadError(f"{name}: file not found")
        if path.is_dir():
            raise ImageLoadError(f"{name}: is a directory, not an image file")
        try:
            # Read the bytes ourselves: PIL would otherwise keep the file open (multi-frame
            # formats) and leak descriptors in long-running loaders.
            data = path.read_bytes()
        except OSError as e:
            raise ImageLoadError(f"{name}: cannot read file ({_why(e)})") from None
        if not data:
            raise ImageLoadError(f"{name}: file is empty (0 bytes)")
    else:
        data = bytes(source)
        if not data:
            raise ImageLoadError(f"{name}: no image data (0 bytes)")
    raise_pil_pixel_limit()
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{name}: image too large, possible decompression bomb ({_why(e)})") from None
    except Exception as e:  # any other parser failure means a broken header
        raise ImageLoadError(f"{name}: corrupt or truncated image header ({_why(e)})") from None
    _check_pixels(image, name)
    try:
        image = _reduce_for_fast_decode(image, fast_decode_size, use_jpeg_draft=True)
        # Decode now: truncated or corrupt data must fail here, with the file name, not later
        # inside a resize or a data-loader worker.
        image.load()
        # The stored orientation is part of what the camera meant; HF's load_image applies it too.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as e:
        # PIL reports truncation as OSError("image file is truncated"), broken PNG chunks as
        # SyntaxError, other codecs as ValueError / EOFError / struct.error: all mean bad data.
        raise ImageLoadError(f"{name}: corrupt or truncated image data ({_why(e)})") from None
    return image


def _scale_16bit_to_8bit(image: Image.Image) -> Image.Image:
    """Map 16-bit grayscale to 'L' by value / 257 (0..65535 -> 0..255, rounded)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode == "I" and values.max(initial=0) <= 255:
        # 'I' also holds plain 8-bit data (e.g. some TIFFs): keep it as is.
        scaled = values
    else:
        scaled = np.round(values / 257.0)
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of `image`, compositing transparency onto white exactly as transformers does.

    Alpha is detected the same way as `transformers.image_transforms.convert_to_rgb`: an 'A' band
    (RGBA, LA, PA) or a `transparency` entry (palette or single-colour transparency).
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        image = _scale_16bit_to_8bit(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    """RGB PIL image from a channels-last uint8 array ([H, W], [H, W, 1|3|4]).

    RGBA arrays are blended onto white with transformers' numpy formula (round(a*c + (1-a)*255)),
    which can differ by one level from PIL's `alpha_composite` used for PIL inputs.
    """
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 [H, W] or [H, W, C], got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return Image.fromarray(array, mode="L").convert("RGB")
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"image arrays must be [H, W] or [H, W, 1|3|4] (channels-last), got {array.shape}")
    if array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255
        blended = alpha * array[..., :3] + (1 - alpha) * 255
        array = np.round(blended).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def load_image(source: ImageSource, *, fast_decode_size: tuple[int, int] | None = None) -> Image.Image:
    """Load an image as an RGB PIL image.

    Args:
      source: a file path (str or PathLike), the encoded file as bytes, a PIL image, or a
        channels-last uint8 array [H, W] / [H, W, 1|3|4].
      fast_decode_size: optional (width, height). When given, large images are decoded at
        reduced size (PIL's JPEG draft mode, else a box `reduce`) while staying at least this
        big. Faster on huge photos; breaks bit-exact parity with transformers, so it is off by
        default.

    Returns:
      An RGB `PIL.Image.Image` (transparency composited onto white; EXIF orientation applied to
      files and bytes; PIL images are taken as given, as transformers does).

    Raises:
      ImageLoadError: missing / empty / non-image / truncated / corrupt file, or more than
        MAX_IMAGE_PIXELS pixels. The message names the file and the problem on one line.
    """
    name = _describe(source)
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        _check_pixels(source, name)
        try:
            image = _reduce_for_fast_decode(source, fast_decode_size, use_jpeg_draft=False)
            image.load()  # a lazily opened PIL image can still be truncated
        except Exception as e:
            raise ImageLoadError(f"{name}: corrupt or truncated image data ({_why(e)})") from None
    elif isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        image = _open(source, name, fast_decode_size)
    else:
        raise TypeError(f"image source must be a path, bytes, PIL image or uint8 array, got {type(source).__name__}")
    return convert_to_rgb(image)


# --------------------------------------------------------------------------------------------
# Config


# image_processor_type (without "Fast"/"Pil") -> defaults of that class in transformers 5.x.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": dict(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        default_to_square=False,
    ),
    "LlavaImageProcessor": dict(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        default_to_square=False,
    ),
    "SiglipImageProcessor": dict(
        size={"height": 224, "width": 224},
        crop_size=None,
        do_center_crop=False,
        image_mean=IMAGENET_STANDARD_MEAN,
        image_std=IMAGENET_STANDARD_STD,
        default_to_square=False,
    ),
    "BlipImageProcessor": dict(
        size={"height": 384, "width": 384},
        crop_size=None,
        do_center_crop=False,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
        default_to_square=True,
    ),
    # Gemma 3: SigLIP's fixed-size resize, but bilinear by default (pan-and-scan crops: refused).
    "Gemma3ImageProcessor": dict(
        size={"height": 224, "width": 224},
        crop_size=None,
        do_center_crop=False,
        image_mean=IMAGENET_STANDARD_MEAN,
        image_std=IMAGENET_STANDARD_STD,
        default_to_square=True,
        resample=BILINEAR,
    ),
}
_KIND_OF_TYPE = {
    "CLIPImageProcessor": "clip",
    "LlavaImageProcessor": "llava",
    "SiglipImageProcessor": "siglip",
    "BlipImageProcessor": "blip",
    "Gemma3ImageProcessor": "siglip",
}


def _hf_size(value: Any, default_to_square: bool, what: str) -> dict[str, int]:
    """HF `size` / `crop_size` in any of its historical forms -> a dict (HF's get_size_dict)."""
    if isinstance(value, dict):
        return {k: int(v) for k, v in value.items() if v is not None}
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    raise ValueError(f"cannot read {what}={value!r} from the preprocessor config")


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Everything needed to turn an image into model pixels.

    Resizing: `shortest_edge` (keep aspect ratio; optionally capped by `longest_edge`) or a
    fixed `resize_height x resize_width`; exactly one of the two when `do_resize`.
    Output: `[height, width, 3]` float32, see `output_size`.
    """

    kind: str = "clip"  # "clip" | "llava" | "siglip" | "blip": which HF processor this mirrors
    do_convert_rgb: bool = True
    do_pad_to_square: bool = False  # LLaVA `do_pad`: pad to a square of the mean colour first
    do_resize: bool = True
    shortest_edge: int | None = 336
    longest_edge: int | None = None
    resize_height: int | None = None
    resize_width: int | None = None
    resample: int = BICUBIC  # a PIL.Image.Resampling value
    do_center_crop: bool = True
    crop_height: int | None = 336
    crop_width: int | None = 336
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        # Frozen dataclass: coerce JSON lists to tuples through object.__setattr__.
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, got {self.image_mean}, {self.image_std}")
        if self.do_resize:
            fixed = self.resize_height is not None or self.resize_width is not None
            if fixed and (self.resize_height is None or self.resize_width is None):
                raise ValueError("resize_height and resize_width must be given together")
            if fixed == (self.shortest_edge is not None):
                raise ValueError("give exactly one of shortest_edge or (resize_height, resize_width) when do_resize")
        if self.do_center_crop and (self.crop_height is None or self.crop_width is None):
            raise ValueError("do_center_crop needs crop_height and crop_width")
        try:
            Image.Resampling(self.resample)
        except ValueError:
            raise ValueError(f"resample={self.resample} is not a PIL resampling filter") from None

    # Named presets -------------------------------------------------------------------------

    @classmethod
    def clip(cls, size: int = 336) -> ImageProcessorConfig:
        """CLIP / LLaVA-1.5: shortest edge to `size`, center crop `size x size`, OpenAI stats."""
        return cls(kind="clip", shortest_edge=size, crop_height=size, crop_width=size)

    @classmethod
    def siglip(cls, size: int = 224) -> ImageProcessorConfig:
        """SigLIP: resize to `size x size` (aspect ratio not kept), mean = std = 0.5."""
        return cls(
            kind="siglip",
            shortest_edge=None,
            resize_height=size,
            resize_width=size,
            do_center_crop=False,
            crop_height=None,
            crop_width=None,
            image_mean=IMAGENET_STANDARD_MEAN,
            image_std=IMAGENET_STANDARD_STD,
        )

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of every preprocessed image."""
        if self.do_center_crop:
            return int(self.crop_height), int(self.crop_width)  # type: ignore[arg-type]
        if self.do_resize and self.resize_height is not None:
            return int(self.resize_height), int(self.resize_width)  # type: ignore[arg-type]
        raise ValueError("output size depends on the input image (no center crop and no fixed resize)")

    # HF preprocessor_config.json --------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        """Read a Hugging Face `preprocessor_config.json` dict.

        Recognizes `image_processor_type` CLIPImageProcessor, LlavaImageProcessor,
        SiglipImageProcessor and BlipImageProcessor (each also with a "Fast" or "Pil" suffix).
        Without a type, the keys decide: `crop_size` or a `shortest_edge` size means CLIP-like,
        a height/width size means SigLIP-like. Missing keys take the class defaults of
        transformers, as `from_pretrained` would.
        """
        type_name = d.get("image_processor_type")
        if type_name is None and isinstance(d.get("feature_extractor_type"), str):
            type_name = d["feature_extractor_type"].replace("FeatureExtractor", "ImageProcessor")
        if type_name is not None:
            base = str(type_name)
            for suffix in ("Fast", "Pil"):
                if base.endswith(suffix):
                    base = base[: -len(suffix)]
            if base not in _HF_DEFAULTS:
                raise ValueError(
                    f"unsupported image_processor_type {type_name!r}; supported: "
                    + ", ".join(sorted(_HF_DEFAULTS))
                    + " (optionally with a Fast/Pil suffix)"
                )
        else:
            size = d.get("size")
            looks_fixed = isinstance(size, dict) and "height" in size and "crop_size" not in d
            base = "SiglipImageProcessor" if looks_fixed else "CLIPImageProcessor"
        defaults = _HF_DEFAULTS[base]
        if d.get("do_pan_and_scan"):
            raise ValueError(
                "do_pan_and_scan=true (Gemma 3's extra crops of wide images) is not supported: "
                "set it to false in preprocessor_config.json (one image, 256 soft tokens)"
            )

        def get(key: str, default: Any) -> Any:
            value = d.get(key)
            return default if value is None else value

        default_to_square = bool(get("default_to_square", defaults["default_to_square"]))
        size = _hf_size(get("size", defaults["size"]), default_to_square, "size")
        do_resize = bool(get("do_resize", True))
        shortest = longest = height = width = None
        if do_resize:
            if "shortest_edge" in size:
                shortest, longest = size["shortest_edge"], size.get("longest_edge")
            elif "height" in size and "width" in size:
                height, width = size["height"], size["width"]
            else:
                raise ValueError(f"unsupported size {size!r}: need shortest_edge or height/width")

        do_center_crop = bool(get("do_center_crop", defaults["do_center_crop"]))
        crop_h = crop_w = None
        if do_center_crop:
            crop = _hf_size(get("crop_size", defaults["crop_size"]), True, "crop_size")
            if "height" not in crop or "width" not in crop:
                raise ValueError(f"unsupported crop_size {crop!r}: need height and width")
            crop_h, crop_w = crop["height"], crop["width"]

        def triple(value: Any) -> tuple[float, float, float]:
            if isinstance(value, (int, float)):
                return float(value), float(value), float(value)
            return tuple(float(x) for x in value)  # type: ignore[return-value]

        return cls(
            kind=_KIND_OF_TYPE[base],
            do_convert_rgb=bool(get("do_convert_rgb", True)),
            do_pad_to_square=bool(get("do_pad", False)) if base == "LlavaImageProcessor" else False,
            do_resize=do_resize,
            shortest_edge=shortest,
            longest_edge=longest,
            resize_height=height,
            resize_width=width,
            resample=int(get("resample", defaults.get("resample", BICUBIC))),
            do_center_crop=do_center_crop,
            crop_height=crop_h,
            crop_width=crop_w,
            do_rescale=bool(get("do_rescale", True)),
            rescale_factor=float(get("rescale_factor", 1 / 255)),
            do_normalize=bool(get("do_normalize", True)),
            image_mean=triple(get("image_mean", defaults["image_mean"])),
            image_std=triple(get("image_std", defaults["image_std"])),
        )

    # Our checkpoint JSON ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["image_mean"] = list(self.image_mean)
        out["image_std"] = list(self.image_std)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageProcessorConfig:
        """Inverse of `to_dict`; unknown keys are an error (a typo would silently change pixels)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ImageProcessorConfig keys: {unknown}")
        return cls(**d)


# --------------------------------------------------------------------------------------------
# Preprocessing


def _shortest_edge_size(height: int, width: int, shortest: int, longest: int | None) -> tuple[int, int]:
    """(height, width) after an aspect-preserving resize, with HF's exact integer rounding."""
    if longest is None:
        # transformers.image_transforms.get_resize_output_image_size(default_to_square=False)
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = shortest, int(shortest * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    # transformers.image_transforms.get_size_with_aspect_ratio(size, max_size)
    size, raw_size = shortest, None
    min_side, max_side = float(min(height, width)), float(max(height, width))
    if max_side / min_side * size > longest:
        raw_size = longest * min_side / max_side
        size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    if width < height:
        new_w = size
        new_h = int(raw_size * height / width) if raw_size is not None else int(size * height / width)
        return new_h, new_w
    new_h = size
    new_w = int(raw_size * width / height) if raw_size is not None else int(size * width / height)
    return new_h, new_w


def _pad_to_square(pixels: np.ndarray, fill: tuple[int, int, int]) -> np.ndarray:
    """[H, W, 3] uint8 -> [S, S, 3] with S = max(H, W), image centered (LLaVA `pad_to_square`)."""
    height, width, _ = pixels.shape
    if height == width:
        return pixels
    side = max(height, width)
    out = np.empty((side, side, 3), dtype=pixels.dtype)
    out[:] = np.asarray(fill, dtype=pixels.dtype)
    if width > height:
        top = (side - height) // 2
        out[top : top + height] = pixels
    else:
        left = (side - width) // 2
        out[:, left : left + width] = pixels
    return out


def _center_crop(pixels: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """[H, W, C] -> [crop_h, crop_w, C]; zero-pads first when the image is smaller (HF semantics)."""
    height, width = pixels.shape[:2]
    top = (height - crop_h) // 2
    left = (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w) + pixels.shape[2:], dtype=pixels.dtype)
    top_pad = math.ceil((new_h - height) / 2)
    left_pad = math.ceil((new_w - width) / 2)
    padded[top_pad : top_pad + height, left_pad : left_pad + width] = pixels
    top, left = top + top_pad, left + left_pad
    return padded[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def preprocess_image(image: ImageSource, config: ImageProcessorConfig, *, fast_decode: bool = False) -> np.ndarray:
    """One image -> float32 pixels [height, width, 3] (channels-last).

    Args:
      image: anything `load_image` accepts (path, bytes, PIL image, uint8 array).
      config: the preprocessing recipe.
      fast_decode: decode huge files at reduced size first (JPEG draft mode / box reduce), keeping at
        least twice the resize target. Much faster on very large photos; not bit-exact with HF.

    Returns:
      float32 array [height, width, 3]; equal to HF's `pixel_values[i].transpose(1, 2, 0)`.
    """
    return rescale_and_normalize(preprocess_image_uint8(image, config, fast_decode=fast_decode), config)


def preprocess_image_uint8(
    image: ImageSource, config: ImageProcessorConfig, *, fast_decode: bool = False
) -> np.ndarray:
    """Steps 1-4 of `preprocess_image` (load, pad, resize, crop): uint8 [height, width, 3].

    A quarter of the float32 bytes to move; `pixel_value_table` finishes the job on device
    with exactly `preprocess_image`'s values."""
    # Always RGB: the vision towers take 3 channels. (HF's do_convert_rgb=False only differs for
    # non-RGB inputs, which it would then mis-shape; we keep the flag for config round-trips.)
    fast_decode_size = _fast_decode_size(config) if fast_decode else None
    pil = load_image(image, fast_decode_size=fast_decode_size)

    if config.do_pad_to_square:
        fill = tuple(int(x * 255) for x in config.image_mean)
        pil = Image.fromarray(_pad_to_square(np.asarray(pil), fill), mode="RGB")  # type: ignore[arg-type]

    if config.do_resize:
        if config.shortest_edge is not None:
            new_h, new_w = _shortest_edge_size(pil.height, pil.width, config.shortest_edge, config.longest_edge)
        else:
            new_h, new_w = int(config.resize_height), int(config.resize_width)  # type: ignore[arg-type]
        # PIL takes (width, height). No reducing_gap: HF resizes in one exact pass.
        pil = pil.resize((new_w, new_h), resample=Image.Resampling(config.resample))

    pixels = np.asarray(pil)  # [H, W, 3] uint8
    if config.do_center_crop:
        pixels = _center_crop(pixels, int(config.crop_height), int(config.crop_width))  # type: ignore[arg-type]
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def rescale_and_normalize(pixels: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """Steps 5-6 of `preprocess_image`: uint8 [..., 3] -> float32 [..., 3]."""
    if config.do_rescale:
        # HF upcasts to float64 before scaling, then rounds once to float32.
        out = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    else:
        out = pixels.astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)
        std = np.asarray(config.image_std, dtype=np.float32)
        out = (out - mean) / std  # float32 throughout, like HF
    return np.ascontiguousarray(out, dtype=np.float32)


def pixel_value_table(config: ImageProcessorConfig) -> np.ndarray:
    """float32 [256, 3]: the value `preprocess_image` gives a uint8 value v in channel c, at
    [v, c]. Steps 5-6 act on each value alone, so looking a uint8 image up in this table
    gives `preprocess_image`'s pixels bit for bit, on any device (no float64 needed there)."""
    return rescale_and_normalize(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1), config)


def _fast_decode_size(config: ImageProcessorConfig) -> tuple[int, int]:
    """(width, height) a fast decode must keep: twice the resize target, so the final bicubic
    still averages over several source pixels."""
    if config.do_resize and config.shortest_edge is not None:
        side = 2 * config.shortest_edge
        return side, side
    if config.do_resize:
        return 2 * int(config.resize_width), 2 * int(config.resize_height)  # type: ignore[arg-type]
    return (1 << 30, 1 << 30)  # no resize: never shrink


def preprocess_batch(
    images: Sequence[ImageSource], config: ImageProcessorConfig, *, fast_decode: bool = False
) -> np.ndarray:
    """Several images -> float32 [batch, height, width, 3]. All outputs must share one size."""
    arrays = [preprocess_image(im, config, fast_decode=fast_decode) for im in images]
    if not arrays:
        height, width = config.output_size
        return np.zeros((0, height, width, 3), dtype=np.float32)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"preprocessed images differ in size {sorted(shapes)}; use a center crop or fixed resize")
    return np.stack(arrays)


__all__ = [
    "BICUBIC",
    "IMAGENET_STANDARD_MEAN",
    "IMAGENET_STANDARD_STD",
    "ImageLoadError",
    "ImageProcessorConfig",
    "MAX_IMAGE_PIXELS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "convert_to_rgb",
    "load_image",
    "preprocess_batch",
    "preprocess_image",
]
