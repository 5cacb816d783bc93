"""The import layering (pyproject.toml's import-linter contracts) holds, and breaks on an
upward import: fastvlm_jax <- decode <- train <- configs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fastvlm_jax", "decode", "train", "configs")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    env = {"PYTHONPATH": str(root), "PATH": str(lint.parent)}
    return subprocess.run([str(lint), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def _copy_tree(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_repository_keeps_its_layers(tmp_path):
    result = _lint_imports(_copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    "module, upward",
    [
        ("fastvlm_jax/nn/kv_cache.py", "decode.engine"),
        ("decode/engine/steps.py", "train.step"),
        ("fastvlm_jax/runtime/paths.py", "fastvlm_jax.nn.model"),
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path, module, upward):
    root = _copy_tree(tmp_path)
    with open(root / module, "a", encoding="utf-8") as f:
        f.write(f"\nimport {upward}  # an upward import\n")
    result = _lint_imports(root)
    assert result.returncode != 0, result.stdout[-3000:]
    importer = module.removesuffix(".py").replace("/", ".")
    assert f"{importer} -> {upward}" in result.stdout, result.stdout[-3000:]
