"""How many programs a folder of Qwen2.5-VL images of random sizes compiles, and what the patch
buckets' padding costs in throughput.

    python benchmarks/qwen_buckets/run.py --out benchmarks/qwen_buckets/cpu_50_images.json

A small random Qwen2.5-VL (built with transformers in-process and converted: needs the test
extra) captions 50 images of random sizes (sides uniform in 60..700 px, so they span the
processor's min/max pixels) through `Captioner.caption`, static batching of 8, greedy SSD,
three ways per repeat, interleaved:
- grouped: what decode.run does: the default patch buckets (fastvlm_jax.image.patches.
  patch_buckets: doubling), images batched with others of similar size four batches ahead
  (decode.engine.captioner.group_by_size);
- buckets: the same buckets, batches in arrival order;
- exact: every distinct patch count of the folder its own bucket, arrival order (rows still pad
  to the longest image of their batch, as any fixed-shape batch must).
Reported: distinct image sizes, compiled programs, patches computed vs the images' own,
decoding seconds without compilation (each new shape is compiled by an untimed warm-up) and
each way's seconds over exact's. Captions must be identical every way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from decode.engine.captioner import Captioner, group_by_size
from fastvlm_jax import convert
from fastvlm_jax.image.qwen_vl import patch_count
from tests.hf_qwen25vl import build_tiny_qwen25vl, random_image


def _captioner(ckpt_dir: Path, buckets, batch: int) -> Captioner:
    captioner = Captioner(ckpt_dir, batch_size=batch)
    if buckets is not None:
        captioner.__dict__["patch_buckets"] = tuple(buckets)  # the cached property, replaced
    return captioner


def _pass(captioner: Captioner, images, order, max_new: int):
    """(captions' token ids in the images' order, decoding seconds without compilation, the
    program shapes this captioner has compiled: one per (prompt width, patch count))."""
    results, seconds = [], 0.0
    for batch in captioner.caption_batches([images[i] for i in order], None, _options(max_new)):
        results.extend(r.token_ids for r in batch.results)
        seconds += batch.stats.seconds
    by_image = dict(zip(order, results))
    return [by_image[i] for i in range(len(images))], seconds, len(captioner._warm)


def _options(max_new: int):
    from decode.engine.captioner import GenerationOptions

    return GenerationOptions(mode="ssd", max_new_tokens=max_new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-images", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp())
    # 14-pixel patches merged 2x2 as released; images between 16 and 256 tokens.
    build_tiny_qwen25vl(
        root / "hf",
        seed=1,
        layers=6,
        hidden=128,
        heads=4,
        kv_heads=2,
        mrope_section=(4, 6, 6),
        vision_depth=4,
        fullatt=(1, 3),
        window_size=112,
        patch_size=14,
        min_pixels=16 * 28 * 28,
        max_pixels=256 * 28 * 28,
    )
    ckpt_dir = convert.convert(root / "hf", root / "ckpt", exit_layer=2, progress=False)
    rng = np.random.RandomState(args.seed)
    sizes = [(int(rng.randint(60, 701)), int(rng.randint(60, 701))) for _ in range(args.num_images)]
    images = [random_image(rng, h, w) for h, w in sizes]

    default = _captioner(ckpt_dir, None, args.batch_size)
    counts = [patch_count(h, w, default.image_config) for h, w in sizes]
    arrival = list(range(len(images)))
    grouped = [
        i
        for batch in group_by_size(arrival, args.batch_size, default.grouping_window, lambda i: counts[i])
        for i in batch
    ]
    runs = {
        "grouped": (default, grouped),
        "buckets": (_captioner(ckpt_dir, None, args.batch_size), arrival),
        "exact": (_captioner(ckpt_dir, sorted(set(counts)), args.batch_size), arrival),
    }
    computed = {}
    for name, (captioner, order) in runs.items():
        padded = 0
        for start in range(0, len(order), args.batch_size):
            rows = [captioner.preprocess(images[i]).patches.shape[0] for i in order[start : start + args.batch_size]]
            padded += max(rows) * args.batch_size
        computed[name] = padded

    programs, seconds, captions = {}, {name: [] for name in runs}, {}
    for repeat in range(args.repeats + 1):  # the first pass compiles (and is not timed)
        for name, (captioner, order) in runs.items():
            tokens, secs, new_programs = _pass(captioner, images, order, args.max_new_tokens)
            if repeat == 0:
                programs[name] = new_programs
                captions[name] = tokens
            else:
                seconds[name].append(secs)
    result = {
        "command": "python benchmarks/qwen_buckets/run.py " + " ".join(sys.argv[1:]),
        "device": str(jax.devices()[0].device_kind),
        "images": args.num_images,
        "batch_size": args.batch_size,
        "distinct_image_sizes": len(set(sizes)),
        "distinct_patch_counts": len(set(counts)),
        "image_patches": sum(counts),
        "buckets": list(default.patch_buckets),
        "compiled_programs": programs,
        "patches_computed": computed,
        "seconds": seconds,
        "median_seconds": {name: statistics.median(v) for name, v in seconds.items()},
        "over_exact": {
            name: statistics.median(seconds[name]) / statistics.median(seconds["exact"])
            for name in ("grouped", "buckets")
        },
        "over_exact_range": {
            name: [
                min(a / e for a, e in zip(seconds[name], seconds["exact"])),
                max(a / e for a, e in zip(seconds[name], seconds["exact"])),
            ]
            for name in ("grouped", "buckets")
        },
        "identical_captions": captions["grouped"] == captions["buckets"] == captions["exact"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=2))


if __name__ == "__main__":
    main()
