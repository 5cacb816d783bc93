"""Markdown table of decode.bench --batching JSONs (python benchmarks/batching/table.py FILE...)."""

import json
import sys
from pathlib import Path


def rows(paths):
    yield (
        "| batch | batching | AR images/s (runs) | SSD images/s (runs) | AR tokens/s | SSD tokens/s | "
        "slot utilization AR / SSD | SSD / AR | continuous / static AR, SSD |"
    )
    yield "|--:|---|--:|--:|--:|--:|--:|--:|--:|"
    for path in paths:
        report = json.loads(Path(path).read_text())
        for run in report["runs"]:
            for batching in ("static", "continuous"):
                ar, ssd = run[batching]["ar"], run[batching]["ssd"]

                def span(entry, key):
                    values = entry[key]
                    return f"{entry[key + '_median']:.2f} ({min(values):.2f}-{max(values):.2f})"

                ratio = run.get("continuous_over_static", {})
                last = f"{ratio['ar']:.2f}, {ratio['ssd']:.2f}" if batching == "continuous" and ratio else "-"
                yield (
                    f"| {run['batch_size']} | {batching} | {span(ar, 'images_per_s')} | {span(ssd, 'images_per_s')} | "
                    f"{ar['tokens_per_s_median']:.1f} | {ssd['tokens_per_s_median']:.1f} | "
                    f"{ar['slot_utilization']:.2f} / {ssd['slot_utilization']:.2f} | "
                    f"{run['ssd_over_ar'][batching]:.2f} | {last} |"
                )


if __name__ == "__main__":
    print("\n".join(rows(sys.argv[1:])))
