"""Our checkpoint format: one directory per model.

    CKPT_DIR/
      config.json        the model config (`to_dict()`, model_type names the family) plus
                         "format_version"
      params/            the parameter pytree, saved with orbax in the dtype it was saved in
      tokenizer/         a tokenizers-library tokenizer.json (fastvlm_jax.text.hf_tokenizer) or a
                         sentencepiece model (fastvlm_jax.text.sp_tokenizer), + tokenizer_config.json
      preprocessor.json  image preprocessing (fastvlm_jax.image.processing)

Format versions: 1 (no "format_version" key) kept one param subtree per decoder layer
('language_model/layers_0', ...); 2 stacks them ('language_model/layers', [num_layers, ...]).
Loading a version-1 checkpoint restacks it on the fly (exact) and says how to upgrade it
on disk: `python -m fastvlm_jax.ckpt.checkpoint --upgrade CKPT_DIR`.

Loading can restore straight onto a Mesh: each array lands with the sharding its
logical axes ask for, without a full host copy first (version 2).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fastvlm_jax.image.processing import ImageProcessorConfig
from fastvlm_jax.image.qwen_vl import QwenImageProcessorConfig
from fastvlm_jax.nn.families import config_from_dict
from fastvlm_jax.nn.model import VLM
from fastvlm_jax.runtime import sharding
from fastvlm_jax.runtime.paths import as_path
from fastvlm_jax.text.tokenizer import load_tokenizer

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
PREPROCESSOR_FILE = "preprocessor.json"
FORMAT_KEY = "format_version"
FORMAT_VERSION = 2  # stacked decoder layers


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or does not match its config."""


class Checkpoint(NamedTuple):
    config: Any  # the family's config (fastvlm_jax.nn.llava.LlavaConfig, fastvlm_jax.nn.blip2.Blip2Config)
    params: Any
    tokenizer: Any  # a fastvlm_jax.text.tokenizer.Tokenizer, or None
    image_config: Any  # fastvlm_jax.image.processing.ImageProcessorConfig or None


def save_checkpoint(path: str | os.PathLike, config, params, tokenizer=None, image_config=None) -> epath.Path:
    """Writes a checkpoint directory (overwriting its params if present), params in their own
    dtype. `path` may be local or a bucket (fastvlm_jax.runtime.paths)."""
    path = as_path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(
        json.dumps({**config.to_dict(), FORMAT_KEY: FORMAT_VERSION}, indent=2, sort_keys=True)
    )
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / PARAMS_DIR, params, force=True)
    checkpointer.wait_until_finished()
    if tokenizer is not None:
        tokenizer.save(path / TOKENIZER_DIR)
    if image_config is not None:
        (path / PREPROCESSOR_FILE).write_text(json.dumps(image_config.to_dict(), indent=2))
    return path


def _read_config_json(path: epath.Path) -> dict:
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        hint = (
            " (this looks like a Hugging Face folder: convert it first with "
            "`python -m fastvlm_jax.convert --hf DIR --out CKPT`)"
            if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()
            else ""
        )
        raise CheckpointError(f"{path} is not a fastvlm-jax checkpoint: {CONFIG_FILE} is missing{hint}")
    return json.loads(config_file.read_text())


def format_version(path: str | os.PathLike) -> int:
    version = int(_read_config_json(as_path(path)).get(FORMAT_KEY, 1))
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version}, newer than this fastvlm-jax "
            f"reads ({FORMAT_VERSION}): upgrade fastvlm-jax"
        )
    return version


def load_config(path: str | os.PathLike):
    """config.json -> the family's config (model_type picks it: LlavaConfig, Blip2Config, ...)."""
    data = _read_config_json(as_path(path))
    data.pop(FORMAT_KEY, None)
    return config_from_dict(data)


def load_checkpoint(path: str | os.PathLike, mesh=None, rules=None, dtype=None) -> Checkpoint:
    """Loads a checkpoint; with `mesh`, params are restored sharded by their logical axes.

    dtype: cast floating params to this dtype while restoring; None keeps the dtype each
    param was saved in (a bfloat16 checkpoint stays bfloat16 on device).
    """

    path = as_path(path)
    config = load_config(path)
    version = format_version(path)
    if not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path} has no {PARAMS_DIR}/ folder: the checkpoint is incomplete")
    boxed = VLM(config).abstract_params()
    abstract = jax.tree.map(
        lambda x: x.value if hasattr(x, "value") else x, boxed, is_leaf=lambda x: hasattr(x, "names")
    )
    if mesh is not None:
        shardings = sharding.param_shardings(boxed, mesh, rules or sharding.DEFAULT_RULES)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)

    def wanted_dtype(leaf_dtype):
        if dtype is not None and jnp.issubdtype(leaf_dtype, jnp.floating):
            return jnp.dtype(dtype)
        return jnp.dtype(leaf_dtype)

    if version == 1:
        print(
            f"note: {path} is in checkpoint format 1 (one param tree per decoder layer); restacking "
            f"it while loading. Upgrade it once with `python -m fastvlm_jax.ckpt.checkpoint --upgrade {path}`",
            file=sys.stderr,
        )
        params = upgrade_params(_checkpointer().restore(path / PARAMS_DIR), abstract, path)
        params = jax.tree.map(
            lambda x, s: jax.device_put(np.asarray(x).astype(wanted_dtype(x.dtype)), s), params, shardings
        )
        return Checkpoint(config, params, _load_tokenizer(path), _load_image_config(path))

    saved = _saved_metadata(path / PARAMS_DIR, abstract)

    def target(key, leaf, leaf_sharding):
        saved_dtype = getattr(saved.get(jax.tree_util.keystr(key)), "dtype", None) or leaf.dtype
        return jax.ShapeDtypeStruct(leaf.shape, wanted_dtype(saved_dtype), sharding=leaf_sharding)

    restore_target = jax.tree_util.tree_map_with_path(target, abstract, shardings)
    params = _checkpointer(shardings).restore(path / PARAMS_DIR, restore_target)
    return Checkpoint(config, params, _load_tokenizer(path), _load_image_config(path))


def _checkpointer(shardings=None) -> ocp.StandardCheckpointer:
    """An orbax checkpointer for reading onto `shardings` (None: to host memory).

    Under `jax.distributed`, orbax's default restore ends in a barrier that every process of
    the run must reach. Where every target device belongs to this process (one device, or a
    mesh over its own chips, as decode.run lays out), the restore involves no other process,
    so it must not wait for them either: a host with no images, or one that already finished,
    would otherwise leave the others hanging in that barrier. Restores onto a mesh that spans
    processes keep orbax's collective behaviour (every process loads together).
    """
    this_process = jax.process_index()
    devices = {
        d
        for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        for d in s.device_set
    }
    if jax.process_count() == 1 or any(d.process_index != this_process for d in devices):
        return ocp.StandardCheckpointer()
    alone = ocp.options.MultiprocessingOptions(primary_host=this_process, active_processes={this_process})
    return ocp.StandardCheckpointer(multiprocessing_options=alone)


def load_without_params(path: str | os.PathLike) -> Checkpoint:
    """A checkpoint's config, tokenizer and image config, and its params as
    ShapeDtypeStructs in their saved dtypes (nothing is read from params/ but metadata):
    what compile-only runs need."""

    path = as_path(path)
    config = load_config(path)
    abstract = jax.tree.map(
        lambda x: x.value if hasattr(x, "value") else x,
        VLM(config).abstract_params(),
        is_leaf=lambda x: hasattr(x, "names"),
    )
    saved = _saved_metadata(path / PARAMS_DIR, abstract) if format_version(path) >= 2 else {}

    def leaf(key, x):
        dtype = getattr(saved.get(jax.tree_util.keystr(key)), "dtype", None) or x.dtype
        return jax.ShapeDtypeStruct(x.shape, dtype)

    params = jax.tree_util.tree_map_with_path(leaf, abstract)
    return Checkpoint(config, params, _load_tokenizer(path), _load_image_config(path))


def upgrade_params(params, abstract, where: str | os.PathLike = "params"):
    """Format-1 params (decoder layers as 'layers_0', 'layers_1', ...) -> the stacked layout.

    abstract: the format-2 tree of the config (shapes), to check the result against.
    """
    text = dict(params["language_model"])
    per_layer = sorted((int(m.group(1)), key) for key in text if (m := re.fullmatch(r"layers_(\d+)", key)))
    if not per_layer:
        raise CheckpointError(f"{where}: no 'language_model/layers_N' params to restack")
    layers = [text.pop(key) for _, key in per_layer]
    text["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
    upgraded = {**params, "language_model": text}
    _check_shapes(upgraded, abstract, where)
    return upgraded


def _saved_metadata(params_dir: epath.Path, abstract) -> dict:
    """{keystr: saved array metadata (shape, dtype)}; fails readably when they do not match
    the config."""
    try:
        metadata = _checkpointer().metadata(params_dir)
        saved = getattr(metadata, "item_metadata", metadata)
        saved = getattr(saved, "tree", saved)
    except Exception:  # metadata layout varies across orbax versions; restore will still check
        return {}
    flat_saved = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    _check_shapes(flat_saved, abstract, params_dir, flat=True)
    return flat_saved


def _check_shapes(tree, abstract, where, flat: bool = False) -> None:
    flat_saved = (
        tree if flat else {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    )
    flat_wanted = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    missing = sorted(set(flat_wanted) - set(flat_saved))
    if missing:
        raise CheckpointError(
            f"{where} lacks {len(missing)} params the config needs, "
            f"e.g. {missing[:3]}: config.json and params/ do not match"
        )
    for key, want in flat_wanted.items():
        got = getattr(flat_saved[key], "shape", None)
        if got is not None and tuple(got) != tuple(want.shape):
            raise CheckpointError(
                f"{where}: param {key} has shape {tuple(got)} but config.json needs {tuple(want.shape)}"
            )


def _load_tokenizer(path: epath.Path):
    if not (path / TOKENIZER_DIR).is_dir():
        return None

    return load_tokenizer(path / TOKENIZER_DIR)


def _load_image_config(path: epath.Path):
    if not (path / PREPROCESSOR_FILE).is_file():
        return None

    settings = json.loads((path / PREPROCESSOR_FILE).read_text())
    if "max_pixels" in settings:  # images kept near their own size (Qwen2.5-VL's processor)
        return QwenImageProcessorConfig.from_dict(settings)
    return ImageProcessorConfig.from_dict(settings)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastvlm_jax.ckpt.checkpoint", description="Inspect or upgrade a fastvlm-jax checkpoint."
    )
    parser.add_argument(
        "--upgrade",
        metavar="CKPT_DIR",
        required=True,
        help="rewrite a format-1 checkpoint in the current format, in place",
    )
    args = parser.parse_args(argv)
    try:
        if format_version(args.upgrade) == FORMAT_VERSION:
            print(f"{args.upgrade} is already in format {FORMAT_VERSION}")
            return 0
        ckpt = load_checkpoint(args.upgrade)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_checkpoint(args.upgrade, ckpt.config, ckpt.params, ckpt.tokenizer, ckpt.image_config)
    print(f"upgraded {args.upgrade} to format {FORMAT_VERSION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
