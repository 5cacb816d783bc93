"""Int8 weight-only decoding (fastvlm_jax.nn.quant): the quantized model's greedy SSD equals
its AR, its logits stay close to the float model's, and its weights stay int8 in the program."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from decode import run
from decode.bench.models import load_bench_model
from decode.engine import DecodeSpec, DraftPolicy, generate
from fastvlm_jax import convert
from fastvlm_jax.ckpt.checkpoint import load_checkpoint
from fastvlm_jax.nn.model import VLM, param_bytes
from fastvlm_jax.nn.quant import (
    QuantizationError,
    dequantize_kernel,
    quantize_kernel,
    quantize_model,
    quantize_params,
)
from tests.run_fixtures import make_tiny_checkpoint, write_image
from tests.test_decode import _near_identity_deep_layers, _prompts, _tokens
from tests.tiny import tiny_config


def shapes(tree):
    return jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), tree)


@pytest.fixture(scope="module")
def models():
    """(float model, params, int8 model, params): a tiny LLaVA with a one-layer imitation network
    (untrained: its zero output projections quantize to zero channels of scale 1)."""
    config = tiny_config(num_layers=4, exit_layer=2, kind="layer")
    model = VLM(config)
    params = _near_identity_deep_layers(jax.jit(model.init)(jax.random.key(3)), config, 0.3)
    qconfig, qparams = quantize_model(config, params)
    return model, params, VLM(qconfig), qparams


def test_quantize_kernel_per_output_channel_round_trip():
    w = jax.random.normal(jax.random.key(0), (3, 32, 16)) * jnp.arange(1, 17)  # channels of different ranges
    w = w.at[1, :, 5].set(0.0)  # an all-zero channel (zero-initialised projections)
    values, scale = quantize_kernel(w)
    assert values.dtype == jnp.int8 and values.shape == w.shape and scale.shape == (3, 16)
    assert int(jnp.max(jnp.abs(values.astype(jnp.int32)))) == 127  # each channel's max maps to +-127
    error = jnp.abs(dequantize_kernel(values, scale) - w)
    assert bool(jnp.all(error <= scale[..., None, :] / 2 + 1e-6))  # round to nearest: half a step at most
    assert float(scale[1, 5]) == 1.0 and not bool(jnp.any(values[1, :, 5]))


def test_which_params_are_quantized(models):
    _, params, qmodel, qparams = models
    assert qmodel.config.quantization == "int8"
    layers = qparams["language_model"]["layers"]
    assert layers["mlp"]["down_proj"]["kernel"].dtype == jnp.int8
    assert layers["mlp"]["down_proj"]["kernel_scale"].shape == (4, 64)  # [layers, out]
    assert qparams["language_model"]["lm_head"]["kernel"].dtype == jnp.int8
    assert qparams["imitation"]["layer"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.int8
    # prefill-only and gathered weights stay float
    assert qparams["language_model"]["embed_tokens"]["embedding"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(qparams["vision_tower"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(qparams["projector"]))

    # the quantized tree is the one the quantized config describes (shardings, checkpoints)
    assert shapes(nn.meta.unbox(qmodel.abstract_params())) == shapes(qparams)
    with pytest.raises(QuantizationError, match="already"):
        quantize_params(qparams)
    with pytest.raises(QuantizationError, match="already"):
        quantize_model(qmodel.config, qparams)
    with pytest.raises(QuantizationError, match="int4"):
        quantize_params(params, "int4")


def test_quantized_logits_close_and_greedy_ssd_equals_ar(models):
    model, params, qmodel, qparams = models
    config = model.config
    n = config.num_image_tokens
    prompts = _prompts(config, [n + 3, n + 8, n + 5], seed=2)
    positions = jnp.broadcast_to(jnp.arange(prompts.input_ids.shape[1]), prompts.input_ids.shape)
    float_logits = jax.jit(model.forward)(params, prompts.input_ids, prompts.pixels, positions)
    int8_logits = jax.jit(qmodel.forward)(qparams, prompts.input_ids, prompts.pixels, positions)
    # Per-channel int8 rounds each weight by at most 1/254 of its channel's max: the logits
    # move by under 3% of their RMS (measured: 1.1%) and the greedy tokens mostly agree.
    rms = float(jnp.sqrt(jnp.mean(float_logits**2)))
    assert float(jnp.sqrt(jnp.mean((int8_logits - float_logits) ** 2))) < 0.03 * rms
    assert float(jnp.mean(jnp.argmax(int8_logits, -1) == jnp.argmax(float_logits, -1))) > 0.9

    ar = generate(qmodel, qparams, prompts, DecodeSpec("ar", capacity=24, eos_ids=()), 24)
    ssd_spec = DecodeSpec("ssd", capacity=24, eos_ids=(), policy=DraftPolicy(draft_len=4))
    ssd = generate(qmodel, qparams, prompts, ssd_spec, 24)
    assert _tokens(ssd) == _tokens(ar)
    assert int(ssd.accepted.sum()) > 0 and int(ssd.rounds.sum()) < int(ar.rounds.sum())


def test_int8_weights_stay_int8_in_the_compiled_program(models):
    model, params, qmodel, qparams = models
    config = model.config
    prompts = _prompts(config, [config.num_image_tokens + 4], seed=1)

    def compiled(m, p):
        return jax.jit(m.forward).lower(p, prompts.input_ids, prompts.pixels).compile()

    float_program, int8_program = compiled(model, params), compiled(qmodel, qparams)
    float_args = float_program.memory_analysis().argument_size_in_bytes
    int8_args = int8_program.memory_analysis().argument_size_in_bytes
    # The program's arguments are the params as they are: the decoder's int8 kernels arrive
    # as int8 (forward reads the language model, the vision tower and the projector).
    saved = param_bytes(params["language_model"]) - param_bytes(qparams["language_model"])
    assert float_args - int8_args == saved > 0.7 * param_bytes(params["language_model"]["layers"])
    # No dequantized copy of a whole stacked weight: the int8 stacks are the program's
    # parameters and no float array of a [layers, in, out] kernel shape is ever built.
    hlo = int8_program.as_text()
    layers = qparams["language_model"]["layers"]
    for block, name in (("self_attn", "q_proj"), ("mlp", "gate_proj"), ("mlp", "down_proj")):
        dims = ",".join(map(str, layers[block][name]["kernel"].shape))
        assert f"s8[{dims}]" in hlo, name
        assert f"f32[{dims}]" not in hlo, name


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """(float checkpoint, its int8 copy written by `fastvlm_jax.convert --ckpt ... --quantize int8`)."""
    root = tmp_path_factory.mktemp("quant")
    ckpt = make_tiny_checkpoint(root / "float")
    quantized = root / "int8"
    assert convert.main(["--ckpt", str(ckpt), "--out", str(quantized), "--quantize", "int8"]) == 0
    return ckpt, quantized


def _last_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "expected an error message"
    return lines[-1]


def test_convert_quantize_stores_int8_and_refuses_bad_input(stored, tmp_path, capsys):
    ckpt, quantized = stored
    loaded = load_checkpoint(quantized)
    assert loaded.config.quantization == "int8" and loaded.tokenizer is not None
    assert loaded.params["language_model"]["layers"]["self_attn"]["o_proj"]["kernel"].dtype == jnp.int8
    expected = quantize_params(load_checkpoint(ckpt).params)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), loaded.params, expected))

    # an already quantized checkpoint, an unknown scheme: one line naming the problem
    assert convert.main(["--ckpt", str(quantized), "--out", str(tmp_path / "again"), "--quantize", "int8"]) == 2
    assert "already quantized" in _last_error_line(capsys)
    with pytest.raises(SystemExit):
        convert.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "x"), "--quantize", "int4"])
    assert "invalid choice: 'int4'" in _last_error_line(capsys)
    image = write_image(tmp_path / "a.png", seed=1)
    base = ["--images", str(image), "--out", str(tmp_path / "out.jsonl")]
    assert run.main(["--ckpt", str(quantized), *base, "--quantize", "int8"]) == run.EXIT_USAGE
    assert "already int8-quantized" in _last_error_line(capsys)
    assert run.main(["--ckpt", str(ckpt), *base, "--quantize", "int4"]) == run.EXIT_USAGE
    assert "invalid choice: 'int4'" in _last_error_line(capsys)
    # decode.bench loads the same way
    bench = load_bench_model(str(ckpt), quantize="int8")
    assert bench.config.quantization == "int8" and bench.dtype == jnp.float32
    with pytest.raises(SystemExit, match="already int8-quantized"):
        load_bench_model(str(quantized), quantize="int8")


@pytest.mark.slow
def test_decode_run_int8_stored_equals_on_load_and_ssd_equals_ar(stored, tmp_path):
    ckpt, quantized = stored
    images = [str(write_image(tmp_path / f"{i}.png", seed=i)) for i in range(3)]

    def captions(*argv):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.jsonl"
        common = ["--images", *images, "--out", str(out), "--batch-size", "4", "--max-new-tokens", "12"]
        assert run.main([*argv, *common]) == run.EXIT_OK
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        return {line["image"]: line["token_ids"] for line in lines}

    stored_ssd = captions("--ckpt", str(quantized))
    assert captions("--ckpt", str(quantized), "--mode", "ar") == stored_ssd
    assert captions("--ckpt", str(ckpt), "--quantize", "int8") == stored_ssd


def _blip2_config():
    from fastvlm_jax.nn.blip2 import Blip2Config, Blip2VisionConfig, OPTConfig, QFormerConfig
    from fastvlm_jax.nn.config import DraftConfig

    return Blip2Config(
        vision=Blip2VisionConfig(
            image_size=16, patch_size=8, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4
        ),
        qformer=QFormerConfig(
            hidden_size=32, intermediate_size=40, num_layers=1, num_heads=4, cross_attention_frequency=1
        ),
        text=OPTConfig(
            vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, tie_word_embeddings=False
        ),
        draft=DraftConfig(exit_layer=1),
        num_query_tokens=4,
        image_token_id=63,
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3", "blip2"])
def test_other_families_quantize(family):
    """Gemma 3 (tied LM head: stays float) and BLIP-2 (OPT: biases, an untied LM head from setup)."""
    from tests.test_gemma3 import _sampling_model

    if family == "gemma3":
        model, params, pixels = _sampling_model()
        ids = jnp.asarray([[2] + [model.config.image_token_id] * model.config.num_image_tokens + [3, 4, 5]])
    else:
        model = VLM(_blip2_config())
        params = jax.jit(model.init)(jax.random.key(0))
        pixels = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3))
        ids = jnp.asarray([[2] + [63] * 4 + [5, 6, 7, 8]])
    qconfig, qparams = quantize_model(model.config, params)
    qmodel = VLM(qconfig)
    assert shapes(nn.meta.unbox(qmodel.abstract_params())) == shapes(qparams)
    head = qparams["language_model"].get("lm_head")
    assert (head is None) == (family == "gemma3") and (head is None or head["kernel"].dtype == jnp.int8)
    float_logits = jax.jit(model.forward)(params, ids, pixels)
    int8_logits = jax.jit(qmodel.forward)(qparams, ids, pixels)
    rms = float(jnp.sqrt(jnp.mean(float_logits**2)))
    assert float(jnp.sqrt(jnp.mean((int8_logits - float_logits) ** 2))) < 0.03 * rms
