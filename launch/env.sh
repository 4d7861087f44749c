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
# machine). labram_jax.main sets it itself when missing; harmless elsewhere.
case ":${GLIBC_TUNABLES:-}:" in
  *glibc.malloc.hugetlb*) ;;
  *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+${GLIBC_TUNABLES}:}glibc.malloc.hugetlb=1" ;;
esac
