"""Images of any size as one batch of patch rows (Qwen2.5-VL's input form).

A resolution-preserving vision tower sees each image as as many patches as its resized size
gives. One compiled program serves a batch of different sizes when every row is padded to the
same patch count and carries its own patch grid; `PatchImages` is that batch. Its leading axis
is the batch, like a pixel array's, so the engine batches, pads and shards it the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import flax.struct
import numpy as np


@flax.struct.dataclass
class PatchImages:
    """patches: [batch, max_patches, patch_dim] float32, each row's real patches first (the
    processor's order) and zeros after; grid: [batch, 3] int32, each row's (t, h, w) in patches
    (zeros for a row without an image)."""

    patches: Any
    grid: Any

    if TYPE_CHECKING:

        def replace(self, **changes: Any) -> PatchImages: ...

    @property
    def shape(self) -> tuple[int, ...]:
        """[batch, max_patches, patch_dim], the patches' shape (the program's shape key)."""
        return tuple(self.patches.shape)


def stack_patch_images(images: Sequence[tuple[np.ndarray, Any]], max_patches: int) -> PatchImages:
    """One batch from (patches [n, patch_dim], (t, h, w)) pairs, each padded to max_patches rows."""
    if not images:
        raise ValueError("no images to stack")
    dim = images[0][0].shape[-1]
    patches = np.zeros((len(images), max_patches, dim), np.float32)
    grid = np.zeros((len(images), 3), np.int32)
    for row, (rows, thw) in enumerate(images):
        if rows.shape[0] > max_patches:
            raise ValueError(f"an image of {rows.shape[0]} patches does not fit a batch of {max_patches}")
        patches[row, : rows.shape[0]] = rows
        grid[row] = thw
    return PatchImages(patches=patches, grid=grid)


def patch_bucket(num_patches: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `num_patches` (buckets ascending)."""
    for bucket in buckets:
        if num_patches <= bucket:
            return bucket
    raise ValueError(f"an image of {num_patches} patches is larger than the largest bucket {max(buckets)}")


def patch_buckets(max_patches: int, smallest: int = 64) -> tuple[int, ...]:
    """The patch counts images are padded to: `smallest`, doubling, up to and ending at
    `max_patches` (the processor's largest image). An image then wastes less than half of its
    row, and a folder of any sizes compiles at most len(buckets) vision programs."""
    buckets = []
    size = min(smallest, max_patches)
    while size < max_patches:
        buckets.append(size)
        size *= 2
    buckets.append(max_patches)
    return tuple(buckets)


def padded_image(patches: np.ndarray, grid: Sequence[int], buckets: Sequence[int]) -> PatchImages:
    """One image's patches [n, patch_dim] padded to its bucket: an unbatched PatchImages
    (patches [bucket, patch_dim], grid [3])."""
    bucket = patch_bucket(patches.shape[0], buckets)
    rows = np.zeros((bucket, patches.shape[1]), np.float32)
    rows[: patches.shape[0]] = patches
    return PatchImages(patches=rows, grid=np.asarray(grid, np.int32))


def batch_pixels(items: Sequence[Any], rows: int) -> Any:
    """`rows` rows of images from `items` (rows past them repeat the first): pixel arrays
    [H, W, C] -> [rows, H, W, C] float32; unbatched PatchImages -> a PatchImages padded to the
    largest item's patch count; None (text-only) -> None."""
    if not items or items[0] is None:
        return None
    chosen = [items[row] if row < len(items) else items[0] for row in range(rows)]
    if isinstance(items[0], PatchImages):
        width = max(item.patches.shape[0] for item in items)
        return stack_patch_images([(np.asarray(i.patches), np.asarray(i.grid)) for i in chosen], width)
    return np.stack([np.asarray(item, np.float32) for item in chosen])
