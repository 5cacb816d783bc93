"""Plots of benchmark JSON files (matplotlib, Agg backend): PNGs next to the JSON.

    python -m decode.bench.plots RESULT.json [RESULT.json ...]

decode.bench results give:
  *_speedup.png   speedup over AR vs draft length, one line per exit layer (and policy);
                  dashed: the ideal speedup of the cost model (--cost-model)
  *_context.png   draft acceptance vs context length (the paper's Figure 5)
  *_batch.png     tokens/s vs batch size for AR and SSD (when several batch sizes ran)
decode.bench.peers results give:
  *_batch.png     tokens/s vs batch size: ours (AR, SSD) and Hugging Face (generate,
                  assistant_early_exit)
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def _plt():
    # matplotlib: optional (the test extra) and slow to import; only plotting needs it, after
    # the backend is chosen.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stem(json_path: Path, suffix: str) -> Path:
    json_path = Path(json_path)
    return json_path.with_name(json_path.stem + suffix + ".png")


def _batch_axis(ax, xs) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.minorticks_off()


def _save(fig, ax, out: Path, xlabel: str, ylabel: str, legend_size: int, grid_which: str = "major") -> Path:
    """Labels, legend and grid, then the PNG at `out`; the figure is closed."""
    plt = _plt()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3, which=grid_which)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _policy(run: dict) -> str:
    return run.get("policy", {}).get("name", "static")


def plot_speedup_vs_draft(report: dict, out: Path) -> Path | None:
    runs = report["runs"]
    if not runs:
        return None
    batch = runs[0]["batch_size"]
    policies = sorted({_policy(r) for r in runs})
    lines = defaultdict(list)
    for r in runs:
        if r["batch_size"] == batch:
            lines[(r["exit_layer"], _policy(r))].append(r)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for index, ((exit_layer, policy), rs) in enumerate(sorted(lines.items())):
        rs = sorted(rs, key=lambda r: r["draft_len"])
        label = f"exit {exit_layer}" + (f", {policy}" if len(policies) > 1 else "")
        color = f"C{index % 10}"
        ax.plot([r["draft_len"] for r in rs], [r["speedup"] for r in rs], "o-", color=color, label=label)
        if all("cost" in r for r in rs):
            ax.plot(
                [r["draft_len"] for r in rs], [r["cost"]["ideal_speedup"] for r in rs], "--", color=color, alpha=0.6
            )
    ax.axhline(1.0, color="grey", lw=0.8)
    title = f"{Path(str(report.get('model', ''))).name or report.get('model')}: batch {batch}"
    if any("cost" in r for r in runs):
        title += " (dashed: ideal from cost model)"
    ax.set_title(title, fontsize=9)
    return _save(fig, ax, out, "draft length (gamma)", "speedup over AR (tokens/s ratio)", 8)


def plot_acceptance_vs_context(report: dict, out: Path) -> Path | None:
    ctx = report.get("context_acceptance")
    plt = _plt()
    if ctx:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for index, (exit_layer, entry) in enumerate(sorted(ctx.items(), key=lambda kv: int(kv[0]))):
            ax.plot(
                entry["bucket_start"],
                entry["agreement"],
                "o-",
                color=f"C{index % 10}",
                label=f"exit {exit_layer}: per-token acceptance",
            )
            rounds = entry.get("rounds_static", {})
            if rounds:
                draft_len = max(rounds, key=int)
                r = rounds[draft_len]
                ax.plot(
                    r["bucket_start"],
                    r["acceptance_rate"],
                    "x:",
                    color=f"C{index % 10}",
                    alpha=0.7,
                    label=f"exit {exit_layer}: per-round acceptance, gamma {draft_len}",
                )
        rows = next(iter(ctx.values()))["rows"]
        ax.set_title(f"draft acceptance vs context length ({rows} prompts, greedy, teacher-forced replay)", fontsize=9)
    else:
        runs = [r for r in report["runs"] if r.get("acceptance_vs_context", {}).get("bucket_start")]
        if not runs:
            return None
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for index, r in enumerate(runs[:8]):
            a = r["acceptance_vs_context"]
            ax.plot(
                a["bucket_start"],
                a["acceptance_rate"],
                "o-",
                color=f"C{index % 10}",
                label=f"b{r['batch_size']} exit {r['exit_layer']} {_policy(r)} g{r['draft_len']}",
            )
        ax.set_title("per-round acceptance vs context length (replayed rounds)", fontsize=9)
    ax.set_ylim(0, 1.02)
    return _save(fig, ax, out, "context length at drafting (prompt + generated tokens)", "acceptance", 7)


def plot_tokens_vs_batch(report: dict, out: Path) -> Path | None:
    runs = report["runs"]
    batches = sorted({r["batch_size"] for r in runs})
    if len(batches) < 2:
        return None
    first = runs[0]
    key = (first["exit_layer"], _policy(first), first["draft_len"])
    chosen = {r["batch_size"]: r for r in runs if (r["exit_layer"], _policy(r), r["draft_len"]) == key}
    xs = sorted(chosen)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(xs, [chosen[b]["ar"]["tokens_per_s"] for b in xs], "o-", label="ours AR")
    ax.plot(
        xs,
        [chosen[b]["ssd"]["tokens_per_s"] for b in xs],
        "s-",
        label=f"ours SSD (exit {key[0]}, {key[1]}, gamma {key[2]})",
    )
    _batch_axis(ax, xs)
    ax.set_yscale("log")
    ax.set_title(f"{Path(str(report.get('model', ''))).name}: throughput vs batch size", fontsize=9)
    return _save(fig, ax, out, "batch size", "generated tokens/s (all rows)", 8, "both")


def plot_bench(report: dict, json_path: Path) -> list[Path]:
    made = [
        plot_speedup_vs_draft(report, _stem(json_path, "_speedup")),
        plot_acceptance_vs_context(report, _stem(json_path, "_context")),
        plot_tokens_vs_batch(report, _stem(json_path, "_batch")),
    ]
    return [p for p in made if p is not None]


def plot_peers(report: dict, json_path: Path) -> list[Path]:
    """Tokens/s vs batch size for every system in a decode.bench.peers result."""
    series = defaultdict(dict)
    for r in report["results"]:
        series[r["system"]][r["batch_size"]] = r["tokens_per_s"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    markers = {"ours_ar": "o-", "ours_ssd": "s-", "hf_ar": "o--", "hf_early_exit": "s--"}
    for name in sorted(series):
        xs = sorted(series[name])
        ax.plot(xs, [series[name][b] for b in xs], markers.get(name, "^-"), label=name)
    _batch_axis(ax, sorted({b for v in series.values() for b in v}))
    ax.set_yscale("log")
    m = report.get("model", {})
    ax.set_title(
        f"same weights, text-only prompts: {m.get('params', 0) / 1e6:.1f}M-param LLaMA, "
        f"exit {report.get('exit_layer')}, gamma {report.get('draft_len')}, "
        f"deep scale {report.get('deep_scale', 1.0)}",
        fontsize=9,
    )
    return [
        _save(fig, ax, _stem(json_path, "_batch"), "batch size", "generated tokens/s (all rows, median)", 8, "both")
    ]


def plot_file(json_path: str | Path) -> list[Path]:
    json_path = Path(json_path)
    report = json.loads(json_path.read_text())
    if "results" in report and report.get("kind") == "peers":
        return plot_peers(report, json_path)
    return plot_bench(report, json_path)


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__)
        return 2
    for path in paths:
        for out in plot_file(path):
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
