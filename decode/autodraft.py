"""`--draft-len auto`: each batch's draft length, from measured round costs and the
acceptance observed so far.

Rows advance in lockstep, so a setting's throughput is (expected tokens per round and row)
/ (seconds per round of the batch). For a chain of draft length g (0 = plain AR rounds):

    tokens per round = 1 + sum_{j < g} P(accepted >= j + 1)

with P(accepted >= j + 1) estimated from the running counters (`DecodeOutput.position_accepts`
over `position_attempts`: for a static chain, the rounds that accepted j + 1 or more drafts
among those that drafted a (j + 1)-th token), shrunk towards a prior for positions seen rarely.
Seconds per round are measured once per program shape (batch, prompt bucket, capacity) and
setting, on the running device, by timing the setting's own compiled generate program on the
first batch of that shape (the prefill alone is timed with a one-token budget and taken off).
Every setting is one of a few programs compiled once: switching between batches never
recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

DEFAULT_CHOICES = (0, 2, 4, 6)


@dataclasses.dataclass(frozen=True)
class AutoDraftConfig:
    """choices: the draft lengths to choose among (0 = plain AR rounds); prior_acceptance /
    prior_rounds: the prior of P(accepted >= j + 1) = prior_acceptance ** (j + 1), worth
    prior_rounds observed rounds at each position."""

    choices: tuple[int, ...] = DEFAULT_CHOICES
    prior_acceptance: float = 0.6
    prior_rounds: float = 2.0

    def __post_init__(self):
        if not self.choices or min(self.choices) < 0 or len(set(self.choices)) != len(self.choices):
            raise ValueError(f"auto draft choices must be distinct lengths >= 0, got {self.choices}")


class AutoDraft:
    """The running state of the choice: acceptance counters and round costs per shape."""

    def __init__(self, config: AutoDraftConfig = AutoDraftConfig()):
        self.config = config
        depth = max(config.choices)
        self.attempts = np.zeros(depth, np.float64)
        self.accepts = np.zeros(depth, np.float64)
        self.round_seconds: dict[tuple, dict[int, float]] = {}

    def observe(self, position_attempts, position_accepts) -> None:
        """Adds one SSD batch's per-position counters (any draft length up to the largest choice)."""
        attempts = np.asarray(position_attempts, np.float64)[: len(self.attempts)]
        accepts = np.asarray(position_accepts, np.float64)[: len(self.accepts)]
        self.attempts[: len(attempts)] += attempts
        self.accepts[: len(accepts)] += accepts

    def accept_at_least(self) -> np.ndarray:
        """P(accepted >= j + 1) for j < the largest choice (observed, shrunk to the prior),
        made non-increasing in j (a round accepting j + 2 drafts accepted j + 1)."""
        prior = self.config.prior_acceptance ** np.arange(1, len(self.attempts) + 1)
        weight = self.config.prior_rounds
        estimate = (self.accepts + weight * prior) / (self.attempts + weight)
        return np.minimum.accumulate(estimate)

    def expected_tokens(self, draft_len: int) -> float:
        """Expected tokens per round and row of a chain of `draft_len` (bonus token included)."""
        return 1.0 + float(np.sum(self.accept_at_least()[:draft_len]))

    def calibrate(self, shape: tuple, run: Callable[[int, bool], tuple[float, object]]) -> None:
        """Measures seconds per round of every choice for one program shape.

        run(draft_len, full): decodes the shape's measuring batch with that choice's
        compiled program, the whole budget (full) or a one-token budget (the prefill
        alone), and returns (seconds, DecodeOutput). The loop's rounds are the most any row
        took (rows advance in lockstep); the best of two full runs is taken. The SSD runs'
        acceptance counters are observed too."""
        costs = {}
        for draft_len in self.config.choices:
            run(draft_len, True)  # compiles the program (if new) and warms it
            prefill_seconds, _ = run(draft_len, False)
            seconds, out = min(run(draft_len, True), run(draft_len, True), key=lambda t: t[0])
            loop_rounds = max(int(np.max(out.rounds)), 1)
            costs[draft_len] = max(seconds - prefill_seconds, 1e-9) / loop_rounds
            if draft_len > 0:
                self.observe(out.position_attempts, out.position_accepts)
        self.round_seconds[shape] = costs

    def choose(self, shape: tuple) -> int:
        """The choice of highest expected tokens per second for a measured shape."""
        costs = self.round_seconds[shape]
        return max(self.config.choices, key=lambda g: self.expected_tokens(g) / costs[g])

    def report(self) -> dict:
        """JSON-ready: the estimates and the measured costs (ms per round, by shape)."""
        return {
            "choices": list(self.config.choices),
            "accept_at_least": [float(x) for x in self.accept_at_least()],
            "expected_tokens_per_round": {str(g): self.expected_tokens(g) for g in self.config.choices},
            "round_ms": {"x".join(map(str, shape)): {str(g): 1000 * s for g, s in costs.items()}
                         for shape, costs in self.round_seconds.items()},
        }


def parse_draft_len(text: str) -> int | str:
    """The value of a `--draft-len` flag: an integer, or 'auto' (argparse type)."""
    import argparse

    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None
