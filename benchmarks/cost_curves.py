"""How cost grows with the work: step time and compiled memory against tokens per sample
(channels x 1-s windows), batch and model size, for each stage; and inference throughput.

    python -m benchmarks.cost_curves [--stages tokenizer pretrain finetune] [--sizes tiny base] \
        [--grids 19x5 23x8 32x8 64x4 64x8 128x8 128x16] [--batches 1 2 4 8 16] [--batch 8] \
        [--batch-grid 23x8] [--steps 5] [--warmup 2] [--inference-sizes tiny base] \
        [--inference-hours 1] [--devices 1] [--attention auto] [--scan-blocks] [--out benchmarks/results] \
        [--tag NAME]
    python -m benchmarks.cost_curves --stages --inference-sizes tiny base large   # inference only
    python -m benchmarks.cost_curves --refit benchmarks/results/cost_curves_cpu_base.json

Every point is one compiled training step of ``benchmarks.train_step`` (the step
``labram_jax.train`` runs, on random EEG-like batches), timed as the median of ``--steps``.
For each (stage, size) two sweeps: tokens per sample at ``--batch`` (``--grids``; 128 x 16 =
2,048 tokens is 8x the reference's 256-patch limit) and batch at ``--batch-grid``.

Fits (least squares of the relative residuals, ``(fit - y) / y``, with non-negative coefficients,
``scipy.optimize.nnls``; the points span two orders of magnitude and their noise is a share of each,
so plain least squares fitted the largest points alone: at Base the 1,024- and 2,048-token points
took the whole fit into ``a + c L^2`` and left the worst points 26-51 % off, session 47):

- time per sample ``t(L) = a + b L + c L^2`` over tokens per sample ``L``: ``b L`` is the
  part that grows linearly (patch embedding, projections, MLPs, heads), ``c L^2`` the
  attention's score and value products; they are equal at the crossover ``L* = b / c``
  (attention dominates beyond it).
- compiled memory ``m(L) = a + b L + c L^2`` the same way (parameters and optimizer state in
  ``a``; activations in ``b``; attention matrices in ``c``).
- step time over batch ``T(B) = t0 + t1 B``: fixed cost per step against cost per sample.

Inference: ``api.Predictor.embed`` of a synthetic 1-hour, 19-channel recording at 256 Hz
(random-weight models of each ``--inference-sizes``): hours of EEG per second, in total and
for the model alone (the preprocessing, MNE's filters and resampling, is the rest).

Writes ``<out>/cost_curves_<backend>[_tag].json`` and ``.png`` (three panels: time per sample
and memory against tokens, step time against batch) and prints the tables. The JSON is rewritten
after every point, so a run stopped by a time limit keeps its points (``--refit`` then plots
them; a sweep with too few points for its fit is drawn without one).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import jax
import numpy as np
from scipy import optimize

from benchmarks import machine as machine_lib
from benchmarks import train_step
from labram_jax.models import config as model_config

LINEAR_NAMES = ("a", "b", "c")


def parse_grid(text: str) -> tuple[int, int]:
    """'23x8' -> (23 channels, 8 windows)."""
    try:
        channels, windows = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write a grid as CHANNELSxWINDOWS, e.g. 23x8") from None
    if not (1 <= windows <= 16 and channels >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: 1 to 16 windows (the time table) and at least one channel")
    return channels, windows


def _relative_nnls(terms: np.ndarray, y: np.ndarray) -> list[float]:
    """Non-negative coefficients w minimising sum(((terms @ w - y) / y)^2): terms [P, K], y [P] > 0."""
    if np.any(y <= 0):
        raise ValueError(f"a relative fit needs positive values (step times, memory); got {y.tolist()}: a point "
                         "at 0 or below did not measure, so rerun it (or drop it from the JSON and --refit)")
    coef, _ = optimize.nnls(terms / y[:, None], np.ones_like(y))
    return [float(v) for v in coef]


def fit_quadratic(x, y) -> dict:
    """Non-negative ``y = a + b x + c x^2`` (relative least squares); with the crossover ``b / c`` (inf if c
    is 0)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    a, b, c = _relative_nnls(np.stack([np.ones_like(x), x, x * x], axis=1), y)
    predicted = a + b * x + c * x * x
    return {"a": a, "b": b, "c": c, "crossover": b / c if c > 0 else float("inf"),
            "max_rel_residual": float(np.max(np.abs(predicted - y) / y))}


def fit_linear(x, y) -> dict:
    """Non-negative ``y = t0 + t1 x`` (relative least squares)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    t0, t1 = _relative_nnls(np.stack([np.ones_like(x), x], axis=1), y)
    predicted = t0 + t1 * x
    return {"t0": t0, "t1": t1, "max_rel_residual": float(np.max(np.abs(predicted - y) / y))}


def measure(stage: str, size: str, grid: tuple[int, int], batch: int, args) -> dict:
    """One training-step point: ``train_step.bench_one`` at this grid and batch."""
    step_args = train_step.parse_args(["--batch", str(batch), "--channels", str(grid[0]), "--windows", str(grid[1]),
                                       "--steps", str(args.steps), "--warmup", str(args.warmup),
                                       "--dtype", args.dtype, "--devices", str(args.devices),
                                       "--attention", args.attention] + (["--scan-blocks"] if args.scan_blocks else []))
    row = train_step.bench_one(stage, size, step_args, None)
    row["tokens_per_sample"] = grid[0] * grid[1]
    row["step_s_per_sample"] = row["step_s_median"] / batch
    # The compiled program's memory, not the device's peak: that one only grows over a process's points.
    row["memory_mib"] = row.get("compiled_total_mib", row.get("runtime_peak_mib", float("nan")))
    print(f"  {stage:<9} {size:<5} {grid[0]:>3}x{grid[1]:<2} B={batch:<3} {1e3 * row['step_s_median']:>9.1f} ms "
          f"{row['memory_mib']:>9.0f} MiB", flush=True)
    return row


def inference(size: str, hours: float, batch_size: int = 32) -> dict:
    """Embeddings of a synthetic ``hours``-long 19-channel recording at 256 Hz: wall time of
    the whole ``embed`` and of the model alone (``embed_windows`` on the same windows)."""
    import mne

    from labram_jax import api
    from labram_jax.models import transformer

    names = "Fp1 Fp2 F7 F3 Fz F4 F8 T7 C3 Cz C4 T8 P7 P3 Pz P4 P8 O1 O2".split()
    sfreq = 256.0
    rng = np.random.default_rng(0)
    data = np.cumsum(rng.standard_normal((len(names), int(hours * 3600 * sfreq))), axis=1)  # brown noise
    data = (data - data.mean(axis=1, keepdims=True)) * 2e-6
    raw = mne.io.RawArray(data.astype(np.float64), mne.create_info(names, sfreq, "eeg"), verbose="error")
    model = transformer.LaBraM(model_config.labram(size), num_outputs=1)
    x0 = np.zeros((1, len(names), 4, 200), np.float32)
    variables = model.init(jax.random.key(0), x0, np.arange(1, len(names) + 1, dtype=np.int32))
    predictor = api.Predictor("finetune", model, variables, "binary", window_s=4)
    predictor.embed(raw, batch_size=batch_size)  # compiles the shapes this recording needs, outside the timing
    t0 = time.perf_counter()
    emb = predictor.embed(raw, batch_size=batch_size)
    total = time.perf_counter() - t0
    x, rows = predictor.windows(raw)
    t0 = time.perf_counter()
    predictor.embed_windows(x, rows, batch_size)
    model_s = time.perf_counter() - t0
    return {"size": size, "hours": hours, "channels": len(names), "sfreq_in": sfreq, "windows": int(emb.windows.shape[0]),
            "batch_size": batch_size, "total_s": total, "model_s": model_s, "hours_per_s": hours / total,
            "model_hours_per_s": hours / model_s}


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for key, curve in result["curves"].items():
        tokens = curve["tokens"]
        x = np.asarray([r["tokens_per_sample"] for r in tokens])
        dense = np.linspace(x.min(), x.max(), 100)
        for ax, field, fit, scale in ((axes[0], "step_s_per_sample", curve.get("time_fit"), 1e3),
                                      (axes[1], "memory_mib", curve.get("memory_fit"), 1.0)):
            line = ax.plot(x, [scale * r[field] for r in tokens], "o", label=key)[0]
            if fit is not None:
                ax.plot(dense, scale * (fit["a"] + fit["b"] * dense + fit["c"] * dense ** 2), "-",
                        color=line.get_color(), alpha=0.6)
        b = np.asarray([r["batch"] for r in curve["batch"]])
        line = axes[2].plot(b, [1e3 * r["step_s_median"] for r in curve["batch"]], "o", label=key)[0]
        if "batch_fit" in curve:
            fit = curve["batch_fit"]
            axes[2].plot(b, 1e3 * (fit["t0"] + fit["t1"] * b), "-", color=line.get_color(), alpha=0.6)
    axes[0].set(xlabel="tokens per sample (channels x 1-s windows)", ylabel="ms per sample",
                title=f"training step time per sample (batch {result['batch']})", xscale="log", yscale="log")
    axes[1].set(xlabel="tokens per sample", ylabel="MiB", title="compiled step memory", xscale="log", yscale="log")
    axes[2].set(xlabel="batch (samples)", ylabel="ms per step", title=f"step time vs batch ({result['batch_grid']})")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    where = (f"{result['machine']['cpu']}, XLA: {result['machine']['xla_isa']}" if result["backend"] == "cpu"
             else f"{result['device_kind']} (host: {result['machine']['cpu']})")
    fig.suptitle(f"{where}, {result['backend']}, {result['dtype']}, attention {result.get('attention', 'auto')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost_curves", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="*", default=["tokenizer", "pretrain", "finetune"],
                        choices=["tokenizer", "pretrain", "finetune"], help="none: inference only")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base", "large", "huge"])
    parser.add_argument("--grids", nargs="+", type=parse_grid,
                        default=[parse_grid(g) for g in ("19x5", "23x8", "32x8", "64x4", "64x8", "128x8", "128x16")])
    parser.add_argument("--batch", type=int, default=8, help="batch of the tokens sweep")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--batch-grid", type=parse_grid, default=parse_grid("23x8"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--devices", type=int, default=1, help="devices of the data-parallel mesh (the curves are "
                        "per device by default)")
    parser.add_argument("--attention", default="auto", choices=list(model_config.ATTENTION_IMPLEMENTATIONS),
                        help="attention implementation of every step (labram_jax.models.attention)")
    parser.add_argument("--scan-blocks", action="store_true", help="nn.scan over stacked blocks: one block compiled "
                        "instead of all (compiling each point's step took 27-37 s on a GPU host at Base)")
    parser.add_argument("--inference-sizes", nargs="*", default=["tiny", "base"], choices=["tiny", "base", "large"])
    parser.add_argument("--inference-hours", type=float, default=1.0)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--tag", default="")
    parser.add_argument("--refit", metavar="JSON", help="measure nothing: recompute the fits, tables and plot of a "
                        "result written earlier (rewrites that JSON and its PNG)")
    args = parser.parse_args(argv)
    if args.refit:
        result = json.loads(pathlib.Path(args.refit).read_text())
        result["curves"] = {key: fit_curve(c["tokens"], c["batch"]) for key, c in result["curves"].items()}
        refit = pathlib.Path(args.refit)
        return write(result, refit.parent / refit.name.removesuffix(".json"))
    if len(args.grids) < 3:
        parser.error("--grids: at least 3 grids (the fit has 3 coefficients)")
    if args.dtype == "auto":
        args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    machine = machine_lib.describe()
    print(machine_lib.summary(machine), flush=True)
    result = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "machine": machine,
              "dtype": args.dtype, "attention": args.attention, "scan_blocks": args.scan_blocks, "batch": args.batch,
              "batch_grid": "x".join(map(str, args.batch_grid)),
              "command": "python -m benchmarks.cost_curves " + " ".join(argv if argv is not None else os.sys.argv[1:]),
              "curves": {}, "inference": []}
    stem = pathlib.Path(args.out) / f"cost_curves_{result['backend']}{'_' + args.tag if args.tag else ''}"
    measured = {}  # a point in both sweeps (--batch at --batch-grid) is measured once

    def point(stage, size, grid, batch):
        if (stage, size, grid, batch) not in measured:
            measured[stage, size, grid, batch] = measure(stage, size, grid, batch, args)
        return measured[stage, size, grid, batch]
    for size in args.sizes:
        for stage in args.stages:
            if stage == "tokenizer" and size in ("large", "huge"):
                continue  # one tokenizer size (benchmarks.train_step)
            tokens, batches = [], []
            for sweep, grid, batch in ([(tokens, g, args.batch) for g in args.grids]
                                       + [(batches, args.batch_grid, b) for b in args.batches]):
                sweep.append(point(stage, size, grid, batch))
                result["curves"][f"{stage} {size}"] = fit_curve(tokens, batches)
                save(result, stem)  # after every point: a run stopped by a time limit keeps what it measured
    for size in args.inference_sizes:
        result["inference"].append(inference(size, args.inference_hours))
        save(result, stem)
    return write(result, stem)


def fit_curve(tokens: list[dict], batches: list[dict]) -> dict:
    """The fits of one (stage, size): time, compiled memory and model FLOPs per sample against
    tokens per sample, step time against batch. The FLOP fit's crossover is where attention's
    arithmetic equals the rest; the time fit's is where its time does (they differ when the
    attention runs at a lower FLOP rate than the matrix products, as on XLA:CPU). The token fits
    need 3 points and the batch fit 2; a sweep stopped before that (a time limit) has none. The
    points are kept in order of tokens and of batch, whatever order they were measured in (the
    tables' "fewest" and "most" columns read the ends)."""
    tokens = sorted(tokens, key=lambda r: r["tokens_per_sample"])
    batches = sorted(batches, key=lambda r: r["batch"])
    curve = {"tokens": tokens, "batch": batches}
    if len(tokens) >= 3:
        x = [r["tokens_per_sample"] for r in tokens]
        curve["time_fit"] = fit_quadratic(x, [r["step_s_per_sample"] for r in tokens])
        curve["memory_fit"] = fit_quadratic(x, [r["memory_mib"] for r in tokens])
        curve["flop_fit"] = fit_quadratic(x, [1e12 * r["model_tflops_per_step"] / r["batch"] for r in tokens])
    if len(batches) >= 2:
        curve["batch_fit"] = fit_linear([r["batch"] for r in batches], [r["step_s_median"] for r in batches])
    return curve


def save(result: dict, stem: pathlib.Path) -> None:
    """Writes ``<stem>.json`` (a tag may hold dots, hence no with_suffix)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.parent.joinpath(stem.name + ".json").write_text(json.dumps(result, indent=1))


def write(result: dict, stem: pathlib.Path) -> dict:
    """Prints the tables, writes ``<stem>.json`` and ``<stem>.png``."""
    print("\n| stage size | ms/sample at fewest tokens | at most | time fit a + b L + c L^2 (ms) | time crossover L* | "
          "FLOP crossover | achieved GFLOP/s, fewest -> most tokens | memory fit (MiB) | step vs batch t0 + t1 B (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, curve in result["curves"].items():
        first, last = curve["tokens"][0], curve["tokens"][-1]
        rates = [1e3 * r["model_tflops_per_step"] / r["step_s_median"] for r in (first, last)]
        cells = [key, f"{1e3 * first['step_s_per_sample']:.2f}", f"{1e3 * last['step_s_per_sample']:.1f}"]
        t, m, f, b = (curve.get(name) for name in ("time_fit", "memory_fit", "flop_fit", "batch_fit"))
        if t:
            cells += [f"{1e3 * t['a']:.3g} + {1e3 * t['b']:.3g} L + {1e3 * t['c']:.3g} L^2", f"{t['crossover']:.0f}",
                      f"{f['crossover']:.0f}"]
        else:
            cells += [f"no fit ({len(curve['tokens'])} points)", "-", "-"]
        cells.append(f"{rates[0]:.0f} -> {rates[1]:.0f}")
        cells.append(f"{m['a']:.0f} + {m['b']:.3g} L + {m['c']:.3g} L^2" if m else "-")
        cells.append(f"{1e3 * b['t0']:.1f} + {1e3 * b['t1']:.1f} B" if b else f"no fit ({len(curve['batch'])} points)")
        print("| " + " | ".join(cells) + " |")
    if result["inference"]:
        print("\n| inference (embed) | windows | total s | hours of EEG per s | model alone: hours per s |")
        print("|---|---|---|---|---|")
        for r in result["inference"]:
            print(f"| {r['size']}, {r['hours']:g} h, {r['channels']} ch at {r['sfreq_in']:g} Hz | {r['windows']} | "
                  f"{r['total_s']:.1f} | {r['hours_per_s']:.3g} | {r['model_hours_per_s']:.3g} |")
    save(result, stem)
    if result["curves"]:
        plot(result, stem.parent / (stem.name + ".png"))
    print(f"wrote {stem}.json and .png")
    return result


if __name__ == "__main__":
    main()
