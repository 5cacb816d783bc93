"""Qwen2.5-VL's vision side against transformers: the image processor (bit for bit) and the
vision tower on padded batches (float32 parity, one compiled program for every image size).

Two structurally different tiny towers are built in-process from random weights (no network):
A (patch 14, frames of 2, 2x2 merge, 2x2-token windows, full attention in blocks 1 and 3) and B
(patch 6, single frames, 3x3 merge, a window size that is not a multiple of the merged patch,
full attention only in the last block, 4 heads, tanh GELU). The references are
`Qwen2VLImageProcessorPil` (what AutoImageProcessor gives without torchvision) and
`Qwen2_5_VisionTransformerPretrainedModel`.
"""

from __future__ import annotations

import dataclasses
import io
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from fastvlm_jax.image.qwen_vl import QwenImageProcessorConfig, patch_count, preprocess, smart_resize
from fastvlm_jax.nn.config import ConfigError
from fastvlm_jax.nn.qwen_vision import QwenVisionConfig, QwenVisionTower, convert_vision_params, patch_layout

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers import AutoImageProcessor, Qwen2_5_VLConfig, Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VisionTransformerPretrainedModel,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402
from transformers.vision_utils import get_vision_window_index  # noqa: E402

hf_logging.set_verbosity_error()

TOWERS = {
    "A": dict(
        depth=4,
        hidden_size=32,
        num_heads=2,
        intermediate_size=40,
        out_hidden_size=48,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        window_size=56,  # 56 // 2 // 14 = 2 merged tokens per window side
        fullatt_block_indexes=[1, 3],
        hidden_act="silu",
    ),
    "B": dict(
        depth=3,
        hidden_size=48,
        num_heads=4,
        intermediate_size=64,
        out_hidden_size=24,
        patch_size=6,
        temporal_patch_size=1,
        spatial_merge_size=3,
        window_size=40,  # 40 // 3 // 6 = 2 (floored, as HF does)
        fullatt_block_indexes=[2],
        hidden_act="gelu_pytorch_tanh",
    ),
}


def _processor_config(name: str) -> QwenImageProcessorConfig:
    vc = TOWERS[name]
    factor = vc["patch_size"] * vc["spatial_merge_size"]
    return QwenImageProcessorConfig(
        patch_size=vc["patch_size"],
        temporal_patch_size=vc["temporal_patch_size"],
        merge_size=vc["spatial_merge_size"],
        min_pixels=factor * factor * 4,
        max_pixels=factor * factor * 40,
    )


def _hf_processor(config: QwenImageProcessorConfig) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        min_pixels=config.min_pixels,
        max_pixels=config.max_pixels,
        patch_size=config.patch_size,
        temporal_patch_size=config.temporal_patch_size,
        merge_size=config.merge_size,
    )


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# (width, height): wide, tall, square, very tall, very wide, smaller than min_pixels
SIZES = [(100, 60), (57, 211), (300, 300), (40, 700), (650, 33), (12, 9)]


# ---------------------------------------------------------------------------------------------
# Preprocessing


def test_auto_image_processor_is_the_pil_reference(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056})
    )
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is Qwen2VLImageProcessorPil


@pytest.mark.parametrize("tower", ["A", "B"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_preprocess_equals_transformers(tower, size):
    config = _processor_config(tower)
    image = _image(*size, seed=size[0])
    expected = _hf_processor(config)(image, return_tensors="np")
    patches, grid = preprocess(image, config)
    assert patches.dtype == np.float32
    np.testing.assert_array_equal(np.asarray([grid]), expected["image_grid_thw"])
    np.testing.assert_array_equal(patches, expected["pixel_values"])  # bit for bit
    assert patch_count(size[1], size[0], config) == len(patches)
    assert _hf_processor(config).get_number_of_image_patches(size[1], size[0]) == len(patches)


def test_preprocess_takes_files_bytes_and_arrays(tmp_path):
    config = _processor_config("A")
    image = _image(90, 70, seed=3)
    path = tmp_path / "x.png"
    image.save(path)
    reference, grid = preprocess(image, config)
    for source in (path, str(path), path.read_bytes(), np.asarray(image)):
        patches, other_grid = preprocess(source, config)
        np.testing.assert_array_equal(patches, reference)
        assert other_grid == grid
    # Transparency is composited onto white, as transformers' convert_to_rgb does.
    rgba = image.convert("RGBA")
    rgba.putalpha(128)
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    np.testing.assert_array_equal(
        preprocess(buffer.getvalue(), config)[0], _hf_processor(config)(rgba, return_tensors="np")["pixel_values"]
    )


def test_smart_resize_rule_and_errors():
    for height in (1, 5, 27, 28, 29, 100, 333, 1000, 4000):
        for width in (1, 13, 28, 57, 211, 640, 3000):
            if max(height, width) / min(height, width) > 200:
                continue
            for bounds in ((3136, 12845056), (28 * 28 * 4, 28 * 28 * 40)):
                assert smart_resize(height, width, 28, *bounds) == hf_smart_resize(height, width, 28, *bounds)
    with pytest.raises(ValueError, match="aspect ratio of 201.0"):
        smart_resize(2, 402, 28, 3136, 12845056)
    with pytest.raises(ValueError, match="empty image"):
        smart_resize(0, 10, 28, 3136, 12845056)


def test_processor_config_from_hf_reads_both_key_forms():
    old = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "min_pixels": 1000,
        "max_pixels": 90000,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    new = {
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "size": {"shortest_edge": 2000, "longest_edge": 80000},
    }
    both = {**new, "min_pixels": 1500}  # top-level keys override size, as in transformers
    for d in (old, new, both, {}):
        ours = QwenImageProcessorConfig.from_hf(d)
        hf_args = {k: v for k, v in d.items() if k != "image_processor_type"}
        size = Qwen2VLImageProcessorPil(**hf_args).size
        assert (ours.min_pixels, ours.max_pixels) == (size.shortest_edge, size.longest_edge), d
    assert QwenImageProcessorConfig.from_dict(QwenImageProcessorConfig.from_hf(old).to_dict()) == (
        QwenImageProcessorConfig.from_hf(old)
    )
    with pytest.raises(ValueError, match="not a Qwen2-VL image processor"):
        QwenImageProcessorConfig.from_hf({"image_processor_type": "CLIPImageProcessor"})
    with pytest.raises(ValueError, match="shortest_edge and longest_edge"):
        QwenImageProcessorConfig.from_hf({"size": {"height": 224, "width": 224}})


# ---------------------------------------------------------------------------------------------
# The tower


def _randomize(model, seed: int) -> None:
    """Weights large enough that every path matters (HF's 0.02 init leaves windows nearly
    invisible in the output): unit-scale linear maps, norms around 1, visible biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name or "ln_q" in name:
                param.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                fan_in = param[0].numel()
                param.copy_(noise / fan_in**0.5)


@pytest.fixture(scope="module", params=["A", "B"])
def tower(request):
    """(name, our config, our params, the HF model)."""
    vision = Qwen2_5_VLConfig(vision_config=TOWERS[request.param]).vision_config
    torch.manual_seed(0)
    model = Qwen2_5_VisionTransformerPretrainedModel._from_config(vision, dtype=torch.float32).eval()
    _randomize(model, seed=1)
    config = QwenVisionConfig.from_hf(vision.to_dict())
    state = {f"model.visual.{k}": v.numpy() for k, v in model.state_dict().items()}
    params = convert_vision_params(state.__getitem__, config, prefix="model.visual.")
    return request.param, config, params, model


def _batch(name: str, sizes, max_patches: int, seed: int):
    config = _processor_config(name)
    items = [preprocess(_image(w, h, seed=seed + i), config) for i, (w, h) in enumerate(sizes)]
    patches = np.zeros((len(items), max_patches, config.patch_dim), np.float32)
    grid = np.zeros((len(items), 3), np.int32)
    for row, (p, g) in enumerate(items):
        patches[row, : len(p)] = p
        grid[row] = g
    return items, patches, grid


# Per tower: two batches of three differently sized images sharing one max_patches, with grids
# (in merged tokens) that windows of 2 cut unevenly: A 150x150 -> 5x5, 90x180 -> 6x3, 120x40 ->
# 1x4 (one window row); B 100x60 -> 3x6, 70x90 -> 5x4, 200x61 -> 3x11, 120x40 -> 2x7.
BATCHES = {
    "A": ([(100, 60), (57, 211), (150, 150)], [(120, 40), (30, 30), (90, 180)], 112),
    "B": ([(100, 60), (70, 90), (150, 150)], [(120, 40), (20, 25), (200, 61)], 648),
}


def test_tower_matches_transformers_on_a_padded_batch(tower):
    name, config, params, model = tower
    first, second, max_patches = BATCHES[name]
    module = QwenVisionTower(config)
    run = jax.jit(lambda params, patches, grid: module.apply({"params": params}, patches, grid))
    worst = 0.0
    for seed, sizes in ((0, first), (10, second)):
        items, patches, grid = _batch(name, sizes, max_patches, seed)
        out = np.asarray(run(params, patches, grid))
        assert out.shape == (3, max_patches // config.merge_unit, config.out_hidden_size)
        with torch.no_grad():
            together = model(
                torch.from_numpy(np.concatenate([p for p, _ in items])), grid_thw=torch.tensor([g for _, g in items])
            ).pooler_output.numpy()
        start = 0
        for row, (p, g) in enumerate(items):
            with torch.no_grad():
                alone = model(torch.from_numpy(p), grid_thw=torch.tensor([g])).pooler_output.numpy()
            tokens = len(p) // config.merge_unit
            np.testing.assert_allclose(together[start : start + tokens], alone, atol=1e-5)
            start += tokens
            assert np.abs(alone).max() > 0.5  # a scale at which 1e-4 is a real check
            worst = max(worst, float(np.abs(out[row, :tokens] - alone).max()))
            np.testing.assert_array_equal(out[row, tokens:], 0)
    print(f"tower {name}: max |ours - HF| = {worst:.2e}")
    assert worst < 1e-4
    assert run._cache_size() == 1  # six image sizes, one program


def test_windows_matter_and_empty_rows_stay_zero(tower):
    """With every block full attention the output moves far beyond the tolerance, so the
    parity above checks the windows. A row without an image (grid 0, 0, 0) gives zeros."""
    name, config, params, _ = tower
    sizes, _, max_patches = BATCHES[name]
    _, patches, grid = _batch(name, sizes, max_patches, 0)
    patches = np.concatenate([patches, np.zeros_like(patches[:1])])
    grid = np.concatenate([grid, np.zeros_like(grid[:1])])
    all_full = dataclasses.replace(config, fullatt_block_indexes=tuple(range(config.depth)))
    windowed, full = (
        np.asarray(jax.jit(QwenVisionTower(c).apply)({"params": params}, patches, grid)) for c in (config, all_full)
    )
    assert float(np.abs(windowed - full).max()) > 1e-2
    np.testing.assert_array_equal(windowed[-1], 0)


@pytest.mark.parametrize("merge, units", [(2, 2), (3, 2), (2, 4), (1, 3)])
def test_window_partition_equals_transformers(merge, units):
    """Our window ids group the merged tokens exactly as HF's window index and cu_seqlens do,
    for grids that are and are not multiples of the window (frames of a clip included)."""
    patch = 4
    config = QwenVisionConfig(
        hidden_size=16, depth=1, num_heads=1, fullatt_block_indexes=(), patch_size=patch,
        spatial_merge_size=merge, window_size=units * merge * patch,
    )  # fmt: skip
    grids = [(1, merge * h, merge * w) for h in range(1, 10) for w in range(1, 10)] + [(3, 2 * merge, 5 * merge)]
    max_patches = max(t * h * w for t, h, w in grids)
    layout = patch_layout(np.asarray(grids, np.int32), max_patches, config)
    keys = np.stack([np.asarray(a) for a in (layout.frame, layout.window_row, layout.window_col)], -1)
    for row, (t, h, w) in enumerate(grids):
        index, cu = get_vision_window_index(torch.tensor([[t, h, w]]), merge, config.window_size, patch)
        cu = (cu.numpy() // merge**2).tolist()
        hf_windows = sorted(sorted(index[a:b].tolist()) for a, b in zip(cu[:-1], cu[1:]))
        ours: dict[tuple, list[int]] = {}
        unit_keys = keys[row, : t * h * w : merge**2]
        for unit, key in enumerate(map(tuple, unit_keys)):
            ours.setdefault(key, []).append(unit)
        assert sorted(ours.values()) == hf_windows, (t, h, w)


def test_params_tree_matches_init_and_carries_logical_axes(tower):
    _, config, params, _ = tower
    module = QwenVisionTower(config)
    patches = np.zeros((1, 4 * config.merge_unit, config.patch_dim), np.float32)
    grid = np.asarray([[1, config.spatial_merge_size, 4 * config.spatial_merge_size]], np.int32)
    boxed = jax.eval_shape(module.init, jax.random.key(0), patches, grid)["params"]
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    init_shapes = jax.tree.map(lambda leaf: leaf.value.shape, boxed, is_leaf=is_box)
    assert jax.tree.map(lambda leaf: leaf.shape, params) == init_shapes
    assert all(is_box(leaf) for leaf in jax.tree.leaves(boxed, is_leaf=is_box))
    names = {name for leaf in jax.tree.leaves(boxed, is_leaf=is_box) for name in leaf.names}
    assert "embed" in names and "heads" in names and "mlp" in names


def test_config_validation_and_hf_spellings():
    original = {  # Qwen2.5-VL-7B-Instruct's vision_config as published
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2, "temporal_patch_size": 2,
    }  # fmt: skip
    config = QwenVisionConfig.from_hf({"model_type": "qwen2_5_vl", "vision_config": original})
    assert config == QwenVisionConfig()
    assert config.window_units == 4 and config.patch_dim == 1176
    assert QwenVisionConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="multiple of 4"):
        QwenVisionConfig(hidden_size=36, num_heads=6)
    with pytest.raises(ConfigError, match="smaller than one merged token"):
        QwenVisionConfig(window_size=20)
    with pytest.raises(ConfigError, match=r"\[32\] are outside"):
        QwenVisionConfig(fullatt_block_indexes=(7, 32))
    with pytest.raises(ConfigError, match="Qwen2-VL's tower"):
        QwenVisionConfig.from_hf({"model_type": "qwen2_vl", "embed_dim": 1280})


def test_converter_names_a_wrong_shape(tower):
    _, config, _, model = tower
    state = {f"visual.{k}": v.numpy() for k, v in model.state_dict().items()}
    state["visual.blocks.0.mlp.up_proj.weight"] = state["visual.blocks.0.mlp.up_proj.weight"][:-1]
    with pytest.raises(ValueError, match=r"visual\.blocks\.0\.mlp\.up_proj\.weight: the checkpoint has shape"):
        convert_vision_params(state.__getitem__, config, prefix="visual.")
