"""How the int8 model's captions compare with the float model's, on the same images.

    python benchmarks/scripts/int8_agreement.py --float FLOAT.jsonl[.gz] --int8-ssd SSD.jsonl[.gz] \
        --int8-ar AR.jsonl[.gz] --json OUT.json

Reads decode.run outputs (one JSON line per image, with caption and token_ids) and counts,
over the images all three captioned: int8 SSD == int8 AR (token ids: must be all), int8 ==
float (captions and token ids), the first-token agreement and the mean common token prefix.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path


def read_captions(path: str) -> dict[str, dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return {line["image"]: line for line in map(json.loads, f) if "caption" in line}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(reference: dict, ssd: dict, ar: dict) -> dict:
    images = sorted(set(reference) & set(ssd) & set(ar))
    if not images:
        raise SystemExit("error: the three files share no captioned image")
    n = len(images)
    return {
        "images": n,
        "int8_ssd_equals_int8_ar_tokens": sum(ssd[k]["token_ids"] == ar[k]["token_ids"] for k in images),
        "int8_equals_float_captions": sum(ssd[k]["caption"] == reference[k]["caption"] for k in images),
        "int8_equals_float_tokens": sum(ssd[k]["token_ids"] == reference[k]["token_ids"] for k in images),
        "first_token_agreement": sum(ssd[k]["token_ids"][:1] == reference[k]["token_ids"][:1] for k in images),
        "mean_common_prefix_tokens": sum(common_prefix(ssd[k]["token_ids"], reference[k]["token_ids"]) for k in images)
        / n,
        "mean_float_tokens": sum(len(reference[k]["token_ids"]) for k in images) / n,
        "mean_int8_tokens": sum(len(ssd[k]["token_ids"]) for k in images) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--float", dest="reference", required=True, help="the float model's decode.run output")
    parser.add_argument("--int8-ssd", required=True, help="the int8 model's SSD decode.run output")
    parser.add_argument("--int8-ar", required=True, help="the int8 model's AR decode.run output")
    parser.add_argument("--json", required=True, help="where to write the counts")
    args = parser.parse_args()
    result = agreement(read_captions(args.reference), read_captions(args.int8_ssd), read_captions(args.int8_ar))
    result["files"] = {"float": args.reference, "int8_ssd": args.int8_ssd, "int8_ar": args.int8_ar}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
