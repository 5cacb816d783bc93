"""Predictions from compiled piece times: acceptance profiles (--acceptance, --tree-nodes)
and the SSD speedup they give per drafter and per draft tree (see the package docstring)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from decode.bench.compile_only.programs import CompileOnlyError
from decode.engine.tree import TreeShape


@dataclasses.dataclass(frozen=True)
class Acceptance:
    """rate: accepted / drafted. tokens_per_round: measured tokens per full-model call
    (None: derive it from `rate` as a per-position probability). source: where it came from."""

    rate: float
    tokens_per_round: float | None
    source: str

    def per_round(self, draft_len: int) -> tuple[float, float]:
        """(tokens emitted, tokens drafted) per round."""
        if self.tokens_per_round is not None:
            drafted = (self.tokens_per_round - 1) / self.rate if self.rate > 0 else float(draft_len)
            return self.tokens_per_round, drafted
        return sum(self.rate**j for j in range(draft_len + 1)), float(draft_len)


def parse_acceptance(text: str) -> Acceptance:
    """A number in [0, 1), or a decode.run --stats / decode.bench JSON file."""
    try:
        rate = float(text)
    except ValueError:
        path = Path(text)
        if not path.is_file():
            raise CompileOnlyError(f"--acceptance {text!r}: neither a number in [0, 1) nor a JSON file") from None
        data = json.loads(path.read_text())
        if "mean_accepted_length" not in data or "acceptance_rate" not in data:
            raise CompileOnlyError(
                f"--acceptance {text}: the JSON has no mean_accepted_length / acceptance_rate "
                "(use a decode.run --stats or decode.bench JSON)"
            ) from None
        return Acceptance(float(data["acceptance_rate"]), float(data["mean_accepted_length"]), str(path))
    if not 0.0 <= rate < 1.0:
        raise CompileOnlyError(f"--acceptance {text}: a per-position acceptance probability lies in [0, 1)")
    return Acceptance(rate, None, f"per-position probability {rate}")


@dataclasses.dataclass(frozen=True)
class Acceptances:
    """The acceptance profile of each drafter: `default` for all (a number, or a JSON of
    one drafter), or `by_drafter` from a decode.bench --drafter JSON of several."""

    default: Acceptance | None
    by_drafter: dict[str, Acceptance]

    def for_drafter(self, name: str) -> Acceptance:
        """By the drafter's name ('model:shapes:X'), else by its kind ('model') when the
        JSON has exactly one drafter of that kind (its own name, e.g. model:demo-draft)."""
        if self.default is not None:
            return self.default
        if name in self.by_drafter:
            return self.by_drafter[name]
        kind = name.split(":")[0]
        same_kind = [key for key in self.by_drafter if key.split(":")[0] == kind]
        if len(same_kind) == 1:
            return self.by_drafter[same_kind[0]]
        raise CompileOnlyError(
            f"--acceptance: no measured run of drafter {name!r} (the JSON has {', '.join(sorted(self.by_drafter))})"
        )


def parse_acceptances(text: str) -> Acceptances:
    """parse_acceptance, or per drafter for a decode.bench JSON whose runs name several
    drafters (each drafter's first run: its mean_accepted_length and acceptance_rate)."""
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        runs = json.loads(path.read_text()).get("runs", [])
        by_drafter: dict[str, Acceptance] = {}
        for run in runs:
            name = run.get("drafter", "imitation")
            if name not in by_drafter and "mean_accepted_length" in run and "acceptance_rate" in run:
                by_drafter[name] = Acceptance(
                    float(run["acceptance_rate"]), float(run["mean_accepted_length"]), f"{path} (drafter {name})"
                )
        if len(by_drafter) > 1:
            return Acceptances(None, by_drafter)
    return Acceptances(parse_acceptance(text), {})


@dataclasses.dataclass(frozen=True)
class TreeAcceptance:
    """A draft tree's tokens per round (full-model calls: one per round), where they came
    from, and the per-position acceptance they were modelled from (None: measured)."""

    tokens_per_round: float
    source: str
    per_position: float | None = None


def tree_label(shape: TreeShape) -> str:
    return f"{shape.nodes}x{shape.width}"


def parse_tree_acceptance(text: str, shape: TreeShape, chain: Acceptance) -> TreeAcceptance:
    """The measured tokens per round of the first run with this tree in the decode.bench
    JSON `text`, else the module docstring's model from the chain acceptance `chain.rate`
    (the number given, or the JSON's rate)."""
    label = tree_label(shape)
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        for run in json.loads(path.read_text()).get("runs", []):
            if (run.get("tree_nodes"), run.get("tree_width")) == (
                shape.nodes,
                shape.width,
            ) and "mean_accepted_length" in run:
                return TreeAcceptance(
                    float(run["mean_accepted_length"]), f"{path} (measured tree {label}, batch {run.get('batch_size')})"
                )
    a = chain.rate
    deeper = 1.0 - (1.0 - a) ** shape.width
    tokens = sum(deeper**depth for depth in range(shape.steps + 1))
    return TreeAcceptance(
        tokens,
        f"modelled: per-position acceptance {a:.3f} from {chain.source}, "
        f"each depth {shape.width} independent tries (an assumption)",
        a,
    )


def parse_trees(nodes: list[int], width: int, drafters: list[str]) -> tuple[TreeShape, ...]:
    """The draft trees of --tree-nodes (0: none) and --tree-width; CompileOnlyError (one line)
    for a bad shape or without the imitation drafter, the only one that builds trees."""
    trees = []
    for n in nodes:
        if n == 0:
            continue
        try:
            trees.append(TreeShape(nodes=n, width=width))
        except ValueError as err:
            raise CompileOnlyError(f"--tree-nodes / --tree-width: {err}") from None
    if trees and "imitation" not in drafters:
        raise CompileOnlyError(
            "--tree-nodes: draft trees are built by the imitation drafter only (add imitation to --drafter)"
        )
    return tuple(trees)


# A drafter kind's draft cost per round from its pieces' times t (by role) and the drafts per
# round G' (see predict_drafter): the kinds of programs.DRAFTER_PROGRAMS.
DRAFT_COST = {
    "imitation": lambda t, drafted: drafted * t["draft_step"] + t["shallow_step"],
    "eagle": lambda t, drafted: t["catchup"] + max(drafted - 1, 0) * t["step"],
    "model": lambda t, drafted: t["start"] + max(drafted - 1, 0) * t["step"],
}


def predict_drafter(kind: str, ar: dict, own: dict, acceptance: Acceptance, draft_len: int) -> dict[str, Any]:
    """A drafter's predicted speedup from its pieces' lower-bound times, on two byte counts:

        tokens_per_round * t_AR / (per-round draft cost + t_verify)

    with the draft cost per round of drafted tokens G' (G' = draft_len for a per-position
    acceptance probability):
      imitation: G' * t_draft_step + t_shallow_step (the last draft's shallow pass)
      eagle:     t_catchup (draft_len + 1 pairs, the first draft) + (G' - 1) * t_step
      model:     t_start (2 tokens, the first draft) + (G' - 1) * t_step
    """
    tokens, drafted = acceptance.per_round(draft_len)

    def times(key):
        t = {role: p[key] for role, p in own.items() if role != "generate_ssd"}
        draft = DRAFT_COST[kind](t, drafted)
        return draft, t["verify"], tokens * ar[key] / (draft + t["verify"])

    draft, verify, speedup = times("time_lower_bound_s")
    return {
        "tokens_per_round": tokens,
        "drafted_per_round": drafted,
        "draft_cost_s": draft,
        "verify_s": verify,
        "ar_step_s": ar["time_lower_bound_s"],
        "predicted_speedup": speedup,
        "predicted_speedup_bytes_accessed": times("step_time_lower_bound_s")[2],
    }


def layer_count_acceptance(speedup: float, draft_len: int, exit_layer: int, num_layers: int) -> float | None:
    """The per-position acceptance a at which a round of the plain layer-count cost model
    reaches `speedup` over AR decoding (None: not reachable at this draft length).

    The model is that of memory-bound batch-1 decoding, where a pass costs in proportion
    to the layers it reads: a draft step (and the last draft's shallow pass) k / L of an AR
    step, the verification (L - k) / L, so a round costs (G + 1) k / L + (L - k) / L AR
    steps and emits 1 + a + ... + a^G tokens. It turns a published speedup (the paper's
    1.55-1.85x) into the acceptance it implies for this exit layer and draft length; the
    compiled pieces then say what that acceptance gives on the slice.
    """
    cost = ((draft_len + 1) * exit_layer + (num_layers - exit_layer)) / num_layers
    needed = speedup * cost

    def tokens(a):
        return sum(a**j for j in range(draft_len + 1))

    if needed > draft_len + 1:
        return None
    low, high = 0.0, 1.0
    for _ in range(60):  # bisection: tokens(a) increases with a
        mid = (low + high) / 2
        low, high = (mid, high) if tokens(mid) < needed else (low, mid)
    return (low + high) / 2


def paper_implied(point: dict, speedups: list[float], num_layers: int) -> list[dict[str, Any]]:
    """For each published speedup: the acceptance it implies (layer_count_acceptance) and
    the imitation drafter's prediction from the compiled pieces at that acceptance."""
    imitation = point["drafters"].get("imitation")
    if imitation is None or "predicted_speedup" not in imitation or "ar_step" not in point["pieces"]:
        return []
    entries = []
    for speedup in speedups:
        rate = layer_count_acceptance(speedup, point["draft_len"], point["exit_layer"], num_layers)
        if rate is None:
            entries.append({"paper_speedup": speedup, "per_position_acceptance": None})
            continue
        acc = Acceptance(rate, None, f"implied by {speedup}x under the layer-count model")
        predicted = predict_drafter(
            "imitation", point["pieces"]["ar_step"], imitation["pieces"], acc, point["draft_len"]
        )
        entries.append(
            {
                "paper_speedup": speedup,
                "per_position_acceptance": rate,
                "tokens_per_round": predicted["tokens_per_round"],
                "predicted_speedup": predicted["predicted_speedup"],
                "predicted_speedup_bytes_accessed": predicted["predicted_speedup_bytes_accessed"],
            }
        )
    return entries


def predict_tree(shape: TreeShape, ar: dict, own: dict, acceptance: TreeAcceptance) -> dict[str, Any]:
    """A draft tree's predicted speedup from its pieces' lower-bound times, on two byte counts:

    tokens_per_round * t_AR / (t_root + steps * t_step + t_verify + t_move)
    """
    tokens = acceptance.tokens_per_round

    def times(key):
        draft = own["root"][key] + shape.steps * own["step"][key]
        return draft, tokens * ar[key] / (draft + own["verify"][key] + own["move"][key])

    draft, speedup = times("time_lower_bound_s")
    return {
        "tokens_per_round": tokens,
        "drafted_per_round": shape.nodes,
        "draft_cost_s": draft,
        "verify_s": own["verify"]["time_lower_bound_s"],
        "move_s": own["move"]["time_lower_bound_s"],
        "ar_step_s": ar["time_lower_bound_s"],
        "predicted_speedup": speedup,
        "predicted_speedup_bytes_accessed": times("step_time_lower_bound_s")[1],
    }
