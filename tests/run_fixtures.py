"""A tiny but complete checkpoint (model + tokenizer + preprocessor) and test images.

`make_tiny_checkpoint(dir)` writes what `python -m decode.run --ckpt DIR` needs, in about a
second: a random tiny VLM (tests/tiny.py), a sentencepiece tokenizer trained in-process
(tests/sp_fixtures.py) with `<image>` as an added token right after its vocabulary (as in
llava-hf), and CLIP-style preprocessing at the model's image size.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from fastvlm_jax.ckpt.checkpoint import save_checkpoint
from fastvlm_jax.image.processing import ImageProcessorConfig
from fastvlm_jax.nn.model import VLM
from fastvlm_jax.text.tokenizer import SentencePieceTokenizer
from tests.sp_fixtures import train_tiny_sentencepiece
from tests.tiny import tiny_config


def make_tiny_tokenizer(directory: str | os.PathLike) -> SentencePieceTokenizer:
    """Tiny LLaMA-style tokenizer; `<image>` gets the first id after the sentencepiece pieces."""
    sp_path = train_tiny_sentencepiece(directory)
    probe = SentencePieceTokenizer(sp_path)
    return SentencePieceTokenizer(sp_path, added_tokens={"<image>": probe.vocab_size})


def random_params(config, seed: int = 0):
    """Random parameters drawn with numpy from the model's abstract shapes.

    Same structure as `VLM(config).init(key)` without compiling the init program, which takes
    ~10 s on 2 CPU cores even for the tiny model. Norm scales are 1, biases small, kernels
    N(0, 1 / fan_in) (so activations keep their scale and argmax ties are unlikely).
    """
    rng = np.random.RandomState(seed)
    boxed = VLM(config).abstract_params()
    abstract = jax.tree.map(
        lambda x: x.value if hasattr(x, "value") else x, boxed, is_leaf=lambda x: hasattr(x, "names")
    )

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        if name.endswith("['scale']"):
            value = np.ones(shape)
        elif name.endswith("['bias']"):
            value = 0.02 * rng.randn(*shape)
        elif name.endswith("['kernel']"):
            fan_in = shape[1:-1] if "['layers']" in name else shape[:-1]  # stacked: [layers, ..., out]
            value = rng.randn(*shape) / np.sqrt(np.prod(fan_in))
        else:  # embeddings
            value = rng.randn(*shape)
        return np.asarray(value, dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def make_tiny_checkpoint(
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    deep_scale: float = 0.3,
    image_size: int = 16,
    eagle: bool = False,
    **config_overrides,
) -> Path:
    """Writes a tiny random checkpoint to `directory` and returns its path.

    deep_scale: multiplies the residual branches of the layers after the draft exit, so the
      draft path agrees with the full model often but not always (non-trivial acceptance
      statistics); 1.0 keeps the random init as is.
    eagle: give the model an EAGLE head (random, like the rest).
    config_overrides: passed to tests.tiny.tiny_config (num_layers, exit_layer, kind, ...).
    """
    directory = Path(directory)
    tokenizer = make_tiny_tokenizer(directory / "sp")
    config = tiny_config(vocab_size=tokenizer.vocab_size, image_size=image_size, **config_overrides)
    assert config.image_token_id == tokenizer.image_token_id
    params = random_params(config, seed)
    if eagle:  # drawn apart, so the rest equals the same seed's model without a head
        config = config.with_draft(eagle_layers=1)
        params["eagle"] = random_params(config, seed + 1)["eagle"]
    deep = config.draft.exit_layer
    layers = params["language_model"]["layers"]
    for block, projection in (("self_attn", "o_proj"), ("mlp", "down_proj")):
        kernel = layers[block][projection]["kernel"]
        layers[block][projection]["kernel"] = np.concatenate([kernel[:deep], kernel[deep:] * deep_scale])
    return save_checkpoint(directory / "ckpt", config, params, tokenizer, ImageProcessorConfig.clip(image_size))


def write_image(path: str | os.PathLike, size=(24, 20), mode: str = "RGB", seed: int = 0, solid: bool = False) -> Path:
    """Writes a small image file (format from the extension) and returns its path.

    mode: 'RGB', 'L', 'RGBA', 'P', 'I;16', ...; solid: one colour (compresses to a few KB even
    at 10000x10000 as PNG).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    if solid:
        image = Image.new("RGB", (width, height), (40 + seed % 200, 120, 200))
    else:
        rng = np.random.RandomState(seed)
        image = Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if mode == "P":
        image = image.quantize(colors=16)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def write_truncated_png(path: str | os.PathLike, seed: int = 0) -> Path:
    """A PNG cut in the middle of its image data: the header parses, decoding fails."""
    full = write_image(path, size=(64, 64), seed=seed)
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2])
    return full
