"""Training: config overrides, losses, input pipeline, sharded steps, stages.

In-process tests on the 8 CPU devices of conftest; the multi-process and kill/resume
tests are in test_train_distributed.py.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import train_helpers as th
from train import config as config_lib
from train import input as input_lib
from train import losses
from train import params as param_lib
from train.refine import compose_sequences
from train.run import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("train_data")
    th.build_tiny_data(path)
    return path


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def test_overrides_convert_types_and_reject_unknown_keys():
    cfg = th.tiny_config("base")
    new = config_lib.apply_overrides(
        cfg,
        {
            "steps": "7",
            "optim.learning_rate": "3e-4",
            "checkpoint.async_save": "false",
            "data.data_dir": "/x",
            "init_from": "none",
            "trainable": "imitation/.*,projector/.*",
            "model.text.num_layers": "3",
            "model.draft.exit_layer": "2",
            "mesh.tensor": "2",
            "compute_dtype": "bfloat16",
        },
    )
    assert new.steps == 7 and new.optim.learning_rate == 3e-4 and new.checkpoint.async_save is False
    assert new.data.data_dir == "/x" and new.init_from is None
    assert new.trainable == ("imitation/.*", "projector/.*")
    assert new.model.text.num_layers == 3 and new.model.draft.exit_layer == 2 and new.mesh.tensor == 2
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'optim.lr'"):
        config_lib.apply_overrides(cfg, {"optim.lr": "1"})
    with pytest.raises(config_lib.ConfigError, match="not int"):
        config_lib.apply_overrides(cfg, {"steps": "many"})
    with pytest.raises(config_lib.ConfigError, match="choose one of"):
        config_lib.apply_overrides(cfg, {"stage": "pretrain"})
    with pytest.raises(config_lib.ConfigError, match="group of settings"):
        config_lib.apply_overrides(cfg, {"optim": "1"})
    # Validated together: exit_layer 3 needs num_layers > 3.
    with pytest.raises(config_lib.ConfigError, match="exit_layer"):
        config_lib.apply_overrides(cfg, {"model.draft.exit_layer": "3"})


@pytest.mark.parametrize(
    "spec",
    [
        "demo.py:base",
        "demo.py:deepen",
        "demo.py:imitation",
        "demo.py:refine",
        "llava15_7b.py",
        "llava15_7b.py:base",
        "llava15_13b.py:base",
        "llava15_13b.py",
        "blip2_opt_2_7b.py",
        "blip2_opt_2_7b.py:refine",
    ],
)
def test_config_files_load(spec):
    cfg = config_lib.load_config_file(str(th.REPO / "configs" / spec))
    assert isinstance(cfg, config_lib.TrainConfig)


def test_stage_groups_take_nested_overrides():
    cfg = th.tiny_config("eagle", init_from="/x")
    new = config_lib.apply_overrides(
        cfg,
        {
            "refine.disagreement_weight": "2",
            "refine.max_new_tokens": "8",
            "eagle.image_pool": "4",
            "eagle.compressor": "prune",
            "eagle.unroll_steps": "3",
            "loss.kd": "0.5",
        },
    )
    assert (new.refine.disagreement_weight, new.refine.max_new_tokens) == (2.0, 8)
    assert (new.eagle.image_pool, new.eagle.compressor, new.eagle.unroll_steps, new.loss.kd) == (4, "prune", 3, 0.5)
    # The head's settings are validated where they live (fastvlm_jax.nn.config.DraftConfig).
    with pytest.raises(config_lib.ConfigError, match="eagle_image_pool=0 must be >= 1"):
        config_lib.apply_overrides(cfg, {"eagle.image_pool": "0"})
    with pytest.raises(config_lib.ConfigError, match="choose one of"):
        config_lib.apply_overrides(cfg, {"eagle.compressor": "mean"})
    # A key of the flat layout names its new home.
    with pytest.raises(config_lib.ConfigError, match="'eagle_image_pool' is now 'eagle.image_pool'"):
        config_lib.apply_overrides(cfg, {"eagle_image_pool": "4"})
    with pytest.raises(config_lib.ConfigError, match="'loss.refine_disagreement_weight' is now"):
        config_lib.apply_overrides(cfg, {"loss.refine_disagreement_weight": "2"})


def test_config_files_of_the_configs_package_are_its_modules(tmp_path):
    """configs/NAME.py loads as the module configs.NAME (its siblings are imported as modules);
    any other file loads from its path."""
    import configs.llava15_7b

    module = config_lib.config_module(th.REPO / "configs" / "llava15_13b.py")
    assert module.__name__ == "configs.llava15_13b" and module.llava15_7b is configs.llava15_7b
    other = tmp_path / "mine.py"
    other.write_text("from tests.train_tiny_config import get_config  # noqa: F401\n")
    assert config_lib.load_config_file(f"{other}:imitation").stage == "imitation"
    with pytest.raises(config_lib.ConfigError, match="no config file"):
        config_lib.load_config_file(str(tmp_path / "missing.py"))


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------


def test_losses_reference_values():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
    other = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 5, size=(2, 3)), jnp.int32)
    mask = jnp.asarray([[1, 1, 0], [0, 1, 1]], jnp.float32)

    log_p = jax.nn.log_softmax(logits)
    want_ce = -sum(log_p[b, t, targets[b, t]] * mask[b, t] for b in range(2) for t in range(3))
    np.testing.assert_allclose(losses.cross_entropy(logits, targets, mask), want_ce, rtol=1e-6)

    # KL is zero against itself, positive otherwise, and scales as T^2 * KL(p_T || q_T).
    assert abs(float(losses.kl_distillation(logits, logits, mask, 2.0))) < 1e-6
    t = 2.0
    p, q = jax.nn.softmax(other / t), jax.nn.softmax(logits / t)
    want_kl = t * t * jnp.sum(jnp.sum(p * (jnp.log(p) - jnp.log(q)), -1) * mask)
    np.testing.assert_allclose(losses.kl_distillation(logits, other, mask, t), want_kl, rtol=1e-5)

    h = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    assert abs(float(losses.cosine_distance(h, 3.0 * h, mask))) < 1e-6
    np.testing.assert_allclose(losses.cosine_distance(h, -h, mask), 2.0 * mask.sum(), rtol=1e-6)

    assert float(losses.top1_agreement(logits, logits, mask)) == float(mask.sum())
    w = losses.disagreement_weights(logits, other, mask, 4.0)
    differs = jnp.argmax(logits, -1) != jnp.argmax(other, -1)
    np.testing.assert_array_equal(w, mask * jnp.where(differs, 4.0, 1.0))


# ---------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from train.run import make_tokenizer

    return make_tokenizer(th.tiny_config("base"), None)


def test_text_format_masks_exactly_the_caption(tokenizer):
    fmt = input_lib.TextFormat(tokenizer, "Describe the image.", num_image_tokens=4, seq_len=40)
    caption = "a small red circle on a plain blue background."
    ex = fmt(caption)
    answer = tokenizer.encode(caption, add_special_tokens=False) + [tokenizer.eos_id]
    n = fmt.prompt_len + len(answer)
    assert list(ex["input_ids"][:n]) == fmt.prompt + answer
    assert (ex["input_ids"][n:] == tokenizer.pad_id).all()
    np.testing.assert_array_equal(ex["targets"][:-1], ex["input_ids"][1:])
    # Trained positions are those whose next token is a caption token or EOS.
    trained = ex["targets"][ex["loss_mask"] > 0]
    assert list(trained) == answer
    assert list(ex["input_ids"][: fmt.prompt_len]).count(tokenizer.image_token_id) == 4
    # Too long: cut at seq_len, the mask stays inside.
    short = input_lib.TextFormat(tokenizer, "Describe the image.", 4, fmt.prompt_len + 3)(caption)
    assert short["loss_mask"].sum() == 3 and short["input_ids"].shape == (fmt.prompt_len + 3,)


def test_global_order_does_not_depend_on_host_count():
    one = input_lib.GlobalBatchSampler(10, 4, (0, 4), seed=3)
    halves = [input_lib.GlobalBatchSampler(10, 4, rows, seed=3) for rows in ((0, 2), (2, 4))]
    for step in range(6):  # crosses epoch boundaries (10 records, 4 per batch)
        full = [one[step * 4 + r] for r in range(4)]
        split = [halves[r // 2][step * 2 + r % 2] for r in range(4)]
        assert [m.record_key for m in full] == [m.record_key for m in split]
        draws = [m.rng.integers(1 << 30) for m in full]
        assert draws == [m.rng.integers(1 << 30) for m in split]
    # Each epoch visits every record once, in a seeded order that changes per epoch.
    epoch0 = [one[i].record_key for i in range(10)]
    epoch1 = [one[i].record_key for i in range(10, 20)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    assert [input_lib.GlobalBatchSampler(10, 4, (0, 4), seed=4)[i].record_key for i in range(10)] != epoch0


def test_loader_resumes_from_saved_state(data_dir, tokenizer):
    from fastvlm_jax.data import tfds_builders

    source = tfds_builders.open_split("synthetic_captions/tiny", "train", str(data_dir), decode=False)
    image_config = input_lib.default_image_config("clip", 16)
    transform = input_lib.CaptionExample(tokenizer, image_config, "Describe the image.", 4, 48)
    loader = input_lib.make_loader(source, transform, 8, (0, 8), seed=1)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    after = [next(it) for _ in range(2)]
    again = iter(loader)
    again.set_state(state)
    # A loader started at batch 3 (how a run resumes at step 3, on any host count) too.
    started = iter(input_lib.make_loader(source, transform, 8, (0, 8), seed=1, start_batch=3))
    for want in after:
        for got in (next(again), next(started)):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    assert first[0]["pixels"].shape == (8, 16, 16, 3) and first[0]["input_ids"].shape == (8, 48)
    # The transform pickles (grain worker processes) with its tokenizer.
    import pickle

    clone = pickle.loads(pickle.dumps(transform))
    record = source[0]
    a = clone.random_map(record, np.random.default_rng(0))
    b = transform.random_map(record, np.random.default_rng(0))
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_worker_processes_give_the_same_batches(data_dir, tokenizer):
    """grain hands items round-robin to its worker processes; the batches must not change."""
    from fastvlm_jax.data import tfds_builders

    source = tfds_builders.open_split("synthetic_captions/tiny", "train", str(data_dir), decode=False)
    transform = input_lib.CaptionExample(
        tokenizer, input_lib.default_image_config("clip", 16), "Describe the image.", 4, 48
    )
    batches = {}
    for workers in (0, 2):
        it = iter(input_lib.make_loader(source, transform, 6, (2, 5), seed=1, worker_count=workers))
        batches[workers] = [next(it) for _ in range(5)]
    for inline, parallel in zip(batches[0], batches[2]):
        for key in inline:
            np.testing.assert_array_equal(parallel[key], inline[key], err_msg=key)
    # Rows (2, 5) of global batch b are rows 2..4 of the one-host batch.
    whole = iter(input_lib.make_loader(source, transform, 6, (0, 6), seed=1))
    np.testing.assert_array_equal(next(whole)["input_ids"][2:5], batches[0][0]["input_ids"])


def test_compose_refine_sequences():
    ids = np.asarray([[1, 5, 6, 7, 8, 9], [1, 5, 6, 7, 8, 9]], np.int32)
    plen = np.asarray([2, 3], np.int32)
    gen = np.asarray([[20, 21, 2, -1], [30, 31, 32, 33]], np.int32)
    num = np.asarray([3, 4], np.int32)
    out = compose_sequences(ids, plen, gen, num, pad_id=0)
    np.testing.assert_array_equal(out["input_ids"], [[1, 5, 20, 21, 2, 0], [1, 5, 6, 30, 31, 32]])
    np.testing.assert_array_equal(out["targets"], [[5, 20, 21, 2, 0, 0], [5, 6, 30, 31, 32, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]])


def test_refine_sequences_are_generated_once_resumed_and_checked(data_dir, tokenizer, tmp_path, monkeypatch):
    """The refine pre-pass with a stand-in generator (a function of the pixels): every record
    once, a killed pass resumes from its finished parts, a finished set is reused, another
    run's set is refused; the training example is prompt + the stored tokens."""
    from fastvlm_jax.data import tfds_builders
    from fastvlm_jax.runtime import sharding
    from train import refine
    from train.step import batch_shardings

    source = tfds_builders.open_split("synthetic_captions/tiny", "train", str(data_dir), decode=False)
    image_config = input_lib.default_image_config("clip", 16)
    transform = input_lib.CaptionExample(tokenizer, image_config, "Describe the image.", 4, 48)
    shardings = batch_shardings(sharding.make_mesh(sharding.MeshConfig(data=-1)))
    # 21 of the records a 3-step run reads: 3 global batches of 8, the last one part padding.
    record_ids = refine.records_to_generate(len(source), 8, 3, seed=0)[:21]
    assert len(set(record_ids.tolist())) == 21
    max_new = 5

    @jax.jit
    def fake(prompts):  # a record's "generation" depends on its pixels only, as greedy decoding does
        key = (jnp.abs(prompts["pixels"]).sum(axis=(1, 2, 3)) * 100).astype(jnp.int32)
        return (key[:, None] + jnp.arange(max_new)[None]) % 50, key % max_new + 1

    calls = []

    def generate_fn(prompts):
        if len(calls) == fail_at:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return fake(prompts)

    def run(max_new_tokens=max_new):
        wanted = refine.identity(
            init_from="model",
            compute_dtype="float32",
            max_new_tokens=max_new_tokens,
            eos_ids=(2,),
            prompt_ids=transform.text.prompt,
            image_config=image_config,
            source=source,
            record_ids=record_ids,
        )
        return refine.pregenerate(
            tmp_path / "seq", wanted, source, transform, record_ids, generate_fn, shardings, 8, max_new_tokens
        )

    monkeypatch.setattr(refine, "CHUNK_BATCHES", 1)
    fail_at = 1  # killed in the second batch: the first one's part is kept
    with pytest.raises(KeyboardInterrupt):
        run()
    assert len(refine.part_files(tmp_path / "seq")) == 1
    fail_at = None
    done = run()
    assert len(calls) == 3 and done.stats["batches_generated"] == 2  # resumed: batches 1 and 2 only
    np.testing.assert_array_equal(done.record_ids, np.sort(record_ids))
    for i, record in enumerate(done.record_ids):
        prompt = refine.prompt_example(transform, source[int(record)])
        want_tokens, want_length = jax.device_get(fake({k: v[None] for k, v in prompt.items()}))
        np.testing.assert_array_equal(done.tokens[i], want_tokens[0])
        assert done.lengths[i] == want_length[0]
    again = run()  # complete: reused, nothing generated
    assert len(calls) == 3 and np.array_equal(again.tokens, done.tokens)
    with pytest.raises(
        config_lib.ConfigError,
        match=r"seq holds refine sequences generated with "
        r"max_new_tokens=5.*needs max_new_tokens=6.*delete",
    ):
        run(max_new_tokens=6)

    # Training examples: the caption example's prompt and pixels, then the stored tokens.
    example = refine.RefineExample(tokenizer, image_config, "Describe the image.", 4, 48)
    record = int(done.record_ids[4])
    item = refine.WithSequences(source, done)[record]
    got = example.random_map(item, np.random.default_rng(0))
    base = transform.random_map(source[record], np.random.default_rng(0))
    plen, n = int(base["prompt_len"]), int(done.lengths[4])
    np.testing.assert_array_equal(got["pixels"], base["pixels"])
    np.testing.assert_array_equal(got["input_ids"][:plen], base["input_ids"][:plen])
    np.testing.assert_array_equal(got["input_ids"][plen : plen + n], done.tokens[4][:n])
    assert got["loss_mask"].sum() == n


def test_split_and_merge_params():
    tree = {"a": {"x": 1, "y": 2}, "b": {"z": 3}}
    paths = param_lib.trainable_paths(tree, ["a/x", "b/.*"])
    assert paths == {"a/x", "b/z"}
    chosen, rest = param_lib.split(tree, paths)
    assert chosen == {"a": {"x": 1}, "b": {"z": 3}} and rest == {"a": {"y": 2}}
    assert param_lib.merge(chosen, rest) == tree
    with pytest.raises(ValueError, match="matches no parameter"):
        param_lib.trainable_paths(tree, ["c/.*"])


# ---------------------------------------------------------------------------------------
# Deepening a trained decoder
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_deepened_model_computes_the_same_function():
    from fastvlm_jax.nn.model import VLM
    from tests.tiny import tiny_config
    from train import deepen

    config = tiny_config(num_layers=3, exit_layer=1, kind="layer")
    assert deepen.layer_sources(3, 7, 1) == [0, 1, None, None, 2, None, None]
    params = jax.jit(VLM(config).init)(jax.random.key(0))
    grown_config = deepen.deepened_config(config, 7)
    grown = deepen.deepen_params(params, jax.jit(VLM(grown_config).init)(jax.random.key(1)), 1)
    assert all(x.shape[0] == 7 for x in jax.tree.leaves(grown["language_model"]["layers"]))
    np.testing.assert_array_equal(
        grown["language_model"]["layers"]["mlp"]["up_proj"]["kernel"][4],
        params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"][2],
    )

    ids = jax.random.randint(jax.random.key(2), (2, 9), 0, config.text.vocab_size - 1)
    ids = ids.at[:, 1 : 1 + config.num_image_tokens].set(config.image_token_id)
    pixels = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
    model, grown_model = VLM(config), VLM(grown_config)

    def exit_state_and_logits(m, p):
        positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
        hidden = m.embed(p, ids, None, positions)
        exit_state, _, _ = m.run_layers(p, hidden, positions, 0, 1)
        return exit_state, m.forward(p, ids, pixels)

    want_exit, want_logits = exit_state_and_logits(model, params)
    got_exit, got_logits = exit_state_and_logits(grown_model, grown)
    np.testing.assert_array_equal(got_exit, want_exit)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-6, atol=1e-6)
    # The new layers are in the path: once their output projection is not zero, the logits move.
    nudged = jax.tree.map(lambda x: x, grown)
    down = nudged["language_model"]["layers"]["mlp"]["down_proj"]
    down["kernel"] = down["kernel"].at[5].add(0.05)
    assert float(jnp.max(jnp.abs(grown_model.forward(nudged, ids, pixels) - want_logits))) > 1e-3
    with pytest.raises(ValueError, match="must exceed"):
        deepen.deepened_config(config, 3)


def test_deepen_to_is_only_for_the_base_stage_from_a_checkpoint():
    with pytest.raises(config_lib.ConfigError, match="deepen_to"):
        th.tiny_config("base", deepen_to=4)
    with pytest.raises(config_lib.ConfigError, match="deepen_to"):
        th.tiny_config("imitation", init_from="/x", deepen_to=4)


def test_an_int8_checkpoint_cannot_be_trained(tmp_path):
    from fastvlm_jax.ckpt.checkpoint import CONFIG_FILE
    from tests.tiny import tiny_config
    from train.run import build_model

    (tmp_path / CONFIG_FILE).write_text(tiny_config().replace(quantization="int8").to_json())
    with pytest.raises(config_lib.ConfigError, match="int8 weights"):
        build_model(th.tiny_config("imitation", init_from=str(tmp_path)), mesh=None)


# ---------------------------------------------------------------------------------------
# Sharded training
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_losses_on_one_and_eight_devices(data_dir, tmp_path):
    """20 steps on 1 device and on 8 with data/fsdp/tensor meshes; one run also
    accumulates gradients over 2 micro-batches, one recomputes the layers in the backward
    pass (remat). float32: relative 1e-5."""
    common = {"data.data_dir": data_dir, "steps": 20, "checkpoint.save_final": False}
    runs = {
        "1dev": {"mesh.data": 1},
        "data8": {"mesh.data": 8},
        "data2_tensor4_accum2": {"mesh.data": 2, "mesh.tensor": 4, "grad_accum": 2},
        "fsdp4_tensor2_remat_full": {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2, "remat": "full"},
    }
    curves = {}
    for name, overrides in runs.items():
        cfg = th.tiny_config("base", **common, **overrides)
        devices = jax.devices()[:1] if name == "1dev" else None
        result = train(cfg, tmp_path / name, progress=False, devices=devices)
        assert result.status == "done" and result.step == 20
        curves[name] = th.losses(tmp_path / name)
    reference = curves.pop("1dev")
    assert sorted(reference) == list(range(1, 21))
    assert reference[20] < reference[1]  # it learns
    for name, curve in curves.items():
        np.testing.assert_allclose(
            [curve[s] for s in range(1, 21)], [reference[s] for s in range(1, 21)], rtol=1e-5, err_msg=name
        )


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["base", "refine", "eagle"])
def test_loss_window_gives_the_losses_of_every_position(stage):
    """The step's losses on positions [loss_start, seq) (StepSpec.loss_start) equal those
    on all positions when no earlier position carries loss; the gradients too. The eagle
    head pools its image slots in pairs, so its window starts in slot space (earlier)."""
    from fastvlm_jax.nn.model import VLM
    from tests.tiny import tiny_config
    from train import step as step_lib

    config = tiny_config(vocab_size=64, num_layers=2, exit_layer=1)
    if stage == "eagle":
        config = config.with_draft(eagle_layers=1, eagle_hidden_size=96, eagle_image_pool=2)
    model = VLM(config)
    params = model.init(jax.random.key(0))
    patterns = {"base": ("language_model/.*",), "refine": ("imitation/.*",), "eagle": ("eagle/.*",)}[stage]
    trainable, frozen = param_lib.split(params, param_lib.trainable_paths(params, patterns))
    rng = np.random.default_rng(0)
    batch, seq, prompt = 3, 24, 9  # 4 image tokens + text; loss from position prompt - 1 on
    ids = rng.integers(0, 60, size=(batch, seq)).astype(np.int32)
    ids[:, 1 : 1 + config.num_image_tokens] = config.image_token_id
    mask = np.zeros((batch, seq), np.float32)
    mask[0, prompt - 1 : seq - 1] = 1
    mask[1, prompt - 1 : prompt + 4] = 1
    mask[2, prompt + 2 : prompt + 6] = 1
    data = {
        "pixels": jnp.asarray(rng.normal(size=(batch, 16, 16, 3)), jnp.float32),
        "input_ids": jnp.asarray(ids),
        "targets": jnp.asarray(np.roll(ids, -1, axis=1)),
        "loss_mask": jnp.asarray(mask),
    }
    loss_config = config_lib.ImitationLossConfig(cos=1.0, kd=1.0, ce=0.1)

    def run(loss_start):
        spec = step_lib.StepSpec(stage, loss_config, loss_start=loss_start, disagreement_weight=4.0)
        fn = jax.value_and_grad(step_lib.forward_losses, argnums=2, has_aux=True)
        return jax.jit(fn, static_argnums=(0, 1))(model, spec, trainable, frozen, data, jnp.sum(data["loss_mask"]))

    (want_loss, want_metrics), want_grads = run(0)
    (loss, metrics), grads = run(prompt - 1)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for name in want_metrics:
        np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for path, want in _flat(want_grads).items():
        np.testing.assert_allclose(_flat(grads)[path], want, rtol=1e-4, atol=1e-7, err_msg=path)
    assert float(want_loss) > 0 and max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 0
    with pytest.raises(ValueError, match="loss window"):
        input_lib.check_loss_window({"loss_mask": mask}, prompt + 1)
    input_lib.check_loss_window({"loss_mask": mask}, prompt - 1)


def _flat(params):
    return {param_lib.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.slow
def test_draft_stages_leave_the_base_model_bit_identical(data_dir, tmp_path):
    from fastvlm_jax.ckpt.checkpoint import load_checkpoint

    # One device: the property does not depend on sharding (the tests above cover that),
    # and single-device programs compile several times faster.
    common = {"data.data_dir": data_dir, "checkpoint.export": True, "mesh.data": 1}
    one_device = functools.partial(train, devices=jax.devices()[:1])
    base = one_device(th.tiny_config("base", steps=3, **common), tmp_path / "base", progress=False)
    # Resuming with another length (hence another learning-rate schedule) is refused.
    with pytest.raises(config_lib.ConfigError, match="steps=3.*this run has steps=5"):
        one_device(th.tiny_config("base", steps=5, **common), tmp_path / "base", progress=False)
    assert json.loads((tmp_path / "base" / "train_config.json").read_text())["steps"] == 3
    # Growing the trained decoder starts from exactly its function: the first step's loss
    # (before any update) equals the un-grown model's on the same batch.
    from_base = th.tiny_config("base", steps=1, **common).replace(model=None, init_from=str(base.export_dir))
    same = one_device(from_base, tmp_path / "same", progress=False)
    deeper = one_device(from_base.replace(deepen_to=4), tmp_path / "deeper", progress=False)
    assert same.status == deeper.status == "done"
    assert load_checkpoint(deeper.export_dir).config.text.num_layers == 4
    assert th.losses(tmp_path / "deeper")[1] == pytest.approx(th.losses(tmp_path / "same")[1], rel=1e-6)
    imitation = one_device(
        th.tiny_config("imitation", steps=4, init_from=base.export_dir, **common),
        tmp_path / "imitation",
        progress=False,
    )
    refine = one_device(
        th.tiny_config("refine", steps=3, init_from=imitation.export_dir, **{"refine.max_new_tokens": 8}, **common),
        tmp_path / "refine",
        progress=False,
    )
    before = _flat(load_checkpoint(base.export_dir).params)
    middle = _flat(load_checkpoint(imitation.export_dir).params)
    after = load_checkpoint(refine.export_dir)
    assert after.tokenizer is not None and after.image_config is not None
    after = _flat(after.params)
    assert before.keys() == after.keys()
    for key in before:
        if key.startswith("imitation/"):
            continue
        assert before[key].dtype == after[key].dtype and np.array_equal(before[key], after[key]), key
    # ...while the imitation network did train in both draft stages.
    moved = [k for k in before if k.startswith("imitation/") and not np.array_equal(before[k], middle[k])]
    assert moved
    assert any(not np.array_equal(middle[k], after[k]) for k in moved)
    records = th.losses(tmp_path / "refine")
    assert len(records) == 3 and all(np.isfinite(list(records.values())))
    # The refine stage trained on sequences generated once, before its first step: one per
    # record its 3 steps read, and each is the full model's greedy decoding of that record
    # alone (the pre-pass decoded it within another batch).
    from decode.engine import DecodeSpec, Prompts, generate
    from fastvlm_jax.data import tfds_builders
    from fastvlm_jax.image.processing import rescale_and_normalize
    from fastvlm_jax.nn.families import stop_ids
    from fastvlm_jax.nn.model import VLM
    from train import refine as refine_lib

    stored = refine_lib.load_sequences(tmp_path / "refine" / refine_lib.SEQUENCES_DIR)
    assert stored.tokens.shape == (3 * 8, 8) and len(set(stored.record_ids.tolist())) == 3 * 8
    model_ckpt = load_checkpoint(imitation.export_dir)
    source = tfds_builders.open_split("synthetic_captions/tiny", "train", str(data_dir), decode=False)
    transform = input_lib.CaptionExample(
        model_ckpt.tokenizer, model_ckpt.image_config, "Describe the image.", model_ckpt.config.num_image_tokens, 48
    )
    prompt = refine_lib.prompt_example(transform, source[int(stored.record_ids[5])])
    out = generate(
        VLM(model_ckpt.config),
        model_ckpt.params,
        Prompts(
            prompt["input_ids"][None],
            prompt["prompt_len"][None],
            rescale_and_normalize(prompt["pixels"], model_ckpt.image_config)[None],
        ),
        DecodeSpec(mode="ar", capacity=8, eos_ids=stop_ids(model_ckpt.config, model_ckpt.tokenizer)),
        8,
    )
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), stored.tokens[5])


@pytest.mark.slow
def test_cli_caches_compiles_in_the_workdir_profiles_and_reports_model_flops(data_dir, tmp_path):
    """The CLI with no compilation cache configured: the compiled programs land in
    workdir/compile_cache (a restart loads them); --profile-steps 1 writes a jax.profiler
    trace; the metrics carry model FLOP/s, and no MFU on CPU (no peak figure to divide by)."""
    workdir = tmp_path / "run"
    env = th.subprocess_env(tmp_path / "unused", 1, JAX_COMPILATION_CACHE_DIR="")
    overrides = {"data.data_dir": data_dir, "steps": 3, "mesh.data": 1, "checkpoint.export": False}
    th.run_cli("base", workdir, overrides, env, ["--profile-steps", "1"])
    assert any((workdir / "compile_cache").iterdir())
    assert list((workdir / "profile").rglob("*.xplane.pb"))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["model_flops_per_s"] > 0 and "mfu" not in r for r in records), records


@pytest.mark.parametrize("preset", ["llava", "siglip"])
def test_uint8_pixels_normalised_on_device_equal_the_host_float32_ones(preset):
    """What the loader sends (uint8) looked up on device (train.step.device_pixels) is the
    host preprocessing's float32 output bit for bit: the same model input, the same losses."""
    from fastvlm_jax.image.processing import (
        ImageProcessorConfig,
        preprocess_image,
        preprocess_image_uint8,
    )
    from train import step as step_lib
    from train.model_setup import pixel_table

    config = {
        "llava": ImageProcessorConfig(shortest_edge=24, crop_height=24, crop_width=24, do_pad_to_square=True),
        "siglip": ImageProcessorConfig.siglip(24),
    }[preset]
    image = np.random.default_rng(0).integers(0, 256, size=(37, 29, 3), dtype=np.uint8)
    sent = preprocess_image_uint8(image, config)
    assert sent.dtype == np.uint8
    got = jax.jit(step_lib.device_pixels, static_argnums=1)(jnp.asarray(sent[None]), pixel_table(config))
    want = preprocess_image(image, config)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got[0]).view(np.uint32), want.view(np.uint32))


def test_refine_decode_placement_is_tensor_parallel_over_the_same_devices():
    """refine.decode_tensor: the pre-pass's params over a (data, tensor) mesh of the training
    mesh's devices (attention heads split over tensor, nothing over fsdp), its batch over data."""
    import flax.linen as nn

    from fastvlm_jax.nn.model import VLM
    from fastvlm_jax.runtime import sharding
    from tests.tiny import tiny_config
    from train import model_setup
    from train import refine as refine_lib

    cfg = th.tiny_config("refine", **{"mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1})
    model = VLM(tiny_config(num_kv_heads=4))
    mesh = sharding.make_mesh(cfg.mesh)
    paths, _, _, training = model_setup.plan_training(cfg, model, mesh, nn.meta.unbox(model.abstract_params()))
    decode_mesh, placed = refine_lib.decode_placement(model, training, mesh, paths, 4)
    assert dict(decode_mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert set(decode_mesh.devices.flat) == set(mesh.devices.flat)
    q = placed.frozen["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"].spec
    assert "tensor" in q, q  # its fsdp axis has size 1: nothing is gathered per token
    assert placed.batch["input_ids"].spec[0] == ("data", "fsdp")
    with pytest.raises(config_lib.ConfigError, match="decode_tensor=3 does not divide the 8 devices"):
        refine_lib.decode_placement(model, training, mesh, paths, 3)
