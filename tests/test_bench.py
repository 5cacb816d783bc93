"""Smoke tests of the benchmark CLIs (no timing thresholds: they only check that the sweep
runs and reports what it promises)."""

import json
import subprocess
import sys

import pytest

from decode.bench import cli, peers, replay


@pytest.mark.slow
def test_bench_sweep_writes_json_keys_and_plots(tmp_path):
    out = tmp_path / "bench.json"
    assert (
        cli.main(
            [
                "--ckpt",
                "random:tiny",
                "--draft-len",
                "1",
                "2",
                "--max-new-tokens",
                "8",
                "--repeats",
                "1",
                "--cost-model",
                "--cost-iters",
                "2",
                "--context-acceptance",
                "--replay-rows",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    for key in ("device", "memory", "runs", "speedup", "identical", "mean_accepted_length", "acceptance_rate"):
        assert key in report, key
    assert report["ar"]["tokens_per_s"] > 0 and report["ssd"]["tokens_per_s"] > 0
    assert [r["draft_len"] for r in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert run["identical"] is True
        assert len(run["acceptance_per_position"]) == run["draft_len"]
        assert run["ssd"]["latency_ms_per_token"] > 0
        assert run["cost"]["ideal_speedup"] > 0
        assert run["cost"]["t_round_ms"] > 0 and run["cost"]["round_over_parts"] > 0
        # The host-side replay of the greedy rounds reproduces the engine's round count.
        assert run["replay"]["matches_engine"], run["replay"]
    context = report["context_acceptance"][str(report["exit_layer"])]
    assert context["full_matches_ar"] == 1.0
    assert len(context["bucket_start"]) == len(context["agreement"]) > 0
    assert report["plots"], "no plot written"
    for path in report["plots"]:
        assert path.endswith(".png")
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_replayed_rounds_follow_the_policies():
    import numpy as np

    from decode.engine import DraftPolicy

    # One row of 8 tokens; the draft agrees with the full model except at tokens 3 and 6.
    agree = np.array([[True, True, True, False, True, True, False, True]])
    rep = replay.Replay(
        prompt_len=10,
        num_tokens=np.array([8]),
        ar_tokens=np.zeros((1, 8), int),
        full_top1=np.zeros((1, 8), int),
        draft_top1=np.where(agree, 0, 1)[:, :8],
        draft_conf=np.array([[1, 1, 1, 1, 1, 0.2, 1, 1]]),
    )
    # static draft_len 4: round 1 drafts tokens 1-4 (accepts 1, 2; rejects 3; emits 3 tokens),
    # round 2 drafts 4-7 (accepts 4, 5; rejects 6), round 3 drafts token 7 (accepted, ends).
    rounds = replay.simulate_rounds(rep, DraftPolicy(draft_len=4))
    assert [(ctx, acc) for _, ctx, _, acc in rounds] == [(11, 2), (14, 2), (17, 1)]
    # context schedule 1, 2, ...: one draft per round while fewer than 4 tokens exist.
    rounds = replay.simulate_rounds(rep, DraftPolicy(draft_len=4, schedule="context", start_len=1, grow_every=4))
    assert [(p, acc) for _, _, p, acc in rounds] == [(1, 1), (1, 0), (2, 2), (2, 1)]
    # confidence: token 5's draft confidence (0.2) stops the round that reaches it in slot > 0
    # (a slot past the last token counts as proposed, its acceptance unknowable).
    rounds = replay.simulate_rounds(rep, DraftPolicy(draft_len=4, min_confidence=0.5))
    assert [(p, acc) for _, _, p, acc in rounds] == [(3, 2), (1, 1), (1, 0), (2, 1)]
    by_context = replay.rounds_by_context(rounds, 4, 10)
    assert sum(by_context["rounds"]) == 4


@pytest.mark.slow
def test_bench_peers_tiny_reports_token_equality(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "peers.json"
    assert (
        peers.main(
            [
                "--size",
                "tiny",
                "--exit-layer",
                "2",
                "--draft-len",
                "3",
                "--batch-size",
                "1",
                "--max-new-tokens",
                "8",
                "--prompt-len",
                "6",
                "--repeats",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    systems = {r["system"] for r in report["results"]}
    assert systems == {"hf_ar", "hf_early_exit", "ours_ar", "ours_ssd"}
    assert report["identical"]["1"] == {name: True for name in systems}
    assert "ours_ar_over_hf_ar_b1" in report["ratios"]
    assert "ours_ssd_over_hf_early_exit_b1" in report["ratios"]
    assert report["plots"] and all(p.endswith(".png") for p in report["plots"])


def test_bench_package_runs_as_a_module_without_torch_or_matplotlib():
    # `python -m decode.bench` keeps the flags that README/BENCHMARKS commands use, and
    # importing the package (peers and plots included) pulls in neither torch,
    # transformers nor matplotlib: only running peers / drawing plots does.
    code = (
        "import sys, runpy\n"
        "import decode.bench.cli, decode.bench.peers, decode.bench.plots\n"
        "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))\n"
        "sys.argv = ['decode.bench', '--help']\n"
        "runpy.run_module('decode.bench', run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, usage = out.stdout.split("\n", 1)
    assert first == "[]", first
    for flag in (
        "--ckpt",
        "--images",
        "--prompt",
        "--batch-size",
        "--exit-layer",
        "--draft-len",
        "--policy",
        "--min-confidence",
        "--draft-schedule",
        "--confidence-threshold",
        "--start-len",
        "--grow-every",
        "--max-new-tokens",
        "--repeats",
        "--prompt-sets",
        "--temperature",
        "--seed",
        "--dtype",
        "--cost-model",
        "--cost-iters",
        "--layer-scaling",
        "--context-acceptance",
        "--replay-rows",
        "--context-bucket",
        "--no-plots",
        "--json",
    ):
        assert flag in usage, flag


@pytest.mark.parametrize("mode", ["ar", "ssd"])
def test_prefill_and_rounds_reproduce_generate(mode):
    # The engine's public prefill / decode_round (what the cost model times) are the two
    # phases of generate: running rounds until every row is done gives its tokens and counters.
    import jax
    import jax.numpy as jnp
    import numpy as np

    from decode import engine
    from decode.bench.models import load_bench_model, make_prompts
    from fastvlm_jax.nn.model import VLM

    bench = load_bench_model("random:tiny")
    model = VLM(bench.config)
    prompts = make_prompts(bench, 2, [], None, seed=0)
    spec = engine.DecodeSpec(mode, capacity=8, eos_ids=(), policy=engine.DraftPolicy(draft_len=3))
    want = engine.generate(model, bench.params, prompts, spec, 6)

    @jax.jit
    def rounds(params):
        state = engine.prefill(model, params, prompts, spec, 6)
        return jax.lax.while_loop(
            lambda s: jnp.any(~s.done), lambda s: engine.decode_round(model, params, spec, s, 6), state
        )

    got = rounds(bench.params)
    for field in ("tokens", "num_tokens"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    for field in ("rounds", "drafted", "accepted", "position_attempts", "position_accepts"):
        np.testing.assert_array_equal(getattr(got.stats, field), getattr(want.stats, field), err_msg=field)


def test_bench_batching_compares_static_and_continuous_on_one_workload(tmp_path):
    """decode.bench --batching static continuous: every (batching, mode) pair timed on the same
    prompts, the same greedy tokens from all four, images/s from the pass times."""
    from tests.run_fixtures import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "batching.json"
    argv = ["--ckpt", str(ckpt), "--batching", "static", "continuous", "--batch-size", "2"]
    argv += ["--num-images", "5", "--max-new-tokens", "6", "--draft-len", "3", "--repeats", "1", "--json", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert [run["batch_size"] for run in report["runs"]] == [2]
    for run in report["runs"]:
        assert run["identical"] is True and run["num_images"] == 5
        for batching in ("static", "continuous"):
            for mode in ("ar", "ssd"):
                entry = run[batching][mode]
                assert entry["images_per_s"] == pytest.approx([5 / s for s in entry["seconds"]])
                assert 0 < entry["slot_utilization"] <= 1
        assert run["continuous"]["ssd"]["inserts"] == 5
        assert run["static"]["ar"]["tokens"] == run["continuous"]["ssd"]["tokens"]


@pytest.mark.slow
def test_bench_compares_the_three_drafters(tmp_path):
    """decode.bench --drafter imitation eagle model:CKPT: one run per drafter on the same
    model and prompts, each reproducing AR's tokens, each with its own memory figures."""
    from tests.run_fixtures import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "main", eagle=True)
    draft = make_tiny_checkpoint(tmp_path / "draft", num_layers=2, exit_layer=1, seed=1)
    out = tmp_path / "bench.json"
    assert (
        cli.main(
            [
                "--ckpt",
                str(ckpt),
                "--drafter",
                "imitation",
                "eagle",
                f"model:{draft}",
                "--batch-size",
                "2",
                "--draft-len",
                "3",
                "--max-new-tokens",
                "8",
                "--repeats",
                "1",
                "--no-plots",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    runs = json.loads(out.read_text())["runs"]
    assert [r["drafter"] for r in runs] == ["imitation", "eagle", f"model:{draft}"]
    for run in runs:
        assert run["identical"] is True, run["drafter"]
        assert run["ssd"]["tokens_per_s"] > 0 and len(run["acceptance_per_position"]) == 3
    draft_bytes = [r["memory"]["draft_params_bytes"] for r in runs]
    assert len(set(draft_bytes)) == 3, draft_bytes  # three different drafters' own params

    from decode.bench import drafter_cost

    cost = tmp_path / "cost.json"
    assert (
        drafter_cost.main(
            [
                "--ckpt",
                str(ckpt),
                "--drafter",
                "eagle",
                f"model:{draft}",
                "--iters",
                "2",
                "--repeats",
                "1",
                "--max-new-tokens",
                "8",
                "--json",
                str(cost),
            ]
        )
        == 0
    )
    rows = json.loads(cost.read_text())["results"]
    assert [r["drafter"] for r in rows] == ["eagle", f"model:{draft}"]
    for row in rows:
        assert row["draft_step_ms_median"] > 0 and row["round_start_ms_median"] > 0
    # The draft model keeps a cache of all its layers, the EAGLE head of its one layer.
    assert rows[1]["draft_cache_bytes"] > rows[0]["draft_cache_bytes"] > 0


def test_bench_rejects_an_unknown_drafter(capsys):
    with pytest.raises(SystemExit, match="unknown --drafter"):
        cli.main(["--ckpt", "random:tiny", "--drafter", "medusa", "--json", "x.json"])
