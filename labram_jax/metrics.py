"""Metric logging: JSONL + TensorBoard event files, and progress lines with ETA."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import numpy as np

log = logging.getLogger("labram_jax")


class MetricWriter:
    """Writes ``{"step": s, **metrics}`` lines to ``metrics.jsonl`` and TensorBoard scalars.

    Only process 0 writes; other processes get a writer that does nothing.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            self._jsonl = open(path, "a")
            if self._jsonl.tell() > 0:  # a process killed mid-line left a partial line: end it
                with open(path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        self._jsonl.write("\n")
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # optional: JSONL alone is enough
                log.warning("tensorboardX not installed: writing metrics.jsonl only")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in clean.items():
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


class Progress:
    """Throughput and ETA over the steps since the last report."""

    def __init__(self, total_steps: int, global_batch: int, start_step: int):
        self.total, self.batch = total_steps, global_batch
        self.last_step, self.last_time = start_step, time.perf_counter()

    def report(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        now = time.perf_counter()
        steps = max(step - self.last_step, 1)
        dt = max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        rate = steps / dt
        eta = (self.total - step) / rate
        extra = {"steps_per_s": rate, "samples_per_s": rate * self.batch}
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if np.ndim(v) == 0)
        log.info("step %d/%d %s samples/s=%.1f ETA %s", step, self.total, shown, rate * self.batch, _hms(eta))
        return extra


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def read_jsonl(path: str) -> list[dict]:
    """The rows of a metrics file; a line cut short by a killed process is left out."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def plot_curves(workdir: str) -> str | None:
    """Plots every train/ and val/ loss-like series of ``metrics.jsonl`` to ``curves.png``."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(path)
    keys = sorted({k for r in rows for k in r if k != "step" and not k.endswith(("lr", "_per_s"))})
    if not keys:
        return None
    cols = min(3, len(keys))
    fig, axes = plt.subplots(-(-len(keys) // cols), cols, figsize=(4.5 * cols, 3 * -(-len(keys) // cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = sorted((r["step"], r[key]) for r in rows if key in r)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    out = os.path.join(workdir, "curves.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_codebook_usage(cluster_size, path: str) -> str:
    """Histogram of the tokenizer's code usage (EMA counts per code, sorted), to spot collapse."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usage = np.sort(np.asarray(cluster_size, np.float64))[::-1]
    used = int((usage > 1e-3 * max(usage.max(), 1e-12)).sum())
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(np.arange(len(usage)), usage, width=1.0)
    ax.set_yscale("symlog")
    ax.set_xlabel("code (sorted by usage)")
    ax.set_ylabel("EMA count per batch")
    ax.set_title(f"codebook usage: {used} of {len(usage)} codes in use")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
