"""AR vs self-speculative decoding on the same model and inputs, in one process.

    python -m decode.bench --ckpt CKPT_DIR|demo|random:SIZE [--images PATH...] \
        [--batch-size N ...] [--exit-layer K ...] [--draft-len G ...] --json OUT.json

For every (batch size, exit layer, draft length) it compiles both programs once, then
times `--repeats` runs of each and reports the median (and min). Tokens/s counts
generated tokens only; compile time is reported apart. `identical` says whether the
greedy SSD tokens equal the AR tokens. The first combination's numbers are also
written at the top level of the JSON (ar.tokens_per_s, ssd.tokens_per_s, speedup, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from decode.engine import DecodeSpec, DraftPolicy, Prompts, generate
from decode.sampling import SamplingConfig
from fastvlm_jax.config import DraftConfig, TextConfig, VisionConfig, VLMConfig
from fastvlm_jax.model import VLM, param_bytes, param_count

# Random-weight presets for speed measurements (acceptance of an untrained draft is low).
RANDOM_PRESETS = {
    "tiny": VLMConfig(
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                            num_layers=2, num_heads=4),
        text=TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=4,
                        num_heads=4, num_kv_heads=4),
        draft=DraftConfig(exit_layer=1), image_token_id=511),
    "50m": VLMConfig(
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=256, intermediate_size=1024,
                            num_layers=4, num_heads=4),
        text=TextConfig(vocab_size=32064, hidden_size=512, intermediate_size=1408, num_layers=8,
                        num_heads=8, num_kv_heads=8),
        draft=DraftConfig(exit_layer=2), image_token_id=32000),
    "150m": VLMConfig(
        vision=VisionConfig(image_size=64, patch_size=8, hidden_size=256, intermediate_size=1024,
                            num_layers=4, num_heads=4),
        text=TextConfig(vocab_size=32064, hidden_size=768, intermediate_size=2048, num_layers=16,
                        num_heads=12, num_kv_heads=12),
        draft=DraftConfig(exit_layer=4), image_token_id=32000),
}


@dataclasses.dataclass
class BenchModel:
    config: VLMConfig
    params: object
    tokenizer: object = None
    image_config: object = None
    source: str = ""


def load_bench_model(spec: str, seed: int = 0) -> BenchModel:
    """`random:PRESET`, `demo`, or a checkpoint directory."""
    if spec.startswith("random:"):
        preset = spec.split(":", 1)[1]
        if preset not in RANDOM_PRESETS:
            raise SystemExit(f"error: unknown random preset {preset!r}; choose from {sorted(RANDOM_PRESETS)}")
        config = RANDOM_PRESETS[preset]
        return BenchModel(config, VLM(config).init(jax.random.key(seed)), source=spec)
    from fastvlm_jax.checkpoint import CheckpointError, load_checkpoint

    path = spec
    if spec == "demo":
        from fastvlm_jax.demo import demo_checkpoint

        path = demo_checkpoint(progress=True)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as err:
        raise SystemExit(f"error: {err}")
    return BenchModel(ckpt.config, ckpt.params, ckpt.tokenizer, ckpt.image_config, source=str(path))


def with_exit_layer(bench: BenchModel, exit_layer: int) -> tuple[VLMConfig, object, bool]:
    """The model with another exit layer; its imitation network is reset to the identity
    (an untrained early exit) when the layer differs from the one it was trained for."""
    if exit_layer == bench.config.draft.exit_layer:
        return bench.config, bench.params, False
    config = bench.config.with_draft(exit_layer=exit_layer)
    fresh = VLM(config).init_imitation(jax.random.key(0))
    return config, {**bench.params, "imitation": fresh}, True


def make_prompts(bench: BenchModel, batch: int, images: list[str], prompt: str, seed: int) -> Prompts:
    """Real images through the checkpoint's processor, else random pixels and text ids."""
    config = bench.config
    if images and bench.tokenizer is not None and bench.image_config is not None:
        from fastvlm_jax.image_processing import load_image, preprocess_image
        from fastvlm_jax.tokenizer import build_llava_input_ids

        chosen = [images[i % len(images)] for i in range(batch)]
        pixels = np.stack([preprocess_image(load_image(p), bench.image_config) for p in chosen])
        ids = build_llava_input_ids(bench.tokenizer, prompt, config.num_image_tokens)
        input_ids = np.asarray([ids] * batch, np.int32)
        return Prompts(jnp.asarray(input_ids), jnp.full((batch,), len(ids), jnp.int32), jnp.asarray(pixels))
    rng = np.random.RandomState(seed)
    text = rng.randint(3, min(config.image_token_id, config.text.vocab_size - 1), (batch, 12))
    image = np.full((batch, config.num_image_tokens), config.image_token_id)
    input_ids = np.concatenate([np.ones((batch, 1)), image, text], axis=1).astype(np.int32)
    size = config.vision.image_size
    pixels = rng.randn(batch, size, size, 3).astype(np.float32)
    return Prompts(jnp.asarray(input_ids), jnp.full((batch,), input_ids.shape[1], jnp.int32),
                   jnp.asarray(pixels))


def _time_runs(model, params, prompts, spec, max_new, repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(generate(model, params, prompts, spec, max_new))
    compile_and_first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(generate(model, params, prompts, spec, max_new))
        times.append(time.perf_counter() - start)
    return out, times, compile_and_first


def _mode_report(out, times, compile_and_first, mode):
    tokens = int(np.sum(np.asarray(out.num_tokens)))
    median = statistics.median(times)
    rounds = int(np.sum(np.asarray(out.rounds)))
    rows = len(np.asarray(out.num_tokens))
    report = {
        "tokens": tokens, "seconds_median": median, "seconds_min": min(times),
        "tokens_per_s": tokens / median, "tokens_per_s_best": tokens / min(times),
        "latency_ms_per_token": 1000 * median / max(tokens / rows, 1),
        "full_model_calls": rounds + rows, "first_call_seconds": compile_and_first,
    }
    if mode == "ssd":
        drafted = int(np.sum(np.asarray(out.drafted)))
        accepted = int(np.sum(np.asarray(out.accepted)))
        attempts = np.asarray(out.position_attempts)
        accepts = np.asarray(out.position_accepts)
        report.update({
            # Tokens per full-model call (verification round), bonus token included; the
            # prefill's first token is not a round's output, so it is left out.
            "mean_accepted_length": (tokens - rows) / max(rounds, 1),
            "mean_accepted_drafts": accepted / max(rounds, 1),
            "acceptance_rate": accepted / max(drafted, 1),
            "drafted": drafted, "accepted": accepted,
            "acceptance_per_position": [float(a / max(n, 1)) for a, n in zip(accepts, attempts)],
        })
    return report


def bench_one(bench: BenchModel, prompts: Prompts, exit_layer: int, draft_len: int, max_new: int,
              repeats: int, sampling: SamplingConfig, policy_kwargs: dict) -> dict:
    config, params, reset = with_exit_layer(bench, exit_layer)
    model = VLM(config)
    eos = (bench.tokenizer.eos_id,) if bench.tokenizer is not None else ()
    policy = DraftPolicy(draft_len=draft_len, **policy_kwargs)
    capacity = max_new
    ar_spec = DecodeSpec("ar", capacity=capacity, sampling=sampling, eos_ids=eos)
    ssd_spec = DecodeSpec("ssd", capacity=capacity, sampling=sampling, eos_ids=eos, policy=policy)
    ar_out, ar_times, ar_first = _time_runs(model, params, prompts, ar_spec, max_new, repeats)
    ssd_out, ssd_times, ssd_first = _time_runs(model, params, prompts, ssd_spec, max_new, repeats)
    ar = _mode_report(ar_out, ar_times, ar_first, "ar")
    ssd = _mode_report(ssd_out, ssd_times, ssd_first, "ssd")
    batch, prompt_len = prompts.input_ids.shape
    base = {k: v for k, v in params.items() if k != "imitation"}
    ar_cache = model.init_cache(batch, ar_spec.cache_capacity(prompt_len))
    ssd_cache = model.init_cache(batch, ssd_spec.cache_capacity(prompt_len))
    draft_cache = model.init_draft_cache(batch, ssd_spec.cache_capacity(prompt_len))
    identical = bool(np.array_equal(np.asarray(ar_out.tokens), np.asarray(ssd_out.tokens)))
    return {
        "batch_size": batch, "exit_layer": exit_layer, "draft_len": draft_len,
        "imitation": "reset to identity (exit layer differs from checkpoint)" if reset else "as loaded",
        "ar": ar, "ssd": ssd,
        "speedup": ssd["tokens_per_s"] / ar["tokens_per_s"],
        "identical": identical if sampling.greedy else None,
        "mean_accepted_length": ssd["mean_accepted_length"],
        "acceptance_rate": ssd["acceptance_rate"],
        "memory": {
            "base_params_bytes": param_bytes(base),
            "imitation_params_bytes": param_bytes(params["imitation"]),
            "ar_kv_cache_bytes": ar_cache.nbytes(),
            # The shallow layers share the full model's cache: SSD only adds the lookahead
            # slots and, for the one-layer imitation network, its own one-layer cache.
            "ssd_kv_cache_bytes": ssd_cache.nbytes(),
            "ssd_draft_cache_bytes": draft_cache.nbytes() if draft_cache is not None else 0,
        },
    }


def device_name() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{getattr(device, 'device_kind', '')} x{jax.device_count()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m decode.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint dir, 'demo', or random:PRESET "
                        f"({', '.join(sorted(RANDOM_PRESETS))})")
    parser.add_argument("--images", nargs="*", default=[], help="image files (default: random pixels)")
    parser.add_argument("--prompt", default="Describe the image.")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--exit-layer", type=int, nargs="+", default=None,
                        help="exit layers to try (default: the checkpoint's)")
    parser.add_argument("--draft-len", type=int, nargs="+", default=[4])
    parser.add_argument("--min-confidence", type=float, default=0.0)
    parser.add_argument("--draft-schedule", choices=["static", "context"], default="static")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", required=True, help="output JSON file")
    args = parser.parse_args(argv)

    bench = load_bench_model(args.ckpt, args.seed)
    exit_layers = args.exit_layer or [bench.config.draft.exit_layer]
    for layer in exit_layers:
        if not 1 <= layer < bench.config.text.num_layers:
            parser.error(f"--exit-layer {layer} must be in [1, {bench.config.text.num_layers - 1}]")
    sampling = SamplingConfig(temperature=args.temperature)
    policy_kwargs = dict(min_confidence=args.min_confidence, schedule=args.draft_schedule)
    runs = []
    for batch in args.batch_size:
        prompts = make_prompts(bench, batch, args.images, args.prompt, args.seed)
        for exit_layer in exit_layers:
            for draft_len in args.draft_len:
                result = bench_one(bench, prompts, exit_layer, draft_len, args.max_new_tokens, args.repeats,
                                   sampling, policy_kwargs)
                runs.append(result)
                print(f"batch {batch:3d} exit {exit_layer:2d} draft {draft_len:2d}: "
                      f"AR {result['ar']['tokens_per_s']:8.1f} tok/s  SSD {result['ssd']['tokens_per_s']:8.1f} "
                      f"tok/s  speedup {result['speedup']:.2f}x  accepted/round "
                      f"{result['mean_accepted_length']:.2f}  acceptance {result['acceptance_rate']:.2f}  "
                      f"identical {result['identical']}", flush=True)
    top = runs[0]
    report = {
        "device": device_name(), "model": bench.source,
        "params": param_count(bench.params), "num_layers": bench.config.text.num_layers,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "temperature": args.temperature,
        **{k: top[k] for k in ("batch_size", "exit_layer", "draft_len", "ar", "ssd", "speedup", "identical",
                               "mean_accepted_length", "acceptance_rate", "memory")},
        "runs": runs,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
