"""Benchmark: the attention alone, forward and forward + backward, in each implementation, on
LaBraM-Base's shapes.

    python -m benchmarks.attention [--implementations cpu_kernel explicit] [--repeats 100] [--json OUT.json]

Times :func:`labram_jax.models.attention.dot_product_attention` (``cpu_kernel``: the C++ kernels on
the token-major layout the blocks use, :func:`~labram_jax.models.attention.token_major`) and
``jax.grad`` of a loss through it, the implementations alternated call by call; prints the median
and the minimum ms per call and the rate in GFLOP/s of the products (forward 4 B H L^2 K; forward +
backward 3.5x that, as the model's FLOP count has it). The minimum is the figure to compare across
two checkouts run one after the other: on a shared host it moves least. Shapes: fine-tuning
(8 x 231 tokens) and pretraining (8 x 185), 10 heads of 20.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine as machine_lib
from benchmarks.layer_norm import time_pair
from labram_jax.models import attention, config as model_config, cpu_kernels

SHAPES = {"fine-tuning": (8, 231, 10, 20), "pretraining": (8, 185, 10, 20)}  # B, L, H, K


def attend(implementation: str):
    """(q, k, v [B, L, H, K] for ``cpu_kernel``, the blocks' token-major layout, else [B, H, L, K],
    the layout the projections write for the others; valid [B, L]) -> the same layout as q."""
    if implementation == "cpu_kernel":
        return attention.token_major
    return lambda q, k, v, valid: attention.dot_product_attention(q, k, v, valid, implementation)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--implementations", nargs="+", default=["cpu_kernel", "explicit"],
                        choices=[i for i in model_config.ATTENTION_IMPLEMENTATIONS if i != "auto"])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    if "cpu_kernel" in args.implementations and cpu_kernels.unavailable_reason() is not None:
        raise SystemExit(f"the CPU kernels cannot be used here ({cpu_kernels.unavailable_reason()}): "
                         "leave cpu_kernel out of --implementations")
    print(machine_lib.summary(machine_lib.describe()))
    print(f"{'shape':<12} {'B, L, H, K':<16} {'implementation':<14} {'pass':<8} {'median ms':>10} {'min ms':>8} "
          f"{'GFLOP/s (min)':>14}")
    rows = []
    for name, shape in SHAPES.items():
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3))
        valid = jnp.asarray(np.arange(shape[1])[None, :] < shape[1] - 3).repeat(shape[0], 0)  # 3 padding keys
        b, length, h, width = shape
        forward_flops = 4 * b * h * length * length * width
        for passes, flops in (("forward", forward_flops), ("fwd+bwd", 3.5 * forward_flops)):
            fns = []
            for implementation in args.implementations:
                f = attend(implementation)
                if passes == "forward":
                    g = lambda q, k, v, f=f: f(q, k, v, valid)  # noqa: E731
                else:
                    g = jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v, valid) * v), argnums=(0, 1, 2))
                token_major = implementation == "cpu_kernel"  # the others get [B, H, L, K], swapped outside the timing
                inputs = (q, k, v) if token_major else tuple(jnp.swapaxes(x, 1, 2) for x in (q, k, v))
                fns.append(lambda g=jax.jit(g), inputs=inputs: g(*inputs))
            for implementation, times in zip(args.implementations, time_pair(fns, (), args.repeats)):
                row = {"shape": name, "bLhk": list(shape), "implementation": implementation, "pass": passes,
                       "median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * min(times)}
                row["gflops_at_min"] = flops / row["min_ms"] / 1e6
                rows.append(row)
                print(f"{name:<12} {str(shape):<16} {implementation:<14} {passes:<8} {row['median_ms']:>10.2f} "
                      f"{row['min_ms']:>8.2f} {row['gflops_at_min']:>14.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python -m benchmarks.attention " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
