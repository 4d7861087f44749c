"""Benchmark: the training input pipeline against the training step it must feed.

    python -m benchmarks.input_pipeline [--data MANIFEST_OR_SHARDS] [--workers 0 2] [--batch 8] \
        [--channels 23] [--windows 10] [--batches 300] [--step-results benchmarks/results/train_step_cpu.json]

Times what ``labram_jax.train`` runs per step on the host: the seeded global shuffle, reading
and decoding records from ArrayRecord, padding them onto the batch grid, batching, the input
guard and placing the batch on the devices (``sharding.to_global``). (Pretraining's token
mask is drawn on the device inside the step, so it is part of the step's time.) Reports
records/s and samples/s with 0 and N Grain worker processes and the ratio to the Base
fine-tuning step rate read from the train-step benchmark's JSON (or ``--step-rate``).

Without ``--data`` it converts the EEGMAT recordings of ``../shared/eeg`` with data_prep
(10-s windows) into a temporary directory first. Results: ``<out>/input_pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import tempfile
import time

import jax

from labram_jax import input_pipeline, sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
EEGMAT = ROOT.parent / "shared" / "eeg" / "eegmat"


def prepare_eegmat(out: pathlib.Path) -> str:
    """EEGMAT -> 10-s records with data_prep; returns the manifest path."""
    from data_prep import __main__ as data_prep_cli

    if not EEGMAT.is_dir():
        raise SystemExit(f"{EEGMAT} not found: pass --data <manifest.json or shards>")
    code = data_prep_cli.main([str(EEGMAT), "--out", str(out), "--window", "10", "--label-from", "filename",
                               "--label-pattern", r"_1\.edf$=rest", "--label-pattern", r"_2\.edf$=arithmetic",
                               "--quiet"])
    if code:
        raise SystemExit(f"data_prep failed with exit code {code}")
    return str(out / "manifest.json")


def time_pipeline(spec: str, grid: input_pipeline.Grid, batch: int, workers: int, batches: int, warmup: int) -> dict:
    mesh = sharding.make_mesh((-1, 1, 1))
    iterator = input_pipeline.train_iterator(spec, grid, batch, seed=0, num_workers=workers)
    guard = input_pipeline.InputGuard(spec, "train")
    t_first = time.perf_counter()
    for _ in range(warmup):
        guard.take(next(iterator))
    warm_s = time.perf_counter() - t_first
    t0 = time.perf_counter()
    for _ in range(batches):
        local = next(iterator)
        guard.take(local)
        jax.block_until_ready(sharding.to_global(local, mesh))
    wall = time.perf_counter() - t0
    return {"workers": workers, "batches": batches, "batch": batch, "wall_s": wall, "warmup_s": warm_s,
            "batches_per_s": batches / wall, "samples_per_s": batches * batch / wall,
            "records_per_s": batches * batch / wall}


def step_rate(path: str | None, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--step-rate"
    if path and os.path.exists(path):
        rows = json.load(open(path))["rows"]
        for row in rows:
            if row["stage"] == "finetune" and row["size"] == "base":
                return row["samples_per_s"], f"{path} (finetune base, batch {row['batch']})"
    return None, "no train-step result (run benchmarks.train_step first or pass --step-rate)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="", help="manifest.json or shard glob (default: convert EEGMAT)")
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=23)
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--batches", type=int, default=300, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=20, help="untimed batches first (workers start, caches fill)")
    parser.add_argument("--step-results", default=str(ROOT / "benchmarks" / "results" / "train_step_cpu.json"))
    parser.add_argument("--step-rate", type=float, default=None, help="samples/s of the step to feed")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    tmp = None
    spec = args.data
    if not spec:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="pipeline_bench_"))
        print(f"converting {EEGMAT} (10-s windows) ...", flush=True)
        spec = prepare_eegmat(tmp)
    try:
        grid = input_pipeline.Grid(args.channels, args.windows)
        records = input_pipeline.count_records(spec, "train")
        rows = []
        for workers in args.workers:
            print(f"... {workers} workers", flush=True)
            rows.append(time_pipeline(spec, grid, args.batch, workers, args.batches, args.warmup))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    rate, source = step_rate(args.step_results, args.step_rate)
    print(f"{'workers':>7} {'batches/s':>9} {'samples/s':>9} {'x step rate':>11}")
    for row in rows:
        row["x_step_rate"] = row["samples_per_s"] / rate if rate else None
        ratio = f"{row['x_step_rate']:.1f}x" if rate else "-"
        print(f"{row['workers']:>7} {row['batches_per_s']:>9.1f} {row['samples_per_s']:>9.1f} {ratio:>11}")
    print(f"step rate: {f'{rate:.2f} samples/s' if rate else '-'} from {source}; {records} training records, "
          f"grid {args.channels} x {args.windows}")
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__, "data": args.data or
              "EEGMAT via data_prep --window 10", "records": records, "grid": [args.channels, args.windows],
              "step_rate": rate, "step_rate_source": source, "rows": rows,
              "command": "python -m benchmarks.input_pipeline " + " ".join(argv if argv is not None else os.sys.argv[1:])}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "input_pipeline.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
