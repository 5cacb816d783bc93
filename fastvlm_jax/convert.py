"""Hugging Face checkpoint (a local folder) -> fastvlm-jax checkpoint, for any family.

    python -m fastvlm_jax.convert --hf HF_DIR --out CKPT_DIR [--exit-layer K] [--dtype bfloat16] [--quantize int8]
    python -m fastvlm_jax.convert --ckpt CKPT_DIR --out INT8_DIR --quantize int8


config.json's model_type picks the family's converter from `fastvlm_jax.nn.families`
('llava': `fastvlm_jax.ckpt.convert.llava`, 'blip-2': `fastvlm_jax.ckpt.convert.blip2`,
'gemma3': `fastvlm_jax.ckpt.convert.gemma3`). The
checkpoint keeps the dtype it is converted to (`--dtype`), and decoding uses it by default.
`--quantize int8` stores the decoding weights as int8 with per-output-channel scales
(`fastvlm_jax.nn.quant`); `--ckpt` quantizes one of our (float) checkpoints instead of
converting a HF folder. Never touches the network.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from etils import epath

from fastvlm_jax.ckpt.checkpoint import load_checkpoint, load_config, save_checkpoint
from fastvlm_jax.ckpt.convert.common import ConversionError
from fastvlm_jax.nn.config import ConfigError, ImitationKind
from fastvlm_jax.nn.families import family_named
from fastvlm_jax.nn.quant import QUANTIZATIONS, QuantizationError, check_quantization, quantize_model


def convert(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    exit_layer: int | None = None,
    draft_kind: ImitationKind = "ffn",
    draft_hidden: int = 0,
    dtype: str = "float32",
    seed: int = 0,
    progress: bool = True,
    quantize: str | None = None,
) -> epath.Path:
    """Converts a HF folder of any supported family into our checkpoint; returns its path.
    quantize: 'int8' stores the decoding weights int8 (fastvlm_jax.nn.quant)."""
    check_quantization(quantize)
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir} is not a folder: pass the local Hugging Face checkpoint folder")
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{config_file} is missing: is {hf_dir} a Hugging Face checkpoint folder?")
    model_type = json.loads(config_file.read_text()).get("model_type")
    try:
        family = family_named(model_type)
    except ConfigError:
        raise ConversionError(
            f"model type {model_type!r} is not supported: this converter reads "
            "LLaVA (model_type 'llava'), BLIP-2 OPT ('blip-2') and Gemma 3 ('gemma3') checkpoints"
        ) from None
    converter = importlib.import_module(family.converter)
    return converter.convert(hf_dir, out_dir, exit_layer, draft_kind, draft_hidden, dtype, seed, progress, quantize)


def quantize_checkpoint(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, quantize: str = "int8") -> epath.Path:
    """Our float checkpoint -> a copy with int8 decoding weights (tokenizer and image
    preprocessing kept); returns its path. An already quantized one raises QuantizationError."""
    check_quantization(quantize)
    if load_config(ckpt_dir).quantization is not None:
        raise QuantizationError(f"{ckpt_dir} is already quantized: pass its float checkpoint")
    ckpt = load_checkpoint(ckpt_dir)
    config, params = quantize_model(ckpt.config, ckpt.params, quantize)
    return save_checkpoint(out_dir, config, params, ckpt.tokenizer, ckpt.image_config)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvlm_jax.convert", description=(__doc__ or "").split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="local Hugging Face LLaVA, BLIP-2 (OPT) or Gemma 3 folder")
    source.add_argument("--ckpt", help="one of our float checkpoints, to quantize (with --quantize)")
    parser.add_argument("--out", required=True, help="output checkpoint folder")
    parser.add_argument(
        "--exit-layer", type=int, default=None, help="draft path exit layer (default: a quarter of the decoder depth)"
    )
    parser.add_argument("--draft-kind", choices=["ffn", "layer"], default="ffn", help="imitation network kind")
    parser.add_argument("--draft-hidden", type=int, default=0, help="imitation network FFN width (0: the decoder's)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="parameter dtype of the converted checkpoint (kept when it is loaded)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh imitation network")
    parser.add_argument(
        "--quantize",
        choices=list(QUANTIZATIONS),
        default=None,
        help="store the decoding weights as int8 with per-output-channel scales (fastvlm_jax.nn.quant)",
    )
    args = parser.parse_args(argv)
    if args.ckpt is not None and args.quantize is None:
        parser.error("--ckpt converts our checkpoint by quantizing it: add --quantize int8")
    try:
        if args.ckpt is not None:
            out = quantize_checkpoint(args.ckpt, args.out, args.quantize)
        else:
            out = convert(
                args.hf,
                args.out,
                args.exit_layer,
                args.draft_kind,
                args.draft_hidden,
                args.dtype,
                args.seed,
                quantize=args.quantize,
            )
    except (ConversionError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
