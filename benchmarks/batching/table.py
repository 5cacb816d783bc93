"""Markdown table of decode.bench --batching JSONs (python benchmarks/batching/table.py FILE...).

With `--draft-len auto` in the run, a column for SSD with auto draft lengths under continuous
batching (and its ratio to continuous AR)."""

import json
import sys
from pathlib import Path


def span(entry, key):
    values = entry[key]
    return f"{entry[key + '_median']:.2f} ({min(values):.2f}-{max(values):.2f})"


def rows(paths):
    reports = [json.loads(Path(path).read_text()) for path in paths]
    auto = any("auto" in run["continuous"] for report in reports for run in report["runs"])
    head = (
        "| batch | batching | AR images/s (runs) | SSD images/s (runs) | AR tokens/s | SSD tokens/s | "
        "slot utilization AR / SSD | SSD / AR | continuous / static AR, SSD |"
    )
    rule = "|--:|---|--:|--:|--:|--:|--:|--:|--:|"
    if auto:
        head += " SSD, auto draft lengths: images/s (runs) | auto / AR |"
        rule += "--:|--:|"
    yield head
    yield rule
    for report in reports:
        for run in report["runs"]:
            for batching in ("static", "continuous"):
                ar, ssd = run[batching]["ar"], run[batching]["ssd"]
                ratio = run.get("continuous_over_static", {})
                last = f"{ratio['ar']:.2f}, {ratio['ssd']:.2f}" if batching == "continuous" and ratio else "-"
                line = (
                    f"| {run['batch_size']} | {batching} | {span(ar, 'images_per_s')} | {span(ssd, 'images_per_s')} | "
                    f"{ar['tokens_per_s_median']:.1f} | {ssd['tokens_per_s_median']:.1f} | "
                    f"{ar['slot_utilization']:.2f} / {ssd['slot_utilization']:.2f} | "
                    f"{run['ssd_over_ar'][batching]:.2f} | {last} |"
                )
                if auto:
                    entry = run[batching].get("auto")
                    line += f" {span(entry, 'images_per_s')} | {run['auto_over_ar']:.2f} |" if entry else " - | - |"
                yield line


if __name__ == "__main__":
    print("\n".join(rows(sys.argv[1:])))
