"""Qwen2-VL / Qwen2.5-VL image preprocessing: resize to a multiple of the merged patch size,
then cut the image into flat patches in the vision tower's order.

The reference is transformers 5.x `Qwen2VLImageProcessorPil`, which is what
`AutoImageProcessor` returns for a Qwen2.5-VL folder when torchvision is not installed (as
here; see `fastvlm_jax.image.processing` for the same choice for CLIP/SigLIP). Its pipeline:

1. convert to RGB (transparency composited onto white: `processing.load_image`);
2. `smart_resize`: (height, width) rounded to multiples of `patch_size * merge_size`, scaled
   so that height * width lies in [min_pixels, max_pixels]; PIL bicubic resize of the uint8
   image to that size;
3. rescale (float64 multiply, one rounding to float32) and normalize in float32, exactly as
   `processing.rescale_and_normalize`;
4. patchify: the image is cut into `patch_size` squares ordered merge-group-major (every
   `merge_size x merge_size` group of neighbouring patches is consecutive, groups in
   row-major order), each patch flattened as (channel, temporal, row, col) with the still
   image repeated `temporal_patch_size` times along the temporal axis (a video of one frame).

Every step uses the reference's arithmetic, so `preprocess` equals the processor's
`pixel_values` and `image_grid_thw` bit for bit (tested in tests/test_qwen_vision.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from fastvlm_jax.image.processing import (
    BICUBIC,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageProcessorConfig,
    ImageSource,
    load_image,
    rescale_and_normalize,
)

# transformers' defaults for Qwen2-VL / Qwen2.5-VL (Qwen2VLImageProcessor.size).
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
# smart_resize refuses images whose long side is more than this many times the short one.
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class QwenImageProcessorConfig:
    """How a Qwen2-VL-style processor turns an image into patches (HF `Qwen2VLImageProcessor`).

    min_pixels / max_pixels bound the resized image's area (HF's size.shortest_edge /
    size.longest_edge, which despite the names count pixels); the resized sides are multiples
    of `patch_size * merge_size`.
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    do_resize: bool = True
    resample: int = BICUBIC  # a PIL.Image.Resampling value
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
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels={self.min_pixels} is larger than max_pixels={self.max_pixels}")
        try:
            Image.Resampling(self.resample)
        except ValueError:
            raise ValueError(f"resample={self.resample} is not a PIL resampling filter") from None

    @property
    def factor(self) -> int:
        """Both resized sides are multiples of this (one merged token covers factor x factor pixels)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flat patch: channels * temporal_patch_size * patch_size**2."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    # HF preprocessor_config.json --------------------------------------------------------------

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> QwenImageProcessorConfig:
        """Read a Hugging Face `preprocessor_config.json` dict of a Qwen2-VL / Qwen2.5-VL model.

        The pixel bounds come, as in transformers 5.x's `Qwen2VLImageProcessor.__init__`, from
        top-level `min_pixels` / `max_pixels` when present (older files), which override
        `size: {shortest_edge, longest_edge}` (newer files), which override the defaults.
        """
        type_name = d.get("image_processor_type")
        if type_name is not None:
            base = str(type_name)
            for suffix in ("Fast", "Pil"):
                base = base.removesuffix(suffix)
            if base not in ("Qwen2VLImageProcessor", "Qwen2_5_VLImageProcessor"):
                raise ValueError(f"image_processor_type {type_name!r} is not a Qwen2-VL image processor")

        def get(key: str, default: Any) -> Any:
            value = d.get(key)
            return default if value is None else value

        size = get("size", {})
        if not isinstance(size, dict):
            raise ValueError(f"cannot read size={size!r}: a Qwen2-VL processor needs {{shortest_edge, longest_edge}}")
        unknown = sorted(k for k, v in size.items() if v is not None and k not in ("shortest_edge", "longest_edge"))
        if unknown:
            # transformers would fail later in resize ("size dict must contain 'shortest_edge'
            # and 'longest_edge'"); say so now.
            raise ValueError(f"size has keys {unknown}; a Qwen2-VL processor reads shortest_edge and longest_edge")
        min_pixels = get("min_pixels", size.get("shortest_edge") or DEFAULT_MIN_PIXELS)
        max_pixels = get("max_pixels", size.get("longest_edge") or DEFAULT_MAX_PIXELS)

        def triple(value: Any) -> tuple[float, float, float]:
            if isinstance(value, (int, float)):
                return float(value), float(value), float(value)
            return tuple(float(x) for x in value)  # type: ignore[return-value]

        return cls(
            patch_size=int(get("patch_size", 14)),
            temporal_patch_size=int(get("temporal_patch_size", 2)),
            merge_size=int(get("merge_size", 2)),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            do_resize=bool(get("do_resize", True)),
            resample=int(get("resample", BICUBIC)),
            do_rescale=bool(get("do_rescale", True)),
            rescale_factor=float(get("rescale_factor", 1 / 255)),
            do_normalize=bool(get("do_normalize", True)),
            image_mean=triple(get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=triple(get("image_std", OPENAI_CLIP_STD)),
        )

    # Our checkpoint JSON ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["image_mean"] = list(self.image_mean)
        out["image_std"] = list(self.image_std)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QwenImageProcessorConfig:
        """Inverse of `to_dict`; unknown keys are an error (a typo would silently change pixels)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown QwenImageProcessorConfig keys: {unknown}")
        return cls(**d)

    def _pixel_steps(self) -> ImageProcessorConfig:
        """The rescale/normalize settings in processing.py's config, so that one function
        (`rescale_and_normalize`) holds that arithmetic for every family."""
        return ImageProcessorConfig(
            kind="qwen2_vl",
            do_resize=False,
            shortest_edge=None,
            do_center_crop=False,
            crop_height=None,
            crop_width=None,
            do_rescale=self.do_rescale,
            rescale_factor=self.rescale_factor,
            do_normalize=self.do_normalize,
            image_mean=self.image_mean,
            image_std=self.image_std,
        )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) of the resized image, transformers' `smart_resize` rule exactly.

    Both sides become multiples of `factor` (each rounded to the nearest multiple); if the area
    then exceeds max_pixels the image is scaled down (sides floored to multiples, at least
    `factor`), if it falls below min_pixels scaled up (sides ceiled), keeping the aspect ratio
    as closely as the rounding allows. Python's round() (half to even) as in the reference.

    Raises ValueError for an empty image or an aspect ratio above 200 (the reference's limit:
    the short side would round to nothing).
    """
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize an empty image of {height}x{width} (height x width) pixels")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of {height}x{width} (height x width) pixels has an aspect ratio of {ratio:.1f}; "
            f"Qwen2-VL preprocessing accepts at most {MAX_ASPECT_RATIO} (crop or pad it first)"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _resized_size(height: int, width: int, config: QwenImageProcessorConfig) -> tuple[int, int]:
    """(height, width) the processor resizes an image to (its own size without do_resize)."""
    if config.do_resize:
        return smart_resize(height, width, config.factor, config.min_pixels, config.max_pixels)
    if height % config.factor or width % config.factor:
        raise ValueError(
            f"do_resize=False needs sides that are multiples of patch_size * merge_size = {config.factor}, "
            f"got {height}x{width} (height x width)"
        )
    return height, width


def patch_count(height: int, width: int, config: QwenImageProcessorConfig) -> int:
    """Number of patches (t * h * w of the grid) `preprocess` gives an image of height x width
    pixels, without loading or resizing it; the merged token count is this // merge_size**2."""
    new_h, new_w = _resized_size(height, width, config)
    return (new_h // config.patch_size) * (new_w // config.patch_size)


def preprocess(image: ImageSource, config: QwenImageProcessorConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (patches, grid).

    image: anything `processing.load_image` takes (path, bytes, PIL image, uint8 array).
    Returns patches float32 [t * h * w, 3 * temporal_patch_size * patch_size**2] in the
    reference processor's order (HF `pixel_values` of this image) and grid (t, h, w) in patches
    (HF `image_grid_thw`; t = 1 for a still image).
    """
    pil = load_image(image)
    new_h, new_w = _resized_size(pil.height, pil.width, config)
    if (new_h, new_w) != (pil.height, pil.width):
        # PIL takes (width, height); one pass without reducing_gap, as the reference.
        pil = pil.resize((new_w, new_h), resample=Image.Resampling(config.resample))
    pixels = rescale_and_normalize(np.asarray(pil), config._pixel_steps())  # [H, W, 3] float32

    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    grid_h, grid_w = new_h // p, new_w // p
    # [H, W, C] -> (group row, row in group, patch row, group col, col in group, patch col, C)
    blocks = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, 3)
    # -> (group row, group col, row in group, col in group, C, patch row, patch col)
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)
    # A still image is a clip of t identical frames: repeat along a temporal axis after C.
    blocks = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], t, p, p))
    patches = np.ascontiguousarray(blocks.reshape(grid_h * grid_w, 3 * t * p * p), dtype=np.float32)
    return patches, (1, grid_h, grid_w)


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_PIXELS",
    "QwenImageProcessorConfig",
    "patch_count",
    "preprocess",
    "smart_resize",
]
