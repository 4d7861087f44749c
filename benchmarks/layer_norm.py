"""Benchmark: LayerNorm forward + backward, XLA against the C++ kernel, on LaBraM-Base's shapes.

    python -m benchmarks.layer_norm [--repeats 20] [--chain 10] [--json OUT.json]

Times ``jax.value_and_grad`` of ``--chain`` LayerNorms in a row (each followed by a residual add,
as in a block) with respect to the input and the parameters, for each implementation of
:func:`labram_jax.models.normalization.layer_norm`, alternated call by call; prints the median ms
per LayerNorm and the kernel's speed-up. Shapes: the 200-wide norms of fine-tuning (8 x 231
tokens) and pretraining (16 x 185: both passes), and the q/k norms over their 20-wide heads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine as machine_lib
from labram_jax import host_memory
from labram_jax.models import cpu_kernels, normalization

SHAPES = {"fine-tuning norm1/norm2": (8 * 231, 200), "fine-tuning q/k norm": (8, 10, 231, 20),
          "pretraining norm1/norm2": (16 * 185, 200), "pretraining q/k norm": (16, 10, 185, 20)}


def chained(implementation: str, chain: int):
    def loss(params, x, g):
        for _ in range(chain):
            x = normalization.layer_norm(x, params["scale"], params["bias"], 1e-6, implementation) * 1.01 + x
        return jnp.sum(x * g)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def time_pair(fns, args, repeats: int) -> list[list[float]]:
    """Each function called ``repeats`` times, alternated; seconds per call."""
    for f in fns:
        jax.block_until_ready(f(*args))
    times = [[] for _ in fns]
    for _ in range(repeats):
        for f, t in zip(fns, times):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            t.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--chain", type=int, default=10, help="LayerNorms per timed call")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    reason = cpu_kernels.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"the CPU kernels cannot be used here ({reason}): nothing to compare")
    machine = machine_lib.describe()
    print(machine_lib.summary(machine))
    rows = []
    print(f"{'shape':<26} {'rows x D':>14} {'xla ms':>8} {'kernel ms':>10} {'speed-up':>9}   "
          "(per LayerNorm, fwd + bwd)")
    for name, shape in SHAPES.items():
        rng = np.random.default_rng(0)
        x, g = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
        params = {"scale": jnp.ones(shape[-1], jnp.float32), "bias": jnp.zeros(shape[-1], jnp.float32)}
        xla, kernel = time_pair([chained("xla", args.chain), chained("cpu_kernel", args.chain)], (params, x, g),
                                args.repeats)
        ratios = [a / b for a, b in zip(xla, kernel)]
        row = {"name": name, "shape": list(shape), "xla_ms": 1e3 * statistics.median(xla) / args.chain,
               "kernel_ms": 1e3 * statistics.median(kernel) / args.chain,
               "speedup_paired_median": statistics.median(ratios), "speedup_range": [min(ratios), max(ratios)]}
        rows.append(row)
        rows_d = f"{int(np.prod(shape[:-1]))} x {shape[-1]}"
        print(f"{name:<26} {rows_d:>14} {row['xla_ms']:>8.3f} {row['kernel_ms']:>10.3f} "
              f"{row['speedup_paired_median']:>8.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "chain": args.chain, "repeats": args.repeats, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    host_memory.reexec_with_hugepages()
    main()
