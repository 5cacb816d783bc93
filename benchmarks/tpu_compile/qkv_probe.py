"""The q/k/v layout copy of issue 28, alone: a layer scan over a stack of LLaVA-1.5-7B-sized
attention projections (q, k, v [layers, 4096, 4096] at tensor=4, RoPE on q and k, o back to
the residual), compiled for v5e:2x2 and v5p:2x2x1, in a few forms of the same arithmetic.
Each form's HBM estimate (decode/bench/compile_only/explain.py, the scan body times its
trips) against the weight bytes its layers must read, and the HBM bytes of `copy` ops.

    PYTHONPATH=. python benchmarks/tpu_compile/qkv_probe.py benchmarks/tpu_compile/qkv_probe.json

Forms (the kernels' storage and how q/k/v are computed):
  stored       [layers, embed, heads x head_dim], x @ W, RoPE on the result (before issue 28's fix)
  no_rope      stored, without RoPE (what the copy depends on)
  apart        the same, the projections behind an optimization barrier (layers.projections_apart)
  features_major  the same storage, the product computed as W^T x ([features, rows], then moved)
  transposed   [layers, heads x head_dim, embed] (torch's Linear layout), x @ W^T
  fused        one [layers, embed, 3, heads x head_dim] kernel, one einsum for q, k and v
  auto_layout  stored, with the compiler choosing the kernels' layout (jax.experimental.layout
               Layout.AUTO in the jit's in_shardings); kernel_layout records its choice
               (minor-to-major of the stacked q kernel in the optimized HLO's entry)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Format, Layout
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from decode.bench.compile_only.explain import explain_hlo
from fastvlm_jax import tpu
from fastvlm_jax.nn.layers import apply_rope, projections_apart

LAYERS, EMBED, HEADS, HEAD_DIM = 4, 4096, 32, 128
FORMS = ("stored", "no_rope", "apart", "features_major", "transposed", "fused", "auto_layout")


def kernel_specs(form: str):
    """{name: (global shape, PartitionSpec)} of one form's stacked kernels (heads over tensor)."""
    width = HEADS * HEAD_DIM
    out = {"o": ((LAYERS, width, EMBED), P(None, "tensor", None))}
    if form == "transposed":
        out.update({name: ((LAYERS, width, EMBED), P(None, "tensor", None)) for name in "qkv"})
    elif form == "fused":
        out["qkv"] = ((LAYERS, EMBED, 3, width), P(None, None, None, "tensor"))
    else:
        out.update({name: ((LAYERS, EMBED, width), P(None, None, "tensor")) for name in "qkv"})
    return out


def project(form: str, x, layer):
    """x [batch, seq, embed] and one layer's kernels -> q, k, v [batch, seq, heads x head_dim]."""
    if form == "fused":
        qkv = jnp.einsum("bse,etf->bstf", x, layer["qkv"])
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if form == "transposed":
        return tuple(jnp.einsum("bse,fe->bsf", x, layer[name]) for name in "qkv")
    if form == "features_major":
        return tuple(jnp.einsum("ef,bse->fbs", layer[name], x).transpose(1, 2, 0) for name in "qkv")
    q, k, v = (jnp.einsum("bse,ef->bsf", x, layer[name]) for name in "qkv")
    return projections_apart(q, k, v) if form == "apart" else (q, k, v)


def program(form: str, trips: int, mesh):
    def run(kernels, x, positions, start):
        def body(h, index):
            # a sub-range of the stack, as the engine's draft and verification passes run it
            layer = jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, index, 0, keepdims=False), kernels)
            batch, seq, _ = h.shape
            q, k, v = project(form, h, layer)
            q, k = q.reshape(batch, seq, HEADS, HEAD_DIM), k.reshape(batch, seq, HEADS, HEAD_DIM)
            if form != "no_rope":
                q, k = apply_rope(q, positions, 10000.0), apply_rope(k, positions, 10000.0)
            mixed = (q + k + v.reshape(batch, seq, HEADS, HEAD_DIM)).reshape(batch, seq, -1)
            return h + jnp.einsum("bsf,fe->bse", mixed, layer["o"]), None

        return jax.lax.scan(body, x, start + jnp.arange(trips, dtype=jnp.int32))[0]

    if form != "auto_layout":
        return jax.jit(run)
    kernels = {name: Format(Layout.AUTO, NamedSharding(mesh, spec)) for name, (_, spec) in kernel_specs(form).items()}
    replicated = NamedSharding(mesh, P())
    return jax.jit(run, in_shardings=(kernels, replicated, replicated, replicated))


def entry_kernel_layout(hlo: str) -> str | None:
    """The layout ({minor-to-major}) the optimized HLO's entry gives the stacked q/k/v kernels."""
    entry = hlo[hlo.index("ENTRY") :]
    match = re.search(r"bf16\[\d+,4096,1024\]\{([\d,]+)[:}].*?parameter\(", entry)
    return match.group(1) if match else None


def probe(topology, form: str, batch: int, seq: int) -> dict:
    mesh = jax.sharding.Mesh(np.array(topology.devices).reshape(1, -1), ("data", "tensor"))
    tensor = mesh.shape["tensor"]

    def sds(shape, spec, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    kernels = {name: sds(shape, spec) for name, (shape, spec) in kernel_specs(form).items()}
    args = (kernels, sds((batch, seq, EMBED), P()), sds((batch, seq), P(), jnp.int32), sds((), P(), jnp.int32))
    trips = LAYERS - 1
    report, refusal = tpu.compile_program(f"qkv probe {form}", program(form, trips, mesh), args, mesh, topology)
    if report is None:
        raise RuntimeError(refusal)
    where = explain_hlo(report.hlo_text or "", top=1000, loop_trips=trips)
    weight = trips * 4 * EMBED * HEADS * HEAD_DIM * 2 // tensor  # q, k, v, o per chip, bf16
    copies = sum(row["hbm_bytes"] for row in where["top"] if row["op"] == "copy")
    return {
        "form": form,
        "batch": batch,
        "seq": seq,
        "weight_bytes": weight,
        "hbm_bytes": where["hbm_bytes"],
        "hbm_to_weight": where["hbm_bytes"] / weight,
        "copy_hbm_bytes": copies,
        "kernel_layout": entry_kernel_layout(report.hlo_text or "") if form != "transposed" else None,
    }


def main(path: str) -> None:
    probes = []
    for name in ("v5e:2x2", "v5p:2x2x1"):
        topology = tpu.get_topology(name)
        for batch in (1, 8, 32):
            for seq in (1, 6):
                for form in FORMS:
                    row = {"topology": name, **probe(topology, form, batch, seq)}
                    probes.append(row)
                    print(
                        f"{name} batch {batch} seq {seq} {form:15s} HBM {row['hbm_to_weight']:.2f}x weights, "
                        f"copies {row['copy_hbm_bytes'] / 1e6:.1f} MB, kernel layout {row['kernel_layout']}",
                        flush=True,
                    )
    Path(path).write_text(json.dumps({"argv": sys.argv[1:], "probes": probes}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
