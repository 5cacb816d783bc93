"""Our checkpoint format: one directory per model.

    CKPT_DIR/
      config.json        VLMConfig.to_dict() (or Blip2Config.to_dict(), model_type 'blip-2')
      params/            the parameter pytree, saved with orbax
      tokenizer/         a tokenizers-library tokenizer.json (fastvlm_jax.hf_tokenizer) or a
                         sentencepiece model (fastvlm_jax.sp_tokenizer), + tokenizer_config.json
      preprocessor.json  image preprocessing (fastvlm_jax.image_processing)

Loading can restore straight onto a Mesh: each array lands with the sharding its
logical axes ask for, without a full host copy first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from fastvlm_jax.config import VLMConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
PREPROCESSOR_FILE = "preprocessor.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or does not match its config."""


class Checkpoint(NamedTuple):
    config: VLMConfig
    params: Any
    tokenizer: Any  # a fastvlm_jax.tokenizer.Tokenizer, or None
    image_config: Any  # fastvlm_jax.image_processing.ImageProcessorConfig or None


def save_checkpoint(path: str | os.PathLike, config: VLMConfig, params, tokenizer=None,
                    image_config=None) -> Path:
    """Writes a checkpoint directory (overwriting its params if present)."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(config.to_json())
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / PARAMS_DIR, params, force=True)
    checkpointer.wait_until_finished()
    if tokenizer is not None:
        tokenizer.save(path / TOKENIZER_DIR)
    if image_config is not None:
        (path / PREPROCESSOR_FILE).write_text(json.dumps(image_config.to_dict(), indent=2))
    return path


def load_config(path: str | os.PathLike) -> VLMConfig:
    """config.json -> VLMConfig, or fastvlm_jax.blip2.Blip2Config for model_type 'blip-2'."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        hint = (" (this looks like a Hugging Face folder: convert it first with "
                "`python -m fastvlm_jax.convert --hf DIR --out CKPT`)"
                if (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()
                else "")
        raise CheckpointError(f"{path} is not a fastvlm-jax checkpoint: {CONFIG_FILE} is missing{hint}")
    data = json.loads(config_file.read_text())
    if data.get("model_type") == "blip-2":
        from fastvlm_jax.blip2 import Blip2Config

        return Blip2Config.from_dict(data)
    return VLMConfig.from_dict(data)


def load_checkpoint(path: str | os.PathLike, mesh=None, rules=None, dtype=None) -> Checkpoint:
    """Loads a checkpoint; with `mesh`, params are restored sharded by their logical axes.

    dtype: cast floating params to this dtype (e.g. jnp.bfloat16) while restoring.
    """
    from fastvlm_jax import sharding
    from fastvlm_jax.model import VLM

    path = Path(path).absolute()
    config = load_config(path)
    if not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path} has no {PARAMS_DIR}/ folder: the checkpoint is incomplete")
    boxed = VLM(config).abstract_params()
    abstract = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, boxed,
                            is_leaf=lambda x: hasattr(x, "names"))
    if mesh is not None:
        shardings = sharding.param_shardings(boxed, mesh, rules or sharding.DEFAULT_RULES)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)

    def target(leaf, leaf_sharding):
        leaf_dtype = dtype if (dtype is not None and jnp.issubdtype(leaf.dtype, jnp.floating)) else None
        return jax.ShapeDtypeStruct(leaf.shape, leaf_dtype or leaf.dtype, sharding=leaf_sharding)

    restore_target = jax.tree.map(target, abstract, shardings)
    _check_saved_shapes(path / PARAMS_DIR, abstract)
    params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, restore_target)
    return Checkpoint(config, params, _load_tokenizer(path), _load_image_config(path))


def _check_saved_shapes(params_dir: Path, abstract) -> None:
    """Fails with a readable message when saved params don't match the config."""
    try:
        metadata = ocp.StandardCheckpointer().metadata(params_dir)
        saved = getattr(metadata, "item_metadata", metadata)
        saved = getattr(saved, "tree", saved)
    except Exception:  # metadata layout varies across orbax versions; restore will still check
        return
    flat_saved = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    flat_wanted = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    missing = sorted(set(flat_wanted) - set(flat_saved))
    if missing:
        raise CheckpointError(f"{params_dir} lacks {len(missing)} params the config needs, "
                              f"e.g. {missing[:3]}: config.json and params/ do not match")
    for key, want in flat_wanted.items():
        got = getattr(flat_saved[key], "shape", None)
        if got is not None and tuple(got) != tuple(want.shape):
            raise CheckpointError(f"{params_dir}: param {key} has shape {tuple(got)} but config.json "
                                  f"needs {tuple(want.shape)}")


def _load_tokenizer(path: Path):
    if not (path / TOKENIZER_DIR).is_dir():
        return None
    from fastvlm_jax.tokenizer import load_tokenizer

    return load_tokenizer(path / TOKENIZER_DIR)


def _load_image_config(path: Path):
    if not (path / PREPROCESSOR_FILE).is_file():
        return None
    from fastvlm_jax.image_processing import ImageProcessorConfig

    return ImageProcessorConfig.from_dict(json.loads((path / PREPROCESSOR_FILE).read_text()))
