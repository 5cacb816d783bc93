"""fastvlm_jax: the model library of fastvlm-jax.

Packages, lower to higher (imports point down only):
  runtime/  sharding rules and meshes, joining a multi-process run, local or bucket paths
  text/     tokenizers (the interface, Hugging Face `tokenizers`, sentencepiece) and prompt
            building for every family
  image/    image loading and preprocessing (Hugging Face processor parity)
  nn/       the models: layers, KV cache, vision towers, the LLaVA and BLIP-2 families, the
            EAGLE head, the family registry and the `VLM` handle
  ckpt/     our checkpoint format and the Hugging Face converters (`convert/`, one per family)
  data/     synthetic captioning data and TFDS builders
  tpu.py    compiling for a named TPU slice on this host (memory and cost figures)
  demo.py   the shipped offline `demo` checkpoints
  convert.py  `python -m fastvlm_jax.convert --hf HF_DIR --out CKPT_DIR`

The public face, for notebooks and scripts:

    import fastvlm_jax as fj
    ckpt = fj.load_checkpoint("CKPT_DIR")          # config, params, tokenizer, image config
    model = fj.VLM(ckpt.config)                     # the functional handle (pure in params)
    tokenizer = fj.load_tokenizer("CKPT_DIR/tokenizer")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastvlm_jax.runtime.platforms import skip_absent_tpu

if TYPE_CHECKING:  # what __getattr__ resolves, for type checkers and editors
    from fastvlm_jax.ckpt.checkpoint import load_checkpoint, save_checkpoint
    from fastvlm_jax.demo import demo_checkpoint
    from fastvlm_jax.nn.model import VLM
    from fastvlm_jax.text.tokenizer import load_tokenizer

# Before any backend starts: on a host without a TPU, do not start libtpu's (its errors would
# open every command's output). See fastvlm_jax.runtime.platforms.
skip_absent_tpu()

# Resolved on first use (PEP 562), so `import fastvlm_jax.runtime.paths` stays light.
_PUBLIC = {
    "VLM": "fastvlm_jax.nn.model",
    "load_checkpoint": "fastvlm_jax.ckpt.checkpoint",
    "save_checkpoint": "fastvlm_jax.ckpt.checkpoint",
    "load_tokenizer": "fastvlm_jax.text.tokenizer",
    "demo_checkpoint": "fastvlm_jax.demo",
}

__all__ = ["VLM", "demo_checkpoint", "load_checkpoint", "load_tokenizer", "save_checkpoint"]  # sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fastvlm_jax' has no attribute {name!r}")
