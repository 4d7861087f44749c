#!/usr/bin/env bash
# Runs labram_jax on every worker of a Cloud TPU VM slice (creating the slice if needed).
#
#   launch/tpu_vm.sh [--dry-run] --name NAME --zone ZONE --type ACCELERATOR [--version RUNTIME]
#                    [--project PROJECT] [--spot] -- <arguments of python -m labram_jax.main>
#
# Example (LaBraM-Huge pretraining on a v5p-64 slice; /mnt/labram is the same shared mount on every
# worker, see launch/README.md):
#   launch/tpu_vm.sh --name labram-v5p --zone us-east5-a --type v5p-64 -- \
#     --config=configs/huge.py:pretrain --workdir=/mnt/labram/runs/huge_pretrain \
#     --config.data.train='/mnt/labram/shards/*/manifest.json' \
#     --config.pretrain.tokenizer_checkpoint=/mnt/labram/runs/tokenizer
#
# Steps: (1) describe the TPU VM, create it when absent; (2) copy this checkout (git archive of
# HEAD) to every worker; (3) install it with jax[tpu] on every worker; (4) run the same command
# on all workers at once (one JAX process per host; jax.distributed.initialize() finds the pod).
# --dry-run prints every command instead of running it.
set -euo pipefail

dry_run=0 name="" zone="" type="" version="" project="" spot=0
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --name) name="$2"; shift ;;
    --zone) zone="$2"; shift ;;
    --type) type="$2"; shift ;;
    --version) version="$2"; shift ;;
    --project) project="$2"; shift ;;
    --spot) spot=1 ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown option $1 (put the training arguments after --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$name" || -z "$zone" || -z "$type" ]]; then
  echo "usage: launch/tpu_vm.sh [--dry-run] --name NAME --zone ZONE --type ACCELERATOR [--version V] [--project P] [--spot] -- ARGS" >&2
  exit 2
fi
if (($# == 0)); then
  echo "tpu_vm.sh: give the training arguments after --, e.g. -- --config=configs/huge.py:pretrain --workdir=/mnt/shared/run" >&2
  exit 2
fi
if [[ -z "$version" ]]; then
  case "$type" in
    v5p-*) version="v2-alpha-tpuv5" ;;
    v5litepod-*) version="v2-alpha-tpuv5-lite" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) version="tpu-ubuntu2204-base" ;;
  esac
fi

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
archive="/tmp/labram_jax_${name}.tar.gz"
common=(--zone="$zone")
if [[ -n "$project" ]]; then common+=(--project="$project"); fi
create=(gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type="$type" --version="$version")
if ((spot)); then create+=(--spot); fi

# The training command, quoted for the remote shell.
train_args=""
for arg in "$@"; do train_args+=" $(printf '%q' "$arg")"; done
remote_install="mkdir -p ~/labram_jax && tar -xzf ~/labram_jax.tar.gz -C ~/labram_jax && \
python3 -m pip install -q -e ~/labram_jax 'jax[tpu]'"
remote_run="cd ~/labram_jax && source launch/env.sh && python3 -m labram_jax.main${train_args}"

run() {
  if ((dry_run)); then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

if ((dry_run)); then
  echo "# create the slice unless 'gcloud compute tpus tpu-vm describe $name' finds it:"
  run "${create[@]}"
elif ! gcloud compute tpus tpu-vm describe "$name" "${common[@]}" > /dev/null 2>&1; then
  run "${create[@]}"
fi
run git -C "$repo_dir" archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$name:~/labram_jax.tar.gz" "${common[@]}" --worker=all
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$remote_install"
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$remote_run"
