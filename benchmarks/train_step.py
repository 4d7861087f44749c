"""Benchmark: the training step of every stage and size on the devices present.

    python -m benchmarks.train_step --sizes tiny base --stages tokenizer pretrain finetune \
        [--batch 8] [--steps 20] [--warmup 15] [--dtype float32|bfloat16] [--peak-tflops auto|N] \
        [--mesh -1 1 1] [--remat none|block] [--attention auto|xla|cudnn|explicit|cpu_kernel] [--scan-blocks] \
        [--layer-norm auto|xla|cpu_kernel] [--linear auto|xla|cpu_kernel] [--loss-chunks N] \
        [--out benchmarks/results] [--reference PATH/TO/LaBraM [--rounds N | --interleave K]] [--vs-xla-defaults] \
        [--vs-attention IMPL] [--vs-layer-norm IMPL] [--vs-linear IMPL] [--vs-optimizer IMPL] [--vs-loss-chunks N]

For each (stage, size): compile time, median step time over ``--steps`` steps after ``--warmup``
(each step waited for), samples/s, patch tokens/s, analytic model FLOPs per step
(benchmarks/flops.py) and XLA's own count, MFU against ``--peak-tflops`` (``auto``: the datasheet
table for GPUs/TPUs; on a CPU a measured float32 matmul rate, said so in the table; for float32 on
a CPU also MFU against the cores' FMA peak, ``cpu_vector_rate.cc``, which no matmul reaches; both
CPU peaks the best of the run's probes, :func:`best_peaks`), and memory (the compiled step's
analysis; the runtime peak where the backend reports one). It runs the very step
``labram_jax.train`` runs (``steps.build``) on random EEG-like batches, and asserts the step was
traced once; as in the trainer, Python's garbage collector skips the set-up's objects while steps
run (``train.set_up_frozen``; the reference's steps alike).

Shapes default to the reference's: fine-tuning 23 channels x 10 s, pretraining and the
tokenizer 23 channels x 8 s. ``--reference``: the original PyTorch code's steps of each stage timed
right after ours on this machine (a subprocess per stage), held to the same instruction set
(``benchmarks.reference_step``), and the ratio. ``--rounds N`` repeats each stage's pair N times,
the order swapped every round (ours first, then the reference first, ...), and reports the median
of the N ratios with their range: a machine whose speed drifts over minutes moves one round's
ratio, not the median. ``--interleave K`` instead keeps the original's step warm in one served
subprocess and alternates K of its steps with K of ours, ``--steps // K`` blocks each, the
median of the blocks' ratios reported: a drift of the machine's speed (the Intel host of sessions
36-39 moved the same step by 35 % within minutes) meets both codes alike. ``--vs-xla-defaults``:
the same step also compiled without this project's XLA options (``labram_jax.compile_options``),
steps alternated, and the paired speed-up; ``--vs-attention IMPL`` the same with the step compiled
with attention ``IMPL`` instead of ``--attention`` (``--vs-layer-norm``,
``--vs-linear``, ``--vs-mlp``, ``--vs-qkv``, ``--vs-optimizer``, ``--vs-loss-chunks``: likewise; the last for
pretraining, whose lm_head loss it sets). The tokenizer has one size (the Base-width VQ-NSP; ``tiny`` for tests), so ``large``/``huge`` skip it. Results go to
``<out>/train_step_<backend>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops as flops_lib
from benchmarks import machine as machine_lib
from labram_jax_configs import common
from labram_jax import compile_options, host_memory, input_pipeline, optim, sharding, steps, train
from labram_jax.models import config as model_config
from labram_jax.tasks import pretrain

DEFAULT_SHAPES = {"finetune": (23, 10), "pretrain": (23, 8), "tokenizer": (23, 8)}


def synthetic_batches(grid: input_pipeline.Grid, batch: int, count: int, seed: int = 0) -> list[dict]:
    """``count`` different random batches: every patch real, amplitudes ~50 uV (x in units of 100 uV),
    channels on the first rows of the spatial table."""
    rng = np.random.default_rng(seed)
    ids = np.arange(1, grid.channels + 1, dtype=np.int32)  # spatial-table rows of the first channels
    out = []
    for _ in range(count):
        out.append({"x": (0.5 * rng.standard_normal((batch, grid.channels, grid.windows, 200))).astype(np.float32),
                    "channel_ids": np.broadcast_to(ids, (batch, grid.channels)).copy(),
                    "patch_mask": np.ones((batch, grid.channels, grid.windows), bool),
                    "label": rng.integers(0, 2, batch).astype(np.int32),
                    "value": rng.standard_normal(batch).astype(np.float32),
                    "valid": np.ones((batch,), bool)})
    return out


def stage_config(stage: str, size: str, batch: int, channels_: int, windows: int, dtype: str):
    config = common.get_config(size, stage)
    config.data.batch_size = batch
    config.data.max_channels = channels_
    config.data.max_windows = windows
    config.model.dtype = dtype
    return config


def analytic_flops(stage: str, config, stage_obj, tokenizer_cfg, grid: input_pipeline.Grid, batch: int) -> float:
    cfg = None if stage == "tokenizer" else stage_obj.model.cfg
    return flops_lib.train_step_flops(stage, batch, grid.channels * grid.windows, cfg=cfg, tokenizer=tokenizer_cfg,
                                      vocab=config.model.vocab_size, num_outputs=1)


def measured_matmul_tflops(dtype, n: int = 2048, repeats: int = 10) -> float:
    """Achieved TFLOP/s of an n x n matmul on the first device (the CPU 'peak')."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def best_peaks(rows: list[dict], fma_peak: float | None, peak: float | None) -> tuple[float | None, float | None]:
    """The run's float32 FMA peak and matmul peak as the best of its probes, and every row's MFU against them.

    A probe that meets the host in a slow second reads low (session 47: the start's FMA 0.155 TFLOP/s and matmul
    0.117 against 0.23 and 0.19-0.21 in every other run, putting a run's MFU at 0.82-1.30). A side-by-side run
    probes the FMA rate again before every block (``reference_rounds[i]["conditions"]``, and the original's);
    the best of all those readings is the rate the cores can reach. rows' ``mfu`` / ``mfu_vs_fma_peak`` are
    recomputed in place where they were given. Returns (fma_peak, peak)."""
    readings = [fma_peak] + [probe.get("fma_tflops") for r in rows for q in r.get("reference_rounds", [])
                             for probe in (q.get("conditions") or {}, q.get("reference_conditions") or {})]
    if fma_peak:  # the start's probe is one of the readings
        fma_peak = max(x for x in readings if x)
    for r in rows:
        if r.get("mfu") is not None and peak:
            r["mfu"] = r["achieved_tflops"] / peak
        if r.get("mfu_vs_fma_peak") is not None and fma_peak:
            r["mfu_vs_fma_peak"] = r["achieved_tflops"] / fma_peak
    return fma_peak, peak


def peak_tflops(arg: str, dtype_name: str) -> tuple[float | None, str]:
    if arg != "auto":
        return float(arg), "given"
    device = jax.devices()[0]
    peak = flops_lib.known_peak(device.device_kind, dtype_name)
    if peak is not None:
        return peak, f"datasheet {device.device_kind}"
    if device.platform == "cpu":
        return measured_matmul_tflops(steps.compute_dtype(dtype_name)), "measured 2048^3 matmul (all cores)"
    return None, "unknown (pass --peak-tflops)"


def memory_figures(compiled) -> dict:
    mib = 1 << 20
    out = {f"compiled_{k}_mib": v / mib for k, v in (steps.compiled_memory(compiled) or {}).items()}
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["runtime_peak_mib"] = stats["peak_bytes_in_use"] / mib
    out["host_max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def usage_figures(usage: list[tuple[float, int]]) -> dict:
    """Medians over every step run (warm-up included) of the process's kernel time and page faults
    per step: what allocating and faulting in XLA:CPU's step buffers costs (labram_jax.host_memory)."""
    if not usage:
        return {}
    return {"kernel_s_per_step_median": statistics.median(u[0] for u in usage),
            "page_faults_per_step_median": statistics.median(u[1] for u in usage)}


def xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"]) if cost and "flops" in cost else None
    except (AttributeError, NotImplementedError, KeyError, TypeError):
        return None


@dataclasses.dataclass
class Prepared:
    """One stage's compiled step with its state and batches, ready to run (see :func:`prepare`)."""
    config: object
    stage_obj: object
    tokenizer_cfg: object
    grid: input_pipeline.Grid
    mesh: object
    rules: object
    compiled: object
    compile_s: float
    traces: list
    state: object = None
    frozen: object = None
    batches: list = dataclasses.field(default_factory=list)
    metrics: dict = dataclasses.field(default_factory=lambda: {"loss": float("nan")})
    usage: list = dataclasses.field(default_factory=list)  # per step run: (kernel seconds, page faults)

    def run(self, n: int) -> list[float]:
        """Run ``n`` steps on the prepared batches, each waited for; returns their seconds and adds
        each step's kernel (system) time and page faults, whole process, to ``usage``."""
        times = []
        with train.set_up_frozen(), jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            for i in range(n):
                before = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                self.state, self.metrics = self.compiled(self.state, self.batches[i % len(self.batches)], self.frozen)
                jax.block_until_ready((self.state, self.metrics))
                times.append(time.perf_counter() - t0)
                after = resource.getrusage(resource.RUSAGE_SELF)
                self.usage.append((after.ru_stime - before.ru_stime,
                                   after.ru_minflt + after.ru_majflt - before.ru_minflt - before.ru_majflt))
        return times


def prepare(stage: str, size: str, args) -> Prepared:
    """Compile ``stage`` at ``size`` with the command line's settings (the very step ``labram_jax.train``
    runs) and initialise its state and three random batches."""
    shape = DEFAULT_SHAPES[stage] if args.channels is None else (args.channels, args.windows)
    grid = input_pipeline.Grid(*shape)
    config = stage_config(stage, size, args.batch, grid.channels, grid.windows, args.dtype)
    config.model.remat = args.remat
    config.model.attention = args.attention
    config.model.layer_norm = args.layer_norm
    config.model.linear = args.linear
    config.model.mlp = args.mlp
    config.model.qkv = args.qkv
    config.optim.implementation = args.optimizer
    config.model.scan_blocks = args.scan_blocks
    if stage == "pretrain" and args.loss_chunks is not None:
        config.pretrain.loss_chunks = args.loss_chunks
    dtype = steps.compute_dtype(args.dtype)
    if stage == "pretrain":
        frozen_tokenizer = pretrain.random_tokenizer(config, dtype)
        stage_obj = pretrain.build(config, dtype, tokenizer=frozen_tokenizer)
        tokenizer_cfg = frozen_tokenizer[0].cfg
    else:
        stage_obj = steps.build_stage(config, dtype)
        tokenizer_cfg = stage_obj.model.cfg if stage == "tokenizer" else None
    devices = jax.devices()[:args.devices] if args.devices else None
    mesh = sharding.make_mesh(tuple(args.mesh), devices)
    rules = sharding.rules_from_config(config)
    key = jax.random.key(0)
    traces = []

    def counting(step_fn):
        def counted(state, batch, frozen):
            traces.append(1)
            return step_fn(state, batch, frozen)
        return counted

    t0 = time.perf_counter()
    built = steps.build(config, stage_obj, mesh, rules, grid, args.batch, key, key, 10_000, 10, wrap=counting)
    out = Prepared(config, stage_obj, tokenizer_cfg, grid, mesh, rules, built.compiled, time.perf_counter() - t0,
                   traces)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out.state = jax.jit(built.spec.init, out_shardings=built.spec.shardings)(key)
        out.frozen = (jax.device_put(stage_obj.frozen, sharding.replicated(mesh))
                      if stage_obj.frozen is not None else None)
        out.batches = [sharding.to_global(b, mesh) for b in synthetic_batches(grid, args.batch, 3)]
    return out


def bench_one(stage: str, size: str, args, peak: float | None, machine: dict | None = None) -> dict:
    """One row of the table; with ``args.reference`` (and a row the reference can run) the reference's
    step of this stage is timed next to ours, ``args.rounds`` times (:func:`rounds_with_reference`)."""
    bench = prepare(stage, size, args)
    fma_peak = (machine or {}).get("fma_peak_tflops") if args.dtype == "float32" else None  # a float32 figure
    config, stage_obj, tokenizer_cfg, grid = bench.config, bench.stage_obj, bench.tokenizer_cfg, bench.grid
    mesh, compiled, compile_s, traces = bench.mesh, bench.compiled, bench.compile_s, bench.traces
    baseline = rounds = None
    second_step = compared_field(args, stage) or args.vs_xla_defaults
    if second_step and not args.compile_only:
        baseline = prepare_baseline(stage, size, args)
        times, base_times = interleaved(bench, baseline, args.warmup + args.steps)
        times, base_times = times[args.warmup:], base_times[args.warmup:]
    elif args.reference and not args.compile_only and comparable(stage, size, args) and args.interleave:
        times, rounds = blocks_with_reference(stage, bench.run, args, machine or {})
    elif args.reference and not args.compile_only and comparable(stage, size, args):
        times, rounds = rounds_with_reference(stage, lambda: bench.run(args.warmup + args.steps)[args.warmup:],
                                              args, machine or {})
    else:
        times = [] if args.compile_only else bench.run(args.warmup + args.steps)[args.warmup:]
    loss = float(bench.metrics["loss"])
    if len(traces) != 1:
        raise AssertionError(f"the {stage} step was traced {len(traces)} times: it recompiled between steps")
    step_s = statistics.median(times) if times else float("nan")
    model_flops = analytic_flops(stage, config, stage_obj, tokenizer_cfg, grid, args.batch)
    tokens = args.batch * grid.channels * grid.windows
    row = {"stage": stage, "size": size, "batch": args.batch, "channels": grid.channels, "windows": grid.windows,
           "dtype": args.dtype, "remat": args.remat, "attention": args.attention, "layer_norm": args.layer_norm,
           "linear": args.linear, "mlp": args.mlp, "qkv": args.qkv, "optimizer": args.optimizer,
           "scan_blocks": args.scan_blocks, "loss_chunks": config.pretrain.loss_chunks if stage == "pretrain" else None,
           "mesh": dict(mesh.shape), "compile_s": compile_s,
           "step_s_median": step_s, "step_s_min": min(times, default=step_s),
           "step_s_max": max(times, default=step_s), "steps": len(times),
           "samples_per_s": args.batch / step_s, "tokens_per_s": tokens / step_s, "model_tflops_per_step":
           model_flops / 1e12, "xla_tflops_per_step": (xla_flops(compiled) or float("nan")) / 1e12,
           "achieved_tflops": model_flops / step_s / 1e12, "mfu": model_flops / step_s / 1e12 / peak if peak else None,
           "mfu_vs_fma_peak": model_flops / step_s / 1e12 / fma_peak if fma_peak else None,
           "loss": loss, "traces": len(traces), **memory_figures(compiled), **usage_figures(bench.usage)}
    if rounds is not None:
        add_reference(row, rounds)
    if baseline is not None:
        ratios = [b / t for b, t in zip(base_times, times)]
        compared = {"step_s_median": statistics.median(base_times), "speedup_paired_median": statistics.median(ratios),
                    "speedup_paired_range": [min(ratios), max(ratios)], "loss": float(baseline.metrics["loss"]),
                    **{k: v for k, v in memory_figures(baseline.compiled).items() if k.startswith("compiled")}}
        field = compared_field(args, stage)
        if field:
            row[f"vs_{field}"] = {field: getattr(args, f"vs_{field}"), **compared}
        else:
            row["xla_defaults"] = {"options": compile_options.compiler_options(), **compared}
    return row


# Settings a second step can be compiled with (``--vs-FIELD``) and timed alternately against ours;
# the stages each applies to.
ALL_STAGES = ("tokenizer", "pretrain", "finetune")
COMPARED_FIELDS = {"attention": ALL_STAGES, "layer_norm": ALL_STAGES, "linear": ALL_STAGES, "mlp": ALL_STAGES,
                   "qkv": ALL_STAGES, "optimizer": ALL_STAGES,
                   "loss_chunks": ("pretrain",)}


def compared_field(args, stage: str) -> str:
    """The setting ``--vs-FIELD`` compares for ``stage``, or ''."""
    return next((f for f, stages in COMPARED_FIELDS.items()
                 if getattr(args, f"vs_{f}") not in ("", None) and stage in stages), "")


def prepare_baseline(stage: str, size: str, args) -> Prepared:
    """The step ``--vs-FIELD`` (that setting instead of ``--FIELD``) or ``--vs-xla-defaults`` (XLA's
    default options) times ours against."""
    field = compared_field(args, stage)
    if field:
        return prepare(stage, size, argparse.Namespace(**{**vars(args), field: getattr(args, f"vs_{field}")}))
    with compile_options.xla_defaults():
        return prepare(stage, size, args)


def interleaved(bench: Prepared, baseline: Prepared, n: int) -> tuple[list[float], list[float]]:
    """``n`` steps of each, alternating (this one, then the baseline), so that a noisy machine
    slows both alike; returns the two lists of step seconds."""
    times, base_times = [], []
    for _ in range(n):
        times += bench.run(1)
        base_times += baseline.run(1)
    return times, base_times


def comparable(stage: str, size: str, args) -> bool:
    """Whether ``stage`` at ``size`` under the command line runs what ``benchmarks.reference_step``
    runs: Base, float32, the reference's shapes."""
    shape = DEFAULT_SHAPES[stage] if args.channels is None else (args.channels, args.windows)
    return size == "base" and args.dtype == "float32" and shape == DEFAULT_SHAPES[stage]


def rounds_with_reference(stage: str, run_ours, args, machine: dict) -> tuple[list[float], list[dict]]:
    """``args.rounds`` rounds of ``run_ours()`` (a list of step seconds) and the reference's step of
    ``stage`` (:func:`run_reference`, a fresh subprocess each), ours first in even rounds and second in
    odd ones. Returns all our step seconds and one dict per round: its order, both medians, the
    ratio (reference median / ours), the machine's speed just before each side ran and the share of
    CPU time the hypervisor stole while it did (``conditions``, ``reference_conditions``:
    :func:`machine.conditions` plus ``steal``, :func:`machine.steal_share`; the reference's includes
    its subprocess's start) and the reference's record."""
    metered = functools.partial(run_metered, threads=machine.get("threads") or 1)
    times, rounds = [], []
    for r in range(args.rounds):
        ours_first = r % 2 == 0
        mine, ours_at = metered(run_ours) if ours_first else (None, None)
        reference, reference_at = metered(lambda: run_reference(args.reference, [stage], args, machine))
        if not ours_first:
            mine, ours_at = metered(run_ours)
        times += mine
        rounds.append(paired(f"round {r + 1}/{args.rounds}", ours_first, mine, reference["rows"][0]["step_s_median"],
                             ours_at, reference_at, reference))
    return times, rounds


def paired(label: str, ours_first: bool, mine: list[float], reference_s: float, ours_at: dict, reference_at: dict,
           reference: dict) -> dict:
    """One round's or block's record (its order, both medians, the ratio reference / ours, the machine's
    state before each side, the reference's record), printed as a line headed ``label``."""
    record = {"order": "ours first" if ours_first else "reference first", "step_s_median": statistics.median(mine),
              "reference_step_s_median": reference_s, "ratio": reference_s / statistics.median(mine),
              "conditions": ours_at, "reference_conditions": reference_at, "reference": reference}
    print(f"    {label} ({record['order']}): ours {1e3 * record['step_s_median']:.0f} ms, reference "
          f"{1e3 * reference_s:.0f} ms: {record['ratio']:.2f}x (machine before ours / the reference: "
          f"{describe_conditions(ours_at)} / {describe_conditions(reference_at)})", flush=True)
    return record


def run_metered(fn, threads: int):
    """fn()'s result, and the machine's speed just before it (:func:`machine.conditions`) with the
    share of CPU time the hypervisor stole while it ran (``steal``)."""
    now = machine_lib.conditions(threads)
    before = machine_lib.cpu_ticks()
    result = fn()
    return result, {"steal": machine_lib.steal_share(before, machine_lib.cpu_ticks()), **now}


def blocks_with_reference(stage: str, run_ours, args, machine: dict) -> tuple[list[float], list[dict]]:
    """``--interleave K``: ours and the original's step (one ``reference_step --serve`` subprocess,
    warmed up once) alternate every K steps, ``args.steps // K`` blocks each, the first side swapped
    every block, a 0.2-s pause between sides (the other library's threads go idle); ``run_ours(n)``
    runs n of our steps, the first ``args.warmup`` untimed. Returns all our step seconds and one dict
    per block as :func:`rounds_with_reference`'s rounds: each ratio pairs two blocks seconds apart, so a
    machine whose speed drifts over minutes moves few of them."""
    cmd = [sys.executable, "-m", "benchmarks.reference_step", "--reference", args.reference, "--stages", stage,
           "--batch", str(args.batch), "--warmup", str(args.warmup), "--serve"]
    env = reference_env(machine)
    metered = functools.partial(run_metered, threads=machine.get("threads") or 1)
    print(f"... the reference ({stage}) served, torch ISA {env.get('ATEN_CPU_CAPABILITY', 'default')}", flush=True)
    with subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          cwd=pathlib.Path(__file__).parent.parent) as server:
        about = _served(server, "ready", cmd)
        about["env"] = {k: env[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
                        if k in env}
        run_ours(args.warmup)

        def run_reference_block():
            server.stdin.write(f"{args.interleave}\n")
            server.stdin.flush()
            return _served(server, "step_s", cmd)["step_s"]

        times, blocks = [], []
        count = max(1, args.steps // args.interleave)
        for b in range(count):
            ours_first = b % 2 == 0
            sides = [lambda: run_ours(args.interleave), run_reference_block]
            done = []
            for side in (sides if ours_first else sides[::-1]):
                time.sleep(0.2)
                done.append(metered(side))
            (mine, ours_at), (theirs, reference_at) = done if ours_first else done[::-1]
            times += mine
            reference = {**about, "rows": [{"stage": stage, "step_s_median": statistics.median(theirs),
                                            "step_s": theirs}]}
            blocks.append(paired(f"block {b + 1}/{count}", ours_first, mine, statistics.median(theirs), ours_at,
                                 reference_at, reference))
        server.stdin.write("\n")
        server.stdin.flush()
    return times, blocks


def _served(server, key: str, cmd: list[str]) -> dict:
    """The next JSON line holding ``key`` that the reference server writes (other output skipped)."""
    for line in server.stdout:
        try:
            answer = json.loads(line)
        except ValueError:
            continue
        if isinstance(answer, dict) and key in answer:
            return answer
    raise SystemExit(f"the reference server ended before answering (exit {server.wait()}): run {' '.join(cmd)} "
                     "by hand to see its error (its output above, if any, says why)")


def describe_conditions(at: dict) -> str:
    """:func:`machine.conditions` plus the stolen share, in a few words."""
    fma = f"FMA {at['fma_tflops']:.3f} TFLOP/s, " if at.get("fma_tflops") else ""
    steal = f", {100 * at['steal']:.1f} % stolen" if at.get("steal") is not None else ""
    return f"{fma}copy {at['copy_gbs']:.1f} GB/s{steal}"


def add_reference(row: dict, rounds: list[dict]) -> None:
    """The reference's figures in ``row``: ``vs_reference`` (the median over rounds of the per-round
    ratios), their range, the reference's median step over rounds, and the rounds themselves."""
    ratios = [r["ratio"] for r in rounds]
    ref_s = statistics.median(r["reference_step_s_median"] for r in rounds)
    row["reference_samples_per_s"] = row["batch"] / ref_s
    row["vs_reference"] = statistics.median(ratios)
    row["vs_reference_range"] = [min(ratios), max(ratios)]
    row["reference_rounds"] = [{k: v for k, v in r.items() if k != "reference"} for r in rounds]
    first = rounds[0]["reference"]
    row["reference_about"] = {k: first[k] for k in ("torch", "torch_isa", "torch_threads", "timm", "reference", "env")}


def reference_env(machine: dict, env: dict | None = None) -> dict:
    """The environment for the reference's subprocess: PyTorch, MKL and oneDNN held to the instruction
    set XLA is held to (``--xla_cpu_max_isa=AVX2`` -> ``ATEN_CPU_CAPABILITY=avx2``,
    ``MKL_ENABLE_INSTRUCTIONS=AVX2``, ``ONEDNN_MAX_CPU_ISA=AVX2``), unless already set."""
    env = dict(os.environ if env is None else env)
    limit = machine_lib.xla_isa_limit(env.get("XLA_FLAGS", "")) or ""
    if limit.startswith(("AVX512", "AMX")) or not limit:
        return env  # XLA may use AVX-512: so may PyTorch (its default on such a CPU)
    wide = limit == "AVX2"
    env.setdefault("ATEN_CPU_CAPABILITY", "avx2" if wide else "default")
    env.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2" if wide else "SSE4_2")
    env.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2" if wide else "SSE41")
    return env


def run_reference(path: str, stages: list[str], args, machine: dict) -> dict:
    """Time the original's steps of ``stages`` (``benchmarks.reference_step``) in a subprocess on this
    machine's CPU, held to XLA's instruction set; returns its JSON record with the ``env`` it ran under."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "reference.json")
        cmd = [sys.executable, "-m", "benchmarks.reference_step", "--reference", path, "--stages", *stages,
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--json", out]
        env = reference_env(machine)
        print(f"... the reference ({' '.join(stages)}), torch ISA {env.get('ATEN_CPU_CAPABILITY', 'default')}",
              flush=True)
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, cwd=pathlib.Path(__file__).parent.parent)
        if done.returncode != 0:
            raise SystemExit(f"the reference run failed (exit {done.returncode}): {' '.join(cmd)}")
        with open(out) as f:
            reference = json.load(f)
    reference["env"] = {k: env[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
                        if k in env}
    return reference


def reference_summary(rows: list[dict]) -> dict | None:
    """The run's ``reference`` record: PyTorch's version, instruction set and threads (from its first
    subprocess) and, per compared stage, the reference's median step over the rounds."""
    compared = [r for r in rows if "reference_rounds" in r]
    if not compared:
        return None
    per_stage = [{"stage": r["stage"], "samples_per_s": r["reference_samples_per_s"],
                  "step_s_median": r["batch"] / r["reference_samples_per_s"], "rounds": len(r["reference_rounds"])}
                 for r in compared]
    return {**compared[0]["reference_about"], "rows": per_stage}


def print_table(rows: list[dict], peak_note: str) -> None:
    head = (f"{'stage':<9} {'size':<5} {'B':>3} {'CxW':>6} {'compile s':>9} {'step ms':>8} {'samples/s':>9} "
            f"{'tokens/s':>9} {'TFLOP/step':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem MiB':>8} {'sys ms':>6} {'vs ref':>6}")
    print(head)
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        ref = f"{r['vs_reference']:.2f}x" if "vs_reference" in r else "-"
        mem = r.get("runtime_peak_mib", r.get("compiled_total_mib", float("nan")))
        kernel_ms = 1e3 * r.get("kernel_s_per_step_median", float("nan"))
        print(f"{r['stage']:<9} {r['size']:<5} {r['batch']:>3} {r['channels']:>3}x{r['windows']:<2} "
              f"{r['compile_s']:>9.1f} {1e3 * r['step_s_median']:>8.1f} {r['samples_per_s']:>9.2f} "
              f"{r['tokens_per_s']:>9.0f} {r['model_tflops_per_step']:>10.4f} {r['achieved_tflops']:>8.3f} "
              f"{mfu:>6} {mem:>8.0f} {kernel_ms:>6.0f} {ref:>6}")
    for r in rows:
        for field in COMPARED_FIELDS:
            if f"vs_{field}" in r:
                d = r[f"vs_{field}"]
                print(f"{r['stage']:<9} {r['size']:<5} with {field}={d[field]} instead of {r[field]}: "
                      f"{1e3 * d['step_s_median']:.1f} ms/step, {d.get('compiled_total_mib', float('nan')):.0f} MiB; "
                      f"{r[field]} makes it {d['speedup_paired_median']:.3f}x ({d['speedup_paired_range'][0]:.2f}-"
                      f"{d['speedup_paired_range'][1]:.2f}; paired median, steps alternated)")
        if "xla_defaults" in r:
            d = r["xla_defaults"]
            print(f"{r['stage']:<9} {r['size']:<5} with XLA's defaults instead of {d['options'] or 'no options'}: "
                  f"{1e3 * d['step_s_median']:.1f} ms/step, {d.get('compiled_total_mib', float('nan')):.0f} MiB; "
                  f"the options make it {d['speedup_paired_median']:.2f}x (paired median, steps alternated)")
    print(f"MFU peak: {peak_note}")


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The command line (also what tests pass to :func:`bench_one`); ``--dtype auto`` resolved.
    ``parser``: another tool's parser to add these options to (``benchmarks.profile_step``)."""
    parser = parser or argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=["tokenizer", "pretrain", "finetune"],
                        choices=["tokenizer", "pretrain", "finetune"])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base"], choices=["tiny", "base", "large", "huge"])
    parser.add_argument("--batch", type=int, default=8, help="global batch (samples)")
    parser.add_argument("--channels", type=int, default=None, help="override the reference shape's channels")
    parser.add_argument("--windows", type=int, default=None, help="... and its 1-s windows (with --channels)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=15,
                        help="untimed steps first, in every round (each of the reference's rounds is a fresh "
                             "process): with the malloc tunables both sides fault their heaps in over their first "
                             "~10-20 steps, then not at all (BENCHMARKS.md, Session 32)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--remat", default="none", choices=["none", "block"],
                        help="rematerialise each transformer block in the backward pass")
    parser.add_argument("--attention", default="auto", choices=list(model_config.ATTENTION_IMPLEMENTATIONS),
                        help="attention implementation (labram_jax.models.attention)")
    parser.add_argument("--layer-norm", default="auto", choices=list(model_config.LAYER_NORM_IMPLEMENTATIONS),
                        help="LayerNorm implementation (labram_jax.models.normalization)")
    parser.add_argument("--linear", default="auto", choices=list(model_config.LINEAR_IMPLEMENTATIONS),
                        help="implementation of the blocks' linear layers (labram_jax.models.linear)")
    parser.add_argument("--mlp", default="auto", choices=list(model_config.MLP_IMPLEMENTATIONS),
                        help="how the blocks' MLPs run (config model.mlp; labram_jax.models.layers.Mlp)")
    parser.add_argument("--qkv", default="auto", choices=list(model_config.QKV_INPUTS),
                        help="how the C++ attention gets q, k and v (config model.qkv; "
                             "labram_jax.models.layers.qkv_in_kernel)")
    parser.add_argument("--optimizer", default="auto", choices=list(optim.IMPLEMENTATIONS),
                        help="what computes each AdamW step (config optim.implementation; labram_jax.optim)")
    parser.add_argument("--loss-chunks", type=int, default=None,
                        help="pretraining: pieces of the lm_head's cross-entropy (config pretrain.loss_chunks; "
                             "0 = all logits at once; default: the config's)")
    parser.add_argument("--scan-blocks", action="store_true",
                        help="nn.scan over stacked blocks (compiles one block instead of depth)")
    parser.add_argument("--mesh", nargs=3, type=int, default=[-1, 1, 1], metavar=("DATA", "FSDP", "TENSOR"))
    parser.add_argument("--vs-xla-defaults", action="store_true",
                        help="also compile each step with XLA's default options (labram_jax.compile_options) "
                             "and time the two alternately: what the options buy on this machine")
    parser.add_argument("--vs-attention", default="", choices=["", *model_config.ATTENTION_IMPLEMENTATIONS],
                        help="also compile each step with this attention implementation and time the two "
                             "alternately: the paired speed-up of --attention over it (one process: this can favour "
                             "the step needing less memory; BENCHMARKS.md, Session 19)")
    for field, choices, what in (("layer_norm", model_config.LAYER_NORM_IMPLEMENTATIONS, "LayerNorm implementation"),
                                 ("linear", model_config.LINEAR_IMPLEMENTATIONS, "linear-layer implementation"),
                                 ("mlp", model_config.MLP_IMPLEMENTATIONS, "MLP implementation"),
                                 ("qkv", model_config.QKV_INPUTS, "qkv setting"),
                                 ("optimizer", optim.IMPLEMENTATIONS, "optimizer implementation")):
        parser.add_argument("--vs-" + field.replace("_", "-"), default="", choices=["", *choices],
                            help=f"also compile each step with this {what} and time the two alternately "
                                 "(as --vs-attention)")
    parser.add_argument("--vs-loss-chunks", type=int, default=None,
                        help="pretraining: also compile the step with this pretrain.loss_chunks and time the two "
                             "alternately (as --vs-attention)")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile and report memory and FLOPs without running steps (sizes too big to run here)")
    parser.add_argument("--compilation-cache", default="", help="persistent XLA compilation cache directory")
    parser.add_argument("--devices", type=int, default=None, help="use only the first N devices (default: all)")
    parser.add_argument("--peak-tflops", default="auto", help="peak TFLOP/s of all devices together, or auto")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    parser.add_argument("--tag", default="", help="suffix of the JSON file name")
    parser.add_argument("--reference", default="",
                        help="checkout of the original LaBraM code: time its steps right after ours on this machine "
                             "(benchmarks.reference_step, held to XLA's instruction set) and report the ratio")
    parser.add_argument("--interleave", type=int, default=0, metavar="K",
                        help="with --reference: alternate K of our steps with K of the original's (a served "
                             "subprocess), --steps // K blocks each, and report the median of the blocks' ratios: "
                             "pairs seconds apart where --rounds pairs minutes apart")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --reference: time each stage's pair this many times, the order swapped every "
                             "round, and report the median ratio and its range")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.rounds > 1 and not args.reference:
        parser.error("--rounds repeats the side-by-side with the original: give --reference PATH")
    if args.interleave and (not args.reference or args.rounds > 1 or not 1 <= args.interleave <= args.steps):
        parser.error("--interleave K alternates K steps of ours with K of the original's: give --reference PATH, "
                     "no --rounds, and 1 <= K <= --steps")
    vs_fields = [getattr(args, f"vs_{f}") not in ("", None) for f in COMPARED_FIELDS]
    if sum(map(bool, [args.reference, args.vs_xla_defaults, *vs_fields])) > 1:
        flags = ", ".join("--vs-" + f.replace("_", "-") for f in COMPARED_FIELDS)
        parser.error(f"--reference, --vs-xla-defaults and {flags} each time a second step next to ours: run them "
                     "separately")
    if min(args.loss_chunks or 0, args.vs_loss_chunks or 0) < 0:
        parser.error("--loss-chunks and --vs-loss-chunks are 0 (all logits at once) or a positive number of pieces")
    if (args.channels is None) != (args.windows is None):
        parser.error("--channels and --windows go together")
    if args.dtype == "auto":
        args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    machine = machine_lib.describe()
    print(machine_lib.summary(machine), flush=True)
    peak, peak_note = peak_tflops(args.peak_tflops, args.dtype)
    if peak is not None and args.peak_tflops == "auto" and jax.default_backend() != "cpu":
        peak *= args.devices or jax.device_count()
    isa_warning = (machine_lib.isa_cap_warning(machine, peak)
                   if peak is not None and args.peak_tflops == "auto" and jax.default_backend() == "cpu" else None)
    if isa_warning:
        print(f"warning: {isa_warning}", flush=True)
    if args.reference and jax.default_backend() != "cpu":
        raise SystemExit(f"--reference times the original on this machine's CPU; this run's steps would run on "
                         f"{jax.default_backend()}: compare on a CPU run (JAX_PLATFORMS=cpu), or drop --reference")
    rows = []
    for size in args.sizes:
        for stage in args.stages:
            if stage == "tokenizer" and size in ("large", "huge"):
                continue  # one tokenizer size: see the docstring
            print(f"... {stage} {size}", flush=True)
            rows.append(bench_one(stage, size, args, peak, machine))
    reference = reference_summary(rows) if args.reference else None
    if args.reference and reference is None:
        print("--reference: no Base float32 row at the reference's shapes to compare", flush=True)
    if rows and peak is not None and peak_note.startswith("measured"):  # measured again, the better of the two
        peak, peak_note = max(peak, measured_matmul_tflops(steps.compute_dtype(args.dtype))), peak_note + ", best of 2"
    machine["fma_peak_tflops"], peak = best_peaks(rows, machine.get("fma_peak_tflops"), peak)
    print_table(rows, f"{peak:.3f} TFLOP/s ({peak_note})" if peak else peak_note)
    fma_peak = machine.get("fma_peak_tflops")
    if fma_peak and rows and all(r["mfu_vs_fma_peak"] is not None for r in rows) and args.peak_tflops == "auto":
        against = ", ".join(f"{r['stage']} {r['size']} {r['mfu_vs_fma_peak']:.1%}" for r in rows)
        print(f"MFU against the cores' float32 FMA peak ({fma_peak:.3f} TFLOP/s"
              f"{f', the matmul above reaches {peak / fma_peak:.0%} of it' if peak else ''}): {against}")
        if peak and peak > fma_peak:
            print("warning: a matmul faster than the FMA peak: something else ran on these cores while the peaks "
                  "were measured; rerun on an idle machine for MFU against it")
    if reference:
        print(f"vs ref: the original PyTorch code in this run (each stage's steps right next to ours), torch "
              f"{reference['torch']} on {reference['torch_isa']}, {reference['torch_threads']} threads")
        for r in rows:
            if len(r.get("reference_rounds", [])) > 1:
                print(f"{r['stage']:<9} {r['size']:<5} vs ref per {'block' if args.interleave else 'round'}: "
                      f"{', '.join(f'{x:.2f}x' for x in (q['ratio'] for q in r['reference_rounds']))} "
                      f"(median {r['vs_reference']:.2f}x, orders alternated)")
    device = jax.devices()[0]
    result = {"backend": jax.default_backend(), "device_kind": device.device_kind, "devices": jax.device_count(),
              "jax": jax.__version__, "python": platform.python_version(), "machine": platform.platform(),
              "cpus": os.cpu_count(), "machine_detail": machine, "peak_tflops": peak, "peak_source": peak_note,
              "reference": reference, "isa_cap_warning": isa_warning,
              "command": "python -m benchmarks.train_step " + " ".join(argv if argv is not None else os.sys.argv[1:]),
              "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"train_step_{jax.default_backend()}{'_' + args.tag if args.tag else ''}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    host_memory.reexec_with_hugepages()
    main()
