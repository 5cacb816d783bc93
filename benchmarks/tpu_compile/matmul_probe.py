"""One bf16 matmul x[rows, 4096] @ W[4096, 2752] (LLaVA-1.5-7B's MLP projection shard at
tensor=4) compiled alone for one v5e and one v5p device: the compiler's bytes accessed
against W's bytes, and the HBM estimate of decode/bench/compile_only/explain.py (issue 28).

    PYTHONPATH=. python benchmarks/tpu_compile/matmul_probe.py benchmarks/tpu_compile/matmul_probe.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from decode.bench.compile_only.explain import matmul_probe
from fastvlm_jax import tpu


def main(path: str) -> None:
    probes = []
    for name in ("v5e:2x2", "v5p:2x2x1"):
        topology = tpu.get_topology(name)
        for rows in (1, 8, 32):
            probe = {"topology": name, **matmul_probe(topology, rows, 4096, 2752)}
            probe["hbm_to_weight"] = probe["hbm_bytes"] / probe["weight_bytes"]
            probes.append(probe)
            print(
                f"{name} x[{rows}, 4096] @ W[4096, 2752]: bytes accessed {probe['bytes_accessed_to_weight']:.2f}x W, "
                f"HBM estimate {probe['hbm_to_weight']:.2f}x W",
                flush=True,
            )
    Path(path).write_text(json.dumps({"argv": sys.argv[1:], "probes": probes}, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
