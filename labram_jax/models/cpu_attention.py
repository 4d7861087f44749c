"""Softmax attention as C++ kernels for x86 CPUs with AVX2 + FMA (``cpu_attention.cc``).

XLA:CPU computes softmax attention as separate operations (scores product, softmax, value
product; five products and the softmax's gradient backward) and writes the [B, H, L, L]
matrices to memory between them; on LaBraM's 20-wide heads those products run at a fraction of
the matrix units' rate. The kernels do one (batch, head) at a time with those matrices in the
core's cache: the forward pass returns the output and each row's max and sum of exponentials,
the backward pass recomputes the probabilities from them (BENCHMARKS.md, "Session 19").

The kernel is compiled on first use with the system's C++ compiler (``$CXX``, else ``c++`` or
``g++``) against jaxlib's FFI headers, into ``$LABRAM_JAX_CACHE_DIR`` (default
``~/.cache/labram_jax``) under a name that hashes the source, the flags, the compiler's path and
the jaxlib version;
later processes load that file. Where it cannot be used (not x86-64 Linux with AVX2 + FMA, no
compiler, a failed build, ``LABRAM_JAX_CPU_KERNEL=0``) :func:`unavailable_reason` says why and
attention stays in XLA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = os.path.join(os.path.dirname(__file__), "cpu_attention.cc")
TARGETS = {"LabramAttentionForward": "labram_cpu_attention_forward",
           "LabramAttentionBackward": "labram_cpu_attention_backward"}  # symbol -> FFI target
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")
MAX_HEAD = 32  # head sizes the kernel computes (LaBraM: 20 Base, 25 Tiny and Large; 50 Huge stays in XLA)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cache_dir() -> str:
    return os.environ.get("LABRAM_JAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "labram_jax")


def compiler() -> str | None:
    """The C++ compiler to build with: ``$CXX``, else ``c++`` or ``g++`` on the PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(cxx: str) -> str:
    """Compile the kernels with ``cxx`` (once per source, flags, compiler and jaxlib) and return the library's path.

    Raises RuntimeError with the compiler's message if the build fails."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
                                     cxx.encode()])).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"cpu_attention_{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    logging.info("compiling the CPU attention kernel with %s (once; cached in %s)", cxx, path)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), SOURCE, "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stderr[-1500:]}")
        os.replace(tmp, path)  # atomic: processes building at once each finish with a whole file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def unavailable_reason() -> str | None:
    """None when the kernel is built and registered in this process; else why it cannot be used."""
    if os.environ.get("LABRAM_JAX_CPU_KERNEL", "1") == "0":
        return "LABRAM_JAX_CPU_KERNEL=0"
    return _load()


@functools.cache
def _load() -> str | None:
    """Build (or find in the cache), load and register the kernel once per process; None, or why not."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the kernel is for x86-64 Linux (this is {platform.system()} {platform.machine()})"
    missing = {"avx2", "fma"} - cpu_flags()
    if missing:
        return f"this CPU lacks {', '.join(sorted(missing))}"
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler (set CXX, or install g++)"
    try:
        library = ctypes.cdll.LoadLibrary(build(cxx))
        for symbol, target in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError) as err:
        logging.warning("the CPU attention kernel is not used: %s", err)
        return f"the build or load failed: {err}"
    return None


def refusal(q: jax.Array) -> str | None:
    """Why the kernels cannot compute attention on ``q`` here, or None: they take float32 heads of at
    most :data:`MAX_HEAD` on the CPU backend with one device (a mesh of several keeps XLA's
    partitioned attention), and need :func:`unavailable_reason` to be None."""
    mesh = jax.sharding.get_abstract_mesh()
    devices = 1 if mesh.empty else mesh.size
    if q.dtype != jnp.float32 or q.shape[-1] > MAX_HEAD or jax.default_backend() != "cpu" or devices != 1:
        return (f"it computes float32 heads of at most {MAX_HEAD} on one CPU device; got {q.dtype} heads of "
                f"{q.shape[-1]} on {jax.default_backend()}, {devices} device(s) in the mesh")
    return unavailable_reason()


def supports(q: jax.Array) -> bool:
    """Whether the kernels compute attention on ``q`` here (:func:`refusal` gives the reason if not)."""
    return refusal(q) is None


def forward(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """softmax(q k^T + bias) v and its rows' statistics, by the kernel.

    Args:
      q: [..., H, L, K] float32 queries, already scaled by 1/sqrt(K); k, v: the same shape.
      bias: [..., L] float32 added to every head's scores (q's leading dims without H).
    Returns:
      out [..., H, L, K]; row_max [..., H, L], the scores' max over the keys; row_sum [..., H, L],
      ``sum(exp(scores - row_max))`` (kept apart: ``row_max + log(row_sum)`` loses ``log(row_sum)`` in
      float32 when a row has no valid key and its scores are all near -1e30).
    """
    stats = jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32)
    return _call("labram_cpu_attention_forward", (jax.ShapeDtypeStruct(q.shape, jnp.float32), stats, stats),
                 q, k, v, bias)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, out: jax.Array, d_out: jax.Array,
             row_max: jax.Array, row_sum: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gradients of :func:`forward`'s ``out`` with respect to q (the pre-scaled one), k and v.

    Args:
      q, k, v, bias: :func:`forward`'s inputs; out, row_max, row_sum: its outputs;
      d_out: [..., H, L, K] float32, the gradient with respect to ``out``.
    Returns:
      dq, dk, dv [..., H, L, K].
    """
    grad = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return _call("labram_cpu_attention_backward", (grad, grad, grad), q, k, v, bias, out, d_out, row_max, row_sum)


def _call(target: str, result_shapes, *args):
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CPU attention kernel cannot be used: {reason}. Use attention='explicit'.")
    return jax.ffi.ffi_call(target, result_shapes, vmap_method="broadcast_all")(*args)
