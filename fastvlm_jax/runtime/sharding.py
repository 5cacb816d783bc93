"""Logical-axis sharding: a Mesh with named axes and a table mapping logical names to them.

Parameters are annotated with logical axes where they are defined (see layers.py);
this module turns those names into `NamedSharding`s for a given Mesh, the way
MaxText's `logical_axis_rules` do. An axis whose size the mesh axes do not divide is
replicated instead of failing, so any model config runs on any mesh; it is warned about
once per array, by name, since every chip then holds all of that dimension.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters shard over fsdp (their 'embed' dim) and tensor
# (heads / mlp / vocab); activations shard their batch over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("activation_batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed_out", None),
    ("layers", None),  # the leading axis of stacked decoder layers: each chip holds every layer
    ("norm", None),
    ("positions", None),
    ("length", None),
    ("activation_length", None),
    ("activation_embed", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; -1 on one axis takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices do not divide into mesh {sizes}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, but {num_devices} are in use"
            )
        data, fsdp, tensor = sizes
        return data, fsdp, tensor


def parse_mesh(text: str) -> MeshConfig:
    """'data=2,tensor=4' (any of data, fsdp, tensor; -1 takes the remaining devices;
    unnamed axes are 1) -> MeshConfig. ValueError (one line) for anything else."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in MESH_AXES:
            raise ValueError(f"--mesh {text!r}: use axis=size pairs over {', '.join(MESH_AXES)}, e.g. data=2,tensor=4")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--mesh {text!r}: {name.strip()}={value!r} is not an integer") from None
    if not sizes:
        raise ValueError(f"--mesh {text!r}: name at least one axis, e.g. data=2,tensor=4")
    return MeshConfig(**{axis: sizes.get(axis, 1) for axis in MESH_AXES})


def make_mesh(
    config: MeshConfig = MeshConfig(),
    devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm] jax.Device: a runtime alias
) -> Mesh:
    """A ('data', 'fsdp', 'tensor') Mesh over the given (default: all) devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = config.shape(len(devices))
    return Mesh(np.array(devices).reshape(shape), MESH_AXES)


def _mesh_axes_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


# (array name, logical axis, size, mesh axes) already warned about: one warning each.
_WARNED_REPLICATED: set[tuple[str, str, int, tuple[str, ...]]] = set()


def _warn_replicated(name: str, logical: str, dim: int, axes: tuple[str, ...], mesh: Mesh) -> None:
    key = (name, logical, dim, axes)
    if key in _WARNED_REPLICATED:
        return
    _WARNED_REPLICATED.add(key)
    size = _mesh_axes_size(mesh, axes)
    warnings.warn(
        f"{name}: its {logical!r} dimension ({dim}) is not divisible by mesh axes {'x'.join(axes)} "
        f"(size {size}), so it is replicated there: every chip holds all of it "
        f"(pick a mesh whose {'x'.join(axes)} size divides {dim})",
        stacklevel=3,  # the line in logical_to_sharding
    )


def logical_to_sharding(
    logical: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules=DEFAULT_RULES,
    name: str | None = None,
) -> NamedSharding:
    """NamedSharding for one array from its logical axis names; indivisible dims replicate
    (with a warning, once, naming the array: `name`, else its shape and axes)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for logical_name, dim in zip(logical, shape):
        axes = table.get(logical_name) if logical_name is not None else None
        axes_tuple = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        # A mesh axis may appear once per array; drop repeats and axes that don't divide.
        axes_tuple = tuple(a for a in axes_tuple if a not in used and a in mesh.shape)
        if axes_tuple and dim % _mesh_axes_size(mesh, axes_tuple) == 0:
            used.update(axes_tuple)
            spec.append(axes_tuple[0] if len(axes_tuple) == 1 else axes_tuple)
        else:
            if axes_tuple and logical_name is not None:
                _warn_replicated(name or f"array {tuple(shape)} {tuple(logical)}", logical_name, dim, axes_tuple, mesh)
            spec.append(None)
    return NamedSharding(mesh, PartitionSpec(*spec))


def param_shardings(abstract_boxed_params, mesh: Mesh, rules=DEFAULT_RULES):
    """Shardings for an (abstract) boxed param tree; returns a tree shaped like the unboxed one."""

    def one(path, leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            return logical_to_sharding(leaf.names, leaf.value.shape, mesh, rules, name=name)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(
        one, abstract_boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def shard_params(abstract_boxed_params, params, mesh: Mesh, rules=DEFAULT_RULES):
    """Places a param tree on `mesh` by the logical axes of its (abstract, boxed) counterpart."""
    return jax.device_put(params, param_shardings(abstract_boxed_params, mesh, rules))


def data_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch-major arrays: shard the leading axis over (data, fsdp)."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def axis_rules(rules=DEFAULT_RULES):
    """Context manager that activates the rules for `nn.with_logical_constraint`."""
    return nn.logical_axis_rules(rules)
