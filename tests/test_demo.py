"""The shipped demo model: `--ckpt demo` captions the README's example images offline."""

import json
from pathlib import Path

import numpy as np
import pytest

from decode import run
from fastvlm_jax import demo
from fastvlm_jax.ckpt.checkpoint import load_checkpoint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_demo_is_shipped_and_loads():
    path = demo.demo_checkpoint()
    assert path == demo.ASSET_DIR, "the demo must ship with the package, not be rebuilt"
    ckpt = load_checkpoint(path)
    assert ckpt.tokenizer is not None and ckpt.image_config is not None
    config = ckpt.config
    # The draft path must be much cheaper than the full path.
    assert config.draft.exit_layer * 3 <= config.text.num_layers
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in __import__("jax").tree.leaves(ckpt.params))


@pytest.mark.slow
def test_readme_command_captions_the_examples_ssd_equal_ar(tmp_path):
    outputs = {}
    for mode in ("ssd", "ar"):
        out = tmp_path / f"{mode}.jsonl"
        stats = tmp_path / f"{mode}.json"
        code = run.main(
            [
                "--ckpt",
                "demo",
                "--images",
                str(EXAMPLES),
                "--out",
                str(out),
                "--mode",
                mode,
                "--stats",
                str(stats),
                "--no-progress",
            ]
        )
        assert code == 0
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(lines) == len(list(EXAMPLES.glob("*.png"))) and all(line["caption"] for line in lines)
        outputs[mode] = {line["image"]: line["token_ids"] for line in lines}
        assert json.loads(stats.read_text())["images"] == len(lines)
    assert outputs["ssd"] == outputs["ar"]
