"""Converted tiny HF LLaVA models give HF's logits (float32, 1e-4)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from fastvlm_jax import convert
from fastvlm_jax.ckpt.convert import llava as convert_llava
from fastvlm_jax.nn.model import VLM
from tests.hf_models import build_tiny_llava, random_prompt_ids

CONFIGS = {
    "mha_layer-2_default_32px": dict(num_kv_heads=4, feature_layer=-2, strategy="default", image_size=32),
    "gqa_layer-1_full_48px": dict(num_kv_heads=2, feature_layer=-1, strategy="full", image_size=48),
    "gqa_bias_tied_multilayer": dict(
        num_kv_heads=1, feature_layer=[-3, -1], strategy="default", attention_bias=True, tie=True, rope_theta=500.0
    ),
    "siglip_layer-2_full": dict(vision="siglip", feature_layer=-2, strategy="full", image_size=32),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_hf(tmp_path, name):
    import torch

    hf_model = build_tiny_llava(tmp_path, seed=len(name), **CONFIGS[name])
    config = convert_llava.config_from_hf(json.loads((tmp_path / "config.json").read_text()), exit_layer=2)
    params = convert_llava.convert_params(
        convert_llava.open_safetensors(tmp_path), config, __import__("jax").random.key(0), progress=False
    )
    rng = np.random.RandomState(0)
    ids = np.array([random_prompt_ids(hf_model.config, rng, text_len=7) for _ in range(2)])
    size = hf_model.config.vision_config.image_size
    pixels = rng.randn(2, 3, size, size).astype(np.float32)
    with torch.no_grad():
        expected = hf_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    got = VLM(config).forward(params, jnp.asarray(ids), jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def test_converter_reads_sharded_checkpoint_and_new_key_layout(tmp_path):
    """Sharded safetensors with an index, keys in the `model.language_model.*` layout."""
    import torch
    from safetensors.torch import save_file

    hf_model = build_tiny_llava(tmp_path / "ref")
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}  # new in-memory layout
    assert any(k.startswith("model.language_model.") for k in state)
    names = sorted(state)
    halves = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    out = tmp_path / "sharded"
    out.mkdir()
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(out / file))
        weight_map.update({k: file for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = convert_llava.config_from_hf(json.loads((tmp_path / "ref" / "config.json").read_text()), exit_layer=1)
    import jax

    sharded = convert_llava.convert_params(
        convert_llava.open_safetensors(out), config, jax.random.key(0), progress=False
    )
    single = convert_llava.convert_params(
        convert_llava.open_safetensors(tmp_path / "ref"), config, jax.random.key(0), progress=False
    )
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    del torch


def test_converter_errors_are_clear(tmp_path):
    with pytest.raises(convert.ConversionError, match="not a folder"):
        convert.convert(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    with pytest.raises(convert.ConversionError, match="not supported"):
        convert.convert(tmp_path, tmp_path / "out")
    hf = {"model_type": "llava", "text_config": {"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}}}
    with pytest.raises(convert.ConversionError, match="rope type"):
        convert_llava.config_from_hf(hf)


def test_converter_shape_mismatch_names_tensor(tmp_path):
    import jax

    build_tiny_llava(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    hf_config["text_config"]["intermediate_size"] = 80  # lie about the MLP width
    config = convert_llava.config_from_hf(hf_config, exit_layer=1)
    with pytest.raises(convert.ConversionError, match="shape mismatch for text.layers.0.mlp"):
        convert_llava.convert_params(
            convert_llava.open_safetensors(tmp_path), config, jax.random.key(0), progress=False
        )


def test_llava15_7b_defaults_from_sparse_config():
    """llava-1.5-7b-hf's config.json leaves most text/vision keys at HF defaults."""
    sparse = {
        "model_type": "llava",
        "image_token_index": 32000,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "text_config": {
            "model_type": "llama",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-05,
            "vocab_size": 32064,
        },
        "vision_config": {
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "model_type": "clip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "projection_dim": 768,
        },
    }
    config = convert_llava.config_from_hf(sparse)
    assert (config.text.num_layers, config.text.hidden_size, config.text.num_kv_heads) == (32, 4096, 32)
    assert config.text.intermediate_size == 11008 and config.num_image_tokens == 576
    assert config.draft.exit_layer == 8
