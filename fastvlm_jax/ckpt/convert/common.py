"""What every family's Hugging Face converter shares: tensor sources (safetensors folders,
in-memory state dicts), the small transforms, and filling a param tree from a rule table.

Rule tables name one HF tensor per *per-layer* parameter path
('language_model/layers_3/mlp/up_proj/kernel'); `fill_param_tree` reads the stacked
decoder params ('language_model/layers/...', [num_layers, ...]) by applying the rule to
each layer and stacking the results.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from tqdm.auto import tqdm

from fastvlm_jax.image.processing import ImageProcessorConfig
from fastvlm_jax.nn.layers import LAYERS_AXIS

STACKED_PREFIX = f"language_model/{LAYERS_AXIS}/"


class ConversionError(ValueError):
    """The HF folder cannot be converted; the message says what to fix."""


def read_image_processor_settings(hf_dir: Path) -> dict:
    """The folder's image processor settings as saved: preprocessor_config.json, or the
    "image_processor" entry of processor_config.json (where transformers 5 saves a
    processor's)."""
    preprocessor_file = hf_dir / "preprocessor_config.json"
    processor_file = hf_dir / "processor_config.json"
    if preprocessor_file.is_file():
        return json.loads(preprocessor_file.read_text())
    if processor_file.is_file() and isinstance(json.loads(processor_file.read_text()).get("image_processor"), dict):
        return json.loads(processor_file.read_text())["image_processor"]
    raise ConversionError(
        f"{preprocessor_file} is missing (and {processor_file.name} has no image_processor): copy the "
        "image processor config from the original model repository"
    )


def read_image_processor(hf_dir: Path) -> ImageProcessorConfig:
    """The folder's image processor (`read_image_processor_settings`) for fixed-size towers."""
    return ImageProcessorConfig.from_hf_dict(read_image_processor_settings(hf_dir))


def identity(x):
    return x


def linear(x):  # torch Linear [out, in] -> our kernel [in, out]
    return np.transpose(x)


def conv(x):  # torch Conv2d [out, in, h, w] -> flax [h, w, in, out]
    return np.transpose(x, (2, 3, 1, 0))


def canonical_name(hf_name: str, prefixes) -> str | None:
    """HF tensor name -> our canonical name ('text.', 'vision.', ...), or None if unused.

    prefixes: (HF prefix, canonical prefix) pairs; the first match wins.
    """
    for prefix, canonical in prefixes:
        if hf_name.startswith(prefix):
            return canonical + hf_name[len(prefix) :]
    return None


class SafetensorsFolder:
    """Random access to tensors of a (possibly sharded) safetensors checkpoint, by canonical name.

    canonical: HF tensor name -> canonical name or None (the family's prefix table).
    """

    def __init__(self, folder: Path, canonical: Callable[[str], str | None]):

        folder = Path(folder)
        index_file = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [single.name]
        else:
            found = sorted(p.name for p in folder.glob("*.safetensors"))
            if not found:
                extra = (
                    " (.bin PyTorch files are not read: re-save with safe_serialization=True)"
                    if list(folder.glob("*.bin"))
                    else ""
                )
                raise ConversionError(f"no safetensors weights in {folder}{extra}")
            files = found
        self._handles = {}
        self._where: dict[str, tuple[str, str]] = {}
        for file in files:
            if not (folder / file).is_file():
                raise ConversionError(f"{folder / file} is listed in the index but missing")
            handle = safe_open(str(folder / file), framework="flax")
            self._handles[file] = handle
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                name = canonical(key)
                if name is not None:
                    self._where[name] = (file, key)

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, canonical: str) -> np.ndarray:
        if canonical not in self._where:
            raise ConversionError(f"tensor {canonical!r} not found in the checkpoint")
        file, key = self._where[canonical]
        # framework='flax' reads bf16/fp16 too; float32 on the host keeps transforms exact.
        return np.asarray(jnp.asarray(self._handles[file].get_tensor(key), jnp.float32))


class StateDictSource:
    """An in-memory HF state dict (torch tensors or arrays), addressed by canonical names."""

    def __init__(self, state_dict: dict[str, Any], canonical: Callable[[str], str | None]):
        self._tensors = {}
        for key, value in state_dict.items():
            name = canonical(key)
            if name is not None:
                self._tensors[name] = value

    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, canonical: str) -> np.ndarray:
        if canonical not in self._tensors:
            raise ConversionError(f"tensor {canonical!r} not found in the state dict")
        value = self._tensors[canonical]
        if hasattr(value, "detach"):  # torch
            value = value.detach().float().cpu().numpy()
        return np.asarray(value, np.float32)


def fill_param_tree(
    source,
    abstract,
    source_for: Callable[[str], tuple[str, Callable]],
    *,
    tied: bool,
    dtype,
    progress: bool,
    fresh_imitation=None,
):
    """Our param tree with the shapes of `abstract`, read from `source`.

    source_for: per-layer param path -> (canonical HF name, transform); tied: the LM head
    reads the token embeddings; 'imitation/...' leaves come from `fresh_imitation`.
    """

    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)

    def read(path: str):
        name, transform = source_for(path)
        if tied and name.endswith("lm_head.weight"):
            name = name.replace("lm_head.weight", "embed_tokens.weight")
        return name, transform(source.get(name))

    out = []
    for key_path, leaf in tqdm(flat, desc="converting", unit="tensor", disable=not progress):
        path = "/".join(str(getattr(k, "key", k)) for k in key_path)
        if path.startswith("imitation/"):
            if fresh_imitation is None:
                raise ValueError(f"{path}: the tree has an imitation network but no fresh_imitation was given")
            value = fresh_imitation
            for part in path.split("/")[1:]:
                value = value[part]
            out.append(jnp.asarray(value, dtype))
            continue
        if path.startswith(STACKED_PREFIX):
            rest = path[len(STACKED_PREFIX) :]
            layers = [read(f"language_model/layers_{index}/{rest}") for index in range(leaf.shape[0])]
            name, value = layers[0][0], np.stack([value for _, value in layers])
        else:
            name, value = read(path)
        if value.shape != leaf.shape:
            raise ConversionError(
                f"shape mismatch for {name}: checkpoint has {value.shape} after "
                f"conversion, config.json implies {leaf.shape} (param {path})"
            )
        out.append(jnp.asarray(value, dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
