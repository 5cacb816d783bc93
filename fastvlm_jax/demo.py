"""The offline `demo` checkpoint: a small VLM trained by this project's own recipe.

It ships inside the package (fastvlm_jax/assets/demo, float32 params, ~48 MB), so
`--ckpt demo` works on a fresh machine without a network. An install without the assets
says how to rebuild them (`python -m train.recipes.demo`, about an hour on 2 CPU cores)
instead of starting that training by itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
from etils import epath

from fastvlm_jax.ckpt.checkpoint import load_checkpoint, save_checkpoint
from fastvlm_jax.nn.model import cast_params

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "demo"
# demo-draft: a separate 3-layer draft model for the demo (same tokenizer and image
# preprocessing), made by train.recipes.make_draft_model and fine-tuned by configs/demo.py:draft_model.
DRAFT_ASSET_DIR = Path(__file__).resolve().parent / "assets" / "demo-draft"


class DemoMissingError(FileNotFoundError):
    """The demo checkpoint is not part of this install."""


def cache_root() -> Path:
    return Path(os.environ.get("FASTVLM_CACHE", Path.home() / ".cache" / "fastvlm_jax")) / "demo"


# The names `--ckpt` and `--drafter model:` accept for the shipped checkpoints.
DEMO_NAMES = ("demo", "demo-draft")


def _packaged_or_built(asset_dir: Path, built: str, what: str, how: str) -> Path:
    """asset_dir if it holds a checkpoint, else cache_root() / built; DemoMissingError
    saying how to build it otherwise."""
    for folder in (asset_dir, cache_root() / built):
        if (folder / "config.json").is_file():
            return folder
    raise DemoMissingError(
        f"{what} is not bundled with this install ({asset_dir} is missing): build it with "
        f"`python -m train.recipes.demo --root {cache_root()}{how}, or reinstall "
        "fastvlm-jax with its package data"
    )


def demo_checkpoint() -> Path:
    """Path of the demo checkpoint: the packaged one, else one built into `cache_root()`."""
    return _packaged_or_built(ASSET_DIR, "refine/export", "the demo model", "` (about an hour on 2 CPU cores)")


def demo_draft_checkpoint() -> Path:
    """Path of the demo's draft model: the packaged one, else one built into `cache_root()`."""
    return _packaged_or_built(
        DRAFT_ASSET_DIR,
        "draft_model/export",
        "the demo's draft model",
        " --draft-model` (about 10 minutes on 2 CPU cores once the demo is built)",
    )


def resolve(ckpt: str | os.PathLike) -> str | os.PathLike:
    """`demo` / `demo-draft` -> the shipped checkpoint's folder (DemoMissingError if it is
    absent); any other name or path unchanged."""
    if ckpt == "demo":
        return demo_checkpoint()
    if ckpt == "demo-draft":
        return demo_draft_checkpoint()
    return ckpt


def package_demo(export_dir: str | os.PathLike, out_dir: str | os.PathLike = ASSET_DIR) -> epath.Path:
    """Copies a trained export into the package assets: params rounded to bfloat16 (the
    shipped weights are exactly bf16 values) but stored as float32.

    Stored float32 because a checkpoint decodes in its own dtype by default, and this CPU
    demo decodes about 2x faster in float32 than in bfloat16 on the 2-core CPU we measure
    on (XLA's CPU backend has no fast bf16 matmul); `--dtype bfloat16` gives the bf16 model.
    """

    ckpt = load_checkpoint(export_dir)
    params = cast_params(cast_params(ckpt.params, jnp.bfloat16), jnp.float32)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    return save_checkpoint(out_dir, ckpt.config, params, ckpt.tokenizer, ckpt.image_config)


def main(argv=None) -> int:

    parser = argparse.ArgumentParser(
        prog="python -m fastvlm_jax.demo",
        description="Print the demo checkpoint path, or package a new one (or a new draft model).",
    )
    parser.add_argument(
        "--package",
        metavar="EXPORT_DIR",
        help="copy this trained export (train.recipes.demo's ROOT/refine/export) into the package assets",
    )
    parser.add_argument(
        "--package-draft",
        metavar="EXPORT_DIR",
        help="copy this trained draft model (ROOT/draft_model/export) into the package assets as demo-draft",
    )
    args = parser.parse_args(argv)
    try:
        if args.package_draft:
            print(package_demo(args.package_draft, DRAFT_ASSET_DIR))
        else:
            print(package_demo(args.package) if args.package else demo_checkpoint())
    except DemoMissingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
