"""Separate draft models: train.recipes.make_draft_model and the shipped demo-draft."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import run as decode_run
from fastvlm_jax import demo
from fastvlm_jax.ckpt.checkpoint import load_checkpoint, save_checkpoint
from fastvlm_jax.nn.blip2 import Blip2Config, Blip2VisionConfig, OPTConfig, QFormerConfig
from fastvlm_jax.nn.config import DraftConfig
from fastvlm_jax.nn.model import VLM
from tests.tiny import tiny_config
from train.recipes import make_draft_model as mdm
from train.recipes.draft_agreement import vocabulary


def tiny_blip2():
    return Blip2Config(
        vision=Blip2VisionConfig(
            image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4
        ),
        qformer=QFormerConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4),
        text=OPTConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, max_position_embeddings=64
        ),
        draft=DraftConfig(exit_layer=2),
        num_query_tokens=2,
        image_token_id=63,
    )


@functools.cache
def jitted_init(config):
    return jax.jit(VLM(config).init)  # eager flax init is ~3x slower, and compiled once per config


def write_source(path, config, seed=0):
    """A random checkpoint of `config` with the demo's tokenizer and preprocessor files
    (only copied through, so their vocabulary need not match the tiny model's)."""
    params = jitted_init(config)(jax.random.key(seed))
    save_checkpoint(path, config, params)
    shutil.copytree(demo.ASSET_DIR / "tokenizer", path / "tokenizer")
    shutil.copy(demo.ASSET_DIR / "preprocessor.json", path / "preprocessor.json")
    return params


def random_inputs(config, seq=12, batch=2, seed=1):
    """Ids with the image placeholders in front, and pixels: [batch, seq], [batch, H, W, 3]."""
    rng = np.random.default_rng(seed)
    n = config.num_image_tokens
    ids = rng.integers(0, config.image_token_id, (batch, n + seq)).astype(np.int32)
    ids[:, :n] = config.image_token_id
    size = config.vision.image_size
    pixels = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(pixels)


@pytest.mark.slow
@pytest.mark.parametrize("family,num_layers", [("llava", 2), ("llava", 3), ("blip-2", 3)])
def test_truncated_model_is_the_sources_early_exit(tmp_path, family, num_layers):
    config = (
        tiny_config(num_layers=4, exit_layer=2, kind="layer").with_draft(eagle_layers=1)
        if family == "llava"
        else tiny_blip2()
    )
    params = write_source(tmp_path / "src", config)
    out = mdm.make_draft_model(tmp_path / "src", num_layers, tmp_path / "draft")

    draft = load_checkpoint(out)
    assert draft.config.text.num_layers == num_layers
    assert draft.config.draft.exit_layer == min(2, num_layers - 1)
    assert draft.config.draft.eagle_layers == 0 and "eagle" not in draft.params
    for name in ("tokenizer/tokenizer.model", "tokenizer/tokenizer_config.json", "preprocessor.json"):
        assert (out / name).read_bytes() == (tmp_path / "src" / name).read_bytes()

    # The source's logits at state N (layers [0, N) then the head) == the draft's full logits.
    # Jitted (one compile each instead of op-by-op dispatch); both run the same ops.
    source = VLM(config)

    @jax.jit
    def source_exit_logits(params, ids, pixels):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        hidden = source.embed(params, ids, source.encode_images(params, pixels), positions)
        hidden, _, _ = source.run_layers(params, hidden, positions, 0, num_layers)
        return source.logits(params, hidden)

    ids, pixels = random_inputs(config)
    want = source_exit_logits(params, ids, pixels)
    got = jax.jit(VLM(draft.config).forward)(draft.params, ids, pixels)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """One 4-layer source checkpoint for all the bad-input cases (copied per case)."""
    path = tmp_path_factory.mktemp("tiny_source") / "src"
    write_source(path, tiny_config(num_layers=4, exit_layer=2))
    return path


@pytest.mark.parametrize(
    "args,message",
    [
        (["--from", "{tmp}/missing", "--layers", "2"], "--from {tmp}/missing: no such folder"),
        (["--from", "{tmp}", "--layers", "2"], "not a fastvlm-jax checkpoint"),
        (["--from", "{tmp}/src", "--layers", "1"], "--layers 1: a draft model needs at least 2 decoder layers"),
        (["--from", "{tmp}/src", "--layers", "4"], "--layers 4: the source has 4 decoder layers"),
        (["--from", "{tmp}/src", "--layers", "2", "--out", "{tmp}/src"], "is or holds the source checkpoint"),
        (["--from", "{tmp}/src", "--layers", "2", "--out", "{tmp}", "--overwrite"], "is or holds the source"),
        (["--from", "{tmp}/src", "--layers", "2", "--out", "{tmp}/full"], "exists and is not empty"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, tiny_source, capsys, args, message):
    shutil.copytree(tiny_source, tmp_path / "src")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "new")]
    assert mdm.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message.format(tmp=tmp_path) in err
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "src" / "config.json").exists()


def test_shipped_demo_draft_shares_the_demos_tokenizer_and_images():
    path = demo.demo_draft_checkpoint()
    assert path == demo.DRAFT_ASSET_DIR, "demo-draft must ship with the package"
    assert decode_run.resolve_checkpoint("demo-draft") == str(path)
    target, draft = load_checkpoint(demo.demo_checkpoint()), load_checkpoint(path)
    assert vocabulary(draft.tokenizer) == vocabulary(target.tokenizer)
    assert draft.tokenizer.image_token_id == target.tokenizer.image_token_id
    assert draft.image_config == target.image_config
    assert json.loads((path / "preprocessor.json").read_text()) == json.loads(
        (demo.ASSET_DIR / "preprocessor.json").read_text()
    )
    # Same family and widths, so it reads the same prompts; fewer layers, so it is cheap.
    t, d = target.config, draft.config
    assert (d.model_type, d.text.vocab_size, d.text.hidden_size, d.image_token_id, d.vision) == (
        t.model_type,
        t.text.vocab_size,
        t.text.hidden_size,
        t.image_token_id,
        t.vision,
    )
    assert d.text.num_layers * 5 <= t.text.num_layers
    leaves = jax.tree.leaves(draft.params)
    assert all(x.dtype == jnp.float32 and np.isfinite(np.asarray(x)).all() for x in leaves)
    # Fine-tuned: the decoder differs from the demo's first layers.
    first = jax.tree.map(lambda x: x[: d.text.num_layers], target.params["language_model"]["layers"])
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(draft.params["language_model"]["layers"]))
    )
