#!/usr/bin/env bash
# Runs N cooperating JAX processes on this host (CPU collectives over gloo), the way a
# pod runs one process per host. Usage:
#   launch/local_multiprocess.sh N --config=configs/tiny.py:pretrain --workdir=DIR [--config.x=...]
#   launch/local_multiprocess.sh --dry-run N ...   (print the commands only)
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
n="${1:?usage: launch/local_multiprocess.sh [--dry-run] N --config=... --workdir=...}"; shift
port="${LABRAM_COORDINATOR_PORT:-23456}"
devices="${LABRAM_DEVICES_PER_PROCESS:-1}"
pids=()
for ((i = 0; i < n; i++)); do
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=${devices}"
       python -m labram_jax.main "$@" "--coordinator=127.0.0.1:${port}" "--num_processes=${n}" "--process_id=${i}")
  if ((dry_run)); then
    printf '%q ' "${cmd[@]}"; echo
  else
    "${cmd[@]}" > "process${i}.log" 2>&1 &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
