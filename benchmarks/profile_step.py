"""Benchmark: where a training step's time goes, by XLA operation and by model part.

    python -m benchmarks.profile_step --stage pretrain --size base [--steps 20] [--warmup 15] \
        [--top 25] [--json OUT.json] [train_step options: --batch --attention --channels ...]

Runs the very step ``benchmarks.train_step`` times (its :func:`~benchmarks.train_step.prepare`)
under ``jax.profiler.trace``, reads the trace back with ``jax.profiler.ProfileData`` and sums the
time of every executed XLA operation over the traced steps. Each operation is put in a model part
by the ``op_name`` metadata XLA keeps from the JAX program (``attention``, ``mlp``, ``norm``,
``optimizer``, ...; :data:`PARTS`), and in a kind by its HLO opcode (``dot``, ``fusion``,
``custom-call``, ...), and in a family by its instruction name without the numeric suffix
(``ynn_fusion``: products handed to YNNPACK; ``wrapped_reduce-window``: the trees XLA:CPU splits
long reductions into; ``ffi_call``: custom calls). Prints the three breakdowns (ms per step, share
of the profiled op time; the 12 largest families) and the ``--top`` slowest operations; ``--json``
keeps the sums and the 300 slowest operations.

Times are per device (a mesh of N devices runs every operation N times: the sums are divided
by N). On a CPU independent operations may overlap on the cores, so their sum can exceed the
step time: read the shares. On an accelerator they are the device plane's kernels.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import sys
import tempfile

import jax

from benchmarks import machine as machine_lib
from benchmarks import train_step
from labram_jax import host_memory

OPS_KEPT = 300  # the slowest operations kept in the result (the part, kind and family sums cover all)
FAMILIES_PRINTED = 12
# First match wins; matched against the lower-cased op_name scope path of each operation.
PARTS = (
    ("optimizer", ("adam", "optax", "clip", "global_norm", "apply_updates", "decay", "schedule")),
    ("tokenizer (frozen targets)", ("vqnsp.tokenize",)),  # pretraining's frozen VQ-NSP
    ("quantizer", ("quantize", "codebook")),
    ("attention", ("attn", "attention", "softmax", "qkv", "q_norm", "k_norm")),
    ("mlp", ("mlp", "fc1", "fc2", "gelu")),
    ("norm", ("norm", "layernorm", "groupnorm")),
    ("patch embed", ("patch_embed", "temporal", "spectrum", "conv")),
    ("loss and head", ("loss", "head", "logits", "cross_entropy", "lm_head")),
)


def hlo_index(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (opcode, op_name metadata) for every instruction of an HLO module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\(", line)
        if not m:
            continue
        meta = re.search(r'op_name="([^"]*)"', line)
        out[m.group(1)] = (m.group(2), meta.group(1) if meta else "")
    return out


def part_of(op_name: str) -> str:
    """The model part of an operation from its op_name scope path (:data:`PARTS`), else ``other``."""
    scope = op_name.lower()
    for part, needles in PARTS:
        if any(n in scope for n in needles):
            return part
    return "other" if scope else "unattributed"


def op_times(trace_dir: str, names: set[str]) -> dict[str, float]:
    """Seconds per operation name summed over the trace in ``trace_dir``, over events whose name
    (or its part before ``:``) is an instruction of the profiled module."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise SystemExit(f"no .xplane.pb under {trace_dir}: the profiler wrote no trace")
    totals: dict[str, float] = collections.defaultdict(float)
    for path in files:
        data = jax.profiler.ProfileData.from_file(path)
        for plane in data.planes:
            for line in plane.lines:
                for event in line.events:
                    name = event.name.split(":")[0].strip()
                    if name in names:
                        totals[name] += event.duration_ns * 1e-9
    return dict(totals)


def family_of(name: str) -> str:
    """An operation's family: its instruction name without XLA's numeric suffix
    (``wrapped_reduce-window.346`` -> ``wrapped_reduce-window``, ``ynn_fusion.12`` -> ``ynn_fusion``).
    It tells what XLA made of the work: products handed to YNNPACK, its own loop fusions, the
    reduce-window trees it splits long reductions into, custom calls."""
    return re.sub(r"\.\d+$", "", name)


def breakdown(times: dict[str, float], index: dict[str, tuple[str, str]], steps: int) -> dict:
    """Per part, per opcode, per family (:func:`family_of`) and per operation: ms per step,
    sorted slowest first."""
    by_part: dict[str, float] = collections.defaultdict(float)
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_family: dict[str, float] = collections.defaultdict(float)
    for name, seconds in times.items():
        kind, op_name = index[name]
        by_part[part_of(op_name)] += seconds
        by_kind[kind] += seconds
        by_family[family_of(name)] += seconds

    def per_step(d):
        return {k: 1e3 * v / steps for k, v in sorted(d.items(), key=lambda kv: -kv[1])}
    ops = [{"name": n, "kind": index[n][0], "part": part_of(index[n][1]), "op_name": index[n][1],
            "ms_per_step": 1e3 * s / steps} for n, s in sorted(times.items(), key=lambda kv: -kv[1])]
    return {"total_ms_per_step": 1e3 * sum(times.values()) / steps, "by_part": per_step(by_part),
            "by_kind": per_step(by_kind), "by_family": per_step(by_family), "ops": ops[:OPS_KEPT],
            "ops_total": len(ops)}


def print_breakdown(result: dict, top: int) -> None:
    total = result["total_ms_per_step"]
    families = dict(list(result["by_family"].items())[:FAMILIES_PRINTED])
    for title, table in (("model part", result["by_part"]), ("HLO kind", result["by_kind"]),
                         (f"operation family (top {len(families)})", families)):
        print(f"{title:<28} {'ms/step':>9} {'share':>6}")
        for k, ms in table.items():
            print(f"{k:<28} {ms:>9.1f} {ms / total:>6.1%}")
        print()
    print(f"slowest {top} operations: {'ms/step':>9} {'kind':<12} part / op_name")
    for op in result["ops"][:top]:
        print(f"  {op['name'][:34]:<34} {op['ms_per_step']:>7.2f} {op['kind']:<12} {op['part']} / "
              f"{op['op_name'][-70:]}")
    print(f"profiled ops: {total:.1f} ms/step; timed step (median): {1e3 * result['step_s_median']:.1f} ms")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", default="pretrain", choices=["tokenizer", "pretrain", "finetune"])
    parser.add_argument("--size", default="base", choices=["tiny", "base", "large", "huge"])
    parser.add_argument("--top", type=int, default=25, help="how many of the slowest operations to print")
    parser.add_argument("--json", default="", help="write the whole breakdown here")
    args = train_step.parse_args(argv, parser)
    machine = machine_lib.describe()
    print(machine_lib.summary(machine), flush=True)
    stage, size = args.stage, args.size
    bench = train_step.prepare(stage, size, args)
    bench.run(args.warmup)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            times = bench.run(args.steps)
        index = hlo_index(bench.compiled.as_text())
        devices = bench.mesh.devices.size  # every device runs the program: report per device
        result = breakdown(op_times(trace_dir, set(index)), index, args.steps * devices)
    result.update(stage=stage, size=size, batch=args.batch, channels=bench.grid.channels,
                  windows=bench.grid.windows, steps=args.steps, step_s_median=statistics.median(times),
                  machine=machine, command="python -m benchmarks.profile_step " + " ".join(
                      sys.argv[1:] if argv is None else argv))
    print_breakdown(result, args.top)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    host_memory.reexec_with_hugepages()
    main()
