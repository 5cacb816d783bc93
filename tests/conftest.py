"""Test setup: 8 host devices for mesh tests, float32 everywhere, no network."""

import os
import shutil
import tempfile

# The suite compiles hundreds of tiny programs; on CPU most of each compile is LLVM's
# optimisation, which buys nothing at these sizes (measured on 2 cores: a greedy drafter test
# 29 -> 20 s, the chi-square sampling tests 98 -> 77 s). Set XLA_FLAGS to override.
# LLVM's expensive passes likewise (the greedy SSD == AR cases: 70 -> 64 s of CPU).
# XLA:CPU's MLIR fusion emitters cost far more compile time than the classic ones at these
# sizes (measured on 2 cores, CPU seconds: two greedy SSD == AR cases 24.7 -> 15.0, the
# sampling tests 42.6 -> 33.8, two training tests 73.9 -> 40.2).
# libtpu (the compile-only tests) reads XLA_FLAGS too and dies on a flag it does not know:
# tests/test_tpu_compile.py hides CPU_ONLY_FLAGS from it.
CPU_ONLY_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)
COMPILE_FLAGS = " ".join(
    ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true", *CPU_ONLY_FLAGS]
)
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {COMPILE_FLAGS}")
# The suite runs on CPU. With libtpu installed (the test extra, for compile-only TPU
# checks) JAX would otherwise try to start a TPU backend in every process (~4 s and a
# screen of warnings on a machine without one); TPU topologies still compile. Several
# processes (pytest-xdist workers, CLI subprocesses) may load libtpu at once.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402 (after the environment it reads)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# One persistent compilation cache per test run, shared by the xdist workers (and the CLI
# subprocesses that inherit the variable): the tests compile the same tiny programs in
# several processes, and each is then compiled once. A fresh folder each run, so a run's
# time never depends on an earlier one's. FASTVLM_TEST_COMPILE_CACHE=off turns it off.
_CACHE_VARIABLE = "FASTVLM_TEST_COMPILE_CACHE"


def pytest_configure(config):
    if os.environ.get(_CACHE_VARIABLE) == "off":
        return
    if not os.environ.get(_CACHE_VARIABLE):  # the controller (or a run without xdist)
        os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="fastvlm-jax-test-cache-")
        config._fastvlm_cache_owner = True
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VARIABLE])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if getattr(config, "_fastvlm_cache_owner", False):
        shutil.rmtree(os.environ.pop(_CACHE_VARIABLE), ignore_errors=True)


# Fixtures several modules use, built once per test process (a module-scoped fixture imported
# into another module is built again there).


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """A converted tiny HF BLIP-2 and its greedy outputs (tests/test_blip2.py convert_tiny_blip2)."""
    from tests.test_blip2 import convert_tiny_blip2

    return convert_tiny_blip2(tmp_path_factory.mktemp("blip2"))


@pytest.fixture(scope="session")
def tiny():
    """The 6-token model of the sampling tests (tests/test_sampling.py sampling_model)."""
    from tests.test_sampling import sampling_model

    return sampling_model()
