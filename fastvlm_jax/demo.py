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
