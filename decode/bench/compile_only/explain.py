"""Where a compiled piece's bytes go (`decode.bench --compile-only ... --explain`).

XLA's cost analysis gives one number per program, `bytes accessed`: every op's operands
and results, whatever memory they live in. On a TPU the compiler stages weights and
tiles into on-chip memory (VMEM, memory space S(1) in the HLO layouts) with async copies
and slices, and the cost analysis counts each staged byte again: the HBM read, the
on-chip write (the whole output tuple of the async start) and the on-chip read of the
op that uses it. One bf16 matmul x[8, 4096] @ W[4096, 2752] on v5e, whose program reads
W from HBM once (a cross-program prefetch into VMEM), reports 5.0x W's bytes; at x[1, 4096]
(no prefetch) 1.0x (see `matmul_probe`).

`explain_hlo` walks the optimized HLO text (the entry computation and the loop bodies
it calls; a fusion is one op, its fused computation read only to see which parts of
its parameters it uses) and books every op's bytes two ways:

  counted  the cost analysis' rule, approximately: operands + results (async starts: the
           whole output tuple; async dones: their result), a fusion reading from a
           parameter only the slices it takes, an in-place update writing the update.
  hbm      the same, but only arrays in HBM (no memory space S(n) in their layout), an
           async copy or slice once at its start (the source it reads, the HBM
           destinations it writes): an estimate of the traffic HBM must serve.

Ops are grouped by kind and by the named scope of their op_name (jax.named_scope and
flax module paths: "ar_step/layers/self_attn/kv_write"), biggest first. The sums are
estimates from the HLO text: `counted` is compared with the compiler's own total in
the report, so a reader sees how much of it the rows account for.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fastvlm_jax import tpu

# Element sizes of the HLO array types we meet (sub-byte types rounded up per element).
_DTYPE_BYTES = {
    "pred": 1,
    "s4": 1,
    "u4": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\](\{[^}]*\})?")
_ON_CHIP = re.compile(r"S\(\d+\)")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_CALLS = re.compile(r"(?:body|condition|calls|to_apply|branch_computations)=\{?%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_PARAMETER = re.compile(r"parameter\((\d+)\)")

# Ops that move no bytes (views, bookkeeping).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id", "replica-id"}
_SLICING = {"dynamic-slice", "slice", "gather"}
_IN_PLACE = {"dynamic-update-slice", "scatter"}
_CONTROL = {"while", "conditional", "call"}


def array_bytes(shape: str, hbm_only: bool = False) -> int:
    """Bytes of the arrays in an HLO shape string (a tuple's elements summed); hbm_only:
    leave out arrays placed in another memory space (S(1) VMEM, S(2) SMEM)."""
    total = 0
    for match in _ARRAY.finditer(shape):
        if hbm_only and match.group(3) and _ON_CHIP.search(match.group(3)):
            continue
        count = 1
        for dim in filter(None, match.group(2).split(",")):
            count *= int(dim)
        total += count * _DTYPE_BYTES[match.group(1)]
    return total


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at text[start]."""
    depth = 0
    for index in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index
    return len(text)


def _tuple_elements(shape: str) -> list[str]:
    """The top-level elements of a tuple shape '(a, (b, c), d)' ([shape] for an array)."""
    if not shape.startswith("("):
        return [shape]
    elements, depth, current = [], 0, ""
    for char in shape[1:-1]:
        depth += (char in "({[") - (char in ")}]")
        if char == "," and depth == 0:
            elements.append(current)
            current = ""
        else:
            current += char
    return [re.sub(r"/\*.*?\*/", "", e).strip() for e in [*elements, current]]


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str
    op: str
    operands: tuple[str, ...]
    calls: tuple[str, ...]
    op_name: str
    root: bool
    parameter: int | None


def parse_hlo(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """Optimized HLO text -> ({computation: instructions}, entry computation's name)."""
    computations: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    entry = ""
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            words = line.split()
            name = (words[1] if words[0] == "ENTRY" else words[0]).lstrip("%")
            entry = name if words[0] == "ENTRY" else entry
            current = computations.setdefault(name, [])
            continue
        match = _INSTRUCTION.match(line)
        if match is None or current is None:
            continue
        rest = line[match.end() :]
        if rest.startswith("("):
            end = _closing(rest, 0)
            shape, rest = rest[: end + 1], rest[end + 2 :]
        else:
            shape, _, rest = rest.partition(" ")
        op, _, rest = rest.partition("(")
        args = rest[: _closing("(" + rest, 0) - 1]
        op_name = _OP_NAME.search(rest)
        parameter = _PARAMETER.match(f"{op}({args})") if op == "parameter" else None
        current.append(
            Instruction(
                name=match.group(1),
                shape=shape,
                op=op,
                operands=tuple(re.findall(r"%([\w.\-]+)", args)),
                calls=tuple(_CALLS.findall(rest)),
                op_name=op_name.group(1) if op_name else "",
                root=line.lstrip().startswith("ROOT"),
                parameter=int(parameter.group(1)) if parameter else None,
            )
        )
    return computations, entry


@dataclasses.dataclass(frozen=True)
class OpBytes:
    """One top-level op's bytes: counted (every memory space) and hbm (HBM arrays only)."""

    op: str
    stem: str  # the instruction's name without its number: what the compiler made of it
    scope: str
    counted: int
    hbm: int


class _Walker:
    def __init__(self, text: str):
        self.computations, self.entry = parse_hlo(text)
        self.shapes = {i.name: i.shape for c in self.computations.values() for i in c}

    def _users(self, computation: str) -> dict[str, list[tuple[Instruction, int]]]:
        users: dict[str, list[tuple[Instruction, int]]] = collections.defaultdict(list)
        for instruction in self.computations.get(computation, []):
            for index, operand in enumerate(instruction.operands):
                users[operand].append((instruction, index))
        return users

    def _parameter_read(self, computation: str, index: int, full: int) -> int:
        """Bytes a fused computation reads from its parameter `index` (of `full` bytes):
        the slices it takes, nothing where it is only updated in place, else all of it."""
        body = self.computations.get(computation, [])
        param = next((i for i in body if i.op == "parameter" and i.parameter == index), None)
        if param is None:
            return full
        users = self._users(computation)
        roots = {i.name for i in body if i.root}

        def read(name: str) -> int:
            if name in roots:  # flows out of a nested fusion whole: its user reads it
                return full
            total = 0
            for user, position in users[name]:
                if user.op in _SLICING and position == 0:
                    total += array_bytes(user.shape)
                elif user.op in _IN_PLACE and position == 0:
                    continue
                elif user.op == "bitcast":
                    total += read(user.name)
                elif user.op == "fusion" and user.calls:
                    total += self._parameter_read(user.calls[0], position, full)
                else:
                    return full
            return min(total, full)

        return read(param.name)

    def _fusion_write(self, computation: str, shape: str, hbm_only: bool) -> int:
        """A fusion's result bytes, an in-place update's root writing only the update."""
        body = {i.name: i for i in self.computations.get(computation, [])}
        root = next((i for i in body.values() if i.root), None)
        if root is None:
            return array_bytes(shape, hbm_only)
        outputs = [body[o] for o in root.operands if o in body] if root.op == "tuple" else [root]
        total = 0
        for out in outputs:
            # dynamic-update-slice(buffer, update, indices...), scatter(buffer, indices, update)
            update = out.operands[1] if out.op == "dynamic-update-slice" else out.operands[-1]
            if out.op in _IN_PLACE and update in body:
                total += array_bytes(body[update].shape) if array_bytes(out.shape, hbm_only) else 0
            else:
                total += array_bytes(out.shape, hbm_only)
        return total

    def _op_bytes(self, ins: Instruction, hbm_only: bool) -> int:
        operands = [self.shapes.get(o, "") for o in ins.operands]
        if ins.op.endswith("-done"):
            # The cost analysis books an async done's result; the traffic is its start's.
            return 0 if hbm_only else array_bytes(ins.shape)
        if ins.op.endswith("-start"):
            wrapped = self.computations.get(ins.calls[0], []) if ins.calls else []
            root = next((i for i in wrapped if i.root), None)
            if root is not None and root.op in _SLICING:
                # An async slice reads and writes its slice (where each lives).
                read = array_bytes(root.shape) if any(array_bytes(s, True) for s in operands) or not hbm_only else 0
                return read + array_bytes(root.shape, hbm_only)
            if not hbm_only:
                return sum(array_bytes(s) for s in operands) + array_bytes(ins.shape)
            reads = sum(array_bytes(s, True) for s in operands)
            # copy-start's tuple is (destination, source, context); an async start's
            # (operands, results, context): only the destination / results are written.
            elements = _tuple_elements(ins.shape)
            written = elements[:1] if ins.op == "copy-start" else elements[1:]
            return reads + sum(array_bytes(e, True) for e in written)
        if ins.op == "fusion" and ins.calls:
            reads = sum(
                self._parameter_read(ins.calls[0], index, array_bytes(s)) if array_bytes(s, hbm_only) else 0
                for index, s in enumerate(operands)
            )
            return reads + self._fusion_write(ins.calls[0], ins.shape, hbm_only)
        return sum(array_bytes(s, hbm_only) for s in operands) + array_bytes(ins.shape, hbm_only)

    def ops(self, loop_trips: int = 1) -> list[OpBytes]:
        """Every top-level op's bytes; ops in a while loop's body (and condition) count
        `loop_trips` times."""
        rows: list[OpBytes] = []
        seen: set[str] = set()

        def walk(computation: str, times: int) -> None:
            if computation in seen:
                return
            seen.add(computation)
            for ins in self.computations.get(computation, []):
                if ins.op in _CONTROL:
                    for called in ins.calls:
                        walk(called, times * loop_trips if ins.op == "while" else times)
                if ins.op in _FREE or ins.op in _CONTROL:
                    continue
                rows.append(
                    OpBytes(
                        ins.op,
                        re.sub(r"(\.\d+)+$", "", ins.name),
                        scope_of(ins.op_name),
                        times * self._op_bytes(ins, False),
                        times * self._op_bytes(ins, True),
                    )
                )

        walk(self.entry, 1)
        return rows


# Prefixes of op names that say nothing about where in our code an op comes from.
_NOISE = (
    re.compile(r"^jit\([^)]*\)/"),
    re.compile(r"\b\w+Module\.\w+/"),
    re.compile(r"closed_call/|while/body/|checkpoint/|jit\(_take\)/"),
)


def scope_of(op_name: str) -> str:
    """The named-scope path of an op_name, without the jit and wrapper prefixes:
    'jit(ar_step)/ar_step/LlavaModule.run_layers/.../DecoderLayer/mlp/down_proj/dot_general'
    -> 'ar_step/language_model.run_layers/DecoderLayer/mlp/down_proj/dot_general'."""
    if not op_name:
        return "(no op_name: compiler-made)"
    for pattern in _NOISE:
        op_name = pattern.sub("", op_name)
    return op_name


def explain_hlo(text: str, top: int = 12, loop_trips: int = 1) -> dict[str, Any]:
    """A compiled program's bytes by op kind and named scope (see the module docstring):
    {counted_bytes, hbm_bytes, top: [{op, scope, count, counted_bytes,
    hbm_bytes}] biggest counted first}. A group: one op kind, instruction name stem
    (fusion, slice_bitcast_fusion, copy-start, ...) and named scope. loop_trips: how many
    times a while loop's body runs (a layer scan's layers), its ops counted that often."""
    rows = _Walker(text).ops(loop_trips)
    groups: dict[tuple[str, str, str], list[OpBytes]] = collections.defaultdict(list)
    for row in rows:
        groups[(row.op, row.stem, row.scope)].append(row)
    ranked = sorted(groups.items(), key=lambda item: -sum(r.counted for r in item[1]))
    return {
        "counted_bytes": sum(r.counted for r in rows),
        "hbm_bytes": sum(r.hbm for r in rows),
        "top": [
            {
                "op": op,
                "name": stem,
                "scope": scope,
                "count": len(members),
                "counted_bytes": sum(r.counted for r in members),
                "hbm_bytes": sum(r.hbm for r in members),
            }
            for (op, stem, scope), members in ranked[:top]
        ],
    }


def matmul_probe(topology: tpu.Topology, rows: int, depth: int, width: int) -> dict[str, Any]:
    """One bf16 matmul x[rows, depth] @ W[depth, width] compiled alone for one device of
    `topology`: a program whose HBM traffic is known (W once, x and the result), to set the
    compiler's bytes accessed and this module's HBM estimate against. Returns {rows, depth,
    width, weight_bytes, bytes_accessed, bytes_accessed_to_weight, hbm_bytes, explain rows}."""
    mesh = jax.sharding.Mesh(np.array(topology.devices[:1]), ("x",))
    placed = NamedSharding(mesh, PartitionSpec())
    x = jax.ShapeDtypeStruct((rows, depth), jnp.bfloat16, sharding=placed)
    w = jax.ShapeDtypeStruct((depth, width), jnp.bfloat16, sharding=placed)
    report, refusal = tpu.compile_program("matmul probe", jax.jit(jnp.matmul), (x, w), mesh, topology)
    if report is None:
        raise RuntimeError(refusal)
    weight = depth * width * 2
    where = explain_hlo(report.hlo_text or "", top=6)
    return {
        "rows": rows,
        "depth": depth,
        "width": width,
        "weight_bytes": weight,
        "bytes_accessed": report.bytes_accessed,
        "bytes_accessed_to_weight": report.bytes_accessed / weight,
        "hbm_bytes": where["hbm_bytes"],
        "top": where["top"],
    }
