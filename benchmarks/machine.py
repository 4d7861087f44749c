"""What a benchmark ran on: CPU model, vector instruction sets, the one XLA was held to, threads.

XLA:CPU's speed depends on the widest vector instructions it may use (AVX-512 against AVX2
halved some of our step rates), so every benchmark prints and stores this next to its figures.
"""

from __future__ import annotations

import os
import pathlib
import platform
import re
import time

import jax
import numpy as np

from labram_jax import preprocess
from labram_jax.models import cpu_kernels

# Widest first: the first one the CPU has is what XLA uses unless XLA_FLAGS holds it lower.
VECTOR_ISAS = ("amx_tile", "avx512f", "avx2", "avx", "sse4_2", "neon", "asimd")
ISA_NAMES = {"amx_tile": "AMX", "avx512f": "AVX-512", "avx2": "AVX2", "avx": "AVX", "sse4_2": "SSE4.2",
             "neon": "NEON", "asimd": "NEON"}
# The most float32 FLOP one x86 core can do per cycle held to an instruction set: two FMA pipes of
# its vector width (16, 8, 8 or 4 lanes), 2 FLOP per lane (AVX has no FMA: one add and one multiply pipe).
FP32_FLOP_PER_CYCLE = {"AVX512": 64, "AVX2": 32, "AVX": 16, "SSE4_2": 8}
# The most any core's boost clock exceeds the nominal one that /proc/cpuinfo gives. Xeons turbo one core to about
# twice their base (a Xeon Platinum 8592+: 1.9 -> 3.9 GHz); the Intel host of sessions 36-41 and CI ran one core's
# 64-FLOP/cycle FMAs at 0.237-0.245 TFLOP/s, 1.76-1.83x its nominal 2,100 MHz, above the 1.6 assumed until then.
BOOST = 2.1


def cpu_flags(cpuinfo: str) -> tuple[str, set[str]]:
    """(model name, instruction-set flags) from the text of /proc/cpuinfo."""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", cpuinfo, re.M)
    return (model.group(1).strip() if model else platform.processor() or platform.machine(),
            set(flags.group(1).split()) if flags else set())


def xla_isa_limit(xla_flags: str) -> str | None:
    """The ``--xla_cpu_max_isa=`` value in XLA_FLAGS (e.g. AVX2), or None (the C++ kernels keep to it too)."""
    return cpu_kernels.xla_isa_cap(xla_flags)


def describe(cpuinfo_path: str = "/proc/cpuinfo", env: dict | None = None) -> dict:
    """The machine as a dict: cpu (name, x86 family / model / stepping), widest vector ISA, the ISA XLA
    may use, threads, library limits, and whether this process's ``auto`` settings use the C++ CPU
    kernels (with the AVX-512 / AVX2 FMA rate that decides it on AVX-512 CPUs)."""
    env = os.environ if env is None else env
    path = pathlib.Path(cpuinfo_path)
    cpuinfo = path.read_text() if path.exists() else ""
    model, flags = cpu_flags(cpuinfo)
    widest = next((ISA_NAMES[f] for f in VECTOR_ISAS if f in flags), "unknown")
    limit = xla_isa_limit(env.get("XLA_FLAGS", ""))
    threads = preprocess.usable_cpus()
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    ids = [re.search(rf"^{key}\s*:\s*(\d+)", cpuinfo, re.M) for key in ("cpu family", "model", "stepping")]
    return {"cpu": model, "cpu_id": ("family {} model {} stepping {}".format(*(i.group(1) for i in ids))
                                     if all(ids) else None),
            "cpu_widest_isa": widest, "fma": "fma" in flags,
            "cpu_mhz": float(mhz.group(1)) if mhz else None,
            "xla_isa": f"{limit} (XLA_FLAGS)" if limit else f"{widest} (no limit set)", "xla_isa_cap": limit,
            "threads": threads, "torch_isa": env.get("ATEN_CPU_CAPABILITY", "default"),
            "mkl_isa": env.get("MKL_ENABLE_INSTRUCTIONS", "default"), "os": platform.platform(),
            "python": platform.python_version(), **cpu_kernels_choice()}


def cpu_kernels_choice() -> dict:
    """This process's choice (not ``describe``'s cpuinfo file's): whether ``auto`` uses the C++ CPU
    kernels (``labram_jax.models.cpu_kernels``), why not, the measured AVX-512 / AVX2 FMA rate (the
    product kernel's AVX-512 tiles run where it makes the units full width), which code they run, and
    the float32 FMA peak of all usable cores at once (TFLOP/s: what the vector units can do).
    On a GPU or TPU the steps never use them, so nothing is built or probed there."""
    backend = jax.default_backend()
    if backend != "cpu":
        return {"cpu_kernels": f"not used (the steps run on {backend})", "cpu_kernel_code": None,
                "avx512_rate_vs_avx2": None, "avx512_units": None, "fma_peak_tflops": None}
    reason = cpu_kernels.unavailable_reason()
    rate = cpu_kernels.avx512_rate_ratio()
    return {"cpu_kernels": "used by auto" if reason is None else f"not used ({reason})",
            # which of their forms runs: AVX-512 on full-width units unless XLA is held below it
            "cpu_kernel_code": None if reason else "AVX-512" if cpu_kernels.full_width_avx512() else "AVX2",
            "avx512_rate_vs_avx2": rate,
            "avx512_units": None if rate is None else "512-bit" if rate >= cpu_kernels.FULL_WIDTH_AVX512 else "256-bit",
            "fma_peak_tflops": cpu_kernels.fma_peak_tflops(preprocess.usable_cpus())}


def isa_cap_warning(machine: dict, matmul_tflops: float) -> str | None:
    """Why a run under ``--xla_cpu_max_isa`` is not what a CPU of that class would do, or None.

    XLA_FLAGS caps the code XLA generates; its matrix kernels (YNNPACK, Eigen) pick theirs from
    CPUID. A float32 matmul faster than ``threads x FP32_FLOP_PER_CYCLE[cap] x BOOST x cpu MHz``
    cannot have run on the capped instruction set: then the products ran wider than the cap."""
    cap = machine.get("xla_isa_cap")
    if cap not in FP32_FLOP_PER_CYCLE or not machine.get("cpu_mhz"):
        return None
    ceiling = machine["threads"] * FP32_FLOP_PER_CYCLE[cap] * BOOST * machine["cpu_mhz"] * 1e6 / 1e12
    if matmul_tflops <= ceiling:
        return None
    return (f"XLA was held to {cap} but its float32 matmul ran at {matmul_tflops:.3f} TFLOP/s, above the "
            f"{ceiling:.3f} that {machine['threads']} cores held to {cap} can reach at {BOOST} x "
            f"{machine['cpu_mhz']:.0f} MHz: its matrix kernels chose a wider instruction set from CPUID, so this "
            f"run is not an {cap}-machine measurement: run on a CPU without wider instructions to measure that class")


def cpu_ticks(stat_path: str = "/proc/stat") -> dict | None:
    """All CPUs' time so far in clock ticks, from the first line of /proc/stat: ``total`` and
    ``steal`` (time the hypervisor ran something else while this VM's vCPUs wanted to run); None
    where there is no such file (not Linux) or it has no steal column."""
    try:
        fields = pathlib.Path(stat_path).read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return {"total": sum(ticks), "steal": ticks[7]}


def steal_share(before: dict | None, after: dict | None) -> float | None:
    """The share of CPU time stolen by the hypervisor between two :func:`cpu_ticks` readings (0-1),
    or None where either is missing or no tick passed. A shared cloud VM's "slow phases" show here
    when a neighbour takes the physical cores; they do not when it takes memory bandwidth or cache."""
    if not before or not after or after["total"] <= before["total"]:
        return None
    return (after["steal"] - before["steal"]) / (after["total"] - before["total"])


def conditions(threads: int, mib: int = 256) -> dict:
    """How fast this machine is right now, for a shared VM whose speed drifts over minutes: the
    float32 FMA rate of ``threads`` threads (:func:`cpu_kernels.fma_rate_tflops`, best of 10 runs
    of ~10 ms; None where the kernels cannot load) and the memory bandwidth of one core copying
    ``mib`` MiB (GB/s counting bytes read and written, best of 3: larger than the caches a 2-vCPU
    slice gets), ~0.3 s in all."""
    src = np.ones(mib * 2 ** 18, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return {"fma_tflops": cpu_kernels.fma_rate_tflops(threads), "copy_gbs": 2 * src.nbytes / best / 1e9}


def summary(machine: dict) -> str:
    """One line for a benchmark's output."""
    cpu = f"{machine['cpu']} ({machine['cpu_id']})" if machine.get("cpu_id") else machine["cpu"]
    units = (f" on {machine['avx512_units']} units ({machine['avx512_rate_vs_avx2']:.2f}x AVX2's FMA rate)"
             if machine.get("avx512_units") else "")
    fma = (f", float32 FMA peak {machine['fma_peak_tflops']:.3f} TFLOP/s" if machine.get("fma_peak_tflops")
           else "")
    return (f"machine: {cpu}, {machine['threads']} threads, widest vector ISA "
            f"{machine['cpu_widest_isa']}{units}{' + FMA' if machine['fma'] else ''}{fma}; XLA uses {machine['xla_isa']}; "
            f"C++ CPU kernels {machine.get('cpu_kernels', 'not asked')}"
            + (f" ({machine['cpu_kernel_code']} code)" if machine.get("cpu_kernel_code") else ""))
