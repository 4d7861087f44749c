"""The blocks of several ``benchmarks.train_step --reference ... --interleave K`` runs, pooled per stage.

    python -m benchmarks.pooled_blocks RUN.json [RUN.json ...] [--threshold 1.3]

Each interleaved run's JSON keeps every block's ratio (the reference's step time over ours, blocks seconds
apart). This prints, per run and stage, the blocks' range of our and the reference's median step times,
the run's median ratio and range, and how many blocks reach ``--threshold``; then, per stage over all the
runs given, the median ratio, its quartiles and that count again. Runs are pooled only when they ran on the
same CPU (model and stepping), the same vector instruction set for XLA and our kernels, the same PyTorch
instruction set and the same size and batch: a run that differs is refused with what differs.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def condition(run: dict, row: dict) -> dict:
    """What must match for two runs' blocks to be pooled."""
    machine = run["machine_detail"]
    about = row.get("reference_about") or {}
    return {"cpu": machine.get("cpu_id"), "xla_isa": machine.get("xla_isa"),
            "kernel_code": machine.get("cpu_kernel_code"), "torch_isa": about.get("torch_isa"),
            "size": row["size"], "batch": row["batch"], "grid": f"{row['channels']}x{row['windows']}"}


def blocks(run: dict) -> dict[str, dict]:
    """{stage: {"ratios", "ours_ms", "reference_ms", "condition"}} of one run's interleaved rows."""
    out = {}
    for row in run["rows"]:
        rounds = row.get("reference_rounds") or []
        if not rounds:
            continue
        out[row["stage"]] = {"ratios": [r["ratio"] for r in rounds],
                             "ours_ms": [1e3 * r["step_s_median"] for r in rounds],
                             "reference_ms": [1e3 * r["reference_step_s_median"] for r in rounds],
                             "condition": condition(run, row)}
    return out


def summary(ratios: list[float], threshold: float) -> dict:
    values = np.asarray(ratios, dtype=float)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"blocks": int(values.size), "median": float(median), "quartiles": (float(q1), float(q3)),
            "range": (float(values.min()), float(values.max())), "at_threshold": int((values >= threshold).sum())}


def pool(runs: dict[str, dict], threshold: float = 1.3) -> dict[str, dict]:
    """{stage: summary of every block of that stage in ``runs`` ({name: run JSON})}. Raises ValueError
    when two runs of a stage ran under different conditions (:func:`condition`)."""
    by_stage: dict[str, list] = {}
    seen: dict[str, tuple[str, dict]] = {}
    for name, run in runs.items():
        for stage, b in blocks(run).items():
            if stage in seen and seen[stage][1] != b["condition"]:
                first, cond = seen[stage]
                differs = {k: (cond[k], b["condition"][k]) for k in cond if cond[k] != b["condition"][k]}
                raise ValueError(f"{stage}: {first} and {name} ran under different conditions {differs}; "
                                 "pool runs of one CPU, instruction set, size and batch only")
            seen.setdefault(stage, (name, b["condition"]))
            by_stage.setdefault(stage, []).extend(b["ratios"])
    return {stage: summary(ratios, threshold) for stage, ratios in by_stage.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="JSONs written by benchmarks.train_step --interleave")
    parser.add_argument("--threshold", type=float, default=1.3, help="the ratio counted (default 1.3)")
    args = parser.parse_args(argv)
    runs = {}
    for path in args.runs:
        with open(path) as f:
            runs[path] = json.load(f)
        if not blocks(runs[path]):
            raise SystemExit(f"{path}: no interleaved blocks (run benchmarks.train_step with --reference and "
                             "--interleave K)")
    for path, run in runs.items():
        for stage, b in blocks(run).items():
            s = summary(b["ratios"], args.threshold)
            print(f"{path}: {stage}: ours {min(b['ours_ms']):,.0f}-{max(b['ours_ms']):,.0f} ms vs the reference "
                  f"{min(b['reference_ms']):,.0f}-{max(b['reference_ms']):,.0f}: median {s['median']:.2f}x "
                  f"({s['range'][0]:.2f}-{s['range'][1]:.2f}), {s['at_threshold']}/{s['blocks']} blocks at "
                  f"{args.threshold}x or more")
    try:
        pooled = pool(runs, args.threshold)
    except ValueError as error:
        raise SystemExit(str(error))
    for stage, s in pooled.items():
        print(f"all blocks: {stage}: median {s['median']:.2f}x (quartiles {s['quartiles'][0]:.2f}-"
              f"{s['quartiles'][1]:.2f}), {s['blocks']} blocks, {s['at_threshold']} at {args.threshold}x or more")


if __name__ == "__main__":
    main()
