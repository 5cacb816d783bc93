"""The offline `demo` checkpoint: a tiny VLM trained by this project's own recipe.

It ships inside the package (fastvlm_jax/assets/demo, a few MB), so `--ckpt demo` works
on a fresh machine without a network. If the assets are missing (a trimmed install),
the recipe in `train.demo_recipe` rebuilds it once into the cache folder
($FASTVLM_CACHE, default ~/.cache/fastvlm_jax) and later runs load it from there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "demo"


def cache_root() -> Path:
    return Path(os.environ.get("FASTVLM_CACHE", Path.home() / ".cache" / "fastvlm_jax")) / "demo"


def demo_checkpoint(progress: bool = True) -> Path:
    """Path of the demo checkpoint, building it on first use if it is not shipped."""
    if (ASSET_DIR / "config.json").is_file():
        return ASSET_DIR
    root = cache_root()
    export = root / "refine" / "export"
    if (export / "config.json").is_file():
        return export
    print(f"The demo model is not bundled with this install: training it into {root} "
          "(one time; resumes if interrupted).", file=sys.stderr)
    from train.demo_recipe import run_recipe

    run_recipe(root, {"data.data_dir": str(root / "tfds")}, progress=progress)
    return export


def package_demo(export_dir: str | os.PathLike, out_dir: str | os.PathLike = ASSET_DIR) -> Path:
    """Copies a trained export into the package assets with bfloat16 params (half the bytes).

    Loading restores them as float32 (the model's own dtype), so the shipped model is
    exactly the bf16-rounded export; every number we report is measured on it.
    """
    import shutil

    import jax
    import jax.numpy as jnp

    from fastvlm_jax.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(export_dir)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), ckpt.params)
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    return save_checkpoint(out_dir, ckpt.config, params, ckpt.tokenizer, ckpt.image_config)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastvlm_jax.demo",
                                     description="Print the demo checkpoint path, or package a new one.")
    parser.add_argument("--package", metavar="EXPORT_DIR",
                        help="copy this trained export (train.demo_recipe's ROOT/refine/export) into the "
                             "package assets")
    args = parser.parse_args(argv)
    if args.package:
        print(package_demo(args.package))
    else:
        print(demo_checkpoint())
    return 0


if __name__ == "__main__":
    sys.exit(main())
