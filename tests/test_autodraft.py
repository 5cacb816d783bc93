"""--draft-len auto: choices and their parsing, the choice rule, and decode.run / decode.bench with
it (greedy output == AR)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate
from decode.engine.autodraft import AutoDraft, AutoDraftConfig, choice_label, parse_choice
from decode.engine.sampling import SamplingConfig
from decode.engine.tree import TreeShape
from tests.test_decode import _near_identity_deep_layers
from tests.test_sampling import PROMPT, _chi_square, _exact_joint


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
def test_auto_draft_len_samples_the_exact_distribution(tiny):
    """Sampling under --draft-len auto draws from the full model's distribution.

    Many batch-1 batches, each calibrated afresh (AutoDraft.calibrate) then decoded with its
    own key, as decode.run does the first batch of a shape; fixed costs per round make the
    choice a plain function of the calibration's acceptance: a draft of 1 where it was
    accepted, else AR rounds. Had the calibration sampled with the batch's own key, the
    chain would be chosen exactly where its draft of that very key is accepted, and the
    output leans to the draft's tokens (p ~ 1e-10 here; 2e-156 over 40,000 calls in the
    review that found it)."""
    model, params, _ = tiny
    # Stronger deep layers than the fixture's: the draft is further from the full model, so
    # whether a draft is accepted says more about the token drawn.
    config = model.config
    params = _near_identity_deep_layers(params, config, 2.0)
    steps, sampling = 2, SamplingConfig(temperature=1.0)
    specs = {
        0: DecodeSpec("ar", capacity=steps, sampling=sampling, eos_ids=()),
        1: DecodeSpec("ssd", capacity=steps, sampling=sampling, eos_ids=(), policy=DraftPolicy(draft_len=1)),
    }
    seconds_per_round = {0: 1.0, 1: 1.5}  # a draft pays when accepted: 2 tokens / 1.5 > 1 / 1
    prompts = Prompts(jnp.asarray([PROMPT], jnp.int32), jnp.asarray([len(PROMPT)], jnp.int32))

    def decode(choice, key):
        return jax.device_get(generate(model, params, prompts, specs[choice], steps, key))

    samples, chosen = [], []
    for seed in range(600):
        rng = jax.random.key(seed)
        auto = AutoDraft(AutoDraftConfig(choices=(0, 1), prior_rounds=0.0))
        runs = {}

        def run(choice, full, key):
            if not full:
                return 0.0, None  # no prefill time to take off
            if choice not in runs:  # the same key gives the same run: decode it once
                runs[choice] = decode(choice, key)
            out = runs[choice]
            return seconds_per_round[choice] * int(np.max(out.rounds)), out

        auto.calibrate(("batch",), run, rng)
        choice = auto.choose(("batch",))
        chosen.append(choice)
        samples.append(np.asarray(decode(choice, rng).tokens)[0, :steps])
    assert 0.2 < np.mean(chosen) < 0.8, "both choices should be frequent"
    pvalue, impossible = _chi_square(np.stack(samples), _exact_joint((model, params, {}), steps, sampling))
    print(f"--draft-len auto, {len(samples)} batches: p = {pvalue:.3g}")
    assert impossible == 0 and pvalue > 1e-3, (
        f"auto draft length samples differ from the exact distribution: p = {pvalue:.3g}"
    )


def test_calibration_samples_with_a_key_the_batch_decode_never_uses(tmp_path, monkeypatch):
    """Captioner (decode.run) with --draft-len auto and sampling: every calibration run gets
    a key that is neither the batch's nor one that generate splits from it (with JAX's
    threefry, split(key, n)[i] is fold_in(key, i))."""
    from decode.engine import DecodeOutput, RoundStats
    from decode.engine import captioner as captioner_lib
    from decode.engine.captioner import Captioner, GenerationOptions
    from tests.run_fixtures import make_tiny_checkpoint

    keys = []

    def recording_generate(model, params, prompts, spec, budget, rng, draft_params=None):
        keys.append(jax.random.key_data(rng).tolist())
        batch = prompts.input_ids.shape[0]
        stats = RoundStats.zeros(batch, spec.draft_depth).replace(rounds=jnp.ones((batch,), jnp.int32))
        return DecodeOutput(jnp.zeros((batch, spec.capacity), jnp.int32), jnp.ones((batch,), jnp.int32), stats)

    monkeypatch.setattr(captioner_lib, "generate", recording_generate)  # no compile: only the keys matter
    captioner = Captioner(make_tiny_checkpoint(tmp_path / "ckpt"), batch_size=2)
    size = captioner.config.vision.image_size
    options = GenerationOptions(
        max_new_tokens=4, sampling=SamplingConfig(temperature=1.0), auto_draft=AutoDraftConfig(choices=(0, 2))
    )
    rng = jax.random.key(7)
    captioner.generate_batch(np.zeros((2, size, size, 3), np.float32), [captioner.prompt_ids()] * 2, options, rng)
    calibration, decoded = keys[:8], keys[-1]  # 4 runs of each choice, (a warm-up,) the batch
    assert decoded == jax.random.key_data(rng).tolist()
    used = [decoded] + [jax.random.key_data(k).tolist() for n in (2, 3) for k in jax.random.split(rng, n)]
    assert all(key not in used for key in calibration), (calibration, used)


@pytest.mark.slow
def test_run_cli_auto_draft_len_equals_ar_and_reports_choices(tmp_path):
    from decode import run
    from tests.run_fixtures import make_tiny_checkpoint, write_image

    ckpt = str(make_tiny_checkpoint(tmp_path / "ckpt"))
    images = [str(write_image(tmp_path / "in" / f"{i}.png", seed=i)) for i in range(4)]
    common = ["--ckpt", ckpt, "--images", *images, "--batch-size", "2", "--max-new-tokens", "8", "--no-progress"]
    assert run.main([*common, "--out", str(tmp_path / "ar.jsonl"), "--mode", "ar"]) == run.EXIT_OK
    auto = ["--draft-len", "auto", "--auto-choices", "0", "2"]
    static = ["--batching", "static", "--out", str(tmp_path / "auto.jsonl"), "--stats", str(tmp_path / "stats.json")]
    assert run.main([*common, *auto, *static]) == run.EXIT_OK
    # Continuous batching chooses between calls of the rounds, among the chains (0, AR, is
    # static batching's only).
    continuous = ["--batching", "continuous", "--out", str(tmp_path / "slots.jsonl")]
    assert run.main([*common, *auto, *continuous, "--stats", str(tmp_path / "slots.json")]) == run.EXIT_OK

    def token_ids(name):
        lines = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        return {line["image"]: line["token_ids"] for line in lines}

    assert token_ids("auto.jsonl") == token_ids("ar.jsonl") == token_ids("slots.jsonl")
    slots = json.loads((tmp_path / "slots.json").read_text())
    assert slots["batching"] == "continuous" and list(slots["draft_len_rounds"]) == ["2"]
    assert slots["draft_len_rounds"]["2"] > 0 and slots["auto_draft"]["choices"] == [2]
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
    common += ["--batching", "static"]  # a choice per batch
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
