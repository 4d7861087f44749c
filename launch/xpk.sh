#!/usr/bin/env bash
# Submits labram_jax as an xpk workload on a GKE cluster of TPU slices or GPU nodes.
#
#   launch/xpk.sh [--dry-run] --cluster CLUSTER --workload NAME (--tpu-type v5p-64 | --device-type h100-80gb-8)
#                 [--num-slices N] [--num-nodes N] [--project P] [--zone Z] [--image BASE_IMAGE]
#                 -- <arguments of python -m labram_jax.main>
#
# xpk builds an image from --image plus this checkout (--script-dir), and runs the same command
# in every pod: install, source launch/env.sh, python -m labram_jax.main ARGS. The workdir and
# the shards must be on storage every pod mounts at the same path (e.g. Cloud Storage FUSE). --dry-run prints the xpk command instead of running it.
set -euo pipefail

dry_run=0 cluster="" workload="" tpu_type="" device_type="" slices=1 nodes=1 project="" zone=""
image="python:3.11-slim"
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --cluster) cluster="$2"; shift ;;
    --workload) workload="$2"; shift ;;
    --tpu-type) tpu_type="$2"; shift ;;
    --device-type) device_type="$2"; shift ;;
    --num-slices) slices="$2"; shift ;;
    --num-nodes) nodes="$2"; shift ;;
    --project) project="$2"; shift ;;
    --zone) zone="$2"; shift ;;
    --image) image="$2"; shift ;;
    --) shift; break ;;
    *) echo "xpk.sh: unknown option $1 (put the training arguments after --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$cluster" || -z "$workload" || ( -z "$tpu_type" && -z "$device_type" ) || $# -eq 0 ]]; then
  echo "usage: launch/xpk.sh [--dry-run] --cluster C --workload W (--tpu-type T | --device-type D) -- ARGS" >&2
  exit 2
fi

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
train_args=""
for arg in "$@"; do train_args+=" $(printf '%q' "$arg")"; done
if [[ -n "$tpu_type" ]]; then
  accel=(--tpu-type="$tpu_type" --num-slices="$slices")
  extra="jax[tpu]"
else
  accel=(--device-type="$device_type" --num-nodes="$nodes")
  extra="jax[cuda12]"
fi
command="pip install -q -e . '${extra}' && source launch/env.sh && python -m labram_jax.main${train_args}"
cmd=(xpk workload create --cluster="$cluster" --workload="$workload" "${accel[@]}"
     --base-docker-image="$image" --script-dir="$repo_dir" --command="bash -c $(printf '%q' "$command")")
if [[ -n "$project" ]]; then cmd+=(--project="$project"); fi
if [[ -n "$zone" ]]; then cmd+=(--zone="$zone"); fi

if ((dry_run)); then
  printf '%q ' "${cmd[@]}"; echo
else
  "${cmd[@]}"
fi
