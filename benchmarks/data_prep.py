"""Benchmark: hours of EEG converted per minute by data_prep, with 1 and N workers.

    python -m benchmarks.data_prep [--inputs ../shared/eeg/eegmat] [--workers 1 2]

Reports wall time, hours of EEG per minute, and the share of reading, filtering,
resampling and writing (summed per-file timings from the manifest). Writes
benchmarks/results/data_prep.json.
"""

import argparse
import json
import pathlib
import platform
import shutil
import tempfile
import time

from data_prep import __main__ as cli

PHASES = ("read", "filter", "resample", "write")


def run_once(inputs: list[str], workers: int) -> dict:
    out = pathlib.Path(tempfile.mkdtemp(prefix="data_prep_bench_"))
    try:
        t0 = time.perf_counter()
        code = cli.main(inputs + ["--out", str(out), "--window", "10", "--workers", str(workers), "--quiet",
                                  "--allow-failures"])
        wall = time.perf_counter() - t0
        manifest = json.loads((out / "manifest.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    hours = manifest["totals"]["hours_in"]
    phase = {p: sum(f["timings"].get(p, 0.0) for f in manifest["files"]) for p in PHASES}
    busy = sum(f["timings"].get("total", 0.0) for f in manifest["files"])
    phase["other"] = max(busy - sum(phase.values()), 0.0)
    return {"workers": workers, "exit_code": code, "files": manifest["totals"]["files"], "hours_of_eeg": hours,
            "wall_s": wall, "hours_per_minute": hours / (wall / 60.0),
            "time_share": {k: v / busy for k, v in phase.items()} if busy else {}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", nargs="+", default=[str(pathlib.Path(__file__).resolve().parents[2] / "shared/eeg/eegmat")])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    args = parser.parse_args()
    results = [run_once(args.inputs, w) for w in args.workers]
    print(f"{'workers':>7} {'files':>5} {'hours':>6} {'wall s':>7} {'h/min':>7}  time share (read/filter/resample/write/other)")
    for r in results:
        share = " ".join(f"{r['time_share'].get(p, 0):.0%}" for p in PHASES + ("other",))
        print(f"{r['workers']:>7} {r['files']:>5} {r['hours_of_eeg']:>6.2f} {r['wall_s']:>7.1f} "
              f"{r['hours_per_minute']:>7.1f}  {share}")
    out = pathlib.Path(__file__).parent / "results" / "data_prep.json"
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": __import__("os").cpu_count(),
                               "inputs": args.inputs, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
