"""Draft trees: greedy tree SSD == AR exactly, the tree helpers, the cache after rounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import engine
from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate, loop
from decode.engine import tree as tree_lib
from decode.engine.tree import TreeShape
from fastvlm_jax.nn.kv_cache import KVCache
from fastvlm_jax.nn.model import VLM
from tests.test_decode import _near_identity_deep_layers, _perturbed_imitation, _prompts, _tokens
from tests.tiny import tiny_config

# (exit layer, imitation kind, nodes, width): both kinds, a narrow and a wide tree. (Width 1,
# a chain drafted as a tree, runs in the decode.run test below.)
CASES = [(1, "ffn", 6, 2), (2, "layer", 8, 4)]


@pytest.mark.slow
@pytest.mark.parametrize("exit_layer,kind,nodes,width", CASES)
def test_greedy_tree_ssd_equals_ar(exit_layer, kind, nodes, width):
    config = tiny_config(num_layers=4, exit_layer=exit_layer, kind=kind)
    model = VLM(config)
    params = model.init(jax.random.key(exit_layer * 10 + nodes))
    params = _near_identity_deep_layers(params, config, 0.3)
    if kind == "layer":  # a non-identity imitation layer, so its own cache matters
        params = _perturbed_imitation(params, seed=nodes, scale=0.01)
    n = config.num_image_tokens
    prompts = _prompts(config, [n + 3, n + 9, n + 5], seed=nodes)
    ar = generate(model, params, prompts, DecodeSpec("ar", capacity=24, eos_ids=()), 24)
    # An EOS that the greedy output of row 0 reaches mid-way (inside some round's tree). AR
    # with it stops right after its first occurrence (test_decode checks that in the engine).
    eos = int(ar.tokens[0, 6])
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in map(list, _tokens(ar))]
    assert len(expected[0]) <= 7
    spec = DecodeSpec("ssd", capacity=24, eos_ids=(eos,), tree=TreeShape(nodes, width))
    ssd = generate(model, params, prompts, spec, 24)
    assert _tokens(ssd) == expected
    assert int(ssd.accepted.sum()) > 0, "the near-identity draft should get some tokens accepted"
    assert int(ssd.rounds.sum()) < sum(map(len, expected)) - len(expected)  # fewer rounds than AR steps
    assert int(ssd.drafted.sum()) == int(ssd.rounds.sum()) * nodes


def _tree_from_parents(parents, tokens):
    """A Tree (batch 1) built node by node from a parent list (parents[0] = 0 for the root)."""
    size = len(parents)
    tree = tree_lib.Tree.root(jnp.asarray([tokens[0]]), size, 4, jnp.float32)
    for i in range(1, size):
        tree = tree.add(jnp.asarray([[i]]), jnp.asarray([[tokens[i]]]), jnp.asarray([[parents[i]]]), jnp.zeros((1, 1)))
    return tree


def test_tree_table_layout_and_greedy_path():
    #        0
    #      /   \
    #     1     2
    #    / \     \
    #   3   4     5
    #   |
    #   6
    parents = [0, 0, 0, 1, 1, 2, 3]
    tokens = [9, 11, 12, 13, 14, 15, 16]
    tree = _tree_from_parents(parents, tokens)
    np.testing.assert_array_equal(tree.depths[0], [0, 1, 1, 2, 2, 2, 3])
    np.testing.assert_array_equal(tree.ancestors[0, 6], [1, 1, 0, 1, 0, 0, 1])
    # The full model's argmax after each node: after 0 -> 11 (node 1), after 1 -> 13
    # (node 3), after 3 -> 99 (node 6 = 16 disagrees). Accepted path: 0, 1, 3.
    target = jnp.asarray([[11, 13, 15, 99, 0, 0, 0]])
    last = tree_lib.accept_greedy_tree(tree, target)
    assert int(last[0]) == 3
    np.testing.assert_array_equal(tree_lib.root_path(tree, last, 3)[0], [0, 1, 3, 0])
    # Node 2's subtree agrees too (15 after 2) but 12 is not the argmax after the root.
    layout = tree_lib.tree_slots(
        jnp.asarray([5]), jnp.asarray([[4, 6]]), tree.ancestors[:, jnp.asarray([4, 6])], cache_slots=14
    )
    np.testing.assert_array_equal(layout.slots, [[9, 11]])
    visible = np.asarray(layout.visible[0])
    np.testing.assert_array_equal(np.nonzero(visible[0])[0], [0, 1, 2, 3, 4, 5, 6, 9])  # context, 0, 1, 4
    np.testing.assert_array_equal(np.nonzero(visible[1])[0], [0, 1, 2, 3, 4, 5, 6, 8, 11])  # 0, 1, 3, 6


@pytest.mark.slow
def test_grow_takes_the_best_open_candidates_best_first():
    tree = tree_lib.Tree.root(jnp.asarray([0]), 5, 4, jnp.float32)
    candidates = tree_lib.Candidates.empty(1, 5, 2)
    logits = jnp.log(jnp.asarray([[[0.1, 0.6, 0.3, 0.0]]]) + 1e-9)
    candidates = tree_lib.propose_children(candidates, tree, jnp.zeros((1, 1), jnp.int32), logits)
    tree, candidates = tree_lib.grow(tree, candidates, jnp.asarray([[1, 2]]))
    np.testing.assert_array_equal(tree.tokens[0, :3], [0, 1, 2])  # the root's top two children
    # Node 1 (p 0.6) is confident, node 2 (p 0.3) is not; the next step takes the best
    # two paths anywhere in the tree, whoever their parents are.
    children = jnp.log(jnp.asarray([[[0.0, 0.0, 0.9, 0.1], [0.5, 0.5, 0.0, 0.0]]]) + 1e-9)
    candidates = tree_lib.propose_children(candidates, tree, jnp.asarray([[1, 2]]), children)
    tree, _ = tree_lib.grow(tree, candidates, jnp.asarray([[3, 4]]))
    # Paths: 1->2: 0.54, 1->3: 0.06, 2->0: 0.15, 2->1: 0.15. Best two: 0.54 and a 0.15.
    np.testing.assert_array_equal(tree.parents[0, 3:], [1, 2])
    np.testing.assert_array_equal(tree.tokens[0, 3], 2)
    np.testing.assert_allclose(np.exp(np.asarray(tree.scores[0, 3:])), [0.54, 0.15], rtol=1e-4)


def test_move_slots_moves_every_layer_of_one_row():
    cache = KVCache.zeros(3, 2, 10, 1, 2)
    values = jnp.arange(3 * 2 * 10, dtype=jnp.float32).reshape(3, 2, 1, 10, 1) * jnp.ones((1, 1, 1, 1, 2))
    cache = cache.replace(keys=values, values=-values)
    # Row 0: slots 5, 7 -> 3, 4 (reads before writes: 4 gets the old 7). Row 1: identity.
    moved = cache.move_slots(jnp.asarray([[5, 7], [1, 2]]), jnp.asarray([[3, 4], [1, 2]]))
    keys = np.asarray(moved.keys[..., 0])
    want = np.asarray(values[..., 0]).copy()
    want[:, 0, :, 3], want[:, 0, :, 4] = want[:, 0, :, 5], want[:, 0, :, 7]
    np.testing.assert_array_equal(keys, want)
    np.testing.assert_array_equal(np.asarray(moved.values[..., 0]), -want)


@pytest.mark.slow
def test_caches_after_tree_rounds_equal_a_cache_free_pass():
    """After tree rounds with partial acceptance, every committed slot of all three caches
    (shallow and deep layers, the imitation layer's own) holds what one pass over the
    committed tokens writes: the accepted paths were moved to contiguous slots."""
    config = tiny_config(num_layers=4, exit_layer=2, kind="layer")
    model = VLM(config)
    params = model.init(jax.random.key(3))
    params = _perturbed_imitation(_near_identity_deep_layers(params, config, 0.3), seed=4, scale=0.005)
    prompts = _prompts(config, [config.num_image_tokens + 4, config.num_image_tokens + 2])
    spec = DecodeSpec("ssd", capacity=24, eos_ids=(), tree=TreeShape(6, 2))

    @jax.jit
    def three_rounds(params):
        state = engine.prefill(model, params, prompts, spec, 24)
        return jax.lax.fori_loop(0, 3, lambda i, s: engine.decode_round(model, params, spec, s, 24), state)

    state = three_rounds(params)
    assert 0 < int(state.stats.accepted.sum()) < int(state.stats.drafted.sum())
    # Some round accepted a path of depth >= 2, whose nodes sit at table indices >= 3
    # (width 2): their entries were really moved.
    assert int(state.stats.position_accepts[1]) > 0
    slots = state.cache.slots
    committed = [int(x) for x in state.cache.pos]
    ids = np.zeros((2, max(committed)), np.int32)  # each row's committed tokens, right-padded
    for row in range(2):
        length = int(prompts.lengths[row])
        ids[row, : committed[row]] = np.concatenate(
            [np.asarray(prompts.input_ids[row, :length]), np.asarray(state.tokens[row, : committed[row] - length])]
        )

    @jax.jit
    def one_pass(params, ids):  # the caches one causal pass over the committed tokens writes
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        hidden = model.embed(params, ids, model.encode_images(params, prompts.pixels), positions)
        fresh = model.init_cache(2, slots)
        h_exit, fresh, _ = model.run_layers(params, hidden, positions, 0, config.draft.exit_layer, fresh)
        _, fresh, _ = model.run_layers(
            params, h_exit, positions, config.draft.exit_layer, config.text.num_layers, fresh
        )
        _, draft_kv = model.imitate(params, h_exit, positions, model.init_draft_cache(2, slots))
        return fresh, draft_kv

    fresh, draft_kv = one_pass(params, jnp.asarray(ids))
    pairs = [
        (state.cache.keys, fresh.keys),
        (state.cache.values, fresh.values),
        (state.draft.keys, draft_kv.keys),
        (state.draft.values, draft_kv.values),
    ]
    for row in range(2):
        for got, want in pairs:  # [layers, batch, kv_heads, slots, head_dim]
            np.testing.assert_allclose(
                got[:, row, :, : committed[row]], want[:, row, :, : committed[row]], rtol=1e-4, atol=1e-5
            )


def test_tree_shape_is_checked():
    with pytest.raises(ValueError, match="multiple of the tree width"):
        TreeShape(nodes=5, width=2)
    with pytest.raises(ValueError, match="static shape"):
        DecodeSpec("ssd", tree=TreeShape(4, 2), policy=DraftPolicy(min_confidence=0.5))
    assert DecodeSpec("ssd", tree=TreeShape(16, 4)).lookahead == 17
    assert DecodeSpec("ssd", tree=TreeShape(16, 4)).draft_depth == 4


def test_a_tree_wider_than_the_vocabulary_is_refused_in_one_line(tiny):
    """Each node proposes `width` distinct tokens: a tree wider than the vocabulary used to
    fail at trace, deep inside lax.top_k."""
    from tests.test_sampling import PROMPT, VOCAB

    model, params, _ = tiny
    prompts = Prompts(jnp.asarray([PROMPT], jnp.int32), jnp.asarray([len(PROMPT)], jnp.int32))
    spec = DecodeSpec("ssd", capacity=4, eos_ids=(), tree=TreeShape(nodes=2 * (VOCAB + 1), width=VOCAB + 1))
    with pytest.raises(ValueError) as info:
        generate(model, params, prompts, spec, 4)
    message = str(info.value)
    assert "\n" not in message and f"width {VOCAB + 1}" in message and f"{VOCAB} tokens" in message
    assert f"tree width <= {VOCAB}" in message  # the fix


def test_run_cli_refuses_a_tree_wider_than_the_vocabulary(tmp_path, capsys):
    from decode import run
    from fastvlm_jax.ckpt.checkpoint import load_config
    from tests.run_fixtures import make_tiny_checkpoint, write_image

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    vocab = load_config(ckpt).text.vocab_size
    width = vocab + 1
    argv = ["--ckpt", str(ckpt), "--images", str(write_image(tmp_path / "in.png")), "--out", str(tmp_path / "o.jsonl")]
    assert run.main([*argv, "--tree-nodes", str(width), "--tree-width", str(width)]) == run.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"width {width}" in err[0] and f"tree width <= {vocab}" in err[0], err
    # A tree among the --draft-len auto choices too.
    choices = ["--draft-len", "auto", "--auto-choices", "0", f"tree:{width}x{width}"]
    assert run.main([*argv, *choices]) == run.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"width {width}" in err[0], err
    assert not (tmp_path / "o.jsonl").exists()


# --- sampling with trees reproduces the full model's distribution --------------------------


def _one_node_tree_samples(p, q, width, rows, seed):
    """The round's first token under accept_speculative_tree at a root whose `width`
    children are drawn from q without replacement, the target being p: ([rows] tokens,
    [rows] accepted node, 0 = none)."""
    vocab = p.shape[0]
    draw_rng, accept_rng = jax.random.split(jax.random.key(seed))
    tree = tree_lib.Tree.root(jnp.zeros((rows,), jnp.int32), width + 1, 1, jnp.float32)
    candidates = tree_lib.propose_children(
        tree_lib.Candidates.empty(rows, width + 1, width),
        tree,
        jnp.zeros((rows, 1), jnp.int32),
        jnp.log(jnp.broadcast_to(q, (rows, 1, vocab))),
        draw_rng,
    )
    tree, _ = tree_lib.grow(tree, candidates, jnp.broadcast_to(jnp.arange(1, width + 1), (rows, width)))
    node, token = tree_lib.accept_speculative_tree(
        accept_rng,
        tree,
        jnp.broadcast_to(p, (rows, width + 1, vocab)),
        jnp.broadcast_to(q, (rows, width + 1, vocab)),
        width,
        1,
    )
    return jnp.where(node > 0, tree.tokens[jnp.arange(rows), node], token), node


P_ONE = jnp.asarray([0.05, 0.4, 0.1, 0.2, 0.05, 0.2])
Q_ONE = jnp.asarray([0.3, 0.3, 0.05, 0.05, 0.2, 0.1])


def test_recursive_rejection_over_siblings_is_exact_and_its_mutation_is_not(monkeypatch):
    """One level, three siblings drawn without replacement from q: the emitted token is
    distributed as p, with later siblings accepted often; the same rule without the
    residual update after a rejected sibling (accept the first sibling that passes its
    own min(1, p/q) test) is far off."""
    from scipy import stats

    rows = 100_000
    run = jax.jit(lambda seed: _one_node_tree_samples(P_ONE, Q_ONE, 3, rows, seed), static_argnums=0)
    first, node = map(np.asarray, run(0))
    assert np.mean(node >= 2) > 0.2, "the second and third siblings should be accepted often"
    pvalue = stats.chisquare(np.bincount(first, minlength=6), np.asarray(P_ONE) * rows).pvalue
    assert pvalue > 1e-3, f"tree rule differs from p: p-value {pvalue:.3g}"
    monkeypatch.setattr(tree_lib, "reject_sibling", lambda residual, draft, token: (residual, draft))
    broken = jax.jit(lambda seed: _one_node_tree_samples(P_ONE, Q_ONE, 3, rows, seed), static_argnums=0)
    first = np.asarray(broken(0)[0])
    pvalue = stats.chisquare(np.bincount(first, minlength=6), np.asarray(P_ONE) * rows).pvalue
    assert pvalue < 1e-6, f"the mutated rule went undetected: p-value {pvalue:.3g}"


# (nodes, width, steps, sampling): steps = the tree's depth + 2, so rows whose first round
# accepts a full-depth path end with that round's bonus token.
TREE_SAMPLING_CASES = [(4, 2, 4, "plain"), (6, 3, 4, "warped")]


def _tree_generate(tiny, nodes, width, steps, sampling, seed, capacity=None):
    from tests.test_sampling import PROMPT, ROWS

    model, params, _ = tiny
    prompts = Prompts(jnp.asarray([PROMPT] * ROWS, jnp.int32), jnp.full((ROWS,), len(PROMPT), jnp.int32))
    spec = DecodeSpec("ssd", capacity=capacity or steps, sampling=sampling, eos_ids=(), tree=TreeShape(nodes, width))
    out = generate(model, params, prompts, spec, steps, jax.random.key(seed))
    assert np.all(np.asarray(out.num_tokens) == steps)
    return out, np.asarray(out.tokens)[:, :steps]


def _sampling_config(name):
    from tests.test_sampling import PLAIN, WARPED

    return {"plain": PLAIN, "warped": WARPED}[name]


@pytest.mark.slow
@pytest.mark.parametrize("nodes,width,steps,sampling", TREE_SAMPLING_CASES, ids=["plain", "warped"])
def test_tree_speculative_sampling_matches_exact_distribution(tiny, nodes, width, steps, sampling):
    from tests.test_sampling import _chi_square, _exact_joint

    sampling = _sampling_config(sampling)
    joint = _exact_joint(tiny, steps, sampling)
    out, tokens = _tree_generate(tiny, nodes, width, steps, sampling, seed=0)
    depth = nodes // width
    # Whole-depth paths (then the bonus token) in many rows, rejections in many others.
    assert int(out.position_accepts[depth - 1]) > 0.2 * len(tokens)
    assert int(out.accepted.sum()) < 0.9 * int(out.rounds.sum()) * depth
    pvalue, impossible = _chi_square(tokens, joint)
    print(f"tree {nodes}x{width}, {steps} steps, {sampling}: p = {pvalue:.3g}")
    assert impossible == 0, f"{impossible} tree SSD samples have probability 0"
    assert pvalue > 1e-3, f"tree SSD samples differ from the exact distribution: p = {pvalue:.3g}"


@pytest.mark.slow
def test_tree_sampling_without_the_residual_update_is_detected(tiny, monkeypatch):
    """The end-to-end check has power: accepting the first sibling whose own min(1, p/q)
    test passes, without updating the target to the residual, fails it."""
    from tests.test_sampling import _chi_square, _exact_joint

    nodes, width, steps, name = TREE_SAMPLING_CASES[0]
    sampling = _sampling_config(name)
    joint = _exact_joint(tiny, steps, sampling)
    traced = []

    def broken(residual, draft, token):
        traced.append(True)  # at trace time
        return residual, draft

    monkeypatch.setattr(tree_lib, "reject_sibling", broken)
    try:  # a capacity of its own: generate's jit cache must not serve the correct program
        _, tokens = _tree_generate(tiny, nodes, width, steps, sampling, seed=0, capacity=steps + 7)
    finally:  # and no later test may get the broken program (see test_sampling.py)
        loop._generate_jit.clear_cache()
    assert traced, "the patched rule was not traced"
    pvalue, impossible = _chi_square(tokens, joint)
    print(f"no residual update, tree {nodes}x{width}: p = {pvalue:.3g}, {impossible} impossible")
    assert impossible > 0 or pvalue < 1e-6, f"the broken tree rule went undetected: p = {pvalue:.3g}"


def test_greedy_tree_ssd_equals_ar_and_hf_on_converted_blip2(converted):
    """A converted Hugging Face model (BLIP-2 / OPT: learned positions, its own layer and
    imitation code) with a one-layer imitation network: tree SSD == AR == HF generate."""
    from fastvlm_jax.nn.blip2 import init_imitation
    from tests.test_blip2 import EOS, MAX_NEW

    checkpoint, prompts, hf_tokens, ar, _ = converted
    config = checkpoint.config.with_draft(kind="layer")
    imitation = init_imitation(config, jax.random.key(1))
    imitation = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + 0.02 * jax.random.normal(jax.random.key(len(str(path))), x.shape)
            if "fc2" in str(path) or "out_proj" in str(path)
            else x
        ),
        imitation,
    )
    params = {**checkpoint.params, "imitation": imitation}
    spec = DecodeSpec("ssd", capacity=MAX_NEW, eos_ids=(EOS,), tree=TreeShape(6, 2))
    ssd = generate(VLM(config), params, prompts, spec, MAX_NEW)
    assert _tokens(ssd) == _tokens(ar) == hf_tokens
    assert int(ssd.accepted.sum()) > 0 and int(ssd.rounds.sum()) < int(ar.rounds.sum())


# --- the flags and the statistics -----------------------------------------------------------


def test_accepted_depth_histogram_and_tree_stats():
    from decode.engine.captioner import BatchStats, accepted_depth_histogram, summarize

    # 10 rounds: 4 accepted nothing, 3 accepted 1, 2 accepted 2, 1 accepted 3.
    assert accepted_depth_histogram(10, [6, 3, 1]) == [4, 3, 2, 1]
    stats = summarize(
        BatchStats(
            images=2,
            tokens=22,
            first_tokens=2,
            rounds=10,
            drafted=80,
            accepted=10,
            seconds=1.0,
            position_attempts=(10, 10, 9),
            position_accepts=(6, 3, 1),
            verified=90,
        )
    )
    assert stats["accepted_depth_histogram"] == [4, 3, 2, 1]
    assert stats["nodes_verified_per_call"] == 9.0
    assert stats["tokens_per_full_model_call"] == 22 / 12


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--tree-nodes", "5", "--tree-width", "2"], "multiple of the tree width"),
        (["--tree-nodes", "-1"], "must be >= 0"),
        (["--tree-nodes", "4", "--min-confidence", "0.5"], "chains only"),
    ],
)
def test_run_cli_rejects_bad_tree_flags(tmp_path, capsys, flags, message):
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


def test_run_cli_tree_equals_ar_and_reports_tree_stats(tmp_path):
    import json

    from decode import run
    from tests.run_fixtures import make_tiny_checkpoint, write_image

    ckpt = str(make_tiny_checkpoint(tmp_path / "ckpt"))
    images = [str(write_image(tmp_path / "in" / f"{i}.png", seed=i)) for i in range(3)]
    common = ["--ckpt", ckpt, "--images", *images, "--batch-size", "2", "--max-new-tokens", "8", "--no-progress"]
    assert run.main([*common, "--out", str(tmp_path / "ar.jsonl"), "--mode", "ar"]) == run.EXIT_OK
    assert (
        run.main(
            [
                *common,
                "--out",
                str(tmp_path / "tree.jsonl"),
                "--tree-nodes",
                "3",
                "--tree-width",
                "1",
                "--stats",
                str(tmp_path / "stats.json"),
            ]
        )
        == run.EXIT_OK
    )

    def token_ids(name):
        lines = [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
        return {line["image"]: line["token_ids"] for line in lines}

    assert token_ids("tree.jsonl") == token_ids("ar.jsonl")
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["tree_nodes"] == 3 and stats["tree_width"] == 1  # a chain of 3, drafted as a tree
    assert stats["nodes_verified_per_call"] == 4.0
    assert len(stats["accepted_depth_histogram"]) == 4 and sum(stats["accepted_depth_histogram"]) == stats["rounds"]
    assert stats["tokens_per_full_model_call"] == stats["tokens"] / stats["full_model_calls"]


def test_bench_cli_runs_a_tree(tmp_path):
    import json

    from decode.bench import cli

    out = tmp_path / "bench.json"
    assert (
        cli.main(
            [
                "--ckpt",
                "random:tiny",
                "--tree-nodes",
                "4",
                "--tree-width",
                "2",
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
    (run,) = json.loads(out.read_text())["runs"]
    assert run["tree_nodes"] == 4 and run["tree_width"] == 2 and run["draft_len"] == 2  # depth
    assert run["identical"] is True and run["nodes_verified_per_call"] == 5
    assert sum(run["accepted_depth_histogram"]) == run["ssd"]["rounds"]
    assert run["tokens_per_full_model_call"] > 0


def test_compiled_tree_program_never_copies_the_kv_cache():
    """The tree round updates the stacked caches in place too (the path move is a gather
    and a scatter, not a copy of the cache): the only cache-sized copies in the compiled
    program are zero initialisations."""
    import re

    config = tiny_config(num_layers=6, exit_layer=2, kind="layer")
    model = VLM(config)
    params = jax.jit(model.init)(jax.random.key(0))
    prompts = Prompts(jnp.full((2, 16), 5, jnp.int32), jnp.full((2,), 16, jnp.int32))
    spec = DecodeSpec("ssd", capacity=32, eos_ids=(), tree=TreeShape(6, 2))
    hlo = loop._generate_jit.lower(model, spec, params, prompts, jnp.int32(32), jax.random.key(0)).compile().as_text()
    for layers in (6, 1):  # the decoder's cache and the imitation layer's own
        shape = rf"f32\[{layers},2,2,{spec.cache_slots(16)},16\]"
        assert re.search(shape, hlo), "the cache shape should appear in the program"
        copies = re.findall("= " + shape + r"\{[^}]*\} copy\((\S+)\)", hlo)
        assert all("broadcast" in source for source in copies), copies
