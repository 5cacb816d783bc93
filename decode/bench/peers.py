"""Our engine against Hugging Face transformers on the same weights, side by side in one run.

    python -m decode.bench.peers [--size 134m|tiny] [--exit-layer K] [--draft-len G] \
        [--batch-size 1 8] [--max-new-tokens N] [--repeats R] [--deep-scale S] --json OUT.json

Builds a random LLaVA-shaped model in transformers (LlavaForConditionalGeneration with a
LLaMA text model), converts its weights with our converter (`convert_llava.config_from_hf` +
`convert_llava.convert_params`, read from the in-memory state dict), and decodes the same
text-only prompt ids with four systems:

  hf_ar          LlamaForCausalLM (the LLaVA language model + its lm_head) `.generate`, greedy
  hf_early_exit  the same model, `.generate(..., assistant_early_exit=K)`: transformers'
                 self-speculative decoding (draft = its first K layers + final norm + head),
                 num_assistant_tokens=G with the constant schedule and no confidence stop;
                 batch 1 only (assisted generation does not batch)
  ours_ar        decode.engine AR (Prompts with pixels=None)
  ours_ssd       decode.engine SSD at exit layer K with the untrained (identity) imitation
                 network: the same early-exit draft transformers uses, static draft length G

(transformers' assistant_early_exit fails on LlavaForConditionalGeneration, hence the
language model alone.) Every system makes exactly N new tokens (no EOS: HF's
eos_token_id=None, ours eos_ids=()), greedy; the runs are interleaved (each repeat runs
every system once) and the median and min are reported; torch uses --threads threads
(default: all cores, which is what XLA's CPU client uses). Token equality between all
four is checked per batch. With plain random weights an early exit is almost never
accepted; --deep-scale S < 1 shrinks the deep layers' output projections so that it is
(see `build_models`), the same weights for all four systems.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from decode.bench.machine import machine_info
from decode.bench.models import decode_sets
from decode.bench.plots import plot_peers
from decode.bench.timing import acceptance_report, speed_report, time_interleaved
from decode.engine import DecodeOutput, DecodeSpec, DraftPolicy, Prompts
from decode.engine.captioner import describe_device
from fastvlm_jax.ckpt.convert.llava import config_from_hf, convert_params, state_dict_source
from fastvlm_jax.nn.model import VLM, param_count

PRESETS = {
    # ~134M parameters: 12 x 768 LLaMA, vocab 32064 (LLaVA-1.5's), untied head.
    "134m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32064,
        image_token_index=32000,
    ),
    # A few M parameters, for tests.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        image_token_index=511,
    ),
}


def build_models(size: str, exit_layer: int, seed: int = 0, deep_scale: float = 1.0):
    """(HF LlamaForCausalLM, our VLM, our params, hf LlavaConfig) on the same random weights.

    deep_scale < 1 multiplies the output projections (o_proj, down_proj) of the layers at
    and past the exit layer: the deep layers then refine the shallow ones' prediction
    instead of overturning it, as in a trained model, so the early-exit draft is accepted
    often (with plain random weights it almost never is, and both speculative decoders
    only pay for drafting)."""
    # torch and transformers: optional (the test extra), imported only when this runs.
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    preset = dict(PRESETS[size])
    image_token = preset.pop("image_token_index")
    text = LlamaConfig(
        **preset,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=image_token)
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random-init norms are all ones: perturb them so they matter
        for name, param in llava.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            deep = ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) >= exit_layer
            if deep_scale != 1.0 and (".o_proj." in name or ".down_proj." in name) and deep:
                param.mul_(deep_scale)
    state = llava.state_dict()
    ours_config = config_from_hf(config.to_dict(), exit_layer=exit_layer)
    params = convert_params(state_dict_source(state), ours_config, jax.random.key(seed), progress=False)

    llama = LlamaForCausalLM(config.text_config).eval()
    llama.model.load_state_dict(llava.model.language_model.state_dict())
    llama.lm_head.load_state_dict(llava.lm_head.state_dict())
    llama.generation_config.eos_token_id = None
    llama.generation_config.pad_token_id = 0
    del llava, state
    return llama, VLM(ours_config), params, config


def run(
    size: str = "134m",
    exit_layer: int = 3,
    draft_len: int = 4,
    batch_sizes=(1, 8),
    max_new_tokens: int = 64,
    prompt_len: int = 32,
    repeats: int = 5,
    threads: int | None = None,
    seed: int = 0,
    deep_scale: float = 1.0,
) -> dict:
    # torch and transformers: optional (the test extra), imported only when this runs.
    import torch
    import transformers

    threads = threads or os.cpu_count()
    torch.set_num_threads(threads)
    llama, model, params, hf_config = build_models(size, exit_layer, seed, deep_scale)
    vocab = hf_config.text_config.vocab_size
    n = max_new_tokens
    ar_spec = DecodeSpec("ar", capacity=n, eos_ids=())
    ssd_spec = DecodeSpec("ssd", capacity=n, eos_ids=(), policy=DraftPolicy(draft_len=draft_len))
    hf_kwargs = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    ee_kwargs = dict(
        hf_kwargs,
        assistant_early_exit=exit_layer,
        num_assistant_tokens=draft_len,
        num_assistant_tokens_schedule="constant",
        assistant_confidence_threshold=0.0,
    )

    results, identical, first_calls, acceptance = [], {}, {}, {}
    for batch in batch_sizes:
        rng = np.random.RandomState(seed + batch)
        ids = np.concatenate(
            [np.ones((batch, 1)), rng.randint(3, min(vocab, hf_config.image_token_index), (batch, prompt_len - 1))], 1
        ).astype(np.int32)
        torch_ids = torch.as_tensor(ids, dtype=torch.long)
        mask = torch.ones_like(torch_ids)
        prompts = Prompts(jnp.asarray(ids), jnp.full((batch,), prompt_len, jnp.int32), None)

        def hf(kwargs):
            def call():
                with torch.inference_mode():
                    return llama.generate(torch_ids, attention_mask=mask, **kwargs)[:, prompt_len:].numpy()

            return call

        def ours(spec):
            # The call the main benchmark times (decode.bench.timing), on the converted weights.
            return lambda: decode_sets(model, params, [prompts], spec, n)

        systems = {"hf_ar": hf(hf_kwargs), "ours_ar": ours(ar_spec), "ours_ssd": ours(ssd_spec)}
        if batch == 1:
            systems["hf_early_exit"] = hf(ee_kwargs)
        timed = time_interleaved(
            systems, repeats, log=lambda line: print(f"  batch {batch} {line}", file=sys.stderr, flush=True)
        )
        tokens = {}
        for name, (out, times, first_call) in timed.items():
            first_calls[f"{name}_b{batch}"] = first_call
            tokens[name] = out.tokens if isinstance(out, DecodeOutput) else out
            results.append({"system": name, "batch_size": batch, **speed_report(batch * n, batch, times)})
        reference = tokens["hf_ar"]
        entry = {}
        for name, toks in tokens.items():
            same = bool(np.array_equal(toks, reference))
            entry[name] = same
            if not same:
                diff = np.argwhere(toks != reference)
                entry[f"{name}_first_mismatch"] = {"row": int(diff[0][0]), "token": int(diff[0][1])}
        identical[str(batch)] = entry
        counts = acceptance_report(timed["ours_ssd"][0])
        acceptance[str(batch)] = {k: counts[k] for k in ("mean_accepted_length", "acceptance_rate")}

    def tps(system, batch):
        for r in results:
            if r["system"] == system and r["batch_size"] == batch:
                return r["tokens_per_s"]
        return None

    ratios = {}
    for batch in batch_sizes:
        if tps("hf_ar", batch):
            ratios[f"ours_ar_over_hf_ar_b{batch}"] = tps("ours_ar", batch) / tps("hf_ar", batch)
            ratios[f"ours_ssd_over_hf_ar_b{batch}"] = tps("ours_ssd", batch) / tps("hf_ar", batch)
        if tps("hf_early_exit", batch):
            ratios[f"ours_ssd_over_hf_early_exit_b{batch}"] = tps("ours_ssd", batch) / tps("hf_early_exit", batch)
            ratios[f"hf_early_exit_over_hf_ar_b{batch}"] = tps("hf_early_exit", batch) / tps("hf_ar", batch)
        ratios[f"ours_ssd_over_ours_ar_b{batch}"] = tps("ours_ssd", batch) / tps("ours_ar", batch)
    text = hf_config.text_config
    return {
        "kind": "peers",
        "device": describe_device(),
        "machine": machine_info(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "torch_threads": torch.get_num_threads(),
        "model": {
            "size": size,
            "params": param_count({k: v for k, v in params.items() if k in ("language_model",)}),
            "hidden_size": text.hidden_size,
            "num_layers": text.num_hidden_layers,
            "intermediate_size": text.intermediate_size,
            "vocab_size": text.vocab_size,
            "num_heads": text.num_attention_heads,
            "num_kv_heads": text.num_key_value_heads,
        },
        "exit_layer": exit_layer,
        "draft_len": draft_len,
        "deep_scale": deep_scale,
        "max_new_tokens": n,
        "prompt_len": prompt_len,
        "repeats": repeats,
        "results": results,
        "ratios": ratios,
        "identical": identical,
        "ours_ssd_acceptance": acceptance,
        "first_call_seconds": first_calls,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m decode.bench.peers", description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(PRESETS), default="134m")
    parser.add_argument("--exit-layer", type=int, default=3)
    parser.add_argument("--draft-len", type=int, default=4)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--deep-scale", type=float, default=1.0, help="scale of the deep layers' output projections (see build_models)"
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    report = run(
        args.size,
        args.exit_layer,
        args.draft_len,
        tuple(args.batch_size),
        args.max_new_tokens,
        args.prompt_len,
        args.repeats,
        args.threads,
        args.seed,
        args.deep_scale,
    )
    for r in report["results"]:
        print(
            f"{r['system']:>14s} batch {r['batch_size']:3d}: {r['tokens_per_s']:8.1f} tok/s "
            f"(best {r['tokens_per_s_best']:8.1f})"
        )
    for key, value in report["ratios"].items():
        print(f"{key}: {value:.2f}")
    print("identical:", json.dumps(report["identical"]))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not args.no_plots:
        report["plots"] = [str(p) for p in plot_peers(report, path)]
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
