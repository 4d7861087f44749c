"""The C++ kernels for x86 CPUs with AVX2 + FMA: building, loading and calling them.

``auto`` settings use them wherever they load: they were measured faster than XLA's own code on
every class of x86 CPU tried (BENCHMARKS.md): AVX2 only (AMD Zen 3), AVX-512 on 256-bit units (AMD
Zen 4) and AVX-512 on full-width units (Intel Xeon, session 36), where the matrix products run
AVX-512 register tiles, the attention's softmax passes AVX-512 vectors (:func:`full_width_avx512`;
``cpu_vector_rate.cc`` tells the two AVX-512 classes apart) and the rest stays AVX2 code. Under
``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` they keep to AVX2 code too, as XLA does.

These operations run as XLA FFI custom calls on such CPUs, where XLA:CPU's own code was measured
slower (BENCHMARKS.md, sessions 19, 21, 23, 24 and 31): softmax attention (``cpu_attention.cc``,
wrapped by :mod:`labram_jax.models.cpu_attention`), LayerNorm (``cpu_layer_norm.cc``, wrapped
by :mod:`labram_jax.models.cpu_layer_norm`), the linear layers' matrix products with their
GELU, and the tokenizer's nearest codes (``cpu_matmul.cc``, wrapped by :mod:`labram_jax.models.cpu_matmul`),
the pretraining loss head's softmax cross-entropy (``cpu_cross_entropy.cc``, wrapped by
:mod:`labram_jax.models.cpu_cross_entropy`) and the optimizer's AdamW step (``cpu_adamw.cc``, wrapped by
:mod:`labram_jax.models.cpu_adamw`). They share their work with XLA's own intra-op thread pool
(``cpu_kernels.h``). The sources (and
the header they share) are compiled into one library on first use with the system's C++ compiler (``$CXX``, else ``c++`` or ``g++``)
against jaxlib's FFI headers, into ``$LABRAM_JAX_CACHE_DIR`` (default ``~/.cache/labram_jax``)
under a name that hashes the sources, the flags, the compiler's path and the jaxlib version; later
processes load that file. Where it cannot be used (not x86-64 Linux with AVX2 + FMA, no compiler, a
failed build, ``LABRAM_JAX_CPU_KERNEL=0``) :func:`unavailable_reason` says why and those operations
stay in XLA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib

HERE = os.path.dirname(__file__)
SOURCES = tuple(os.path.join(HERE, f) for f in ("cpu_adamw.cc", "cpu_attention.cc", "cpu_cross_entropy.cc",
                                                 "cpu_layer_norm.cc", "cpu_matmul.cc", "cpu_vector_rate.cc"))
HEADERS = (os.path.join(HERE, "cpu_kernels.h"),)  # included by the sources: part of the cache key
TARGETS = {"LabramAttentionForward": "labram_cpu_attention_forward",  # symbol -> FFI target
           "LabramAttentionBackward": "labram_cpu_attention_backward",
           "LabramQkvAttentionForward": "labram_cpu_qkv_attention_forward",
           "LabramQkvAttentionBackward": "labram_cpu_qkv_attention_backward",
           "LabramLayerNormForward": "labram_cpu_layer_norm_forward",
           "LabramLayerNormBackward": "labram_cpu_layer_norm_backward",
           "LabramMatmul": "labram_cpu_matmul",
           "LabramNearest": "labram_cpu_nearest",
           "LabramAdamW": "labram_cpu_adamw",
           "LabramSoftmaxCrossEntropy": "labram_cpu_softmax_cross_entropy"}
FLAGS = ("-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w")


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


# Where AVX-512 FMAs do at least this many times an AVX2 FMA's work per cycle, the CPU's vector
# units are 512 bits wide; below it each AVX-512 instruction is split over 256-bit units.
FULL_WIDTH_AVX512 = 1.5


# Values of XLA's ``--xla_cpu_max_isa`` that leave AVX-512 out.
BELOW_AVX512 = frozenset({"SSE4_2", "AVX", "AVX2"})


def xla_isa_cap(xla_flags: str | None = None) -> str | None:
    """XLA:CPU's instruction-set cap, the ``--xla_cpu_max_isa=`` value in ``xla_flags`` (default: the
    XLA_FLAGS environment variable), upper case (e.g. ``AVX2``), or None."""
    found = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags)
    return found.group(1).upper() if found else None


def full_width_avx512() -> bool:
    """Whether this CPU's AVX-512 units are full width (:func:`avx512_rate_ratio` at least
    :data:`FULL_WIDTH_AVX512`): where the product kernel's AVX-512 tiles (``cpu_matmul.cc``, ``wide``)
    do twice the FMA work of its AVX2 ones, and the attention kernels' products and softmax passes run
    AVX-512 forms. (On 256-bit units they were no faster: session 35.) False where XLA is held below
    AVX-512 (``XLA_FLAGS=--xla_cpu_max_isa=AVX2``): the kernels keep to XLA's cap, so a run held to AVX2
    runs their AVX2 code, as on a CPU without AVX-512."""
    if "avx512f" not in cpu_flags() or xla_isa_cap() in BELOW_AVX512:
        return False
    ratio = avx512_rate_ratio()
    return ratio is not None and ratio >= FULL_WIDTH_AVX512


@functools.cache
def avx512_rate_ratio() -> float | None:
    """float32 FMA throughput of AVX-512 over AVX2 on one core of this CPU, measured once per process
    (``cpu_vector_rate.cc``, the median of 15 paired runs, ~15 ms): ~2 on full-width AVX-512 units, ~1
    where each AVX-512 instruction is split over 256-bit units. None without AVX-512 or where the kernels
    cannot load."""
    if "avx512f" not in cpu_flags() or unavailable_reason() is not None:
        return None
    measure = _load()[0].LabramAvx512RateRatio
    measure.restype, measure.argtypes = ctypes.c_double, (ctypes.c_long, ctypes.c_int)
    ratio = measure(200_000, 15)
    logging.info("AVX-512 does %.2fx the float32 FMA work of AVX2 per cycle here", ratio)
    return ratio


@functools.cache
def fma_peak_tflops(threads: int) -> float | None:
    """:func:`fma_rate_tflops`, measured once per process (the figure a benchmark states)."""
    return fma_rate_tflops(threads)


def fma_rate_tflops(threads: int) -> float | None:
    """float32 TFLOP/s of ``threads`` threads multiplying-and-adding at once, each on independent
    accumulators at the CPU's widest vector width (``cpu_vector_rate.cc``, ~0.1 s): what the vector
    units can do, the ceiling of any matrix product (a matmul's measured rate also pays for packing
    and cache misses). Another process busy on the cores meanwhile lowers it. None where the
    library cannot load (``LABRAM_JAX_CPU_KERNEL=0`` does not stop this measurement)."""
    library = _load()[0]
    if library is None:
        return None
    measure = library.LabramFmaFlops
    measure.restype, measure.argtypes = ctypes.c_double, (ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_int)
    return measure(5_000_000, threads, 10, int("avx512f" in cpu_flags())) / 1e12  # best of 10 runs of ~10 ms


def cache_dir() -> str:
    return os.environ.get("LABRAM_JAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "labram_jax")


def compiler() -> str | None:
    """The C++ compiler to build with: ``$CXX``, else ``c++`` or ``g++`` on the PATH."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(cxx: str) -> str:
    """Compile the kernels with ``cxx`` (once per sources, flags, compiler and jaxlib) and return the library's path.

    Raises RuntimeError with the compiler's message if the build fails."""
    parts = []
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            parts.append(f.read())
    key = hashlib.sha256(b"\0".join([*parts, " ".join(FLAGS).encode(), jaxlib.__version__.encode(),
                                     cxx.encode()])).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"cpu_kernels_{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    logging.info("compiling the CPU kernels with %s (once; cached in %s)", cxx, path)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    try:
        # Compile the very bytes the key was made of (copies): a source edited while another process
        # builds must not land in the cache under the old source's key.
        with tempfile.TemporaryDirectory(dir=cache_dir()) as src:
            for file, text in zip(SOURCES + HEADERS, parts):
                with open(os.path.join(src, os.path.basename(file)), "wb") as f:
                    f.write(text)
            copies = [os.path.join(src, os.path.basename(file)) for file in SOURCES]
            cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), "-I", src, *copies, "-o", tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{done.stderr[-1500:]}")
        os.replace(tmp, path)  # atomic: processes building at once each finish with a whole file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def unavailable_reason() -> str | None:
    """None when the kernels are built and registered in this process; else why they cannot be used."""
    if os.environ.get("LABRAM_JAX_CPU_KERNEL", "1") == "0":
        return "LABRAM_JAX_CPU_KERNEL=0"
    return _load()[1]


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """Build (or find in the cache), load and register the kernels once per process: (the library,
    None), or (None, why not)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"the kernels are for x86-64 Linux (this is {platform.system()} {platform.machine()})"
    missing = {"avx2", "fma"} - cpu_flags()
    if missing:
        return None, f"this CPU lacks {', '.join(sorted(missing))}"
    cxx = compiler()
    if cxx is None:
        return None, "no C++ compiler (set CXX, or install g++)"
    try:
        library = ctypes.cdll.LoadLibrary(build(cxx))
        for symbol, target in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError) as err:
        logging.warning("the CPU kernels are not used: %s", err)
        return None, f"the build or load failed: {err}"
    return library, None


def refusal(x: jax.Array) -> str | None:
    """Why the kernels cannot compute on ``x`` here, or None: they take float32 arrays on the CPU
    backend with one device (a mesh of several keeps XLA's partitioned operations), and need
    :func:`unavailable_reason` to be None."""
    mesh = jax.sharding.get_abstract_mesh()
    devices = 1 if mesh.empty else mesh.size
    if x.dtype != jnp.float32 or jax.default_backend() != "cpu" or devices != 1:
        return (f"they compute float32 on one CPU device; got {x.dtype} on {jax.default_backend()}, "
                f"{devices} device(s) in the mesh")
    return unavailable_reason()


def call(target: str, result_shapes, *args, what: str, instead: str, vmap_method: str = "broadcast_all",
         aliases: dict[int, int] | None = None, **attrs):
    """``jax.ffi.ffi_call`` of one of :data:`TARGETS`' targets (``aliases``: argument index -> result
    index computed in place); a RuntimeError naming ``what`` and the setting to use ``instead`` where
    the kernels cannot be used."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CPU {what} kernel cannot be used: {reason}. Use {instead}.")
    return jax.ffi.ffi_call(target, result_shapes, vmap_method=vmap_method,
                            input_output_aliases=aliases)(*args, **attrs)
