"""The eagle training stage: the EAGLE head's inputs and loss, and the stage in the loop.

Unit tests build a tiny float32 model with a head in-process; the stage tests train the
tiny config (tests/train_tiny_config.py) from a 3-step base checkpoint on one device,
except the mesh test, which uses the 8 CPU devices of conftest.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fastvlm_jax.ckpt.checkpoint import load_checkpoint
from fastvlm_jax.nn.model import VLM
from tests import train_helpers as th
from tests.train_tiny_config import tiny_model
from train import config as config_lib
from train import eagle as eagle_lib
from train import losses
from train import params as param_lib
from train.config import EagleStageConfig
from train.run import train

IMAGE_ID = 60
VOCAB = 64


# ---------------------------------------------------------------------------------------
# Inputs and loss (unit)
# ---------------------------------------------------------------------------------------


# Jitted: op-by-op dispatch of the whole head and LM head is slower than compiling.
_eagle_losses = jax.jit(eagle_lib.eagle_losses, static_argnums=(0, 2))


@pytest.fixture(scope="module")
def params():
    """Random params of the tiny model with a head (the same tree for every image_pool)."""
    return jax.jit(_model(1).init)(jax.random.key(1))


def _model(pool: int = 1) -> VLM:
    config = tiny_model()
    config = config.replace(text=dataclasses.replace(config.text, vocab_size=VOCAB), image_token_id=IMAGE_ID)
    return VLM(config.with_draft(eagle_layers=1, eagle_hidden_size=96, eagle_image_pool=pool), jnp.float32)


def _arrays(seed: int = 0):
    """A batch of 2 rows of 12 positions: 1 text, 4 image tokens (the tiny model's
    count), 2 prompt text, a 4-token caption, 1 padding; random features and embeds."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    ids = jax.random.randint(k1, (2, 12), 1, IMAGE_ID)
    ids = ids.at[:, 1:5].set(IMAGE_ID)
    loss_mask = jnp.zeros((2, 12)).at[:, 6:10].set(1.0)  # targets 7..10: the caption + EOS
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros((2, 1), ids.dtype)], axis=1)
    features = 3.0 * jax.random.normal(k2, (2, 12, 64))
    embeds = jax.random.normal(k3, (2, 12, 64))
    teacher_logits = jax.random.normal(k4, (2, 12, VOCAB))
    return ids, targets, loss_mask, features, embeds, teacher_logits


def test_pool1_inputs_are_the_plain_shift():
    """image_pool 1: the head at t sees f_t and e_{t+1} at position t, and is scored on
    f_{t+1} with loss_mask[t+1] (the head's token is t+2)."""
    ids, _, loss_mask, f, e, _ = _arrays()
    inputs = eagle_lib.head_inputs(f, e, ids, loss_mask, IMAGE_ID, 1, "pool")
    np.testing.assert_array_equal(inputs.features, f)
    np.testing.assert_array_equal(inputs.embeds[:, :-1], e[:, 1:])
    np.testing.assert_array_equal(inputs.embeds[:, -1], 0.0)
    np.testing.assert_array_equal(inputs.positions, np.broadcast_to(np.arange(12), (2, 12)))
    assert bool(jnp.all(inputs.key_mask))
    np.testing.assert_array_equal(inputs.target_index, np.minimum(np.arange(12) + 1, 11)[None].repeat(2, 0))
    np.testing.assert_array_equal(inputs.weights[:, :-1], loss_mask[:, 1:])
    np.testing.assert_array_equal(inputs.weights[:, -1], 0.0)


def test_pool1_loss_equals_the_head_on_the_shifted_sequence(params):
    """The stage's loss against an independent reference: the head run directly on
    (f[:, :-1], e[:, 1:]) and scored on f[:, 1:] and the teacher's logits[:, 1:]."""
    model = _model(1)
    ids, targets, loss_mask, f, e, _ = _arrays()
    full_logits = model.logits(params, f)
    loss_cfg = EagleStageConfig(ce_weight=1.0, feature_weight=0.5, temperature=2.0)
    total, metrics = _eagle_losses(model, params, loss_cfg, e, f, full_logits, ids, targets, loss_mask)

    positions = jnp.broadcast_to(jnp.arange(11), (2, 11))
    pred, _ = model.eagle_draft(params, f[:, :-1], e[:, 1:], positions)
    w = loss_mask[:, 1:]
    ce = losses.soft_cross_entropy(model.logits(params, pred), full_logits[:, 1:], w, 2.0)
    feature = losses.smooth_l1(pred, f[:, 1:], w)
    np.testing.assert_allclose(metrics["eagle_ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["eagle_feature_l1"], feature, rtol=1e-5)
    np.testing.assert_allclose(total, ce + 0.5 * feature, rtol=1e-5)
    assert float(feature) > 0.1 and float(ce) > 0.1  # a fresh head is far from the teacher


def test_pooled_inputs_compress_the_image_and_keep_the_caption():
    """image_pool 2: the 4 image positions become 2 slots (means of f_t and of e_{t+1}),
    every text position keeps its own slot at its own RoPE position, image slots carry
    no loss, and unused slots at the end are masked."""
    ids, _, loss_mask, f, e, _ = _arrays()
    inputs = eagle_lib.head_inputs(f, e, ids, loss_mask, IMAGE_ID, 2, "pool")
    # positions: 0 | image 1-2, 3-4 | 5 ... 11, then 2 unused slots.
    np.testing.assert_array_equal(inputs.positions[0, :10], [0, 1, 3, 5, 6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(inputs.key_mask[0], [True] * 10 + [False] * 2)
    np.testing.assert_allclose(inputs.features[:, 1], (f[:, 1] + f[:, 2]) / 2, rtol=1e-6)
    np.testing.assert_allclose(inputs.embeds[:, 2], (e[:, 4] + e[:, 5]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(inputs.features[:, 3:10], f[:, 5:12])
    np.testing.assert_array_equal(inputs.embeds[:, 3:9], e[:, 6:12])
    # Text slot j (position p) is scored with loss_mask[p + 1]; image slots never.
    np.testing.assert_array_equal(inputs.weights[:, 1:3], 0.0)
    np.testing.assert_array_equal(inputs.weights[:, 3:9], loss_mask[:, 6:12])
    np.testing.assert_array_equal(inputs.weights[:, 9:], 0.0)
    # The loss sees every caption target exactly once, as with pool 1.
    np.testing.assert_array_equal(jnp.sum(inputs.weights, axis=1), jnp.sum(loss_mask, axis=1))
    prune = eagle_lib.head_inputs(f, e, ids, loss_mask, IMAGE_ID, 2, "prune")
    np.testing.assert_array_equal(prune.features[:, 1], f[:, 1])
    np.testing.assert_array_equal(prune.embeds[:, 2], e[:, 4])


@pytest.mark.slow
def test_pooled_loss_masks_unused_slots_and_differs_from_pool1(params):
    """The head over the padded compact sequence (key_mask) gives the loss of the head
    over the used slots alone; and the compressed loss is not the pool-1 loss."""
    ids, targets, loss_mask, f, e, _ = _arrays()
    model = _model(2)
    full_logits = model.logits(params, f)
    loss_cfg = EagleStageConfig()
    total, metrics = _eagle_losses(model, params, loss_cfg, e, f, full_logits, ids, targets, loss_mask)

    inputs = eagle_lib.head_inputs(f, e, ids, loss_mask, IMAGE_ID, 2, "pool")
    used = 10  # both rows: 12 positions - 2 merged away
    pred, _ = model.eagle_draft(params, inputs.features[:, :used], inputs.embeds[:, :used], inputs.positions[:, :used])
    index = inputs.target_index[:, :used]
    w = inputs.weights[:, :used]
    ce = losses.soft_cross_entropy(
        model.logits(params, pred), jnp.take_along_axis(full_logits, index[..., None], axis=1), w
    )
    np.testing.assert_allclose(metrics["eagle_ce"], ce, rtol=1e-5)

    pool1 = _model(1)
    total1, _ = _eagle_losses(pool1, params, loss_cfg, e, f, full_logits, ids, targets, loss_mask)
    assert np.isfinite(float(total)) and abs(float(total) - float(total1)) > 1e-4


def test_soft_cross_entropy_and_smooth_l1_reference_values():
    student = jnp.log(jnp.array([[[0.5, 0.25, 0.25]]]))
    teacher = jnp.log(jnp.array([[[0.25, 0.5, 0.25]]]))
    w = jnp.ones((1, 1))
    expected = -(0.25 * np.log(0.5) + 0.5 * np.log(0.25) + 0.25 * np.log(0.25))
    np.testing.assert_allclose(losses.soft_cross_entropy(student, teacher, w), expected, rtol=1e-6)
    pred = jnp.array([[[0.0, 0.0, 0.0, 0.0]]])
    target = jnp.array([[[0.5, -0.5, 3.0, -2.0]]])
    # 0.5 * 0.25, 0.5 * 0.25, 3 - 0.5, 2 - 0.5 -> mean over 4 features.
    np.testing.assert_allclose(
        losses.smooth_l1(pred, target, 2.0 * w), 2.0 * (0.125 + 0.125 + 2.5 + 1.5) / 4, rtol=1e-6
    )


# ---------------------------------------------------------------------------------------
# The stage in the training loop
# ---------------------------------------------------------------------------------------


ONE_DEVICE = {"mesh.data": 1}  # the mesh of _train's default: the first device


def _train(cfg, workdir, **kwargs):
    """train() on the first device, unless `devices` says otherwise."""
    return train(cfg, workdir, progress=False, **{"devices": jax.devices()[:1], **kwargs})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(data dir, a 3-step tiny base export): the frozen VLM the head learns from."""
    root = tmp_path_factory.mktemp("eagle_train")
    th.build_tiny_data(root / "data")
    cfg = th.tiny_config("base", steps=3, **{"data.data_dir": root / "data", "checkpoint.export": True}, **ONE_DEVICE)
    result = _train(cfg, root / "base")
    return root / "data", result.export_dir


def _eagle(base, **overrides):
    data_dir, export = base
    settings = {"data.data_dir": data_dir, "init_from": export, "eagle.hidden_size": 96, **ONE_DEVICE}
    settings.update(overrides)
    return th.tiny_config("eagle", **settings)


def _flat(params):
    return {param_lib.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    """A 20-step eagle run with its export: (workdir, config, result)."""
    workdir = tmp_path_factory.mktemp("eagle_run") / "eagle"
    cfg = _eagle(base, steps=20, **{"checkpoint.export": True})
    return workdir, cfg, _train(cfg, workdir)


@pytest.mark.slow
def test_eagle_stage_trains_the_head_and_leaves_the_vlm_bit_identical(base, trained, tmp_path):
    workdir, _, result = trained
    assert result.status == "done" and result.step == 20
    curve = th.losses(workdir)
    assert sorted(curve) == list(range(1, 21))
    assert np.mean([curve[s] for s in range(16, 21)]) < np.mean([curve[s] for s in range(1, 6)])
    records = {m["step"]: m for m in th.read_metrics(workdir)}
    assert records[20]["eagle_agreement"] > records[1]["eagle_agreement"]

    before, after = load_checkpoint(base[1]), load_checkpoint(result.export_dir)
    assert before.config.draft.eagle_layers == 0
    assert after.config == before.config.with_draft(eagle_layers=1, eagle_hidden_size=96)
    old, new = _flat(before.params), _flat(after.params)
    assert set(new) - set(old) == {k for k in new if k.startswith("eagle/")} and set(old) <= set(new)
    for key in old:
        assert old[key].dtype == new[key].dtype and np.array_equal(old[key], new[key]), key
    assert all(new[k].dtype == np.float32 for k in new if k.startswith("eagle/"))
    # The export is a model with a working head: its draft runs from the checkpoint.
    model = VLM(after.config)
    features = jnp.ones((1, 3, after.config.text.hidden_size))
    predicted, _ = model.eagle_draft(after.params, features, features, jnp.arange(3)[None])
    assert predicted.shape == features.shape and bool(jnp.all(jnp.isfinite(predicted)))

    # Training an exported head further needs its settings; other settings are refused.
    with pytest.raises(config_lib.ConfigError, match="has an EAGLE head"):
        _train(_eagle(base, init_from=result.export_dir, **{"eagle.image_pool": 2}), tmp_path / "x")
    # Draft stages train only their drafter.
    with pytest.raises(config_lib.ConfigError, match="may only train eagle"):
        _train(_eagle(base, trainable="eagle/.*,projector/.*"), tmp_path / "y")


def _final_state(workdir, step):
    return _flat(ocp.PyTreeCheckpointer().restore(str(workdir / "checkpoints" / str(step) / "state")))


def test_eagle_stage_resumes_exactly(trained, tmp_path):
    """Stopped after 10 of the 20 steps and resumed: the same params and optimizer state,
    bit for bit, as the uninterrupted run; a resume with other head settings is refused."""
    whole, cfg, _ = trained
    first = _train(cfg, tmp_path / "resumed", stop_after=10)
    assert (first.status, first.step) == ("stopped", 10)
    with pytest.raises(config_lib.ConfigError, match="eagle="):
        _train(cfg.replace(eagle=dataclasses.replace(cfg.eagle, image_pool=2)), tmp_path / "resumed")
    second = _train(cfg, tmp_path / "resumed")
    assert (second.status, second.step) == ("done", 20)
    a, b = _final_state(whole, 20), _final_state(tmp_path / "resumed", 20)
    assert a.keys() == b.keys() and any(k.startswith("opt_state") for k in a)
    assert any(k.startswith("params/eagle/") for k in a)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert th.losses(whole) == th.losses(tmp_path / "resumed")


@pytest.fixture(scope="module")
def short_pool1(base, tmp_path_factory):
    """The loss curve of a 3-step pool-1 run on one device."""
    workdir = tmp_path_factory.mktemp("eagle_short") / "pool1"
    assert _train(_eagle(base, steps=3), workdir).status == "done"
    return th.losses(workdir)


@pytest.mark.slow
def test_eagle_stage_on_a_mesh_matches_one_device(base, short_pool1, tmp_path):
    """data 2 x fsdp 2 x tensor 2 over 8 CPU devices, with 2 micro-batches: the
    1-device loss curve (float32, relative 1e-5)."""
    mesh = _eagle(base, steps=3, grad_accum=2, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    assert _train(mesh, tmp_path / "eight", devices=jax.devices()[:8]).status == "done"
    curve = th.losses(tmp_path / "eight")
    assert sorted(curve) == sorted(short_pool1) == [1, 2, 3]
    np.testing.assert_allclose([curve[s] for s in short_pool1], list(short_pool1.values()), rtol=1e-5)


@pytest.mark.slow
def test_pooled_stage_trains_and_differs_from_pool1(base, short_pool1, tmp_path):
    """The compressed path through the whole stage: same data and head init, another
    first loss (the head's image context is pooled)."""
    assert _train(_eagle(base, steps=3, **{"eagle.image_pool": 2}), tmp_path / "pool2").status == "done"
    curve = th.losses(tmp_path / "pool2")
    assert sorted(curve) == [1, 2, 3] and np.isfinite(list(curve.values())).all()
    assert abs(curve[1] - short_pool1[1]) > 1e-6
    saved = json.loads((tmp_path / "pool2" / "train_config.json").read_text())
    assert saved["eagle"]["image_pool"] == 2


def test_demo_eagle_configs():
    """The demo's eagle stages start from the shipped asset with a fresh head; the pool-4
    variant differs only in the compressor's pool."""
    from fastvlm_jax.demo import ASSET_DIR

    one = config_lib.load_config_file(str(th.REPO / "configs" / "demo.py:eagle"))
    four = config_lib.load_config_file(str(th.REPO / "configs" / "demo.py:eagle_pool4"))
    assert one.stage == four.stage == "eagle" and one.init_from == str(ASSET_DIR)
    assert (one.eagle.hidden_size, one.eagle.image_pool, one.eagle.reinit) == (512, 1, True)
    assert four.eagle.image_pool == 4
    assert four.replace(eagle=dataclasses.replace(four.eagle, image_pool=1), workdir=one.workdir) == one
    assert one.trainable_patterns == ("eagle/.*",)


def test_unrolled_passes_feed_the_previous_slots_prediction():
    """eagle.unroll_steps > 1: a slot reads the previous slot's prediction only where that
    slot is the previous position (not across a pooled image run, nor at the start)."""
    from train.eagle import feed_predictions

    positions = jnp.asarray([[0, 1, 5, 6, 7]])  # slot 2 follows a pooled run (positions 2-4)
    features = jnp.arange(5.0).reshape(1, 5, 1)
    predicted = 10.0 + jnp.arange(5.0).reshape(1, 5, 1)
    fed = feed_predictions(features, predicted, positions)
    np.testing.assert_array_equal(fed[0, :, 0], [0.0, 10.0, 2.0, 12.0, 13.0])
