"""Smoke tests of the benchmark CLIs (no timing thresholds: they only check that the sweep
runs and reports what it promises)."""

import json

import pytest

from decode import bench, bench_peers


def test_bench_sweep_writes_json_keys_and_plots(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--ckpt", "random:tiny", "--draft-len", "1", "2", "--max-new-tokens", "8",
                       "--repeats", "1", "--cost-model", "--cost-iters", "2", "--context-acceptance",
                       "--replay-rows", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("device", "memory", "runs", "speedup", "identical", "mean_accepted_length",
                "acceptance_rate"):
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
    rep = bench.Replay(prompt_len=10, num_tokens=np.array([8]), ar_tokens=np.zeros((1, 8), int),
                       full_top1=np.zeros((1, 8), int), draft_top1=np.where(agree, 0, 1)[:, :8],
                       draft_conf=np.array([[1, 1, 1, 1, 1, 0.2, 1, 1]]))
    # static gamma 4: round 1 drafts tokens 1-4 (accepts 1, 2; rejects 3; emits 3 tokens),
    # round 2 drafts 4-7 (accepts 4, 5; rejects 6), round 3 drafts token 7 (accepted, ends).
    rounds = bench.simulate_rounds(rep, DraftPolicy(draft_len=4))
    assert [(ctx, acc) for _, ctx, _, acc in rounds] == [(11, 2), (14, 2), (17, 1)]
    # context schedule 1, 2, ...: one draft per round while fewer than 4 tokens exist.
    rounds = bench.simulate_rounds(rep, DraftPolicy(draft_len=4, schedule="context", start_len=1, grow_every=4))
    assert [(p, acc) for _, _, p, acc in rounds] == [(1, 1), (1, 0), (2, 2), (2, 1)]
    # confidence: token 5's draft confidence (0.2) stops the round that reaches it in slot > 0
    # (a slot past the last token counts as proposed, its acceptance unknowable).
    rounds = bench.simulate_rounds(rep, DraftPolicy(draft_len=4, min_confidence=0.5))
    assert [(p, acc) for _, _, p, acc in rounds] == [(3, 2), (1, 1), (1, 0), (2, 1)]
    by_context = bench.rounds_by_context(rounds, 4, 10)
    assert sum(by_context["rounds"]) == 4


def test_bench_peers_tiny_reports_token_equality(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "peers.json"
    assert bench_peers.main(["--size", "tiny", "--exit-layer", "2", "--draft-len", "3", "--batch-size", "1",
                             "--max-new-tokens", "8", "--prompt-len", "6", "--repeats", "1",
                             "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    systems = {r["system"] for r in report["results"]}
    assert systems == {"hf_ar", "hf_early_exit", "ours_ar", "ours_ssd"}
    assert report["identical"]["1"] == {name: True for name in systems}
    assert "ours_ar_over_hf_ar_b1" in report["ratios"]
    assert "ours_ssd_over_hf_early_exit_b1" in report["ratios"]
    assert report["plots"] and all(p.endswith(".png") for p in report["plots"])
