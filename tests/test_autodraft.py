"""--draft-len auto: the choice rule, and decode.run with it (greedy output == AR)."""

import json

import numpy as np
import pytest

from decode.autodraft import AutoDraft, AutoDraftConfig


def test_expected_tokens_follow_the_observed_acceptance():
    auto = AutoDraft(AutoDraftConfig(choices=(0, 2, 4), prior_rounds=0.0))
    # 10 rounds of draft length 4: 8 accepted >= 1, 6 >= 2, 3 >= 3, 1 >= 4.
    auto.observe([10, 10, 10, 10], [8, 6, 3, 1])
    np.testing.assert_allclose(auto.accept_at_least(), [0.8, 0.6, 0.3, 0.1])
    assert auto.expected_tokens(0) == 1.0
    assert auto.expected_tokens(2) == pytest.approx(2.4)
    assert auto.expected_tokens(4) == pytest.approx(2.8)


def test_choice_maximizes_tokens_per_second_and_falls_back_to_ar():
    auto = AutoDraft(AutoDraftConfig(choices=(0, 2, 4), prior_rounds=0.0))
    auto.observe([10, 10, 10, 10], [8, 6, 3, 1])
    # Cheap drafts: the longest chain wins (2.8 / 1.5 > 2.4 / 1.3 > 1 / 1).
    auto.round_seconds[("cheap",)] = {0: 1.0, 2: 1.3, 4: 1.5}
    assert auto.choose(("cheap",)) == 4
    # Costly drafts (e.g. a large batch on a CPU): 2.4 / 2.6 < 1 / 1, so plain AR rounds.
    auto.round_seconds[("costly",)] = {0: 1.0, 2: 2.6, 4: 3.5}
    assert auto.choose(("costly",)) == 0
    assert auto.report()["round_ms"]["costly"]["0"] == 1000.0


def test_estimates_are_non_increasing_and_shrunk_to_the_prior_where_unseen():
    auto = AutoDraft(AutoDraftConfig(choices=(0, 6), prior_acceptance=0.5, prior_rounds=2.0))
    auto.observe([4, 4], [4, 4])  # draft length 2 only, everything accepted
    estimate = auto.accept_at_least()
    assert np.all(np.diff(estimate) <= 0)
    assert estimate[0] > 0.8 and estimate[5] <= 0.5 ** 3


def test_run_cli_auto_draft_len_equals_ar_and_reports_choices(tmp_path):
    from decode import run
    from tests.run_fixtures import make_tiny_checkpoint, write_image

    ckpt = str(make_tiny_checkpoint(tmp_path / "ckpt"))
    images = [str(write_image(tmp_path / "in" / f"{i}.png", seed=i)) for i in range(4)]
    common = ["--ckpt", ckpt, "--images", *images, "--batch-size", "2", "--max-new-tokens", "8", "--no-progress"]
    assert run.main([*common, "--out", str(tmp_path / "ar.jsonl"), "--mode", "ar"]) == run.EXIT_OK
    assert run.main([*common, "--out", str(tmp_path / "auto.jsonl"), "--draft-len", "auto", "--auto-choices",
                     "0", "2", "--stats", str(tmp_path / "stats.json")]) == run.EXIT_OK

    def token_ids(name):
        lines = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        return {line["image"]: line["token_ids"] for line in lines}

    assert token_ids("auto.jsonl") == token_ids("ar.jsonl")
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["draft_len"] == "auto"
    assert len(stats["draft_len_per_batch"]) == 2 and set(stats["draft_len_per_batch"]) <= {0, 2}
    report = stats["auto_draft"]
    (costs,) = report["round_ms"].values()  # one program shape: measured once
    assert report["choices"] == [0, 2] and set(costs) == {"0", "2"} and all(ms > 0 for ms in costs.values())


@pytest.mark.parametrize("flags,message", [
    (["--draft-len", "auto", "--tree-nodes", "4"], "does not combine"),
    (["--auto-choices", "0", "2"], "needs --draft-len auto"),
    (["--draft-len", "auto", "--auto-choices", "2", "2"], "distinct"),
])
def test_run_cli_rejects_bad_auto_flags(tmp_path, capsys, flags, message):
    from decode import run

    argv = ["--ckpt", str(tmp_path / "no-ckpt"), "--images", str(tmp_path / "no.png"),
            "--out", str(tmp_path / "out.jsonl"), *flags]
    assert run.main(argv) == run.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_bench_cli_auto_draft_len(tmp_path):
    from decode.bench import cli

    out = tmp_path / "bench.json"
    assert cli.main(["--ckpt", "random:tiny", "--draft-len", "2", "auto", "--auto-choices", "0", "3",
                     "--max-new-tokens", "8", "--repeats", "1", "--no-plots", "--json", str(out)]) == 0
    static, auto = json.loads(out.read_text())["runs"]
    assert static["draft_len"] == 2 and auto["policy"]["name"] == "auto"
    assert auto["auto_draft"]["chosen"] in (0, 3) and auto["draft_len"] == auto["auto_draft"]["chosen"]
    assert auto["identical"] is True
