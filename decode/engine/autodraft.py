"""`--draft-len auto`: each batch's draft setting, from measured round costs and the
acceptance observed so far.

A choice is a chain draft length g (an int; 0 = plain AR rounds) or a draft tree
(`decode.engine.tree.TreeShape`, written `tree:NODESxWIDTH` on the command line). Rows advance in
lockstep, so a choice's throughput is (expected tokens per round and row) / (seconds per
round of the batch), with

    tokens per round = 1 + sum_{j < depth} P(accepted >= j + 1)

(depth: g for a chain, tree.steps for a tree). The probabilities come from running counters
(`DecodeOutput.position_accepts` / `position_attempts`), kept apart per kind because they
mean different things:
- chains share one estimate: for a static chain, accepts[j] / attempts[j] is the share of
  rounds that accepted j + 1 or more drafts among those that drafted a (j + 1)-th token,
  whatever the chain's length; it is shrunk towards prior_acceptance ** (j + 1);
- each tree shape has its own: a tree's attempts[j] counts only the rounds whose (dynamic)
  tree reached depth j + 1, so P(accepted >= j + 1) = accepts[j] / rounds, with rounds =
  attempts[0] (every round's tree reaches depth 1). Until observed it is shrunk towards the
  chains' estimate at the same depths: a tree holds a few alternatives at every level next
  to (usually) the draft's own chain, so the chain's acceptance is a conservative guess of
  what the tree accepts.
Seconds per round are measured once per program shape (batch, prompt bucket, capacity) and
choice, on the running device, by timing the choice's own compiled generate program on the
first batch of that shape (the prefill alone is timed with a one-token budget and taken off).
Every choice is one of a few programs compiled once: switching between batches never
recompiles. Those measuring runs sample with a key of their own (`calibration_key`), never
the batch's: the choice must not depend on the draws that then decode the batch.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import numpy as np

from decode.engine.tree import TreeShape

if TYPE_CHECKING:
    from typing_extensions import TypeIs

    from decode.engine.loop import DecodeOutput

DEFAULT_CHOICES = (0, 2, 4, 6)
Choice = int | TreeShape
# fold_in(key, i) is split(key, n)[i] (JAX's partitionable threefry), and generate splits its
# key in two: the calibration stream's index is far past any split of a batch's key.
CALIBRATION_STREAM = 0xCA1B


def calibration_key(rng: jax.Array) -> jax.Array:
    """The key the calibration runs of a batch sample with, from the batch's own key `rng`.

    Independent of every draw that decodes the batch, and so is the choice made from those
    runs. Calibrating on the batch's own key chooses by how the very draws that then decode
    it come out (a draft length because its drafts were accepted, say): the output is then
    biased, off the full model's distribution."""
    return jax.random.fold_in(rng, CALIBRATION_STREAM)


def is_tree(choice: Choice) -> TypeIs[TreeShape]:
    return not isinstance(choice, int)


def choice_depth(choice: Choice) -> int:
    """The deepest a round of this choice drafts: the chain's length or the tree's steps."""
    return choice.steps if is_tree(choice) else choice


def choice_label(choice: Choice) -> int | str:
    """How stats name a choice: the draft length of a chain, 'tree:NODESxWIDTH' for a tree."""
    return f"tree:{choice.nodes}x{choice.width}" if is_tree(choice) else choice


def parse_choice(text: str) -> Choice:
    """One `--auto-choices` entry (argparse type): a draft length 'G' (0 = AR rounds) or a
    draft tree 'tree:NODESxWIDTH', e.g. tree:16x2."""
    if not text.startswith("tree:"):
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a draft length or tree:NODESxWIDTH (e.g. tree:16x2), got {text!r}"
            ) from None
    nodes, sep, width = text[len("tree:") :].partition("x")
    if not (sep and nodes.isdigit() and width.isdigit()):
        raise argparse.ArgumentTypeError(f"expected tree:NODESxWIDTH (e.g. tree:16x2), got {text!r}")
    try:
        tree = TreeShape(nodes=int(nodes), width=int(width))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e}") from None
    if not tree.enabled:
        raise argparse.ArgumentTypeError(f"{text}: a tree needs nodes >= 1 (0 is the AR choice)")
    return tree


@dataclasses.dataclass(frozen=True)
class AutoDraftConfig:
    """choices: the settings to choose among: chain draft lengths (0 = plain AR rounds) and
    draft trees (TreeShape); prior_acceptance / prior_rounds: the chains' prior
    P(accepted >= j + 1) = prior_acceptance ** (j + 1), worth prior_rounds observed rounds at
    each position (a tree's prior is the chains' estimate, with the same weight)."""

    choices: tuple[Choice, ...] = DEFAULT_CHOICES
    prior_acceptance: float = 0.6
    prior_rounds: float = 2.0

    def __post_init__(self):
        labels = [choice_label(c) for c in self.choices]
        valid = all(c >= 0 if isinstance(c, int) else getattr(c, "enabled", False) for c in self.choices)
        if not self.choices or not valid or len(set(labels)) != len(labels):
            raise ValueError(f"auto draft choices must be distinct draft lengths >= 0 or draft trees, got {labels}")

    @property
    def trees(self) -> tuple[TreeShape, ...]:
        return tuple(c for c in self.choices if is_tree(c))


class AutoDraft:
    """The running state of the choice: acceptance counters and round costs per shape."""

    def __init__(self, config: AutoDraftConfig = AutoDraftConfig()):
        self.config = config
        # The chains' counters reach the deepest choice: they are the trees' prior too.
        depth = max(choice_depth(c) for c in config.choices)
        self.attempts = np.zeros(depth, np.float64)
        self.accepts = np.zeros(depth, np.float64)
        # Per tree: rounds drafted, and [tree.steps] rounds that accepted >= j + 1 nodes.
        self.tree_rounds = {tree: 0.0 for tree in config.trees}
        self.tree_accepts = {tree: np.zeros(tree.steps, np.float64) for tree in config.trees}
        self.round_seconds: dict[tuple, dict[Choice, float]] = {}
        self._round_totals: dict[tuple, dict[Choice, tuple[float, int]]] = {}  # observe_rounds'

    def observe(self, choice: Choice, position_attempts, position_accepts) -> None:
        """Adds the counters of one batch decoded with `choice` (nothing for AR rounds)."""
        attempts = np.asarray(position_attempts, np.float64)
        accepts = np.asarray(position_accepts, np.float64)
        if is_tree(choice):
            self.tree_rounds[choice] += float(attempts[0]) if len(attempts) else 0.0
            self.tree_accepts[choice][: len(accepts)] += accepts[: choice.steps]
        elif choice > 0:
            self.attempts[: len(attempts)] += attempts[: len(self.attempts)]
            self.accepts[: len(accepts)] += accepts[: len(self.accepts)]

    def accept_at_least(self, choice: Choice | None = None) -> np.ndarray:
        """P(accepted >= j + 1), j < the choice's depth (None: the chains' estimate to the
        deepest choice), observed and shrunk to the prior, made non-increasing in j (a
        round accepting j + 2 drafts accepted j + 1)."""
        weight = self.config.prior_rounds

        def shrunk(accepts, rounds, prior):  # the prior alone where nothing weighs (weight 0, unseen)
            return np.divide(accepts + weight * prior, rounds + weight, out=prior.copy(), where=rounds + weight > 0)

        chains_prior = self.config.prior_acceptance ** np.arange(1, len(self.attempts) + 1)
        chains = np.minimum.accumulate(shrunk(self.accepts, self.attempts, chains_prior))
        if choice is None or not is_tree(choice):
            return chains[: choice_depth(choice) if choice is not None else len(chains)]
        rounds = np.full(choice.steps, self.tree_rounds[choice])
        return np.minimum.accumulate(shrunk(self.tree_accepts[choice], rounds, chains[: choice.steps]))

    def expected_tokens(self, choice: Choice) -> float:
        """Expected tokens per round and row of a choice (the bonus token included)."""
        return 1.0 + float(np.sum(self.accept_at_least(choice)))

    def calibrate(
        self, shape: tuple, run: Callable[[Choice, bool, jax.Array], tuple[float, DecodeOutput]], rng: jax.Array
    ) -> None:
        """Measures seconds per round of every choice for one program shape.

        run(choice, full, key): decodes the shape's measuring batch with that choice's
        compiled program and the sampling key `key`, the whole budget (full) or a one-token
        budget (the prefill alone), and returns (seconds, DecodeOutput). rng: the key the
        batch is then decoded with; the runs get calibration_key(rng). The loop's rounds are
        the most any row took (rows advance in lockstep); the best of two full runs is taken.
        The SSD runs' acceptance counters are observed too."""
        key = calibration_key(rng)
        costs = {}
        for choice in self.config.choices:
            run(choice, True, key)  # compiles the program (if new) and warms it
            prefill_seconds, _ = run(choice, False, key)
            seconds, out = min(run(choice, True, key), run(choice, True, key), key=lambda t: t[0])
            loop_rounds = max(int(np.max(out.rounds)), 1)
            costs[choice] = max(seconds - prefill_seconds, 1e-9) / loop_rounds
            self.observe(choice, out.position_attempts, out.position_accepts)
        self.round_seconds[shape] = costs

    def observe_rounds(self, shape: tuple, choice: Choice, seconds: float, rounds: int) -> None:
        """Adds `rounds` rounds of `choice` that took `seconds` on program shape `shape` (continuous
        batching measures its choices on the slots as they decode): their mean is the cost."""
        totals = self._round_totals.setdefault(shape, {})
        total_seconds, total_rounds = totals.get(choice, (0.0, 0))
        totals[choice] = (total_seconds + seconds, total_rounds + rounds)
        self.round_seconds.setdefault(shape, {})[choice] = (total_seconds + seconds) / (total_rounds + rounds)

    def choose(self, shape: tuple) -> Choice:
        """The choice of highest expected tokens per second for a measured shape (the first
        listed on a tie)."""
        costs = self.round_seconds[shape]
        return max(self.config.choices, key=lambda c: self.expected_tokens(c) / costs[c])

    def report(self) -> dict:
        """JSON-ready: the estimates, and per shape ('BxPxC') each choice's measured ms per
        round and expected tokens per second; choices are keyed by str(choice_label)."""

        def name(choice):
            return str(choice_label(choice))

        return {
            "choices": [choice_label(c) for c in self.config.choices],
            "accept_at_least": [float(x) for x in self.accept_at_least()],
            "tree_accept_at_least": {name(t): [float(x) for x in self.accept_at_least(t)] for t in self.config.trees},
            "expected_tokens_per_round": {name(c): self.expected_tokens(c) for c in self.config.choices},
            "round_ms": {
                "x".join(map(str, shape)): {name(c): 1000 * s for c, s in costs.items()}
                for shape, costs in self.round_seconds.items()
            },
            "expected_tokens_per_s": {
                "x".join(map(str, shape)): {name(c): self.expected_tokens(c) / s for c, s in costs.items()}
                for shape, costs in self.round_seconds.items()
            },
        }


def parse_draft_len(text: str) -> int | str:
    """The value of a `--draft-len` flag: an integer, or 'auto' (argparse type)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None
