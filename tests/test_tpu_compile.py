"""Compile-only mode for TPU topologies (fastvlm_jax.tpu, train.compile_only,
decode.bench.compile_only): named topologies, the compiler's memory and cost figures,
fits and does-not-fit, on tiny models and the 4-chip v5e:2x2 slice (seconds per compile).

The tests that compile need libtpu (the `tpu` and `test` extras); the others do not.
"""

from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import pytest

from fastvlm_jax import tpu
from fastvlm_jax.nn.architectures import architecture
from fastvlm_jax.nn.model import VLM, param_count
from fastvlm_jax.runtime import sharding
from tests import train_helpers as th

TOPOLOGY = "v5e:2x2"
# The tiny training config with a fixed vocabulary, so no tokenizer is trained first.
TINY_TRAIN = [f"--config={th.TINY_CONFIG}:base", "model.text.vocab_size=128", "model.image_token_id=127"]


@pytest.fixture(autouse=True)
def xla_flags_libtpu_knows(monkeypatch):
    """libtpu parses XLA_FLAGS when it loads and aborts the process on a flag it does not
    know: the suite's XLA:CPU-only flags are hidden from it, once the CPU backend has read
    them (XLA reads XLA_FLAGS once per process, when the first backend starts)."""
    import jax

    from tests.conftest import CPU_ONLY_FLAGS

    jax.devices()
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in CPU_ONLY_FLAGS]
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags))


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
    assert counts == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 1, "all-to-all": 0, "collective-permute": 1}


def test_collectives_from_the_compilers_own_text_when_as_text_fails():
    """libtpu 0.0.52 on v5p emits HLO jaxlib cannot parse back: the counts then come from
    the text the compiler wrote (compile_program dumps it)."""
    import jax
    import jax.numpy as jnp

    compiled = jax.jit(lambda x: x * 2).lower(jnp.zeros(4)).compile()

    class Unreadable:
        def __getattr__(self, name):
            return getattr(compiled, name)

        def as_text(self):
            raise RuntimeError("INVALID_ARGUMENT: unknown opcode")

    topology = tpu.Topology("cpu", tpu.CHIPS["v5e"], [jax.devices()[0]], 1)
    text = "%ar = f32[4] all-reduce(f32[4] %p)\n%w = (f32[4]) while((f32[4]) %t)"
    report = tpu.analyze("f", Unreadable(), topology, hlo_text=text)
    assert report.collectives["all-reduce"] == 1 and report.while_loops == 1
    assert tpu.analyze("f", Unreadable(), topology).collectives is None


# The optimized HLO of one bf16 matmul x[8, 4096] @ W[4096, 2752] compiled for v5e (trimmed):
# W is prefetched into VMEM (S(1)) and the dot reads it there; plus a fusion that reads
# layer 1 of a stacked [2, 16] table and an in-place update of a [2, 64] buffer.
PROBE_HLO = """
%bitcast_fusion.1 (bitcast_input.1: bf16[4096,2752]) -> bf16[4096,2752] {
  %bitcast_input.1 = bf16[4096,2752]{0,1:T(8,128)(2,1)S(1)} parameter(0)
  ROOT %bitcast.1 = bf16[4096,2752]{0,1:T(8,128)(2,1)} bitcast(%bitcast_input.1)
}

%fused_computation (param_0: bf16[8,4096], param_1: bf16[4096,2752]) -> bf16[8,2752] {
  %param_0 = bf16[8,4096]{1,0:T(8,128)(2,1)} parameter(0)
  %param_1 = bf16[4096,2752]{0,1:T(8,128)(2,1)S(1)} parameter(1)
  %fusion.2 = bf16[4096,2752]{0,1:T(8,128)(2,1)} fusion(%param_1), kind=kLoop, calls=%bitcast_fusion.1
  ROOT %convolution.1 = bf16[8,2752]{1,0:T(8,128)(2,1)} convolution(%param_0, %fusion.2), dim_labels=bf_io->bf
}

%row_computation (param_0.1: f32[2,16], param_1.1: s32[]) -> f32[1,16] {
  %param_0.1 = f32[2,16]{1,0} parameter(0)
  %param_1.1 = s32[]{:T(128)} parameter(1)
  %c = s32[]{:T(128)} constant(0)
  ROOT %ds = f32[1,16]{1,0} dynamic-slice(%param_0.1, %param_1.1, %c), dynamic_slice_sizes={1,16}
}

%update_computation (param_0.2: f32[2,64], param_1.2: f32[1,64], param_2.2: s32[]) -> f32[2,64] {
  %param_0.2 = f32[2,64]{1,0} parameter(0)
  %param_1.2 = f32[1,64]{1,0} parameter(1)
  %param_2.2 = s32[]{:T(128)} parameter(2)
  %c.1 = s32[]{:T(128)} constant(0)
  ROOT %dus = f32[2,64]{1,0} dynamic-update-slice(%param_0.2, %param_1.2, %param_2.2, %c.1)
}

ENTRY %main.1 (x.1: bf16[8,4096], w.1: bf16[4096,2752], t.1: f32[2,16], i.1: s32[], b.1: f32[2,64], u.1: f32[1,64]) -> bf16[8,2752] {
  %w.1 = bf16[4096,2752]{0,1:T(8,128)(2,1)} parameter(1), metadata={op_name="w"}
  %copy-start = (bf16[4096,2752]{0,1:T(8,128)(2,1)S(1)}, bf16[4096,2752]{0,1:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%w.1), cross_program_prefetch_index=0
  %x.1 = bf16[8,4096]{1,0:T(8,128)(2,1)} parameter(0)
  %t.1 = f32[2,16]{1,0} parameter(2)
  %i.1 = s32[]{:T(128)} parameter(3)
  %b.1 = f32[2,64]{1,0} parameter(4)
  %u.1 = f32[1,64]{1,0} parameter(5)
  %row = f32[1,16]{1,0} fusion(%t.1, %i.1), kind=kLoop, calls=%row_computation, metadata={op_name="jit(f)/table/dynamic_slice"}
  %upd = f32[2,64]{1,0} fusion(%b.1, %u.1, %i.1), kind=kLoop, calls=%update_computation, metadata={op_name="jit(f)/kv_write/dynamic_update_slice"}
  %copy-done = bf16[4096,2752]{0,1:T(8,128)(2,1)S(1)} copy-done(%copy-start)
  ROOT %fusion = bf16[8,2752]{1,0:T(8,128)(2,1)} fusion(%x.1, %copy-done), kind=kOutput, calls=%fused_computation, metadata={op_name="jit(f)/LlavaModule.logits/lm_head/dot_general"}
}
"""


def test_explain_books_each_ops_bytes_as_counted_and_in_hbm():
    """The matmul's W (22.5 MB) is read from HBM once, by its prefetch: the cost analysis'
    rule books it 4 times more (the prefetch's whole output tuple, the done, the dot's
    read from VMEM), the HBM estimate once. A sliced parameter reads its slice; an in-place
    update writes the update and does not read the buffer."""
    from decode.bench.compile_only.explain import explain_hlo

    w, x, out = 4096 * 2752 * 2, 8 * 4096 * 2, 8 * 2752 * 2
    row, update, index = 16 * 4, 64 * 4, 4
    where = explain_hlo(PROBE_HLO, top=10)
    rows = {(r["name"], r["scope"]): r for r in where["top"]}
    dot = rows[("fusion", "lm_head/dot_general")]
    assert dot["counted_bytes"] == x + w + out and dot["hbm_bytes"] == x + out
    prefetch = rows[("copy-start", "(no op_name: compiler-made)")]
    assert prefetch["counted_bytes"] == w + (2 * w + 4) and prefetch["hbm_bytes"] == w
    assert rows[("copy-done", "(no op_name: compiler-made)")]["hbm_bytes"] == 0
    assert rows[("row", "table/dynamic_slice")]["counted_bytes"] == row + index + row
    assert rows[("upd", "kv_write/dynamic_update_slice")]["counted_bytes"] == update + index + update
    assert where["counted_bytes"] == sum(r["counted_bytes"] for r in where["top"])
    assert where["hbm_bytes"] == x + out + w + 2 * row + index + 2 * update + index
    assert where["counted_bytes"] > 4 * w  # the artefact: W counted about 4 times


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


def test_acceptance_per_drafter_from_a_bench_json(tmp_path):
    from decode.bench.compile_only import CompileOnlyError, parse_acceptances

    bench = tmp_path / "bench.json"
    runs = [
        {"drafter": "imitation", "mean_accepted_length": 3.0, "acceptance_rate": 0.5},
        {"drafter": "eagle", "mean_accepted_length": 4.0, "acceptance_rate": 0.75},
        {"drafter": "model:demo-draft", "mean_accepted_length": 2.0, "acceptance_rate": 0.25},
        {"drafter": "eagle", "mean_accepted_length": 1.0, "acceptance_rate": 0.0},
    ]  # a later run: ignored
    bench.write_text(json.dumps({"mean_accepted_length": 3.0, "acceptance_rate": 0.5, "runs": runs}))
    table = parse_acceptances(str(bench))
    assert table.for_drafter("imitation").per_round(5) == (3.0, 4.0)
    assert table.for_drafter("eagle").per_round(5) == (4.0, 4.0)
    # A compile-only draft model matches the JSON's only model drafter by kind.
    assert table.for_drafter("model:shapes:llava_draft_160m").per_round(5) == (2.0, 4.0)
    assert table.for_drafter("eagle:pool=4").source.endswith("(drafter eagle)")
    with pytest.raises(CompileOnlyError, match="no measured run of drafter 'medusa'"):
        table.for_drafter("medusa")
    # One number (or a one-drafter JSON) holds for every drafter.
    assert parse_acceptances("0.5").for_drafter("eagle").per_round(1) == (1.5, 1.0)


def test_tree_acceptance_measured_or_modelled(tmp_path):
    from decode.bench.compile_only import CompileOnlyError, parse_acceptance, parse_tree_acceptance, parse_trees
    from decode.engine.tree import TreeShape

    chain = parse_acceptance("0.5")
    # Modelled: each depth is reached with p = 1 - (1 - 0.5)^2 = 0.75, up to 8 / 2 = 4 deep.
    modelled = parse_tree_acceptance("0.5", TreeShape(8, 2), chain)
    assert modelled.tokens_per_round == pytest.approx(1 + 0.75 + 0.75**2 + 0.75**3 + 0.75**4)
    assert modelled.per_position == 0.5 and "assumption" in modelled.source
    # Measured: the first run with the same tree (a chain run has tree_nodes 0).
    bench = tmp_path / "bench.json"
    runs = [
        {"tree_nodes": 0, "tree_width": None, "mean_accepted_length": 3.0, "acceptance_rate": 0.4},
        {"tree_nodes": 8, "tree_width": 2, "mean_accepted_length": 4.25, "acceptance_rate": 0.3},
        {"tree_nodes": 8, "tree_width": 2, "mean_accepted_length": 1.0, "acceptance_rate": 0.0},
    ]
    bench.write_text(json.dumps({"mean_accepted_length": 3.0, "acceptance_rate": 0.4, "runs": runs}))
    measured = parse_tree_acceptance(str(bench), TreeShape(8, 2), parse_acceptance(str(bench)))
    assert measured.tokens_per_round == 4.25 and measured.per_position is None
    # A tree the JSON did not run: modelled from its (chain) acceptance rate.
    other = parse_tree_acceptance(str(bench), TreeShape(16, 4), parse_acceptance(str(bench)))
    assert other.per_position == 0.4 and other.tokens_per_round == pytest.approx(
        sum((1 - 0.6**4) ** depth for depth in range(5))
    )
    assert parse_trees([0, 8, 16], 2, ["imitation"]) == (TreeShape(8, 2), TreeShape(16, 2))
    for nodes, width, drafters, message in (
        ([5], 2, ["imitation"], "multiple of the tree width"),
        ([4], 0, ["imitation"], "width >= 1"),
        ([4], 2, ["eagle"], "imitation drafter only"),
    ):
        with pytest.raises(CompileOnlyError, match=message) as err:
            parse_trees(nodes, width, drafters)
        assert "\n" not in str(err.value)


def test_named_architectures_have_the_released_sizes():
    config = architecture("llava15_7b")
    abstract = nn.meta.unbox(VLM(config).abstract_params())
    # llava-1.5-7b-hf has 7,063,427,072 parameters; we leave out the CLIP layer after the
    # feature layer (-2) and its post-layernorm, which LLaVA never uses (12,598,272).
    assert param_count({k: v for k, v in abstract.items() if k != "imitation"}) == 7_063_427_072 - 12_598_272
    assert config.num_image_tokens == 576 and config.draft.exit_layer == 8
    assert architecture("llava15_13b").text.num_layers == 40
    assert architecture("blip2_opt_2_7b").num_image_tokens == 32
    with pytest.raises(
        ValueError, match="known: blip2_opt_2_7b, gemma3_12b, gemma3_27b, gemma3_4b, llava15_13b, llava15_7b,"
    ):
        architecture("llava15_70b")


def test_drafter_architectures_for_llava15_7b():
    """The EAGLE head: a fuse projection [f, e] -> 4096 and one Vicuna-7B-shaped layer (FFN
    11008); the draft VLM: the 7B's vocabulary and image tokens, 68M-163M text params."""
    base = architecture("llava15_7b")
    eagle = architecture("llava15_7b_eagle")
    abstract = nn.meta.unbox(VLM(eagle).abstract_params())
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert param_count(abstract["eagle"]) == 2 * 4096 * 4096 + 2 * 4096 + layer
    assert eagle.draft.eagle_image_pool == 1 and architecture("llava15_7b_eagle_pool4").draft.eagle_image_pool == 4
    for name, low, high in (("llava_draft_68m", 60e6, 75e6), ("llava_draft_160m", 150e6, 170e6)):
        small = architecture(name)
        assert (small.text.vocab_size, small.image_token_id, small.num_image_tokens) == (
            base.text.vocab_size,
            base.image_token_id,
            base.num_image_tokens,
        )
        assert low < param_count(nn.meta.unbox(VLM(small).abstract_params())["language_model"]) < high


def test_checkpoint_shapes_without_reading_params(tmp_path):
    """Compile-only runs from a checkpoint read its config and saved dtypes, not its params."""
    import jax
    import jax.numpy as jnp

    from fastvlm_jax.ckpt.checkpoint import load_without_params, save_checkpoint
    from fastvlm_jax.nn.model import cast_params
    from tests.tiny import tiny_config

    config = tiny_config()
    params = cast_params(jax.jit(VLM(config).init)(jax.random.key(0)), jnp.bfloat16)
    save_checkpoint(tmp_path / "ckpt", config, params)
    ckpt = load_without_params(tmp_path / "ckpt")
    assert ckpt.config == config
    assert jax.tree.map(lambda x: (x.shape, x.dtype), ckpt.params) == jax.tree.map(lambda x: (x.shape, x.dtype), params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(ckpt.params))

    # --quantize int8 from a checkpoint or a named shape: int8 kernels + per-channel scales
    from decode.bench.compile_only import CompileOnlyError, load_shapes
    from fastvlm_jax.nn.quant import quantize_model

    for shapes in (load_shapes(str(tmp_path / "ckpt"), quantize="int8"), load_shapes("random:tiny", quantize="int8")):
        assert shapes.config.quantization == "int8"
        down = shapes.params["language_model"]["layers"]["mlp"]["down_proj"]
        assert (
            down["kernel"].dtype == jnp.int8
            and down["kernel_scale"].shape == down["kernel"].shape[:1] + down["kernel"].shape[2:]
        )
    save_checkpoint(tmp_path / "int8", *quantize_model(config, params))
    with pytest.raises(CompileOnlyError, match="already int8-quantized"):
        load_shapes(str(tmp_path / "int8"), quantize="int8")
    assert load_shapes(str(tmp_path / "int8")).params["language_model"]["lm_head"]["kernel"].dtype == jnp.int8


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


@pytest.mark.slow
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
    args = [
        *TINY_TRAIN[:1],
        "--compile-only",
        TOPOLOGY,
        "--json",
        str(out),
        *TINY_TRAIN[1:],
        "model.text.intermediate_size=8000000",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: does not fit on {TOPOLOGY}: ") and "HBM" in err[-1]
    report = json.loads(out.read_text())
    assert report["fits"] is False and "HBM" in report["reason"]


@pytest.mark.slow
def test_decode_compile_only_pieces_cache_sharding_and_speedup(tmp_path):
    needs_libtpu()
    from decode.bench.cli import main
    from decode.bench.models import RANDOM_PRESETS

    out = tmp_path / "decode.json"
    assert (
        main(
            [
                "--ckpt",
                "random:tiny",
                "--compile-only",
                TOPOLOGY,
                "--batch-size",
                "4",
                "--draft-len",
                "3",
                "--max-new-tokens",
                "16",
                "--acceptance",
                "0.6",
                "--batching",
                "continuous",
                "--explain",
                "60",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["topology"] == TOPOLOGY and report["chips"] == 4 and report["fits"] is True
    assert report["mesh"] == {"data": 1, "fsdp": 1, "tensor": 4}
    run = report["runs"][0]
    assert set(run["pieces"]) == {"ar_step", "draft_step", "shallow_step", "verify", "generate_ar", "generate_ssd"}
    assert "image_tokens" not in run  # a fixed-size tower's JSON is what it was (no patch bucket)
    # random:tiny: 4 layers, 4 kv heads of width 32, float32; 16 image tokens + 13 -> 29-token
    # prompts; SSD slots 29 + 16 + 3 + 1. The heads are split over tensor=4: one per chip.
    assert run["kv_cache_bytes_per_device"] == 2 * 4 * 4 * 1 * (29 + 16 + 3 + 1) * 32 * 4
    ar, draft, verify = (run["pieces"][k] for k in ("ar_step", "draft_step", "verify"))
    # The pieces are compiled as the engine runs them (a layer scan is a while loop) and
    # counted by their unrolled twins, so their costs count every layer; generate loops.
    assert ar["while_loops"] >= 1 and ar["cost_counting"] == "unrolled_twin"
    assert ar["scanned_program"]["flops_per_device"] < ar["flops_per_device"]  # the scan's body counted once
    assert run["pieces"]["generate_ssd"]["while_loops"] > 0
    assert run["pieces"]["generate_ssd"]["cost_counting"] == "static_loop_bodies_once"
    assert ar["collectives"]["all-reduce"] > 0  # tensor parallel
    # The draft runs 1 of 4 layers: less to read than the full step (in FLOPs the tiny
    # model's imitation network and 512-word head outweigh 3 layers); verification scores 4
    # tokens through 3 layers.
    shallow = run["pieces"]["shallow_step"]
    assert (
        shallow["must_read_bytes_per_device"] < draft["must_read_bytes_per_device"] < ar["must_read_bytes_per_device"]
    )
    assert shallow["flops_per_device"] < ar["flops_per_device"] < verify["flops_per_device"]
    assert run["pieces"]["generate_ssd"]["memory_per_device"]["peak"] >= run["kv_cache_bytes_per_device"]
    tokens = 1 + 0.6 + 0.36 + 0.216
    assert run["tokens_per_round"] == pytest.approx(tokens)
    t = {k: run["pieces"][k]["time_lower_bound_s"] for k in ("ar_step", "draft_step", "shallow_step", "verify")}
    assert run["predicted_speedup"] == pytest.approx(
        tokens * t["ar_step"] / (3 * t["draft_step"] + t["shallow_step"] + t["verify"])
    )
    assert report["predicted_speedup"] == run["predicted_speedup"]
    # The paper's speedups (the default --paper-speedup 1.55 1.85) as acceptances (exit 1 of
    # 4 layers, draft 3: a round costs 4/4 + 3/4 AR steps under the layer-count model).
    implied = {entry["paper_speedup"]: entry for entry in run["paper_implied"]}
    for speedup in (1.55, 1.85):
        a = implied[speedup]["per_position_acceptance"]
        assert sum(a**j for j in range(4)) == pytest.approx(speedup * 1.75)
        assert implied[speedup]["predicted_speedup"] == pytest.approx(
            implied[speedup]["tokens_per_round"]
            * t["ar_step"]
            / (3 * t["draft_step"] + t["shallow_step"] + t["verify"])
        )
    assert implied[1.85]["predicted_speedup"] > implied[1.55]["predicted_speedup"]
    # Both byte bases per piece, and (--explain) where the bytes go, under each piece's
    # named scope (decode/engine/steps.py) and the layer's modules.
    scopes = {"ar_step": "ar_step/", "draft_step": "draft_step/", "shallow_step": "shallow_pass/", "verify": "verify/"}
    for name, scope in scopes.items():
        piece = run["pieces"][name]
        assert piece["bytes_accessed_per_device"] == piece["bytes_per_device"]
        assert piece["bytes_accessed_to_must_read"] == pytest.approx(
            piece["bytes_per_device"] / piece["must_read_bytes_per_device"]
        )
        where = piece["explain"]
        assert 0 < where["hbm_bytes"] <= where["counted_bytes"]
        assert where["hbm_to_must_read"] == pytest.approx(where["hbm_bytes"] / piece["must_read_bytes_per_device"])
        assert any(row["scope"].startswith(scope) for row in where["top"]), (name, where["top"])
    for piece in (ar, verify):  # the scanned program's loop body, times the layers
        engine = piece["explain"]["engine_program"]
        assert engine["hbm_bytes"] > 0 and engine["hbm_to_must_read"] > 0
    verify_scopes = [row["scope"] for row in verify["explain"]["top"]]
    assert any("/self_attn/attend/" in s for s in verify_scopes) and any("/mlp/" in s for s in verify_scopes)
    assert "explain" not in run["pieces"]["generate_ssd"]  # whole programs: memory only
    # Continuous batching's programs over the 4 slots (4 prompts per prefill, the default's
    # least): the insert and the rounds update the donated slot state in place, the rounds run
    # a while loop.
    slots = run["slots"]
    assert slots["prefill_rows"] == 4 and set(slots["pieces"]) == {"slot_prefill", "slot_insert", "slot_rounds"}
    for name in ("slot_insert", "slot_rounds"):
        memory = slots["pieces"][name]["memory_per_device"]
        assert memory["aliased"] >= run["kv_cache_bytes_per_device"]  # the cache is written in place
        assert memory["outputs"] - memory["aliased"] < run["kv_cache_bytes_per_device"] / 4  # no new cache
    assert slots["pieces"]["slot_rounds"]["while_loops"] > 0
    assert run["per_chip_peak_bytes"] >= slots["per_chip_peak_bytes"] > 0

    # --quantize int8: the decoding kernels go from float32 to int8 in the compiled programs'
    # arguments and must-read bytes, and no dequantized copy of the stacked weights is built
    # (that would add the whole stack's float bytes per device to the AR step's temporaries).
    int8_out = tmp_path / "decode_int8.json"
    argv = ["--ckpt", "random:tiny", "--compile-only", TOPOLOGY, "--batch-size", "4", "--draft-len", "3"]
    argv += ["--max-new-tokens", "16", "--acceptance", "0.6", "--no-generate", "--json", str(int8_out)]
    assert main([*argv, "--quantize", "int8"]) == 0
    int8_report = json.loads(int8_out.read_text())
    int8_run = int8_report["runs"][0]
    assert int8_report["quantization"] == "int8" and report["quantization"] is None
    int8_ar = int8_run["pieces"]["ar_step"]
    assert int8_run["param_bytes_per_device"] < 0.5 * run["param_bytes_per_device"]
    assert int8_ar["must_read_bytes_per_device"] < 0.5 * ar["must_read_bytes_per_device"]
    assert int8_ar["memory_per_device"]["arguments"] < 0.7 * ar["memory_per_device"]["arguments"]
    assert int8_ar["time_lower_bound_s"] < ar["time_lower_bound_s"]
    text = RANDOM_PRESETS["tiny"].text
    stack_per_device = (
        4 * text.num_layers * (2 * text.hidden_size**2 + 3 * text.hidden_size * text.intermediate_size) / 4
    )
    extra = int8_ar["memory_per_device"]["temporaries"] - ar["memory_per_device"]["temporaries"]
    assert extra < stack_per_device / 2, (extra, stack_per_device)


def test_layer_count_acceptance_inverts_the_round_cost():
    from decode.bench.compile_only import layer_count_acceptance

    # Exit 8 of 32, draft 5: a round costs 6 * 8/32 + 24/32 = 2.25 AR steps.
    a = layer_count_acceptance(1.55, 5, 8, 32)
    assert sum(a**j for j in range(6)) == pytest.approx(1.55 * 2.25)
    assert layer_count_acceptance(1.0 / 2.25, 5, 8, 32) == pytest.approx(0.0, abs=1e-9)  # one token a round
    assert layer_count_acceptance(2.7, 5, 8, 32) is None  # more than 6 tokens a round


def tiny_draft_checkpoint(path):
    """A 2-layer draft VLM with random:tiny's vocabulary and image tokens, saved (bf16)."""
    import jax
    import jax.numpy as jnp

    from fastvlm_jax.ckpt.checkpoint import save_checkpoint
    from fastvlm_jax.nn.model import cast_params
    from tests.tiny import tiny_config

    config = tiny_config(vocab_size=512, num_layers=2, exit_layer=1, num_kv_heads=4, image_size=32, hidden_size=64)
    save_checkpoint(path, config, cast_params(jax.jit(VLM(config).init)(jax.random.key(0)), jnp.bfloat16))
    return path


@pytest.mark.slow
def test_decode_compile_only_per_drafter_and_tree_pieces_and_speedups(tmp_path):
    """Each drafter's pieces and predicted speedup, then the imitation drafter's draft tree's,
    from one run: the AR step and the imitation drafter's pieces, which both need, compile once."""
    needs_libtpu()
    from decode.bench.cli import main

    out = tmp_path / "drafters.json"
    draft = tiny_draft_checkpoint(tmp_path / "draft")
    drafters = ["imitation", "eagle", "eagle:pool=4", f"model:{draft}"]
    assert (
        main(
            [
                "--ckpt",
                "random:tiny",
                "--compile-only",
                TOPOLOGY,
                "--batch-size",
                "4",
                "--draft-len",
                "3",
                "--max-new-tokens",
                "16",
                "--acceptance",
                "0.6",
                "--no-generate",
                "--drafter",
                *drafters,
                "--tree-nodes",
                "4",
                "--tree-width",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    run = report["runs"][0]
    assert list(run["drafters"]) == drafters and report["notes"]  # random:tiny got a fresh EAGLE head
    roles = {
        "imitation": {"draft_step", "shallow_step", "verify"},
        "eagle": {"catchup", "step", "verify"},
        "model": {"start", "step", "verify"},
    }
    ar = run["pieces"]["ar_step"]
    tokens = 1 + 0.6 + 0.36 + 0.216
    for name, drafter in run["drafters"].items():
        pieces = drafter["pieces"]
        assert set(pieces) == roles[drafter["kind"]], name
        for piece in pieces.values():
            assert piece["flops_per_device"] > 0 and piece["bytes_per_device"] > 0
            assert piece["must_read_bytes_per_device"] > 0
            assert piece["cost_counting"] in ("unrolled_twin", "straight_line")
        t = {role: p["time_lower_bound_s"] for role, p in pieces.items()}
        draft_cost = {
            "imitation": lambda: 3 * t["draft_step"] + t["shallow_step"],
            "eagle": lambda: t["catchup"] + 2 * t["step"],
            "model": lambda: t["start"] + 2 * t["step"],
        }[drafter["kind"]]()
        assert drafter["predicted_speedup"] == pytest.approx(
            tokens * ar["time_lower_bound_s"] / (draft_cost + t["verify"])
        ), name
    eagle, pooled, small = (run["drafters"][k] for k in drafters[1:])
    # Verification from the tokens runs every layer: more to read than the imitation
    # drafter's [exit, L), and the same program for both drafters that need it.
    assert eagle["pieces"]["verify"] == small["pieces"]["verify"]
    assert (
        eagle["pieces"]["verify"]["must_read_bytes_per_device"] > run["pieces"]["verify"]["must_read_bytes_per_device"]
    )
    # The catch-up pass reads the head once for 4 pairs: 4 times the step's FLOPs or so.
    assert eagle["pieces"]["catchup"]["flops_per_device"] > 2 * eagle["pieces"]["step"]["flops_per_device"]
    # 16 image tokens pooled 4 to a slot save 12 of the head's cache slots (29 + 16 + 4 = 49).
    assert (eagle["eagle_cache_slots"], pooled["eagle_cache_slots"]) == (49, 37)
    assert pooled["draft_cache_bytes_per_device"] == eagle["draft_cache_bytes_per_device"] * 37 // 49
    assert (
        pooled["pieces"]["step"]["must_read_bytes_per_device"] < eagle["pieces"]["step"]["must_read_bytes_per_device"]
    )
    # The draft VLM (2 layers of width 64, bf16) reads less per step than the full model
    # (4 layers of width 128, float32), and its start feeds two tokens.
    assert small["pieces"]["step"]["must_read_bytes_per_device"] < ar["must_read_bytes_per_device"]
    assert small["pieces"]["start"]["flops_per_device"] > small["pieces"]["step"]["flops_per_device"]
    assert small["draft_cache_bytes_per_device"] > 0 and small["draft_param_bytes_per_device"] > 0
    assert run["predicted_speedup"] == run["drafters"]["imitation"]["predicted_speedup"]

    # The imitation drafter's draft tree (--tree-nodes 4 --tree-width 2).
    tree = run["trees"]["4x2"]
    assert (tree["steps"], tree["size"]) == (2, 5)
    # The tree's cache looks 5 slots ahead: 29 + 16 + 5, one head of width 32 per chip, float32.
    assert tree["cache_slots"] == 50 and tree["kv_cache_bytes_per_device"] == 2 * 4 * 4 * 1 * 50 * 32 * 4
    pieces = tree["pieces"]
    assert set(pieces) == {"root", "step", "verify", "move"}
    for piece in pieces.values():
        assert piece["bytes_per_device"] > 0 and piece["must_read_bytes_per_device"] > 0
        assert piece["cost_counting"] == ("straight_line" if piece is pieces["move"] else "unrolled_twin")
    for role in ("root", "step", "verify"):
        assert pieces[role]["flops_per_device"] > 0, role
    # A drafting step scores 2 nodes, the root 1, through the same weights; verification
    # reads layers [1, 4) only; the move touches the path's 3 slots of 50 (read and write).
    assert pieces["step"]["flops_per_device"] > pieces["root"]["flops_per_device"]
    assert pieces["step"]["must_read_bytes_per_device"] == pieces["root"]["must_read_bytes_per_device"]
    assert pieces["verify"]["must_read_bytes_per_device"] < ar["must_read_bytes_per_device"]
    assert pieces["move"]["must_read_bytes_per_device"] == pytest.approx(2 * 3 / 50 * tree["kv_cache_bytes_per_device"])
    # Modelled acceptance: each depth reached with 1 - 0.4^2 = 0.84, 2 deep.
    tokens = 1 + 0.84 + 0.84**2
    assert tree["tokens_per_round"] == pytest.approx(tokens)
    t = {role: p["time_lower_bound_s"] for role, p in pieces.items()}
    assert tree["predicted_speedup"] == pytest.approx(
        tokens * ar["time_lower_bound_s"] / (t["root"] + 2 * t["step"] + t["verify"] + t["move"])
    )
    assert report["tree_acceptance"]["4x2"]["per_position"] == 0.6


def test_decode_compile_only_bad_drafter_is_one_line(capsys):
    needs_libtpu()
    from decode.bench.cli import main

    base = ["--ckpt", "random:tiny", "--compile-only", TOPOLOGY, "--json", "/dev/null", "--drafter"]
    for drafter, message in (
        ("medusa", "unknown --drafter 'medusa'"),
        ("eagle:pool=0", "eagle:pool=N"),
        ("model:shapes:llava_draft_160m", "vocabulary"),
    ):
        assert main([*base, "imitation", drafter]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_decode_compile_only_bad_tree_is_one_line(capsys):
    needs_libtpu()
    from decode.bench.cli import main

    assert (
        main(
            [
                "--ckpt",
                "random:tiny",
                "--compile-only",
                TOPOLOGY,
                "--json",
                "/dev/null",
                "--tree-nodes",
                "5",
                "--tree-width",
                "2",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tree-nodes") and "multiple of the tree width" in err and "\n" not in err, err


def test_decode_compile_only_too_big_exits_1_with_the_reason(tmp_path, capsys):
    needs_libtpu()
    from decode.bench.cli import main

    out = tmp_path / "decode_big.json"
    # A KV cache of 4 layers x 64 rows x 300k slots: ~20 GB per chip.
    assert (
        main(
            [
                "--ckpt",
                "random:tiny",
                "--compile-only",
                TOPOLOGY,
                "--batch-size",
                "64",
                "--max-new-tokens",
                "300000",
                "--no-generate",
                "--json",
                str(out),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: batch 64 does not fit on {TOPOLOGY}: ") and "HBM" in err[-1]
    assert json.loads(out.read_text())["fits"] is False


# --- images of no fixed size (Qwen2.5-VL: patch rows) -----------------------------------------


def _tiny_qwen_shapes():
    """A tiny Qwen2.5-VL (16 image tokens at most, 2x2 merge: 64 patches of 3*2*4*4 values) as
    compile-only ModelShapes: abstract params, no weights."""
    import jax.numpy as jnp

    from decode.bench.compile_only import ModelShapes
    from fastvlm_jax.nn.config import DraftConfig, TextConfig
    from fastvlm_jax.nn.qwen25vl import Qwen25VLConfig
    from fastvlm_jax.nn.qwen_vision import QwenVisionConfig

    config = Qwen25VLConfig(
        vision=QwenVisionConfig(
            hidden_size=16,
            depth=2,
            num_heads=2,
            intermediate_size=24,
            out_hidden_size=32,
            patch_size=4,
            window_size=16,
            fullatt_block_indexes=(1,),
        ),
        text=TextConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_layers=3,
            num_heads=2,
            num_kv_heads=2,
            qkv_bias=True,
        ),
        draft=DraftConfig(exit_layer=1),
        mrope_section=(2, 3, 3),
        max_image_tokens=16,
        image_token_id=63,
    )
    return ModelShapes(config, nn.meta.unbox(VLM(config).abstract_params()), jnp.dtype(jnp.float32), "tiny-qwen")


def test_compile_only_programs_take_patch_images_of_the_bucket_and_fixed_images_stay_pixels():
    """The programs that take images (prefill, generate, continuous batching's prefill) get a
    patch-image model's PatchImages of ShapeDtypeStructs, one patch bucket per row, the prompt
    sized by it; a fixed-size tower's pixels and prompts are what they were. Shapes and traces
    only, on 4 CPU devices (no compiler)."""
    import jax
    import jax.numpy as jnp

    from decode.bench.compile_only.programs import (
        PROMPT_TEXT_TOKENS,
        CompileOnlyError,
        abstract_images,
        load_shapes,
        make_point,
        prefill_programs,
        prompt_image_tokens,
    )
    from decode.bench.compile_only.slot_programs import slot_programs
    from fastvlm_jax.image.patches import PatchImages

    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, tensor=2), jax.devices()[:4])
    qwen = _tiny_qwen_shapes()
    patch_dim = qwen.config.vision.patch_dim
    for tokens, bucket in ((None, 16), (4, 4)):
        point = make_point(qwen, mesh, 2, 3, 8, generate=True, image_tokens=tokens)
        assert (point.image_tokens, point.prompt_len) == (bucket, bucket + PROMPT_TEXT_TOKENS)
        images = [
            point.generate_program(point.model, point.ssd_spec).args[2].pixels,
            slot_programs(point, 2)["slot_prefill"].args[1].pixels,
            prefill_programs(point)["encode_images"].args[1],
        ]
        for image in images:
            assert isinstance(image, PatchImages)
            assert (image.patches.shape, image.patches.dtype) == ((2, 4 * bucket, patch_dim), jnp.float32)
            assert (image.grid.shape, image.grid.dtype) == ((2, 3), jnp.int32)
            # The rows are sharded over the batch like pixels and token ids.
            assert image.patches.sharding.spec[0] == image.grid.sharding.spec[0] == ("data", "fsdp")
        for name, program in prefill_programs(point).items() if tokens else ():
            out = jax.eval_shape(program.fn, *program.args)
            if name == "encode_images":
                assert out.shape == (2, bucket, qwen.config.text.hidden_size)
            else:
                assert out.cache.keys.shape[3] == point.cache.slots
    for bad in (0, 17):
        with pytest.raises(CompileOnlyError, match="--image-tokens"):
            prompt_image_tokens(qwen.config, bad)

    # A fixed-size tower (random:tiny: 32x32 pixels, 16 image tokens): [batch, H, W, 3] pixels.
    tiny = load_shapes("random:tiny")
    point = make_point(tiny, mesh, 2, 3, 8, generate=True)
    assert (point.image_tokens, point.prompt_len) == (16, 16 + PROMPT_TEXT_TOKENS)
    pixels = point.generate_program(point.model, point.ssd_spec).args[2].pixels
    expected = jax.ShapeDtypeStruct(
        (2, 32, 32, 3),
        jnp.float32,
        sharding=sharding.logical_to_sharding(("batch", None, None, None), (2, 32, 32, 3), mesh),
    )
    assert pixels == expected == abstract_images(tiny.config, 2, mesh)
    assert slot_programs(point, 2)["slot_prefill"].args[1].pixels == expected
    assert make_point(tiny, mesh, 2, 3, 8, generate=False, image_tokens=16).prompt_len == point.prompt_len
    with pytest.raises(CompileOnlyError, match="fixed size"):
        prompt_image_tokens(tiny.config, 8)
