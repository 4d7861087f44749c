"""Huge pages for XLA:CPU's per-step buffers (glibc's ``glibc.malloc.hugetlb`` tunable).

XLA:CPU allocates each executable's temporary buffer (about 1 GiB for a Base training step
at batch 8) with malloc at every call; glibc serves it with a fresh mmap, so every step
page-faults and zeroes the whole buffer 4 KiB at a time: measured on a 2-core machine,
~260,000 faults and 0.6 s of kernel time per fine-tuning step of 1.0 s. With
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` glibc asks for transparent huge pages on those
mappings: under 2,000 faults per step, and the step takes 0.57 s (BENCHMARKS.md).

Huge pages still leave glibc mapping the buffer afresh and unmapping it at every step: XLA runs
the step on a thread with its own malloc arena, whose heaps cannot hold a request over 64 MiB, so
glibc falls back to a private mmap whatever ``mmap_max`` says, and every step faults in and zeroes
the buffer again (~800 huge-page faults and 0.1-0.45 s of kernel time per 1.5-s pretraining step;
BENCHMARKS.md, "Session 21"). Where no accelerator is attached, three more tunables keep it: one
arena (``arena_max=1``) that serves large requests from its heap (``mmap_max=0``) and does not
give the heap back (``trim_threshold`` 64 GiB): no faults after the first steps, the process's
resident memory stays at its peak. Tunables the user already set are left as they are.

The tunables are read when a process starts, so :func:`reexec_with_hugepages` restarts the
current command (same pid, arguments and environment plus the tunables) when they are not set.
Set ``LABRAM_JAX_NO_REEXEC=1`` to opt out.
"""

from __future__ import annotations

import glob
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
KEEP_BUFFERS = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={1 << 36}")
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
ACCELERATOR_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")  # TPU (v4-, v5+), NVIDIA GPU


def hugepages_available() -> bool:
    """Linux with glibc >= 2.35 and transparent huge pages in ``madvise`` or ``always`` mode."""
    if sys.platform != "linux":
        return False
    libc, version = platform.libc_ver()
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    if libc != "glibc" or (major, minor) < (2, 35):
        return False
    try:
        with open(THP_MODE_FILE) as f:
            mode = f.read()
    except OSError:
        return False
    return "[never]" not in mode


def tunable_set(environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", "")


def accelerator_present() -> bool:
    """Whether a TPU or NVIDIA GPU device file exists (the steps then do not run on XLA:CPU)."""
    return any(glob.glob(pattern) for pattern in ACCELERATOR_FILES)


def environment_with_hugepages(environ=None, keep_buffers: bool | None = None) -> dict[str, str]:
    """A copy of the environment with :data:`TUNABLE` and, with ``keep_buffers`` (default: no
    accelerator present), :data:`KEEP_BUFFERS` appended to GLIBC_TUNABLES; a tunable whose name
    is already there keeps the value it has."""
    env = dict(os.environ if environ is None else environ)
    keep_buffers = not accelerator_present() if keep_buffers is None else keep_buffers
    current = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    names = {t.split("=", 1)[0] for t in current}
    added = [t for t in (TUNABLE, *(KEEP_BUFFERS if keep_buffers else ())) if t.split("=", 1)[0] not in names]
    env["GLIBC_TUNABLES"] = ":".join(current + added)
    return env


def reexec_with_hugepages() -> None:
    """Replaces this process with the same command line (``sys.orig_argv``: interpreter
    options, ``-m module`` and arguments) run with the tunable, when useful, not already set
    and not opted out. Returns only if nothing was done. Call it first thing in ``__main__``,
    before threads or devices exist."""
    if os.environ.get("LABRAM_JAX_NO_REEXEC") or tunable_set() or not hugepages_available():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], environment_with_hugepages())
