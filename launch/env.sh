#!/usr/bin/env bash
# XLA / runtime settings for labram_jax runs, in one place. Source it before launching:
#   source launch/env.sh && python -m labram_jax.main --config=configs/base.py:pretrain --workdir=...
# Each setting can be overridden by exporting it beforehand.

# Keep host RAM free for the input pipeline: let XLA grow GPU memory up to 90%.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
# GPU: latency-hiding scheduler overlaps FSDP all-gathers with compute.
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"
# TPU: the same overlap for collectives.
export LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:---xla_enable_async_all_gather=true --xla_enable_async_reduce_scatter=true}"
# Persistent compilation cache: restarts after preemption skip recompiling.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/labram_jax/xla}"
# CPU runs: transparent huge pages for XLA:CPU's per-step buffers (BENCHMARKS.md: 1.4-1.7x on a 2-core
# machine) and, where no TPU or GPU is attached, glibc keeping those buffers mapped between steps
# (session 21). labram_jax/host_memory.py decides (tunables already set keep their values);
# labram_jax.main does the same itself when they are missing. Harmless elsewhere.
if _tunables="$(python3 -c 'from labram_jax import host_memory
print(host_memory.environment_with_hugepages()["GLIBC_TUNABLES"])' 2>/dev/null)"; then
  export GLIBC_TUNABLES="${_tunables}"
else  # labram_jax not installed yet: huge pages alone
  case ":${GLIBC_TUNABLES:-}:" in
    *glibc.malloc.hugetlb*) ;;
    *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+${GLIBC_TUNABLES}:}glibc.malloc.hugetlb=1" ;;
  esac
fi
unset _tunables
