"""Compile-only mode for TPU topologies (fastvlm_jax.tpu, train.compile_only,
decode.bench.compile_only): named topologies, the compiler's memory and cost figures,
fits and does-not-fit, on tiny models and the 4-chip v5e:2x2 slice (seconds per compile).

The tests that compile need libtpu (the `tpu` and `test` extras); the others do not.
"""

from __future__ import annotations

import json
import sys

import flax.linen as nn
import pytest

from fastvlm_jax import sharding, tpu
from fastvlm_jax.architectures import architecture
from fastvlm_jax.model import VLM, param_count
from tests import train_helpers as th

TOPOLOGY = "v5e:2x2"
# The tiny training config with a fixed vocabulary, so no tokenizer is trained first.
TINY_TRAIN = [f"--config={th.TINY_CONFIG}:base", "model.text.vocab_size=128", "model.image_token_id=127"]


def needs_libtpu():
    pytest.importorskip("libtpu", reason="compiling for TPU needs libtpu: pip install -e '.[tpu]'")


# --- no compiler needed ---------------------------------------------------------------------


def test_topology_names_parse_and_bad_ones_list_the_valid_forms():
    chip, dims = tpu.parse_topology("v5p:2x2x4")
    assert chip.name == "v5p" and dims == (2, 2, 4) and chip.hbm_bytes == 95 * tpu.GiB
    assert tpu.parse_topology("v5e:4x8")[1] == (4, 8)
    for bad in ("v9:2x2", "v5e-8", "v5e:2x2x2", "v5p:2x2", "v5e:3x2", ""):
        with pytest.raises(tpu.TopologyError, match="valid forms: v5e:2x2") as err:
            tpu.parse_topology(bad)
        assert "\n" not in str(err.value)


def test_parse_mesh():
    assert sharding.parse_mesh("data=2,tensor=4") == sharding.MeshConfig(data=2, fsdp=1, tensor=4)
    assert sharding.parse_mesh("tensor=-1") == sharding.MeshConfig(data=1, fsdp=1, tensor=-1)
    for bad in ("model=2", "data=two", "", "data"):
        with pytest.raises(ValueError, match="--mesh"):
            sharding.parse_mesh(bad)


def test_collective_counts_read_sync_and_async_ops():
    hlo = """
      %all-reduce.1 = f32[8]{0} all-reduce(f32[8]{0} %p), replica_groups={{0,1}}
      %ags = (bf16[4], bf16[8]) all-gather-start(bf16[4] %x), dimensions={0}
      %agd = bf16[8] all-gather-done((bf16[4], bf16[8]) %ags)
      %rs = f32[2] reduce-scatter(f32[8] %y), dimensions={0}
      %cp = f32[2] collective-permute(f32[2] %rs), source_target_pairs={{0,1}}
    """
    counts = tpu.collective_counts(hlo)
    assert counts == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 1, "all-to-all": 0,
                      "collective-permute": 1}


def test_acceptance_profile_from_a_number_and_from_a_stats_json(tmp_path):
    from decode.bench.compile_only import CompileOnlyError, parse_acceptance

    tokens, drafted = parse_acceptance("0.5").per_round(3)
    assert tokens == pytest.approx(1 + 0.5 + 0.25 + 0.125) and drafted == 3
    assert parse_acceptance("0").per_round(5) == (1.0, 5.0)
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"mean_accepted_length": 3.0, "acceptance_rate": 0.5}))
    # 2 accepted drafts per round at acceptance 0.5: 4 drafted per round.
    assert parse_acceptance(str(stats)).per_round(5) == (3.0, 4.0)
    for bad in ("1.5", str(tmp_path / "missing.json")):
        with pytest.raises(CompileOnlyError, match="--acceptance"):
            parse_acceptance(bad)


def test_named_architectures_have_the_released_sizes():
    config = architecture("llava15_7b")
    abstract = nn.meta.unbox(VLM(config).abstract_params())
    # llava-1.5-7b-hf has 7,063,427,072 parameters; we leave out the CLIP layer after the
    # feature layer (-2) and its post-layernorm, which LLaVA never uses (12,598,272).
    assert param_count({k: v for k, v in abstract.items() if k != "imitation"}) == 7_063_427_072 - 12_598_272
    assert config.num_image_tokens == 576 and config.draft.exit_layer == 8
    assert architecture("llava15_13b").text.num_layers == 40
    assert architecture("blip2_opt_2_7b").num_image_tokens == 32
    with pytest.raises(ValueError, match="known: blip2_opt_2_7b, llava15_13b, llava15_7b"):
        architecture("llava15_70b")


def test_checkpoint_shapes_without_reading_params(tmp_path):
    """Compile-only runs from a checkpoint read its config and saved dtypes, not its params."""
    import jax
    import jax.numpy as jnp

    from fastvlm_jax.checkpoint import load_without_params, save_checkpoint
    from fastvlm_jax.model import cast_params
    from tests.tiny import tiny_config

    config = tiny_config()
    params = cast_params(jax.jit(VLM(config).init)(jax.random.key(0)), jnp.bfloat16)
    save_checkpoint(tmp_path / "ckpt", config, params)
    ckpt = load_without_params(tmp_path / "ckpt")
    assert ckpt.config == config
    assert jax.tree.map(lambda x: (x.shape, x.dtype), ckpt.params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(ckpt.params))


def test_without_libtpu_compile_only_says_how_to_get_it(monkeypatch, capsys):
    from train.run import main

    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` now raises ImportError
    assert main([*TINY_TRAIN[:1], "--compile-only", TOPOLOGY, *TINY_TRAIN[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert 'pip install -e ".[tpu]"' in err and "\n" not in err


def test_shapes_checkpoints_need_compile_only(capsys):
    from decode.bench.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--ckpt", "shapes:llava15_7b", "--json", "/dev/null"])
    assert exit_info.value.code == 2 and "--compile-only" in capsys.readouterr().err


# --- compiled for v5e:2x2 -------------------------------------------------------------------


def test_train_compile_only_fits_and_reports(tmp_path, capsys):
    needs_libtpu()
    from train.run import main

    out = tmp_path / "train.json"
    assert main([*TINY_TRAIN[:1], "--compile-only", TOPOLOGY, "--json", str(out), *TINY_TRAIN[1:]]) == 0
    report = json.loads(out.read_text())
    assert report["topology"] == TOPOLOGY and report["chips"] == 4 and report["device_kind"] == "TPU v5 lite"
    assert report["hbm_bytes_per_chip"] == 16 * tpu.GiB and report["fits"] is True
    assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}  # the config's data=-1 over 4 chips
    step = report["programs"]["train_step"]
    assert 0 < report["per_chip_peak_bytes"] == step["per_chip_peak_bytes"] < 100 * 1024**2
    memory = step["memory_per_device"]
    assert memory["arguments"] > 0 and memory["temporaries"] > 0 and memory["aliased"] > 0  # state donated
    assert report["flops_per_step"] > 0 and report["bytes_per_step"] > 0
    # Data parallel: the gradients are all-reduced.
    assert step["collectives"]["all-reduce"] > 0
    # The bound takes the larger of the compiler's FLOPs and the model's (the compiler counts
    # a layer scan's body once), per device, against v5e's peak and bandwidth.
    flops = max(step["flops_per_device"], report["flops_per_step"] / report["devices"])
    assert report["step_time_lower_bound_s"] == pytest.approx(max(flops / 197e12, step["bytes_per_device"] / 819e9))
    assert step["while_loops"] > 0  # the layer scans
    assert "fits" in capsys.readouterr().out


def test_train_compile_only_too_big_exits_1_with_the_reason(tmp_path, capsys):
    needs_libtpu()
    from train.run import main

    out = tmp_path / "big.json"
    # ~6 GB of float32 MLP weights per layer, with gradients and Adam moments: far over 16 GiB.
    args = [*TINY_TRAIN[:1], "--compile-only", TOPOLOGY, "--json", str(out), *TINY_TRAIN[1:],
            "model.text.intermediate_size=8000000"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: does not fit on {TOPOLOGY}: ") and "HBM" in err[-1]
    report = json.loads(out.read_text())
    assert report["fits"] is False and "HBM" in report["reason"]


def test_decode_compile_only_pieces_cache_sharding_and_speedup(tmp_path):
    needs_libtpu()
    from decode.bench.cli import main

    out = tmp_path / "decode.json"
    assert main(["--ckpt", "random:tiny", "--compile-only", TOPOLOGY, "--batch-size", "4", "--draft-len", "3",
                 "--max-new-tokens", "16", "--acceptance", "0.6", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["topology"] == TOPOLOGY and report["chips"] == 4 and report["fits"] is True
    assert report["mesh"] == {"data": 1, "fsdp": 1, "tensor": 4}
    run = report["runs"][0]
    assert set(run["pieces"]) == {"ar_step", "draft_step", "shallow_step", "verify", "generate_ar",
                                  "generate_ssd"}
    # random:tiny: 4 layers, 4 kv heads of width 32, float32; 16 image tokens + 13 -> 29-token
    # prompts; SSD slots 29 + 16 + 3 + 1. The heads are split over tensor=4: one per chip.
    assert run["kv_cache_bytes_per_device"] == 2 * 4 * 4 * 1 * (29 + 16 + 3 + 1) * 32 * 4
    ar, draft, verify = (run["pieces"][k] for k in ("ar_step", "draft_step", "verify"))
    # The pieces are unrolled, so their costs count every layer; generate loops.
    assert ar["while_loops"] == 0 and run["pieces"]["generate_ssd"]["while_loops"] > 0
    assert ar["collectives"]["all-reduce"] > 0  # tensor parallel
    # The draft runs 1 of 4 layers: less to read than the full step (in FLOPs the tiny
    # model's imitation network and 512-word head outweigh 3 layers); verification scores 4
    # tokens through 3 layers.
    shallow = run["pieces"]["shallow_step"]
    assert shallow["must_read_bytes_per_device"] < draft["must_read_bytes_per_device"] < ar["must_read_bytes_per_device"]
    assert shallow["flops_per_device"] < ar["flops_per_device"] < verify["flops_per_device"]
    assert run["pieces"]["generate_ssd"]["memory_per_device"]["peak"] >= run["kv_cache_bytes_per_device"]
    tokens = 1 + 0.6 + 0.36 + 0.216
    assert run["tokens_per_round"] == pytest.approx(tokens)
    t = {k: run["pieces"][k]["time_lower_bound_s"] for k in ("ar_step", "draft_step", "shallow_step", "verify")}
    assert run["predicted_speedup"] == pytest.approx(
        tokens * t["ar_step"] / (3 * t["draft_step"] + t["shallow_step"] + t["verify"]))
    assert report["predicted_speedup"] == run["predicted_speedup"]


def test_decode_compile_only_too_big_exits_1_with_the_reason(tmp_path, capsys):
    needs_libtpu()
    from decode.bench.cli import main

    out = tmp_path / "decode_big.json"
    # A KV cache of 4 layers x 64 rows x 300k slots: ~20 GB per chip.
    assert main(["--ckpt", "random:tiny", "--compile-only", TOPOLOGY, "--batch-size", "64",
                 "--max-new-tokens", "300000", "--no-generate", "--json", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: batch 64 does not fit on {TOPOLOGY}: ") and "HBM" in err[-1]
    assert json.loads(out.read_text())["fits"] is False
