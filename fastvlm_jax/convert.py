"""Hugging Face checkpoint (a local folder) -> fastvlm-jax checkpoint, for any family.

    python -m fastvlm_jax.convert --hf HF_DIR --out CKPT_DIR [--exit-layer K] [--dtype bfloat16]

config.json's model_type picks the family's converter from `fastvlm_jax.nn.families`
('llava': `fastvlm_jax.ckpt.convert.llava`, 'blip-2': `fastvlm_jax.ckpt.convert.blip2`,
'gemma3': `fastvlm_jax.ckpt.convert.gemma3`). The
checkpoint keeps the dtype it is converted to (`--dtype`), and decoding uses it by default.
Never touches the network.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from etils import epath

from fastvlm_jax.ckpt.convert.common import ConversionError
from fastvlm_jax.nn.config import ConfigError, ImitationKind
from fastvlm_jax.nn.families import family_named


def convert(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    exit_layer: int | None = None,
    draft_kind: ImitationKind = "ffn",
    draft_hidden: int = 0,
    dtype: str = "float32",
    seed: int = 0,
    progress: bool = True,
) -> epath.Path:
    """Converts a HF folder of any supported family into our checkpoint; returns its path."""
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
    return converter.convert(hf_dir, out_dir, exit_layer, draft_kind, draft_hidden, dtype, seed, progress)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvlm_jax.convert", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--hf", required=True, help="local Hugging Face LLaVA, BLIP-2 (OPT) or Gemma 3 folder")
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
    args = parser.parse_args(argv)
    try:
        out = convert(args.hf, args.out, args.exit_layer, args.draft_kind, args.draft_hidden, args.dtype, args.seed)
    except (ConversionError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
