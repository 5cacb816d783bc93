"""BLIP-2 (OPT): HF parity (logits, greedy generate), conversion, greedy SSD == AR."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate
from fastvlm_jax import convert
from fastvlm_jax.ckpt.checkpoint import load_checkpoint
from fastvlm_jax.ckpt.convert import blip2 as convert_blip2
from fastvlm_jax.nn.blip2 import Blip2Config, OPTConfig, OPTDecoder, init_imitation
from fastvlm_jax.nn.config import ConfigError
from fastvlm_jax.nn.model import VLM
from fastvlm_jax.runtime import sharding
from tests.hf_blip2 import build_tiny_blip2, perturb_norms, random_prompt_ids

CONFIGS = {
    # cross-attention in every Q-Former layer, tied LM head, 32px / 8px patches, 4 queries
    "xattn1_tied": dict(),
    # cross-attention every 2nd layer, untied head, no qkv / OPT biases, 48px / 16px, 6 queries
    "xattn2_untied_nobias": dict(
        qkv_bias=False,
        qformer_layers=3,
        cross_attention_frequency=2,
        tie=False,
        enable_bias=False,
        image_size=48,
        patch_size=16,
        num_query_tokens=6,
        text_layers=3,
    ),
}


def _hf_logits(hf_model, ids, pixels):
    import torch

    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_hf(tmp_path, name):
    hf_model = build_tiny_blip2(
        tmp_path, seed=len(name), text_init_std=0.15, vision_init_std=0.2, projection_std=0.5, **CONFIGS[name]
    )
    config = convert_blip2.config_from_hf(json.loads((tmp_path / "config.json").read_text()), exit_layer=2)
    params = convert_blip2.convert_params(
        convert_blip2.open_safetensors(tmp_path), config, jax.random.key(0), progress=False
    )
    rng = np.random.RandomState(0)
    ids = np.array([random_prompt_ids(hf_model.config, rng, text_len=7) for _ in range(2)])
    size = hf_model.config.vision_config.image_size
    pixels = rng.randn(2, 3, size, size).astype(np.float32)
    expected = _hf_logits(hf_model, ids, pixels)
    got = jax.jit(VLM(config).forward)(params, jnp.asarray(ids), jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)

    # The in-memory state dict (same key layout in transformers 5) converts identically.
    in_memory = convert_blip2.convert_params(
        convert_blip2.state_dict_source(hf_model.state_dict()), config, jax.random.key(0), progress=False
    )
    for a, b in zip(jax.tree.leaves(in_memory), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_opt_project_in_out_and_post_norm_match_hf():
    """OPT-350m-style decoder (word_embed_proj_dim < hidden, post-norm layers) vs OPTForCausalLM."""
    import torch
    from transformers import OPTConfig as HFOPTConfig
    from transformers import OPTForCausalLM

    torch.manual_seed(0)
    hf_config = HFOPTConfig(
        vocab_size=80,
        hidden_size=32,
        word_embed_proj_dim=16,
        ffn_dim=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        do_layer_norm_before=False,
    )
    hf_model = OPTForCausalLM(hf_config).eval()
    perturb_norms(hf_model)
    with torch.no_grad():  # larger weights than HF's init, so the logits are far from zero
        for param in hf_model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.15)
    text = convert_blip2.opt_config_from_hf(hf_config.to_dict())
    assert text.embed_dim == 16 and not text.has_final_layer_norm
    state = {f"language_model.{k}": v for k, v in hf_model.state_dict().items()}
    params = convert_blip2.convert_opt_params(convert_blip2.state_dict_source(state), text)
    ids = np.random.RandomState(1).randint(3, 80, size=(2, 9))
    with torch.no_grad():
        expected = hf_model(input_ids=torch.tensor(ids)).logits.numpy()
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    got = OPTDecoder(text).apply({"params": params}, jnp.asarray(ids), positions)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)

    # BLIP-2 cannot use such a decoder: HF scatters hidden_size-wide image features into
    # word_embed_proj_dim-wide embeddings.
    with pytest.raises(ConfigError, match="word_embed_proj_dim"):
        Blip2Config(text=OPTConfig(hidden_size=32, word_embed_proj_dim=16, num_heads=4, num_layers=4))


def test_converter_errors_are_clear(tmp_path, capsys):
    hf = {"model_type": "blip-2", "image_token_index": 50265, "text_config": {"model_type": "t5", "d_model": 2048}}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(convert.ConversionError, match="Flan-T5.*not supported yet"):
        convert.convert(tmp_path, tmp_path / "out")
    assert convert.main(["--hf", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Flan-T5" in err and "\n" not in err


def test_blip2_opt_2_7b_config_from_sparse_hub_config():
    """The hub's config.json leaves most keys at HF defaults; our preset has the same sizes."""
    from configs.blip2_opt_2_7b import get_model_config
    from fastvlm_jax.nn.model import param_count

    hub = {
        "architectures": ["Blip2ForConditionalGeneration"],
        "image_text_hidden_size": 256,
        "image_token_index": 50265,
        "model_type": "blip-2",
        "num_query_tokens": 32,
        "qformer_config": {"classifier_dropout": None, "model_type": "blip_2_qformer"},
        "text_config": {
            "_name_or_path": "facebook/opt-2.7b",
            "activation_dropout": 0.0,
            "architectures": ["OPTForCausalLM"],
            "eos_token_id": 50118,
            "ffn_dim": 10240,
            "hidden_size": 2560,
            "model_type": "opt",
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "prefix": "</s>",
            "torch_dtype": "float16",
            "vocab_size": 50304,
            "word_embed_proj_dim": 2560,
        },
        "vision_config": {
            "dropout": 0.0,
            "initializer_factor": 1.0,
            "model_type": "blip_2_vision_model",
            "num_channels": 3,
            "projection_dim": 512,
        },
    }
    config = convert_blip2.config_from_hf(hub)
    assert config == get_model_config()
    assert config.draft.exit_layer == 8 and config.num_image_tokens == 32
    abstract = nn.meta.unbox(VLM(config).abstract_params())
    base = {k: v for k, v in abstract.items() if k != "imitation"}
    assert param_count(base) == 3_744_761_856  # Blip2ForConditionalGeneration's count


# --- generation on one converted model ----------------------------------------------------------

EXIT_LAYER = 1
MAX_NEW = 20
EOS = 2


def convert_tiny_blip2(root):
    """A tiny HF BLIP-2 (deep layers scaled so early exits often agree), converted with the
    CLI path, and its greedy outputs: (checkpoint, prompts, HF tokens, our AR output, path).
    The `converted` fixture (tests/conftest.py) builds it once per test process."""
    import torch

    hf_model = build_tiny_blip2(root / "hf", seed=3, text_init_std=0.15, deep_scale=0.3, exit_layer=EXIT_LAYER)
    convert.convert(root / "hf", root / "ckpt", exit_layer=EXIT_LAYER, progress=False)
    checkpoint = load_checkpoint(root / "ckpt")

    rng = np.random.RandomState(0)
    rows = [random_prompt_ids(hf_model.config, rng, text_len=n) for n in (3, 6, 9)]
    size = hf_model.config.vision_config.image_size
    pixels = rng.randn(len(rows), 3, size, size).astype(np.float32)
    hf_tokens = []
    with torch.no_grad():  # one row at a time: no padding on the HF side
        for row, image in zip(rows, pixels):
            out = hf_model.generate(
                input_ids=torch.tensor([row]),
                pixel_values=torch.tensor(image[None]),
                max_new_tokens=MAX_NEW,
                do_sample=False,
            )
            hf_tokens.append(out[0, len(row) :].tolist())
    ids = np.zeros((len(rows), max(map(len, rows))), np.int32)  # right-padded, as the engine wants
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    prompts = Prompts(
        jnp.asarray(ids), jnp.asarray([len(r) for r in rows], jnp.int32), jnp.asarray(pixels.transpose(0, 2, 3, 1))
    )
    model = VLM(checkpoint.config)
    ar = generate(model, checkpoint.params, prompts, DecodeSpec("ar", capacity=MAX_NEW, eos_ids=(EOS,)), MAX_NEW)
    return checkpoint, prompts, hf_tokens, ar, root / "ckpt"


def _tokens(output):
    return [[int(t) for t in row[: int(n)]] for row, n in zip(np.asarray(output.tokens), output.num_tokens)]


@pytest.mark.slow
def test_converted_checkpoint(converted):
    checkpoint, prompts, *_, path = converted
    assert isinstance(checkpoint.config, Blip2Config)
    assert checkpoint.tokenizer is None  # the HF folder has no tokenizer files
    assert checkpoint.image_config.kind == "blip" and checkpoint.image_config.output_size == (32, 32)

    # Restored onto a mesh by logical axes, the sharded forward pass gives the same logits.
    model = VLM(checkpoint.config)
    ids, pixels = prompts.input_ids[:2], prompts.pixels[:2]
    expected = jax.jit(model.forward)(checkpoint.params, ids, pixels)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=4))
    sharded = load_checkpoint(path, mesh=mesh).params
    kernel = sharded["language_model"]["layers"]["fc1"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    with jax.set_mesh(mesh), sharding.axis_rules():
        got = jax.jit(model.forward)(sharded, ids, pixels)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_greedy_matches_hf_generate(converted):
    _, _, hf_tokens, ar, _ = converted
    assert len({t for row in hf_tokens for t in row}) > 5, "a degenerate reference proves little"
    assert _tokens(ar) == hf_tokens


@pytest.mark.slow
@pytest.mark.parametrize("kind,draft_len", [("ffn", 4), ("layer", 3)])
def test_greedy_ssd_equals_ar(converted, kind, draft_len):
    checkpoint, prompts, hf_tokens, ar, _ = converted
    config = checkpoint.config.with_draft(kind=kind)
    model = VLM(config)
    # A trained-looking imitation network: small random output projections instead of zeros.
    imitation = init_imitation(config, jax.random.key(1))
    imitation = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + 0.02 * jax.random.normal(jax.random.key(len(str(path))), x.shape)
            if "fc2" in str(path) or "out_proj" in str(path)
            else x
        ),
        imitation,
    )
    params = {**checkpoint.params, "imitation": imitation}
    spec = DecodeSpec("ssd", capacity=MAX_NEW, eos_ids=(EOS,), policy=DraftPolicy(draft_len=draft_len))
    ssd = generate(model, params, prompts, spec, MAX_NEW)
    assert _tokens(ssd) == _tokens(ar) == hf_tokens
    assert int(ssd.accepted.sum()) > 0, "the near-identity deep layers should accept some drafts"
    assert int(ssd.rounds.sum()) < int(ar.rounds.sum())
