"""Compile time of the SSD (and AR) generation program against decoder depth.

    python benchmarks/scripts/compile_time.py --layers 4 32 [--width 256] [--batch 1] --json OUT.json

Builds random LLaMA-style models of the same width and different depths, and times the
first `decode.engine.generate` call (trace + compile + run) and a second call with the
same shapes (run only); compile seconds = first - second. Uses only the public API, so
the same script measures any revision of the engine (run it from that revision's root).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path.cwd()))

from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate
from fastvlm_jax.nn.config import DraftConfig, TextConfig, VisionConfig
from fastvlm_jax.nn.llava import LlavaConfig
from fastvlm_jax.nn.model import VLM


def config_with(num_layers: int, width: int) -> LlavaConfig:
    return LlavaConfig(
        vision=VisionConfig(
            image_size=32, patch_size=16, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2
        ),
        text=TextConfig(
            vocab_size=1024,
            hidden_size=width,
            intermediate_size=2 * width,
            num_layers=num_layers,
            num_heads=4,
            num_kv_heads=4,
        ),
        draft=DraftConfig(exit_layer=1),
        image_token_id=1023,
    )


def time_program(num_layers: int, width: int, mode: str, batch: int, prompt_len: int, max_new: int) -> dict:
    model = VLM(config_with(num_layers, width))
    params = jax.jit(model.init)(jax.random.key(0))
    prompts = Prompts(jnp.full((batch, prompt_len), 5, jnp.int32), jnp.full((batch,), prompt_len, jnp.int32))
    spec = DecodeSpec(mode, capacity=max_new, eos_ids=(), policy=DraftPolicy(draft_len=4))
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        jax.block_until_ready(generate(model, params, prompts, spec, max_new).tokens)
        seconds.append(time.perf_counter() - start)
    return {
        "layers": num_layers,
        "mode": mode,
        "first_call_s": seconds[0],
        "run_s": seconds[1],
        "compile_s": seconds[0] - seconds[1],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=["ssd"], choices=["ssd", "ar"])
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for mode in args.modes:
        for layers in args.layers:
            row = time_program(layers, args.width, mode, batch=args.batch, prompt_len=16, max_new=16)
            rows.append(row)
            print(
                f"{mode} {layers:3d} layers: compile {row['compile_s']:.2f} s "
                f"(first call {row['first_call_s']:.2f} s, run {row['run_s']:.3f} s)",
                flush=True,
            )
    report = {
        "revision": revision,
        "device": str(jax.devices()[0].device_kind),
        "machine": platform.processor() or platform.machine(),
        "width": args.width,
        "batch": args.batch,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "runs": rows,
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
