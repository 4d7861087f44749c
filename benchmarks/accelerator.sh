#!/usr/bin/env bash
# BENCHMARKS.md's accelerator figures in one pass, on the GPU or TPU that JAX sees: the cost
# curves of each stage and the inference throughput, then the Base training steps (bfloat16, then
# float32) and the original PyTorch code's steps on the same GPU (--device cuda, with and without
# its float16 autocast). Each part runs under its own time limit, cut to what is left of SECONDS,
# most important first; a part that fails or runs out is reported and the next one starts.
#
#   bash benchmarks/accelerator.sh OUT [REFERENCE_CHECKOUT] [SECONDS=540] [ARCHIVE]
#
# OUT receives every part's JSON, PNG and log; ARCHIVE (a .tgz path), if given, is rewritten after
# each part, so a run stopped from outside still returns what was done. Without a reference
# checkout (https://github.com/935963004/LaBraM) the PyTorch parts are skipped.
set -u
usage="usage: bash benchmarks/accelerator.sh OUT [REFERENCE_CHECKOUT] [SECONDS] [ARCHIVE]"
out=${1:?$usage}
ref=${2:-}
budget=${3:-540}
archive=${4:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start_us=${EPOCHREALTIME/./}

elapsed() {  # whole seconds since the start, rounded up: a part that took any time leaves less than before it
    local now_us=${EPOCHREALTIME/./}
    echo $(((now_us - start_us + 999999) / 1000000))
}

part() {  # part NAME LIMIT_S COMMAND...: COMMAND under min(LIMIT_S, seconds left), logged to OUT/NAME.log;
    # skipped when fewer than min(30, LIMIT_S) seconds are left
    local name=$1 limit=$2 least=30 left rc
    shift 2
    ((limit < least)) && least=$limit
    left=$((budget - $(elapsed)))
    ((left < limit)) && limit=$left
    if ((limit < least)); then
        echo "=== $name: skipped, ${left} s left"
        return 1
    fi
    echo "=== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "=== $name: exit $rc, $(elapsed) s into the run"
    grep -v -E '^\s*$|Warning|warn\(' "$out/$name.log" | tail -n 14
    [[ -n $archive ]] && tar czf "$archive" -C "$out" .
    return $rc
}

# Each point of a curve is its own compiled step: --scan-blocks compiles one block instead of twelve
# (unrolled, a Base step took 27-37 s to compile on an H200's host; scanned, 16-25 s). Session 28
# measured fine-tuning and pretraining with XLA's attention (its [L, L] matrices took 31-62 GB at
# 2,048 tokens); these curves take cuDNN's flash attention first, then the tokenizer's with `auto`.
curves="--sizes base --grids 19x5 23x8 64x8 128x16 --batch 8 --batch-grid 23x8 --batches 1 8 64 256"
curves="$curves --scan-blocks --inference-sizes --out $out"

part versions 20 python3 -c "
import jax, flax, optax, orbax.checkpoint, grain, mne, labram_jax
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'mne', mne.__version__)
print(jax.devices())" || exit 1
part curves_finetune_cudnn 150 python3 -m benchmarks.cost_curves --stages finetune $curves --attention cudnn \
    --tag finetune_cudnn
part curves_pretrain_cudnn 150 python3 -m benchmarks.cost_curves --stages pretrain $curves --attention cudnn \
    --tag pretrain_cudnn
part curves_tokenizer 120 python3 -m benchmarks.cost_curves --stages tokenizer $curves --tag tokenizer
part inference 120 python3 -m benchmarks.cost_curves --stages --inference-sizes tiny base large \
    --out "$out" --tag inference
part train_bfloat16 150 python3 -m benchmarks.train_step --sizes base --steps 20 --warmup 3 \
    --dtype bfloat16 --out "$out" --tag bfloat16
[[ -n $ref ]] && part reference_amp 100 python3 -m benchmarks.reference_step --reference "$ref" \
    --device cuda --amp --json "$out/reference_cuda_amp.json"
part train_float32 120 python3 -m benchmarks.train_step --sizes base --steps 20 --warmup 3 \
    --dtype float32 --out "$out" --tag float32
[[ -n $ref ]] && part reference_fp32 90 python3 -m benchmarks.reference_step --reference "$ref" \
    --device cuda --json "$out/reference_cuda_fp32.json"
echo "=== done in $(elapsed) s"
