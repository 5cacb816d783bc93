"""Int8 weight-only quantization of the decoding weights, and the Dense that reads it.

Decoding one token reads every decoder weight once and does little arithmetic with it, so
its speed is the weight bytes over the HBM bandwidth: int8 weights halve the bytes of a
bfloat16 model. Each quantized kernel [..., in, out] becomes

    kernel        int8 [..., in, out]   round(w / scale), in [-127, 127]
    kernel_scale  [..., out]            max |w| over `in` / 127, in the float weights' dtype

(symmetric, one scale per output channel). `Dense` multiplies by the scale after the dot:
`(x @ int8->float(kernel)) * scale`, so the int8 array is the only copy in HBM and XLA fuses the
convert into the dot's operand read; no dequantized copy of a whole weight is built.

What is quantized: every Dense kernel under `language_model` (attention and MLP projections of
every decoder layer, and the untied LM head), `imitation` and `eagle` (the draft path) -- the
weights read at every decoding step. What is not: token embeddings (a gather reads a few rows,
not the table; Gemma 3's tied LM head therefore stays in float too), norms and biases (tiny), and
the vision tower, Q-Former and projector (run once per image, at prefill).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
DType = Any

QUANTIZATIONS = ("int8",)
KERNEL = "kernel"
SCALE = "kernel_scale"
# The top-level param subtrees read at every decoding step (see the module docstring).
QUANTIZED_SUBTREES = ("language_model", "imitation", "eagle")
INT8_MAX = 127


class QuantizationError(ValueError):
    """An unknown quantization, or params that are already quantized."""


def check_quantization(name: str | None) -> None:
    if name is not None and name not in QUANTIZATIONS:
        raise QuantizationError(f"quantization {name!r} is not supported: use one of {list(QUANTIZATIONS)}")


class Dense(nn.Module):
    """nn.Dense's float path, plus int8 kernels: with a `kernel_scale` param next to the kernel
    the int8 kernel is converted inside the dot and the per-output-channel scale applied after.

    x: [..., in] -> [..., features] in `dtype`.
    """

    features: int
    use_bias: bool
    dtype: DType
    kernel_init: Any
    bias_init: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(KERNEL, self.kernel_init, (x.shape[-1], self.features))
        x = jnp.asarray(x, self.dtype)
        contract = (((x.ndim - 1,), (0,)), ((), ()))
        if self.has_variable("params", SCALE):
            scale = self.get_variable("params", SCALE)  # [features]
            out = jax.lax.dot_general(x, kernel.astype(self.dtype), contract) * jnp.asarray(scale, self.dtype)
        else:
            out = jax.lax.dot_general(x, jnp.asarray(kernel, self.dtype), contract)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,))
            out = out + jnp.asarray(bias, self.dtype)
        return out


def quantize_kernel(kernel: Array) -> tuple[Array, Array]:
    """[..., in, out] float -> (int8 [..., in, out], scale [..., out] in the kernel's dtype).

    The values are rounded against the scale as stored, so int8 * scale is the dequantized
    weight exactly; an all-zero channel gets scale 1 (and zeros)."""
    absmax = jnp.max(jnp.abs(kernel.astype(jnp.float32)), axis=-2)
    scale = jnp.where(absmax > 0, absmax / INT8_MAX, 1.0).astype(kernel.dtype)
    values = jnp.round(kernel.astype(jnp.float32) / scale.astype(jnp.float32)[..., None, :])
    return jnp.clip(values, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def dequantize_kernel(values: Array, scale: Array) -> Array:
    """The inverse of quantize_kernel (up to rounding): [..., in, out] in the scale's dtype."""
    return values.astype(scale.dtype) * scale[..., None, :]


def _is_boxed(leaf) -> bool:
    return isinstance(leaf, nn.LogicallyPartitioned)


def quantize_tree(tree: Mapping) -> dict:
    """Every 2-D+ `kernel` in `tree` -> int8 `kernel` + `kernel_scale` (see the module docstring).

    Works on plain params and on boxed ones (nn.LogicallyPartitioned leaves, e.g. under
    jax.eval_shape of an init): a scale's logical axes are its kernel's without the input axis.
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out[key] = quantize_tree(value)
            continue
        raw = value.value if _is_boxed(value) else value
        if key != KERNEL or jnp.ndim(raw) < 2:
            out[key] = value
            continue
        values, scale = quantize_kernel(raw)
        if _is_boxed(value):
            names = tuple(value.names)
            out[KERNEL] = value.replace(value=values)
            out[SCALE] = value.replace(value=scale, names=names[:-2] + names[-1:])
        else:
            out[KERNEL], out[SCALE] = values, scale
    return out


def is_quantized(params) -> bool:
    """Whether any kernel of `params` is already quantized (has a `kernel_scale`)."""
    paths = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_boxed)[0]
    return any(getattr(path[-1], "key", None) == SCALE for path, _ in paths)


def quantize_params(params: Mapping, quantization: str = "int8") -> dict:
    """A model's params with its decoding weights quantized (QUANTIZED_SUBTREES); the rest as is.

    Raises QuantizationError for an unknown quantization or already quantized params."""
    check_quantization(quantization)
    if is_quantized(params):
        raise QuantizationError("these params are already int8-quantized: quantize the float checkpoint instead")
    return {key: quantize_tree(value) if key in QUANTIZED_SUBTREES else value for key, value in params.items()}


def quantize_model(config, params, quantization: str = "int8"):
    """(config, params) of a float model -> the quantized model's (config.quantization set,
    params through quantize_params under one jit). Raises QuantizationError for an unknown
    quantization or a model that is already quantized."""
    check_quantization(quantization)
    if config.quantization is not None or is_quantized(params):
        raise QuantizationError(
            f"the model is already {config.quantization or 'int8'}-quantized: pass the float checkpoint to quantize it"
        )
    return config.replace(quantization=quantization), jax.jit(quantize_params, static_argnums=1)(params, quantization)
