"""Draft trees: greedy tree SSD == AR exactly, the tree helpers, the cache after rounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import engine
from decode import tree as tree_lib
from decode.engine import DecodeSpec, generate
from decode.tree import TreeShape
from fastvlm_jax.kv_cache import KVCache
from fastvlm_jax.model import VLM
from tests.test_decode import _near_identity_deep_layers, _perturbed_imitation, _prompts, _tokens
from tests.tiny import tiny_config


# (exit layer, imitation kind, nodes, width): both kinds, narrow and wide trees, a chain.
CASES = [(1, "ffn", 6, 2), (2, "layer", 8, 4), (2, "ffn", 4, 1), (1, "layer", 6, 3)]


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
    # An EOS that the greedy output of row 0 reaches mid-way (inside some round's tree).
    eos = int(ar.tokens[0, 6])
    ar = generate(model, params, prompts, DecodeSpec("ar", capacity=24, eos_ids=(eos,)), 24)
    spec = DecodeSpec("ssd", capacity=24, eos_ids=(eos,), tree=TreeShape(nodes, width))
    ssd = generate(model, params, prompts, spec, 24)
    assert _tokens(ssd) == _tokens(ar)
    assert int(ar.num_tokens[0]) <= 7 and int(ar.tokens[0, int(ar.num_tokens[0]) - 1]) == eos
    accepted, drafted = int(ssd.accepted.sum()), int(ssd.drafted.sum())
    assert 0 < accepted, "the near-identity draft should get some tokens accepted"
    assert int(ssd.rounds.sum()) < int(ar.rounds.sum())
    assert drafted == int(ssd.rounds.sum()) * nodes


def _tree_from_parents(parents, tokens):
    """A Tree (batch 1) built node by node from a parent list (parents[0] = 0 for the root)."""
    size = len(parents)
    tree = tree_lib.Tree.root(jnp.asarray([tokens[0]]), size, 4, jnp.float32)
    for i in range(1, size):
        tree = tree.add(jnp.asarray([[i]]), jnp.asarray([[tokens[i]]]), jnp.asarray([[parents[i]]]),
                        jnp.zeros((1, 1)))
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
    layout = tree_lib.tree_slots(jnp.asarray([5]), jnp.asarray([[4, 6]]), tree.ancestors[:, jnp.asarray([4, 6])],
                                 cache_slots=14)
    np.testing.assert_array_equal(layout.slots, [[9, 11]])
    visible = np.asarray(layout.visible[0])
    np.testing.assert_array_equal(np.nonzero(visible[0])[0], [0, 1, 2, 3, 4, 5, 6, 9])  # context, 0, 1, 4
    np.testing.assert_array_equal(np.nonzero(visible[1])[0], [0, 1, 2, 3, 4, 5, 6, 8, 11])  # 0, 1, 3, 6


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
        state = engine._prefill(model, params, prompts, spec, jax.random.key(0), jnp.int32(24))
        for _ in range(3):
            state = engine._tree_round(model, params, spec, state, jnp.int32(24))
        return state

    state = three_rounds(params)
    assert 0 < int(state.accepted.sum()) < int(state.drafted.sum())
    # Some round accepted a path of depth >= 2, whose nodes sit at table indices >= 3
    # (width 2): their entries were really moved.
    assert int(state.position_accepts[1]) > 0
    slots = state.cache.slots
    for row in range(2):
        length = int(prompts.lengths[row])
        committed = int(state.cache.pos[row])
        ids = np.concatenate([np.asarray(prompts.input_ids[row, :length]),
                              np.asarray(state.tokens[row, :committed - length])])[None]
        positions = jnp.arange(committed)[None]
        hidden = model.embed(params, jnp.asarray(ids), model.encode_images(params, prompts.pixels[row:row + 1]),
                             positions)
        fresh = model.init_cache(1, slots)
        h_exit, fresh, _ = model.run_layers(params, hidden, positions, 0, config.draft.exit_layer, fresh)
        _, fresh, _ = model.run_layers(params, h_exit, positions, config.draft.exit_layer,
                                       config.text.num_layers, fresh)
        _, draft_kv = model.imitate(params, h_exit, positions, model.init_draft_cache(1, slots))
        pairs = [(state.cache.keys[:, row], fresh.keys[:, 0]), (state.cache.values[:, row], fresh.values[:, 0]),
                 (state.draft_cache.keys[:, row], draft_kv.keys[:, 0]),
                 (state.draft_cache.values[:, row], draft_kv.values[:, 0])]
        for got, want in pairs:
            np.testing.assert_allclose(got[:, :, :committed], want[:, :, :committed], rtol=1e-4, atol=1e-5)


def test_tree_shape_is_checked():
    with pytest.raises(ValueError, match="multiple of the tree width"):
        TreeShape(nodes=5, width=2)
    with pytest.raises(ValueError, match="static shape"):
        DecodeSpec("ssd", tree=TreeShape(4, 2), policy=engine.DraftPolicy(min_confidence=0.5))
    assert DecodeSpec("ssd", tree=TreeShape(16, 4)).lookahead == 17
    assert DecodeSpec("ssd", tree=TreeShape(16, 4)).draft_depth == 4
