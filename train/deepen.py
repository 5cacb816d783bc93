"""Growing a trained decoder deeper without changing what it computes.

New decoder layers start with zero output projections (attention `o_proj` and MLP
`down_proj`), so each adds nothing to the residual stream: the grown model's logits
equal the original's until training moves them. The layers before the draft exit stay
where they are, so the exit-layer states the draft path reads are unchanged too; the
original deeper layers keep their order, spread evenly over the new deep part.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from fastvlm_jax.config import VLMConfig

# The two projections that write a layer's output into the residual stream.
OUTPUT_PROJECTIONS = (("self_attn", "o_proj"), ("mlp", "down_proj"))


def deepened_config(config: VLMConfig, num_layers: int) -> VLMConfig:
    old = config.text.num_layers
    if num_layers <= old:
        raise ValueError(f"deepen_to={num_layers} must exceed the checkpoint's {old} decoder layers")
    if config.draft.exit_layer >= old:
        raise ValueError(f"the draft exit layer {config.draft.exit_layer} must lie inside the "
                         f"checkpoint's {old} decoder layers")
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
    """
    old_text, new_text = params["language_model"], fresh["language_model"]
    count = lambda tree: sum(key.startswith("layers_") for key in tree)
    sources = layer_sources(count(old_text), count(new_text), exit_layer)
    text = {key: value for key, value in old_text.items() if not key.startswith("layers_")}
    for index, source in enumerate(sources):
        if source is not None:
            text[f"layers_{index}"] = old_text[f"layers_{source}"]
            continue
        layer = {block: dict(sub) for block, sub in new_text[f"layers_{index}"].items()}
        for block, projection in OUTPUT_PROJECTIONS:
            layer[block][projection] = {name: jnp.zeros_like(value, device=value.sharding)
                                        for name, value in layer[block][projection].items()}
        text[f"layers_{index}"] = layer
    return {**params, "language_model": text}
