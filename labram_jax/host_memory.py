"""Huge pages for XLA:CPU's per-step buffers (glibc's ``glibc.malloc.hugetlb`` tunable).

XLA:CPU allocates each executable's temporary buffer (about 1 GiB for a Base training step
at batch 8) with malloc at every call; glibc serves it with a fresh mmap, so every step
page-faults and zeroes the whole buffer 4 KiB at a time: measured on a 2-core machine,
~260,000 faults and 0.6 s of kernel time per fine-tuning step of 1.0 s. With
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` glibc asks for transparent huge pages on those
mappings: under 2,000 faults per step, and the step takes 0.57 s (BENCHMARKS.md).

The tunable is read when a process starts, so :func:`reexec_with_hugepages` restarts the
current command (same pid, arguments and environment plus the tunable) when it is not set.
Set ``LABRAM_JAX_NO_REEXEC=1`` to opt out.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def environment_with_hugepages(environ=None) -> dict[str, str]:
    """A copy of the environment with the tunable appended to GLIBC_TUNABLES."""
    env = dict(os.environ if environ is None else environ)
    current = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
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
