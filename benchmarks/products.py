"""Benchmark: the matrix products of a LaBraM-Base block, XLA:CPU, our C++ kernel and PyTorch, at the step's shapes.

    python -m benchmarks.products [--repeats 10] [--rounds 3] [--stages ...] [--json OUT.json]

For every product of a transformer block (qkv 200 -> 600, proj 200 -> 200, fc1 200 -> 800,
fc2 800 -> 200, and pretraining's lm_head 200 -> 8,192) at the rows each stage's step feeds it
(fine-tuning 8 x 231 tokens, the pretraining student 16 x 185, the tokenizer 8 x 185, the lm_head
8 x 184), in the three layouts training runs (forward ``x @ W``, the input's gradient
``dy @ W^T``, the weight's gradient ``x^T @ dy``), this times the product as the training step
compiles it with ``model.linear=xla`` (``labram_jax.compile_options``: YNNPACK on CPU), by the
C++ product kernel of ``model.linear=cpu_kernel`` (:mod:`labram_jax.models.cpu_matmul`, where it
builds) and, when PyTorch is installed, as ``torch.matmul`` (MKL on x86), one after the other
(:func:`time_in_turn`); medians in ms and GFLOP/s. With ``--operand-sets N`` each call takes the next of N
copies of its operands, so that (N large enough) they come from the last-level cache or memory rather
than from the core's own cache, as inside a training step, whose products take 1.3-1.6x their time
with hot operands (BENCHMARKS.md, "Session 43"). Per stage, the sum over one block's products in
all three layouts says how much of the two codes' step gap the products alone make. PyTorch runs with as many threads as XLA and the same instruction-set limit
as ``benchmarks.train_step --reference`` gives the original code (``reference_env``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine as machine_lib
from benchmarks import train_step
from labram_jax import compile_options, host_memory
from labram_jax.models import cpu_kernels, cpu_matmul

D, MLP, VOCAB = 200, 800, 8192
ROWS = {"fine-tuning": 8 * 231, "pretraining": 16 * 185, "tokenizer": 8 * 185}
BLOCK = {"qkv": (D, 3 * D), "proj": (D, D), "fc1": (D, MLP), "fc2": (MLP, D)}
LAYOUTS = {"forward x.W": ("mk,kn->mn", "mk", "kn"), "dx dy.W^T": ("mn,kn->mk", "mn", "kn"),
           "dW x^T.dy": ("mk,mn->kn", "mk", "mn")}


def cases(stages=tuple(ROWS)) -> list[tuple[str, str, int, int, int]]:
    """(stage, product, M, K, N) of every product timed for ``stages``."""
    out = [(stage, name, ROWS[stage], k, n) for stage in stages for name, (k, n) in BLOCK.items()]
    return out + ([("pretraining", "lm_head", 8 * 184, D, VOCAB)] if "pretraining" in stages else [])


def operands(layout: str, m: int, k: int, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    sizes = {"m": m, "k": k, "n": n}
    _, a, b = LAYOUTS[layout]
    return tuple(rng.standard_normal([sizes[c] for c in spec]).astype(np.float32) for spec in (a, b))


def kernel_product(layout: str):
    """The C++ kernel's product for ``layout`` (operands as :func:`operands` gives them), jitted."""
    transposes = {"forward x.W": {}, "dx dy.W^T": {"transpose_b": True}, "dW x^T.dy": {"transpose_a": True}}[layout]
    product = compile_options.jit(lambda x, y: cpu_matmul.matmul(x, y, **transposes))
    return lambda x, y: jax.block_until_ready(product(x, y))


def torch_product(torch, layout: str):
    if layout == "forward x.W":
        return lambda a, b: a @ b
    if layout == "dx dy.W^T":
        return lambda a, b: a @ b.T
    return lambda a, b: a.T @ b


def time_in_turn(fns: list, args: list, repeats: int, rounds: int) -> list[float]:
    """Seconds of each fns[i] on args[i], a list of argument tuples (operand sets) taken in turn, one
    per call: in each of ``rounds`` rounds every function in turn is called ``repeats`` times after
    a warm-up call on each set, and the median of its calls is kept; returns each function's median
    over the rounds. Not alternated call by call: PyTorch's OpenMP threads keep
    spinning for a while after each call and would take the cores from the XLA call right after it
    (measured: XLA's products at half their rate when alternated)."""
    per_round = [[] for _ in fns]
    for _ in range(rounds):
        for f, sets, kept in zip(fns, args, per_round):
            time.sleep(0.2)  # let the other library's threads go idle
            for a in sets:
                f(*a)
            times = []
            for i in range(repeats):
                a = sets[i % len(sets)]
                t0 = time.perf_counter()
                f(*a)
                times.append(time.perf_counter() - t0)
            kept.append(statistics.median(times))
    return [statistics.median(kept) for kept in per_round]


def load_torch(machine: dict):
    """torch with the reference harness's instruction-set limit and XLA's thread count, or None."""
    for key, value in train_step.reference_env(machine).items():
        if key in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA"):
            os.environ.setdefault(key, value)
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(machine["threads"])
    return torch


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="calls per round (their median is the round's)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the libraries in turn (median of rounds)")
    parser.add_argument("--stages", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--operand-sets", type=int, default=1,
                        help="copies of each product's operands, one per call in turn: 1 times them hot in the "
                             "core's cache; ~16 (several MB each) from the last-level cache or memory, as in a step")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    if args.operand_sets < 1:
        parser.error(f"--operand-sets {args.operand_sets}: give at least 1")
    machine = machine_lib.describe()
    print(machine_lib.summary(machine), flush=True)
    torch = load_torch(machine)
    if torch is None:
        print("PyTorch is not installed: not timed")
    kernel_missing = cpu_kernels.unavailable_reason()
    if kernel_missing:
        print(f"the C++ product kernel is not timed: {kernel_missing}")
    libraries = ["xla"] + ([] if kernel_missing else ["kernel"]) + ([] if torch is None else ["torch"])
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'stage':<12} {'product':<8} {'layout':<11} {'M x K x N':>17}"
          + "".join(f" {lib + ' ms':>9} {'GFLOP/s':>7}" for lib in libraries))
    for stage, name, m, k, n in cases(args.stages):
        for layout, (spec, _, _) in LAYOUTS.items():
            sets = [operands(layout, m, k, n, rng) for _ in range(args.operand_sets)]
            xla = compile_options.jit(lambda x, y, s=spec: jnp.einsum(s, x, y))
            on_device = [(jax.device_put(a), jax.device_put(b)) for a, b in sets]
            fns, fargs = [lambda x, y, f=xla: jax.block_until_ready(f(x, y))], [on_device]
            if not kernel_missing:
                fns.append(kernel_product(layout))
                fargs.append(on_device)
            if torch is not None:
                fns.append(torch_product(torch, layout))
                fargs.append([(torch.from_numpy(a), torch.from_numpy(b)) for a, b in sets])
            seconds = time_in_turn(fns, fargs, args.repeats, args.rounds)
            flop = 2.0 * m * k * n
            row = {"stage": stage, "product": name, "layout": layout, "m": m, "k": k, "n": n}
            for lib, s in zip(libraries, seconds):
                row.update({f"{lib}_ms": 1e3 * s, f"{lib}_gflops": flop / s / 1e9})
            rows.append(row)
            print(f"{stage:<12} {name:<8} {layout:<11} {f'{m}x{k}x{n}':>17}"
                  + "".join(f" {row[lib + '_ms']:>9.2f} {row[lib + '_gflops']:>7.0f}" for lib in libraries), flush=True)
    summary = {}
    for stage in args.stages:
        block = [r for r in rows if r["stage"] == stage and r["product"] in BLOCK]
        summary[stage] = {f"block_products_{lib}_ms": sum(r[f"{lib}_ms"] for r in block) for lib in libraries}
        times = ", ".join(f"{lib} {summary[stage][f'block_products_{lib}_ms']:.1f} ms" for lib in libraries)
        print(f"{stage}: one block's products, forward and both gradients: {times}")
    result = {"machine": machine, "torch": getattr(torch, "__version__", None), "repeats": args.repeats,
              "rounds": args.rounds, "operand_sets": args.operand_sets, "rows": rows, "summary": summary,
              "command": "python -m benchmarks.products " + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    host_memory.reexec_with_hugepages()
    main()
