"""--draft-len auto: choices and their parsing, the choice rule, and decode.run / decode.bench with
it (greedy output == AR)."""

import json

import numpy as np
import pytest

from decode.engine.autodraft import AutoDraft, AutoDraftConfig, choice_label, parse_choice
from decode.engine.tree import TreeShape


def test_expected_tokens_follow_the_observed_acceptance():
    auto = AutoDraft(AutoDraftConfig(choices=(0, 2, 4), prior_rounds=0.0))
    # 10 rounds of draft length 4: 8 accepted >= 1, 6 >= 2, 3 >= 3, 1 >= 4.
    auto.observe(4, [10, 10, 10, 10], [8, 6, 3, 1])
    np.testing.assert_allclose(auto.accept_at_least(), [0.8, 0.6, 0.3, 0.1])
    assert auto.expected_tokens(0) == 1.0
    assert auto.expected_tokens(2) == pytest.approx(2.4)
    assert auto.expected_tokens(4) == pytest.approx(2.8)


def test_choice_maximizes_tokens_per_second_and_falls_back_to_ar():
    auto = AutoDraft(AutoDraftConfig(choices=(0, 2, 4), prior_rounds=0.0))
    auto.observe(4, [10, 10, 10, 10], [8, 6, 3, 1])
    # Cheap drafts: the longest chain wins (2.8 / 1.5 > 2.4 / 1.3 > 1 / 1).
    auto.round_seconds[("cheap",)] = {0: 1.0, 2: 1.3, 4: 1.5}
    assert auto.choose(("cheap",)) == 4
    # Costly drafts (e.g. a large batch on a CPU): 2.4 / 2.6 < 1 / 1, so plain AR rounds.
    auto.round_seconds[("costly",)] = {0: 1.0, 2: 2.6, 4: 3.5}
    assert auto.choose(("costly",)) == 0
    assert auto.report()["round_ms"]["costly"]["0"] == 1000.0


def test_estimates_are_non_increasing_and_shrunk_to_the_prior_where_unseen():
    auto = AutoDraft(AutoDraftConfig(choices=(0, 6), prior_acceptance=0.5, prior_rounds=2.0))
    auto.observe(2, [4, 4], [4, 4])  # draft length 2 only, everything accepted
    estimate = auto.accept_at_least()
    assert np.all(np.diff(estimate) <= 0)
    assert estimate[0] > 0.8 and estimate[5] <= 0.5**3


@pytest.mark.slow
def test_run_cli_auto_draft_len_equals_ar_and_reports_choices(tmp_path):
    from decode import run
    from tests.run_fixtures import make_tiny_checkpoint, write_image

    ckpt = str(make_tiny_checkpoint(tmp_path / "ckpt"))
    images = [str(write_image(tmp_path / "in" / f"{i}.png", seed=i)) for i in range(4)]
    common = ["--ckpt", ckpt, "--images", *images, "--batch-size", "2", "--max-new-tokens", "8", "--no-progress"]
    assert run.main([*common, "--out", str(tmp_path / "ar.jsonl"), "--mode", "ar"]) == run.EXIT_OK
    assert (
        run.main(
            [
                *common,
                "--out",
                str(tmp_path / "auto.jsonl"),
                "--draft-len",
                "auto",
                "--auto-choices",
                "0",
                "2",
                "--stats",
                str(tmp_path / "stats.json"),
            ]
        )
        == run.EXIT_OK
    )

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


def test_parse_choice_reads_chains_and_trees():
    assert parse_choice("0") == 0 and parse_choice("6") == 6
    assert parse_choice("tree:16x2") == TreeShape(nodes=16, width=2)
    assert choice_label(TreeShape(nodes=16, width=2)) == "tree:16x2" and choice_label(4) == 4


@pytest.mark.parametrize(
    "text,message",
    [
        ("four", "expected a draft length or tree:NODESxWIDTH"),
        ("tree:16", "expected tree:NODESxWIDTH"),
        ("tree:ax2", "expected tree:NODESxWIDTH"),
        ("tree:7x2", "multiple of the tree width"),
        ("tree:0x2", "nodes >= 1"),
    ],
)
def test_parse_choice_rejects_bad_ones(text, message):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_choice(text)


def test_tree_estimate_is_its_own_and_counts_every_round():
    tree = TreeShape(nodes=8, width=2)  # 4 steps deep
    auto = AutoDraft(AutoDraftConfig(choices=(0, 2, tree), prior_rounds=0.0))
    # 10 rounds; the dynamic tree reached depths 1..4 in 10, 9, 5, 2 of them and its accepted
    # path was >= 1..4 deep in 9, 7, 4, 1: P(accepted >= j + 1) is over all 10 rounds.
    auto.observe(tree, [10, 9, 5, 2], [9, 7, 4, 1])
    np.testing.assert_allclose(auto.accept_at_least(tree), [0.9, 0.7, 0.4, 0.1])
    assert auto.expected_tokens(tree) == pytest.approx(3.1)
    assert auto.attempts.sum() == 0  # the chains' counters are untouched
    auto.observe(2, [10, 10], [5, 2])
    np.testing.assert_allclose(auto.accept_at_least(tree), [0.9, 0.7, 0.4, 0.1])


def test_unobserved_tree_starts_from_the_chains_estimate():
    tree = TreeShape(nodes=12, width=2)  # 6 steps: deeper than any chain choice
    auto = AutoDraft(AutoDraftConfig(choices=(0, 2, tree), prior_acceptance=0.5, prior_rounds=2.0))
    auto.observe(2, [100, 100], [80, 60])
    chains = auto.accept_at_least()
    assert len(chains) == 6 and chains[1] == pytest.approx(60.5 / 102)
    np.testing.assert_allclose(auto.accept_at_least(tree), chains)
    auto.observe(tree, [4, 4, 4, 4, 4, 4], [4, 4, 4, 4, 4, 4])  # a few rounds pull it up
    assert np.all(auto.accept_at_least(tree) > chains)


def test_choice_between_chains_and_a_tree_follows_tokens_per_second():
    tree = TreeShape(nodes=8, width=2)
    auto = AutoDraft(AutoDraftConfig(choices=(0, 2, 4, tree), prior_rounds=0.0))
    auto.observe(4, [10, 10, 10, 10], [8, 6, 3, 1])  # chain of 4: 2.8 tokens per round
    auto.observe(tree, [10, 9, 5, 2], [9, 7, 4, 1])  # the tree: 3.1
    # A cheap tree: 3.1 / 1.6 beats the chain's 2.8 / 1.5 (and 2.4 / 1.3, 1 / 1).
    auto.round_seconds[("cheap tree",)] = {0: 1.0, 2: 1.3, 4: 1.5, tree: 1.6}
    assert auto.choose(("cheap tree",)) == tree
    # A costly one (e.g. many nodes per verification on a slow device): 3.1 / 2.0 loses.
    auto.round_seconds[("costly tree",)] = {0: 1.0, 2: 1.3, 4: 1.5, tree: 2.0}
    assert auto.choose(("costly tree",)) == 4
    report = auto.report()
    assert report["choices"] == [0, 2, 4, "tree:8x2"]
    assert report["round_ms"]["costly tree"]["tree:8x2"] == 2000.0
    assert report["expected_tokens_per_s"]["cheap tree"]["tree:8x2"] == pytest.approx(3.1 / 1.6)
    assert report["tree_accept_at_least"]["tree:8x2"] == pytest.approx([0.9, 0.7, 0.4, 0.1])


@pytest.mark.slow
def test_run_cli_auto_chooses_among_chains_and_trees(tmp_path):
    from decode import run
    from tests.run_fixtures import make_tiny_checkpoint, write_image

    ckpt = str(make_tiny_checkpoint(tmp_path / "ckpt"))
    images = [str(write_image(tmp_path / "in" / f"{i}.png", seed=i)) for i in range(4)]
    common = ["--ckpt", ckpt, "--images", *images, "--batch-size", "2", "--max-new-tokens", "8", "--no-progress"]
    assert run.main([*common, "--out", str(tmp_path / "ar.jsonl"), "--mode", "ar"]) == run.EXIT_OK
    # The choice itself, and a tree as the only choice (so a tree surely decodes the batches).
    for name, choices in (("mixed", ["0", "2", "tree:4x2"]), ("tree", ["tree:4x2"])):
        assert (
            run.main(
                [
                    *common,
                    "--out",
                    str(tmp_path / f"{name}.jsonl"),
                    "--draft-len",
                    "auto",
                    "--auto-choices",
                    *choices,
                    "--stats",
                    str(tmp_path / f"{name}.json"),
                ]
            )
            == run.EXIT_OK
        )

    def token_ids(name):
        lines = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        return {line["image"]: line["token_ids"] for line in lines}

    assert token_ids("mixed.jsonl") == token_ids("ar.jsonl") == token_ids("tree.jsonl")
    mixed = json.loads((tmp_path / "mixed.json").read_text())
    assert len(mixed["draft_len_per_batch"]) == 2 and set(mixed["draft_len_per_batch"]) <= {0, 2, "tree:4x2"}
    report = mixed["auto_draft"]
    (costs,) = report["round_ms"].values()
    assert report["choices"] == [0, 2, "tree:4x2"] and set(costs) == {"0", "2", "tree:4x2"}
    assert (
        set(report["expected_tokens_per_round"]) == set(costs) and len(report["tree_accept_at_least"]["tree:4x2"]) == 2
    )
    tree = json.loads((tmp_path / "tree.json").read_text())
    assert tree["draft_len_per_batch"] == ["tree:4x2", "tree:4x2"]
    assert tree["nodes_verified_per_call"] == 5  # 4 nodes and the root: the tree's program ran


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--draft-len", "auto", "--tree-nodes", "4"], "does not combine"),
        (["--draft-len", "auto", "--auto-choices", "0", "tree:5x2"], "multiple of the tree width"),
        (["--draft-len", "auto", "--auto-choices", "0", "tree:4x2", "--drafter", "eagle"], "imitation drafter only"),
        (["--auto-choices", "0", "2"], "needs --draft-len auto"),
        (["--draft-len", "auto", "--auto-choices", "2", "2"], "distinct"),
    ],
)
def test_run_cli_rejects_bad_auto_flags(tmp_path, capsys, flags, message):
    from decode import run

    argv = [
        "--ckpt",
        str(tmp_path / "no-ckpt"),
        "--images",
        str(tmp_path / "no.png"),
        "--out",
        str(tmp_path / "out.jsonl"),
        *flags,
    ]
    assert run.main(argv) == run.EXIT_USAGE
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_bench_cli_auto_draft_len(tmp_path):
    from decode.bench import cli

    out = tmp_path / "bench.json"
    assert (
        cli.main(
            [
                "--ckpt",
                "random:tiny",
                "--draft-len",
                "2",
                "auto",
                "--auto-choices",
                "0",
                "tree:4x2",
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
    static, auto = json.loads(out.read_text())["runs"]
    assert static["draft_len"] == 2 and auto["policy"]["name"] == "auto"
    chosen = auto["auto_draft"]["chosen"]
    assert set(auto["auto_draft"]["round_ms"].popitem()[1]) == {"0", "tree:4x2"}
    # The timed run is the chosen setting's: AR's program, or the 4-node tree.
    assert (auto["tree_nodes"], auto["draft_len"]) == ((4, 2) if chosen == "tree:4x2" else (0, 0))
    assert auto["identical"] is True
