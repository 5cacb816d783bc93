"""TPU topologies without a TPU: compile for a named slice on this host and read the
compiler's own figures.

    topology = get_topology("v5e:2x2")           # abstract devices of 4 v5e chips
    mesh = sharding.make_mesh(MeshConfig(tensor=-1), topology.devices)
    compiled = jax.jit(f, ...).lower(*abstract_args_with_named_shardings).compile()
    report = analyze(compiled, topology)        # memory per chip, FLOPs, bytes, collectives

libtpu's ahead-of-time compiler does the work (`pip install -e ".[tpu]"`): nothing is
allocated and nothing runs. Memory figures are per device, as `memory_analysis()` gives
them; FLOPs and bytes are those of one device's partitioned program (`cost_analysis()`
of an SPMD program describes one device). The step-time lower bound is the roofline
max(flops / peak FLOP/s, bytes / HBM bandwidth) of one chip, from the public figures below.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import topologies

from fastvlm_jax.runtime import sharding

GiB = 1024**3


class TopologyError(ValueError):
    """A topology name we cannot compile for (one line, with the valid forms)."""


class LibtpuMissingError(RuntimeError):
    """Compiling for TPU needs libtpu, an optional dependency."""


LIBTPU_HINT = 'compiling for a TPU topology needs libtpu: pip install -e ".[tpu]" (or pip install libtpu)'


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Public per-chip figures of one TPU generation.

    peak_bf16_flops: dense bf16 FLOP/s of one chip; hbm_bandwidth: bytes/s; hbm_bytes:
    capacity of one chip. dims: the number of dimensions of its topology names (2 for the
    2D-torus lite chips, 3 for the 3D-torus ones).
    """

    name: str
    device_kind: str
    peak_bf16_flops: float
    hbm_bandwidth: float
    hbm_bytes: int
    dims: int


# Per-chip figures from Google Cloud's TPU system-architecture pages
# (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e), as of 2025:
#   v4:  275 TFLOP/s bf16, 32 GiB HBM2,  1,200 GB/s
#   v5e: 197 TFLOP/s bf16, 16 GiB HBM2,    819 GB/s
#   v5p: 459 TFLOP/s bf16, 95 GiB HBM2e, 2,765 GB/s
#   v6e: 918 TFLOP/s bf16, 32 GiB HBM,   1,640 GB/s
CHIPS: dict[str, ChipSpec] = {
    chip.name: chip
    for chip in (
        ChipSpec("v4", "TPU v4", 275e12, 1200e9, 32 * GiB, 3),
        ChipSpec("v5e", "TPU v5 lite", 197e12, 819e9, 16 * GiB, 2),
        ChipSpec("v5p", "TPU v5", 459e12, 2765e9, 95 * GiB, 3),
        ChipSpec("v6e", "TPU v6 lite", 918e12, 1640e9, 32 * GiB, 2),
    )
}

_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+)*)$")


def valid_forms() -> str:
    return "v5e:2x2, v5e:4x8, v6e:2x2 (2D: v5e, v6e); v4:2x2x2, v5p:2x2x4 (3D: v4, v5p); each dimension a power of two"


def parse_topology(name: str) -> tuple[ChipSpec, tuple[int, ...]]:
    """'v5e:4x8' -> (the v5e ChipSpec, (4, 8)); TopologyError for anything else."""
    match = _NAME.match(name.strip())
    if not match:
        raise TopologyError(f"unknown TPU topology {name!r}; valid forms: {valid_forms()}")
    chip = CHIPS[match.group(1)]
    dims = tuple(int(d) for d in match.group(2).split("x"))
    if len(dims) != chip.dims or any(d < 1 or d & (d - 1) for d in dims):
        raise TopologyError(
            f"TPU topology {name!r}: {chip.name} takes {chip.dims} power-of-two "
            f"dimensions; valid forms: {valid_forms()}"
        )
    return chip, dims


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named TPU slice as abstract devices this host can compile for.

    devices: the slice's devices in JAX's order (one per TensorCore JAX exposes: v4
      topologies come with two per chip, the others with one).
    """

    name: str
    chip: ChipSpec
    devices: tuple
    chips: int

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.chips

    @property
    def hbm_bytes_per_device(self) -> int:
        return self.chip.hbm_bytes // self.devices_per_chip


def get_topology(name: str) -> Topology:
    """The abstract devices of a named slice. TopologyError for a bad name,
    LibtpuMissingError (one line: how to install it) without libtpu."""
    chip, _ = parse_topology(name)
    try:
        import libtpu  # noqa: F401  (the AOT compiler lives in libtpu)
    except ImportError:
        raise LibtpuMissingError(LIBTPU_HINT) from None

    # libtpu takes a host-wide lockfile (/tmp/libtpu_lockfile) meant to keep two processes
    # off one TPU; here no TPU is opened, and any other JAX process on the host (a test run,
    # a CPU benchmark: with libtpu installed they all load it) would otherwise block us.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name.strip())
    except Exception as err:  # libtpu's message is long; keep its first line
        raise TopologyError(
            f"libtpu rejects topology {name!r}: {str(err).splitlines()[0]}; valid forms: {valid_forms()}"
        ) from None
    devices = tuple(desc.devices)
    if devices[0].device_kind != chip.device_kind:
        raise TopologyError(f"{name!r} gave {devices[0].device_kind!r} devices, expected {chip.device_kind!r}")
    chips = len({tuple(d.coords) for d in devices})
    return Topology(name.strip(), chip, devices, chips)


# ---------------------------------------------------------------------------------------
# What a compiled program costs
# ---------------------------------------------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# An op's name followed by its operand list: "all-reduce(" or the async "all-gather-start(".
_COLLECTIVE_OP = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def collective_counts(hlo_text: str) -> dict[str, int]:
    """{collective: number of such ops in the compiled HLO}. Static counts: an op inside a
    loop body (the layer scan) counts once, not once per iteration."""
    counts = {name: 0 for name in COLLECTIVES}
    for match in _COLLECTIVE_OP.finditer(hlo_text):
        counts[match.group(1)] += 1
    return counts


_WHILE_OP = re.compile(r"\bwhile\(")


def while_loops(hlo_text: str) -> int:
    """Number of while loops in the compiled program (a layer scan is one). XLA's cost
    analysis counts a loop body once, whatever its trip count, so a program with loops
    does more work per call than its `flops` and `bytes accessed` say."""
    return len(_WHILE_OP.findall(hlo_text))


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes per device from the compiler's buffer assignment.

    peak: the larger of the compiler's peak figure and arguments + outputs - aliased +
    temporaries (both are reported by some libtpu versions and not others; the sum never
    undercounts what is live at once).
    """

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int
    compiler_peak: int
    peak: int


def memory_report(compiled) -> MemoryReport:
    stats = compiled.memory_analysis()
    args, outs = int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes)
    alias, temps = int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes)
    compiler_peak = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    return MemoryReport(
        arguments=args,
        outputs=outs,
        aliased=alias,
        temporaries=temps,
        generated_code=int(stats.generated_code_size_in_bytes),
        compiler_peak=compiler_peak,
        peak=max(compiler_peak, args + outs - alias + temps),
    )


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """One compiled program on one topology. Per-device figures unless named per chip.

    flops, bytes_accessed: the compiler's cost model of one device's program (bytes count
      the operands and results of every op, so they overcount what HBM must deliver; a
      loop body counts once, whatever its trip count: see `while_loops`).
    while_loops: how many while loops the compiled program has.
    collectives, while_loops: None when the compiled HLO text cannot be read back.
    compiler_seconds: the TPU cost model's own time estimate ('optimal_seconds'), if any.
    step_time_lower_bound_s: max(flops / peak FLOP/s, bytes / HBM bandwidth) of one device.
    hlo_text: the optimized HLO text, None when it cannot be read back.
    """

    name: str
    memory: MemoryReport
    flops: float
    bytes_accessed: float
    transcendentals: float
    compiler_seconds: float | None
    collectives: dict[str, int] | None
    while_loops: int | None
    compile_seconds: float
    step_time_lower_bound_s: float
    flops_time_s: float
    bytes_time_s: float
    # The optimized HLO (for a breakdown of where the bytes go); not part of the JSON.
    hlo_text: str | None = dataclasses.field(default=None, repr=False, compare=False)


def peak_flops(devices: Sequence[Any]) -> float | None:
    """Dense bf16 FLOP/s of the TPU chips `devices` run on (real or abstract devices), from
    CHIPS; None for other devices (a CPU or GPU has no entry here, and no figure is made up).
    Chips are counted by their coordinates: a v4 chip may show up as two devices."""
    kinds = {d.device_kind for d in devices}
    chip = next((c for c in CHIPS.values() if kinds == {c.device_kind}), None)
    if chip is None:
        return None
    return chip.peak_bf16_flops * len({tuple(d.coords) for d in devices})


def device_peak_flops(topology: Topology) -> float:
    return topology.chip.peak_bf16_flops / topology.devices_per_chip


def device_bandwidth(topology: Topology) -> float:
    return topology.chip.hbm_bandwidth / topology.devices_per_chip


def roofline_seconds(flops: float, bytes_moved: float, topology: Topology) -> tuple[float, float, float]:
    """(lower bound, compute time, memory time) in seconds for one device's work."""
    compute = flops / device_peak_flops(topology)
    memory = bytes_moved / device_bandwidth(topology)
    return max(compute, memory), compute, memory


def compile_program(name: str, program, args, mesh, topology: Topology):
    """Lowers `program` (a jitted function) on `args` under the library's logical-axis rules
    over `mesh`, compiles it for `topology` and analyzes it: (CompileReport, None), or
    (None, the compiler's one-line refusal, e.g. out of HBM)."""

    start = time.perf_counter()
    with jax.set_mesh(mesh), sharding.axis_rules(sharding.DEFAULT_RULES):
        lowered = program.lower(*args)
    with tempfile.TemporaryDirectory(prefix="fastvlm_hlo_") as dump_dir:
        try:
            # The compiler also writes its optimized HLO as text: some libtpu versions emit
            # ops that jaxlib's `as_text` cannot parse back (seen on v5p), and the
            # collective counts are read from this text instead.
            compiled = lowered.compile(compiler_options={"xla_dump_to": dump_dir, "xla_dump_hlo_as_text": True})
        except jax.errors.JaxRuntimeError as err:
            first = next((line for line in str(err).splitlines() if line.strip()), str(err))
            return None, f"{name}: the TPU compiler refused it: {first}"
        dumped = sorted(Path(dump_dir).glob("*after_optimizations.txt"), key=lambda p: p.stat().st_size)
        hlo_text = dumped[-1].read_text() if dumped else None
    return analyze(name, compiled, topology, time.perf_counter() - start, hlo_text), None


def analyze(
    name: str, compiled, topology: Topology, compile_seconds: float = 0.0, hlo_text: str | None = None
) -> CompileReport:
    """The compiler's memory and cost figures of `compiled` (a jax.stages.Compiled);
    hlo_text: its optimized HLO as the compiler wrote it, when `as_text` cannot read it."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    flops = float(cost.get("flops", 0.0))
    moved = float(cost.get("bytes accessed", 0.0))
    bound, compute, memory = roofline_seconds(flops, moved, topology)
    optimal = cost.get("optimal_seconds")
    try:
        text = compiled.as_text()
    except Exception:
        text = hlo_text
    return CompileReport(
        name=name,
        memory=memory_report(compiled),
        flops=flops,
        bytes_accessed=moved,
        transcendentals=float(cost.get("transcendentals", 0.0)),
        compiler_seconds=float(optimal) if optimal is not None else None,
        collectives=collective_counts(text) if text is not None else None,
        while_loops=while_loops(text) if text is not None else None,
        compile_seconds=compile_seconds,
        step_time_lower_bound_s=bound,
        flops_time_s=compute,
        bytes_time_s=memory,
        hlo_text=hlo_text if hlo_text is not None else text,
    )


def fits(peak_bytes_per_device: int, topology: Topology) -> bool:
    return peak_bytes_per_device <= topology.hbm_bytes_per_device


def topology_summary(topology: Topology) -> dict[str, Any]:
    """The JSON keys that describe the slice (topology, chips, device_kind, hbm_bytes_per_chip)."""
    return {
        "topology": topology.name,
        "chips": topology.chips,
        "devices": len(topology.devices),
        "devices_per_chip": topology.devices_per_chip,
        "device_kind": topology.device_kind,
        "hbm_bytes_per_chip": topology.chip.hbm_bytes,
        "peak_bf16_flops_per_chip": topology.chip.peak_bf16_flops,
        "hbm_bandwidth_per_chip": topology.chip.hbm_bandwidth,
    }


def report_dict(report: CompileReport, topology: Topology) -> dict[str, Any]:
    """One program's figures as JSON, per device and per chip."""
    per_chip = topology.devices_per_chip
    return {
        "memory_per_device": dataclasses.asdict(report.memory),
        "per_chip_peak_bytes": report.memory.peak * per_chip,
        "fits": fits(report.memory.peak, topology),
        "flops_per_device": report.flops,
        "flops_per_step": report.flops * len(topology.devices),
        "bytes_per_device": report.bytes_accessed,
        "bytes_per_step": report.bytes_accessed * len(topology.devices),
        "transcendentals_per_device": report.transcendentals,
        "compiler_seconds": report.compiler_seconds,
        "collectives": report.collectives,
        # XLA's cost analysis counts each loop body once: with loops, flops and bytes above
        # undercount a call's work (a layer scan's body counts as one layer).
        "while_loops": report.while_loops,
        "compile_seconds": report.compile_seconds,
        "step_time_lower_bound_s": report.step_time_lower_bound_s,
        "flops_time_s": report.flops_time_s,
        "bytes_time_s": report.bytes_time_s,
    }


def write_report(report: dict[str, Any], json_path: str | None, failure: str | None) -> int:
    """The end of a compile-only run: `report` as JSON at `json_path` (if any), then the
    verdict. failure: None when every program fits, else the one-line reason (printed to
    stderr as 'error: ...'). Returns the exit status: 0 fits, 1 does not fit or refused."""

    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {json_path}")
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    return 0


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


def program_lines(name: str, p: dict[str, Any], hbm_bytes_per_device: int) -> list[str]:
    """Console lines for one program's `report_dict`."""
    m = p["memory_per_device"]
    coll = (
        "(HLO text unavailable)"
        if p["collectives"] is None
        else ", ".join(f"{k} {v}" for k, v in p["collectives"].items() if v) or "none"
    )
    return [
        f"{name}: compiled in {p['compile_seconds']:.1f} s",
        f"  per device: arguments {format_bytes(m['arguments'])}, outputs {format_bytes(m['outputs'])} "
        f"(aliased {format_bytes(m['aliased'])}), temporaries {format_bytes(m['temporaries'])}, "
        f"peak {format_bytes(m['peak'])} of {format_bytes(hbm_bytes_per_device)} HBM",
        f"  per step: {p['flops_per_step']:.3e} FLOPs, {p['bytes_per_step']:.3e} bytes accessed (all devices); "
        f"roofline >= {1000 * p['step_time_lower_bound_s']:.3f} ms "
        f"(compute {1000 * p['flops_time_s']:.3f} ms, memory {1000 * p['bytes_time_s']:.3f} ms)",
        f"  collectives in the HLO: {coll}",
    ]


def shard_bytes(shape: Sequence[int], dtype, sharding) -> int:
    """Bytes of one device's shard of an array of `shape` placed with `sharding`."""

    local = sharding.shard_shape(tuple(shape)) if sharding is not None else tuple(shape)
    return math.prod(local) * np.dtype(dtype).itemsize
