"""Growing a trained decoder deeper without changing what it computes.

New decoder layers start with zero output projections (attention `o_proj` and MLP
`down_proj`), so each adds nothing to the residual stream: the grown model's logits
equal the original's until training moves them. The layers before the draft exit stay
where they are, so the exit-layer states the draft path reads are unchanged too; the
original deeper layers keep their order, spread evenly over the new deep part.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fastvlm_jax.nn.llava import LlavaConfig

# The two projections that write a layer's output into the residual stream.
OUTPUT_PROJECTIONS = (("self_attn", "o_proj"), ("mlp", "down_proj"))


def deepened_config(config: LlavaConfig, num_layers: int) -> LlavaConfig:
    old = config.text.num_layers
    if num_layers <= old:
        raise ValueError(f"deepen_to={num_layers} must exceed the checkpoint's {old} decoder layers")
    if config.draft.exit_layer >= old:
        raise ValueError(
            f"the draft exit layer {config.draft.exit_layer} must lie inside the checkpoint's {old} decoder layers"
        )
    return config.replace(text=dataclasses.replace(config.text, num_layers=num_layers))


def layer_sources(old_layers: int, new_layers: int, exit_layer: int) -> list[int | None]:
    """For each layer of the grown decoder, the original layer it copies (None: a new one).

    Layers [0, exit_layer) keep their index; original layer exit_layer + i moves to
    exit_layer + i * (new deep layers) // (old deep layers).
    """
    old_deep, new_deep = old_layers - exit_layer, new_layers - exit_layer
    sources: list[int | None] = list(range(exit_layer)) + [None] * new_deep
    for i in range(old_deep):
        sources[exit_layer + i * new_deep // old_deep] = exit_layer + i
    return sources


def deepen_params(params, fresh, exit_layer: int):
    """The grown parameter tree.

    params: the trained tree (its decoder has the original depth); fresh: a seeded init of
    the grown model, placed as training wants it. Original layers come from `params`,
    new ones from `fresh` with zeroed output projections; everything else from `params`.
    Decoder layers are stacked ([num_layers, ...] per leaf), so each leaf of the grown
    stack gathers its rows: original rows from `params`, new ones from `fresh`.
    """
    old_layers, new_layers = params["language_model"]["layers"], fresh["language_model"]["layers"]
    old_count = jax.tree.leaves(old_layers)[0].shape[0]
    new_count = jax.tree.leaves(new_layers)[0].shape[0]
    sources = layer_sources(old_count, new_count, exit_layer)
    is_new = jnp.asarray([source is None for source in sources])
    source_rows = jnp.asarray([0 if source is None else source for source in sources])

    def grow(path, old, new):
        names = tuple(getattr(key, "key", key) for key in path)
        if names[:2] in OUTPUT_PROJECTIONS:
            new = jnp.zeros_like(new)
        rows = is_new.reshape((-1,) + (1,) * (new.ndim - 1))
        taken = jnp.take(old, source_rows, axis=0).astype(new.dtype)
        return jax.device_put(jnp.where(rows, new, taken), new.sharding)

    layers = jax.tree_util.tree_map_with_path(grow, old_layers, new_layers)
    return {**params, "language_model": {**params["language_model"], "layers": layers}}
