"""Model library: cached decoding, the layer-range API, sharding and checkpoints."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastvlm_jax.ckpt import checkpoint
from fastvlm_jax.nn import model as model_lib
from fastvlm_jax.nn.model import VLM
from fastvlm_jax.runtime import sharding
from tests.tiny import tiny_config


def _inputs(config, batch=2, text_len=9, seed=0):
    rng = np.random.RandomState(seed)
    n = config.num_image_tokens
    ids = np.concatenate(
        [
            np.ones((batch, 1), np.int32),
            np.full((batch, n), config.image_token_id),
            rng.randint(3, config.image_token_id, (batch, text_len)),
        ],
        axis=1,
    )
    size = config.vision.image_size
    pixels = rng.randn(batch, size, size, 3).astype(np.float32)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(pixels)


@pytest.mark.parametrize("kind", ["ffn", "layer"])
def test_cached_incremental_decoding_equals_full_forward(kind):
    config = tiny_config(kind=kind)
    model = VLM(config)
    params = model.init(jax.random.key(1))
    ids, pixels = _inputs(config)
    full = jax.jit(model.forward)(params, ids, pixels)

    batch, seq = ids.shape
    hidden = jax.jit(lambda p: model.embed(p, ids, model.encode_images(p, pixels)))(params)
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    cache = model.init_cache(batch, seq + 8)
    prefix = seq - 5
    # Jitted (as in decoding): op-by-op dispatch of the whole model is slow on CPU.
    run = jax.jit(lambda p, h, pos, c: model.run_layers(p, h, pos, 0, 4, c)[:2])
    logits = jax.jit(model.logits)
    out, cache = run(params, hidden[:, :prefix], positions[:, :prefix], cache)
    steps = [logits(params, out)]
    # Then two tokens at once, then one at a time: chunks of any size must agree.
    for start, stop in [(prefix, prefix + 2), (prefix + 2, prefix + 3), (prefix + 3, prefix + 4), (prefix + 4, seq)]:
        out, cache = run(params, hidden[:, start:stop], positions[:, start:stop], cache)
        steps.append(logits(params, out))
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full), atol=1e-5)


def _range_inputs():
    """A 5-layer model (exit 2), its params, embedded hidden states [batch, seq, embed],
    positions and an empty cache."""
    config = tiny_config(num_layers=5, exit_layer=2)
    model = VLM(config)
    params = model.init(jax.random.key(3))
    ids, pixels = _inputs(config)
    batch, seq = ids.shape
    hidden = model.embed(params, ids, model.encode_images(params, pixels))
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    return model, params, hidden, positions, model.init_cache(batch, seq + 4)


@pytest.mark.slow
@pytest.mark.parametrize("start,stop", [(2, 5), (0, 5), (0, 2)])
def test_unrolled_layers_equal_the_layer_loop(start, stop):
    """unroll_layers compiles the same layers over the same stacked params and cache."""
    model, params, hidden, positions, cache = _range_inputs()
    unrolled_model = VLM(model.config, unroll_layers=True)
    run = jax.jit(lambda m, p, h, c: m.run_layers(p, h, positions, start, stop, c, collect=(stop,)), static_argnums=0)
    looped, unrolled = run(model, params, hidden, cache), run(unrolled_model, params, hidden, cache)
    np.testing.assert_allclose(np.asarray(looped[0]), np.asarray(unrolled[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(looped[1].keys), np.asarray(unrolled[1].keys), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(looped[2][stop]), np.asarray(looped[0]))


def test_layer_ranges_read_the_stacked_params_and_write_only_their_cache_layers():
    """Layer i of a range is row i of the stacked params (changing row 3 changes [2, 5)
    but not [0, 2)), and a cached range writes its own cache layers only."""
    model, params, hidden, positions, cache = _range_inputs()
    layers = params["language_model"]["layers"]
    assert layers["mlp"]["down_proj"]["kernel"].shape[0] == 5
    changed = {
        **params,
        "language_model": {**params["language_model"], "layers": jax.tree.map(lambda x: x.at[3].multiply(2.0), layers)},
    }
    run = jax.jit(
        lambda p, start, stop: model.run_layers(p, hidden, positions, start, stop, cache)[:2], static_argnums=(1, 2)
    )
    deep, deep_cache = run(params, 2, 5)
    assert not np.allclose(np.asarray(run(changed, 2, 5)[0]), np.asarray(deep), atol=1e-3)
    np.testing.assert_array_equal(np.asarray(run(changed, 0, 2)[0]), np.asarray(run(params, 0, 2)[0]))
    keys = np.asarray(deep_cache.keys)
    assert not keys[:2].any() and keys[2:].any()  # layers 0, 1 untouched (still zeros)
    with pytest.raises(ValueError, match=r"layer range \[3, 7\) is outside a stack of 5"):
        model.run_layers(params, hidden, positions, 3, 7, cache)


def test_layer_ranges_compose_and_collect_states():
    config = tiny_config(num_layers=5, exit_layer=3)
    model = VLM(config)
    params = model.init(jax.random.key(2))
    ids, pixels = _inputs(config)
    hidden = model.embed(params, ids, model.encode_images(params, pixels))
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    last, _, states = model.run_layers(params, hidden, positions, 0, 5, collect=(1, 3, 5))
    h3, _, _ = model.run_layers(params, hidden, positions, 0, 3)
    h5, _, _ = model.run_layers(params, h3, positions, 3, 5)
    np.testing.assert_array_equal(np.asarray(states[3]), np.asarray(h3))
    np.testing.assert_allclose(np.asarray(h5), np.asarray(last), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(states[5]), np.asarray(last))


def test_rows_at_different_positions_see_only_their_own_history():
    """Per-row positions: a row that advanced further must not leak into a shorter row."""
    config = tiny_config()
    model = VLM(config)
    params = model.init(jax.random.key(3))
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(3, 60, (2, 12)), jnp.int32)
    full = model.forward(params, ids)
    cache = model.init_cache(2, 16)
    hidden = model.embed(params, ids)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    # Row 0 prefilled with 7 tokens, row 1 with 10 (right-padded to 10 for both).
    _, cache, _ = model.run_layers(params, hidden[:, :10], pos[:, :10], 0, 4, cache)
    row_pos = jnp.array([7, 10])
    step_hidden = jnp.stack([hidden[0, 7], hidden[1, 10]])[:, None]
    out, cache, _ = model.run_layers(params, step_hidden, row_pos[:, None], 0, 4, cache)
    logits = model.logits(params, out)[:, 0]
    np.testing.assert_allclose(np.asarray(logits[0]), np.asarray(full[0, 7]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits[1]), np.asarray(full[1, 10]), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 1, 4), (1, 2, 4)])
def test_sharded_forward_matches_single_device(mesh_shape):
    assert jax.device_count() >= 8, "conftest sets 8 host devices"
    config = tiny_config(num_kv_heads=4)
    model = VLM(config)
    params = model.init(jax.random.key(4))
    ids, pixels = _inputs(config, batch=8)
    expected = jax.jit(model.forward)(params, ids, pixels)

    mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape))
    shardings = sharding.param_shardings(model.abstract_params(), mesh)
    sharded_params = jax.device_put(params, shardings)
    # Something really is split across devices.
    q = sharded_params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    if mesh_shape[2] > 1:
        assert q.sharding.shard_shape(q.shape) != q.shape
    with jax.set_mesh(mesh), sharding.axis_rules():
        fn = jax.jit(
            model.forward, in_shardings=(shardings, sharding.data_sharding(mesh, 2), sharding.data_sharding(mesh, 4))
        )
        got = fn(sharded_params, ids, pixels)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_checkpoint_round_trip_exact(tmp_path):
    config = tiny_config(kind="layer")
    params = VLM(config).init(jax.random.key(5))
    checkpoint.save_checkpoint(tmp_path / "ckpt", config, params)
    loaded = checkpoint.load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == config
    flat_a = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_b = jax.tree_util.tree_flatten_with_path(loaded.params)[0]
    assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
    for (_, a), (_, b) in zip(flat_a, flat_b):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_restores_onto_mesh(tmp_path):
    config = tiny_config(num_kv_heads=4)
    params = VLM(config).init(jax.random.key(6))
    checkpoint.save_checkpoint(tmp_path / "ckpt", config, params)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=4))
    loaded = checkpoint.load_checkpoint(tmp_path / "ckpt", mesh=mesh)
    kernel = loaded.params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_array_equal(
        np.asarray(kernel), np.asarray(params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"])
    )


def test_checkpoint_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="config.json is missing"):
        checkpoint.load_checkpoint(tmp_path)
    config = tiny_config()
    checkpoint.save_checkpoint(tmp_path / "a", config, VLM(config).init(jax.random.key(0)))
    wider = tiny_config(hidden_size=96)
    (tmp_path / "a" / "config.json").write_text(
        json.dumps({**wider.to_dict(), "format_version": checkpoint.FORMAT_VERSION})
    )
    with pytest.raises(checkpoint.CheckpointError, match="shape"):
        checkpoint.load_checkpoint(tmp_path / "a")


def _write_format_1(path, config, params):
    """A checkpoint as format 1 wrote it: one param subtree per decoder layer and no
    format_version in config.json."""
    import orbax.checkpoint as ocp

    layers = params["language_model"]["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    text = {k: v for k, v in params["language_model"].items() if k != "layers"}
    text.update({f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], layers) for i in range(count)})
    path.mkdir(parents=True)
    (path / "config.json").write_text(config.to_json())
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / "params", {**params, "language_model": text})
    checkpointer.wait_until_finished()


def test_format_1_checkpoint_loads_restacked_and_upgrades_in_place(tmp_path, capsys):
    config = tiny_config(kind="layer")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), VLM(config).init(jax.random.key(7)))
    _write_format_1(tmp_path / "old", config, params)
    assert checkpoint.format_version(tmp_path / "old") == 1
    loaded = checkpoint.load_checkpoint(tmp_path / "old")
    assert "--upgrade" in capsys.readouterr().err
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded.params)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert checkpoint.main(["--upgrade", str(tmp_path / "old")]) == 0
    assert checkpoint.format_version(tmp_path / "old") == checkpoint.FORMAT_VERSION
    upgraded = checkpoint.load_checkpoint(tmp_path / "old")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(upgraded.params)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_checkpoint_keeps_its_dtype_and_casts_on_request(tmp_path):
    config = tiny_config()
    params = VLM(config).init(jax.random.key(8))
    checkpoint.save_checkpoint(tmp_path / "bf16", config, model_lib.cast_params(params, jnp.bfloat16))
    kept = checkpoint.load_checkpoint(tmp_path / "bf16").params
    assert model_lib.params_dtype(kept) == jnp.bfloat16
    assert model_lib.param_bytes(kept) * 2 == model_lib.param_bytes(params)
    cast = checkpoint.load_checkpoint(tmp_path / "bf16", dtype=jnp.float32).params
    assert model_lib.params_dtype(cast) == jnp.float32


def test_indivisible_dims_warn_once_by_name(monkeypatch):
    """A vocab of 66 on a tensor axis of 4 replicates: warned about by parameter name, once."""
    monkeypatch.setattr(sharding, "_WARNED_REPLICATED", set())  # whatever earlier tests warned about
    model = VLM(tiny_config(vocab_size=66))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=1, tensor=4))
    with pytest.warns(UserWarning) as first:
        shardings = sharding.param_shardings(model.abstract_params(), mesh)
    messages = [str(w.message) for w in first]
    embedding = [m for m in messages if m.startswith("language_model/embed_tokens/embedding:")]
    assert len(embedding) == 1 and "'vocab' dimension (66)" in embedding[0] and "tensor (size 4)" in embedding[0]
    assert any(m.startswith("language_model/lm_head/kernel:") for m in messages), messages
    assert "tensor" not in shardings["language_model"]["embed_tokens"]["embedding"].spec
    assert len(messages) == len(set(messages))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sharding.param_shardings(model.abstract_params(), mesh)  # the same mesh again: no repeat
