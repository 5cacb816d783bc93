"""Model library: cached decoding, the layer-range API, sharding and checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastvlm_jax import checkpoint, sharding
from fastvlm_jax import model as model_lib
from fastvlm_jax.model import VLM
from tests.tiny import tiny_config


def _inputs(config, batch=2, text_len=9, seed=0):
    rng = np.random.RandomState(seed)
    n = config.num_image_tokens
    ids = np.concatenate([np.ones((batch, 1), np.int32), np.full((batch, n), config.image_token_id),
                          rng.randint(3, config.image_token_id, (batch, text_len))], axis=1)
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
    for start, stop in [(prefix, prefix + 2), (prefix + 2, prefix + 3), (prefix + 3, prefix + 4),
                        (prefix + 4, seq)]:
        out, cache = run(params, hidden[:, start:stop], positions[:, start:stop], cache)
        steps.append(logits(params, out))
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full), atol=1e-5)


def _scan_inputs():
    """A 5-layer model (exit 2), its params, inputs, embedded hidden states [batch, seq,
    embed], positions and an empty cache small enough for the scanned path."""
    config = tiny_config(num_layers=5, exit_layer=2)
    model = VLM(config)
    params = model.init(jax.random.key(3))
    ids, pixels = _inputs(config)
    batch, seq = ids.shape
    hidden = model.embed(params, ids, model.encode_images(params, pixels))
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    return model, params, ids, pixels, hidden, positions, model.init_cache(batch, seq + 4)


def test_scanned_cached_layers_equal_unrolled_layers(monkeypatch):
    """Small caches run the layers as one lax.scan; large ones unrolled: same numbers."""
    model, params, _, _, hidden, positions, cache = _scan_inputs()
    assert model._scan_layers(params, hidden, 2, 5, cache, None, ())
    scanned = model.run_layers(params, hidden, positions, 2, 5, cache)
    # The same scan over a stacked copy made once (what decoding passes in).
    stacked_params = model.stack_layers(params, 2, 5)
    prestacked = model.run_layers(stacked_params, hidden, positions, 2, 5, cache)
    monkeypatch.setattr(model_lib, "SCAN_MAX_LAYER_CACHE_BYTES", 0)
    assert not model._scan_layers(params, hidden, 2, 5, cache, None, ())
    unrolled = model.run_layers(params, hidden, positions, 2, 5, cache)
    for result in (scanned, prestacked):
        np.testing.assert_allclose(np.asarray(result[0]), np.asarray(unrolled[0]), atol=1e-5)
        for got, want in zip(result[1].keys + result[1].values, unrolled[1].keys + unrolled[1].values):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    # Layers outside [2, 5) are the input cache's own buffers, untouched.
    assert scanned[1].keys[0] is cache.keys[0] and scanned[1].values[1] is cache.values[1]


def test_scan_reads_the_stacked_copy_and_modules_ignore_it(monkeypatch):
    """With a stacked copy present the scanned path reads it (a changed copy changes the
    result), every other call ignores it, and without one big layers are not scanned."""
    model, params, ids, pixels, hidden, positions, cache = _scan_inputs()
    stacked_params = model.stack_layers(params, 2, 5)
    np.testing.assert_array_equal(
        np.asarray(stacked_params[model_lib.STACKED_LAYERS]["2:5"]["mlp"]["down_proj"]["kernel"][1]),
        np.asarray(params["language_model"]["layers_3"]["mlp"]["down_proj"]["kernel"]))
    doubled = jax.tree.map(lambda x: 2 * x, stacked_params[model_lib.STACKED_LAYERS])
    changed = {**stacked_params, model_lib.STACKED_LAYERS: doubled}
    base = model.run_layers(params, hidden, positions, 2, 5, cache)[0]
    assert not np.allclose(np.asarray(model.run_layers(changed, hidden, positions, 2, 5, cache)[0]),
                           np.asarray(base), atol=1e-3)
    # Uncached and other ranges use the module's own layers.
    np.testing.assert_array_equal(np.asarray(model.forward(changed, ids, pixels)),
                                  np.asarray(model.forward(params, ids, pixels)))
    np.testing.assert_array_equal(np.asarray(model.run_layers(changed, hidden, positions, 0, 2, cache)[0]),
                                  np.asarray(model.run_layers(params, hidden, positions, 0, 2, cache)[0]))
    monkeypatch.setattr(model_lib, "SCAN_MAX_LAYER_WEIGHT_BYTES", 0)
    assert not model._scan_layers(params, hidden, 2, 5, cache, None, ())
    assert model._scan_layers(stacked_params, hidden, 2, 5, cache, None, ())
    with pytest.raises(ValueError, match=r"cannot stack layers \[3, 7\)"):
        model.stack_layers(params, 3, 7)


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
    q = sharded_params["language_model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    if mesh_shape[2] > 1:
        assert q.sharding.shard_shape(q.shape) != q.shape
    with jax.set_mesh(mesh), sharding.axis_rules():
        fn = jax.jit(model.forward, in_shardings=(shardings, sharding.data_sharding(mesh, 2),
                                                  sharding.data_sharding(mesh, 4)))
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
    kernel = loaded.params["language_model"]["layers_1"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    np.testing.assert_array_equal(np.asarray(kernel),
                                  np.asarray(params["language_model"]["layers_1"]["mlp"]["up_proj"]["kernel"]))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="config.json is missing"):
        checkpoint.load_checkpoint(tmp_path)
    config = tiny_config()
    checkpoint.save_checkpoint(tmp_path / "a", config, VLM(config).init(jax.random.key(0)))
    wider = tiny_config(hidden_size=96)
    (tmp_path / "a" / "config.json").write_text(wider.to_json())
    with pytest.raises(checkpoint.CheckpointError, match="shape"):
        checkpoint.load_checkpoint(tmp_path / "a")
