"""Makes a small draft VLM from a checkpoint: the same model with only its first N decoder layers.

    python -m train.recipes.make_draft_model --from CKPT --layers N --out DIR [--overwrite]

A separate draft model must share the target's tokenizer (the verifier checks the
drafted ids) and should start close to it. Truncating the target does both: the result
keeps the source's token embeddings, final norm, LM head, vision tower, projector (and
BLIP-2's Q-Former), tokenizer and image preprocessing, and its decoder is layers
[0, N) of the source, so its logits are exactly the source's `logits(state N)` (the
early exit at layer N). Fine-tuning it (configs/demo.py:draft_model for the demo) then
makes those logits track the full model's.

Also kept: the imitation network (its shapes do not depend on depth), with
draft.exit_layer = min(source's, N - 1) so the config stays valid. Dropped: the EAGLE
head, which reads the source's last-layer features that the truncated model no longer
computes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax

from fastvlm_jax.ckpt.checkpoint import CheckpointError, load_checkpoint, load_config, save_checkpoint
from fastvlm_jax.demo import DemoMissingError, demo_checkpoint
from fastvlm_jax.nn.model import VLM

MIN_LAYERS = 2  # with one layer there is no exit layer in [1, num_layers - 1] to keep a valid config


class DraftModelError(ValueError):
    """Bad input for make_draft_model (a missing checkpoint, an impossible depth, ...)."""


def truncated_config(config, num_layers: int):
    """The source's config with `num_layers` decoder layers and no EAGLE head.

    Works for any family whose config has `text.num_layers` and `draft.exit_layer`
    (llava, blip-2, gemma3). Raises DraftModelError for a depth outside [2, source layers).
    """
    source_layers = config.text.num_layers
    if num_layers < MIN_LAYERS:
        raise DraftModelError(
            f"--layers {num_layers}: a draft model needs at least {MIN_LAYERS} decoder "
            f"layers (its draft.exit_layer must lie in [1, layers - 1]); pass "
            f"--layers 2..{source_layers - 1}"
        )
    if num_layers >= source_layers:
        raise DraftModelError(
            f"--layers {num_layers}: the source has {source_layers} decoder layers and a "
            f"draft model must have fewer; pass --layers {MIN_LAYERS}..{source_layers - 1}"
        )
    draft = dataclasses.replace(config.draft, exit_layer=min(config.draft.exit_layer, num_layers - 1), eagle_layers=0)
    text_changes: dict[str, Any] = {"num_layers": num_layers}
    if hasattr(config.text, "layer_types"):  # Gemma 3: each layer's kind (local / global) goes with it
        text_changes["layer_types"] = config.text.layer_types[:num_layers]
    return config.replace(text=dataclasses.replace(config.text, **text_changes), draft=draft)


def truncated_params(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Source params -> the draft model's: 'language_model/layers' (every leaf stacked
    [source_layers, ...]) sliced to [:num_layers], 'eagle' dropped, the rest shared as is
    (same arrays, no copy)."""
    text = dict(params["language_model"])
    text["layers"] = jax.tree.map(lambda x: x[:num_layers], text["layers"])
    return {**{k: v for k, v in params.items() if k != "eagle"}, "language_model": text}


def _check_against_config(params, config) -> None:
    """Fails if `params` do not have exactly the shapes `config` builds (a family whose
    decoder is not one stacked 'language_model/layers' tree would land here)."""
    want = nn.meta.unbox(VLM(config).abstract_params())
    flat_want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    flat_got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if flat_want != flat_got:
        diff = sorted(set(flat_want.items()) ^ set(flat_got.items()))[:3]
        raise DraftModelError(
            f"model_type {config.model_type!r}: truncating its decoder does not give the "
            f"params its config needs (e.g. {diff}); this family is not supported by "
            "make_draft_model"
        )


def resolve_source(source: str) -> Path:
    """`demo` -> the shipped demo; else a local checkpoint folder (checked)."""
    if source == "demo":
        try:
            return demo_checkpoint()
        except DemoMissingError as err:
            raise DraftModelError(f"--from demo: {err}") from None
    path = Path(source)
    if not path.is_dir():
        raise DraftModelError(
            f"--from {source}: no such folder (pass a fastvlm-jax checkpoint folder with "
            "config.json and params/, or `demo`)"
        )
    if not (path / "config.json").is_file() or not (path / "params").is_dir():
        raise DraftModelError(
            f"--from {source}: not a fastvlm-jax checkpoint (it needs config.json and "
            "params/; convert a Hugging Face folder first with python -m fastvlm_jax.convert)"
        )
    return path


def make_draft_model(
    source: str | os.PathLike, num_layers: int, out: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Writes the `num_layers`-layer draft model of checkpoint `source` to `out`; returns `out`.

    Params keep the source's dtype. tokenizer/ and preprocessor.json are copied byte for
    byte, so the draft model tokenizes and preprocesses exactly as the source does.
    """
    source = resolve_source(os.fspath(source))
    try:
        config = truncated_config(load_config(source), num_layers)  # checks N before reading params
        ckpt = load_checkpoint(source)
    except DraftModelError:
        raise
    except (CheckpointError, ValueError) as err:
        raise DraftModelError(f"--from {source}: {' '.join(str(err).split())}") from None
    out = Path(out)
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        # --overwrite empties --out first, which would delete the source.
        raise DraftModelError(f"--out {out} is or holds the source checkpoint: pass a new folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DraftModelError(f"--out {out} exists and is not empty: pass a new folder, or --overwrite")
    params = truncated_params(ckpt.params, num_layers)
    _check_against_config(params, config)
    if out.exists():
        shutil.rmtree(out)
    save_checkpoint(out, config, params)
    for name in ("tokenizer", "preprocessor.json"):
        if (source / name).is_dir():
            shutil.copytree(source / name, out / name)
        elif (source / name).is_file():
            shutil.copy2(source / name, out / name)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.recipes.make_draft_model", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--from", dest="source", required=True, metavar="CKPT|demo", help="the target checkpoint folder (or `demo`)"
    )
    parser.add_argument(
        "--layers",
        type=int,
        required=True,
        metavar="N",
        help="decoder layers of the draft model: 2 .. source layers - 1",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="new checkpoint folder")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        out = make_draft_model(args.source, args.layers, args.out, args.overwrite)
    except DraftModelError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
