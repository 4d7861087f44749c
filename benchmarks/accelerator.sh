#!/usr/bin/env bash
# BENCHMARKS.md's accelerator figures in one pass, on the GPU or TPU that JAX sees: the cuDNN attention
# tests, cuDNN's attention against XLA's, the Base training steps (bfloat16, then float32) and the
# original PyTorch code's steps on the same GPU (--device cuda, with and without its float16 autocast),
# then the cost curves of each stage and the inference throughput. Each part runs under its own time
# limit, cut to what is left of SECONDS, most important first (what the last GPU session left
# unmeasured); a part that fails or runs out is reported and the next one starts.
#
# The device machines have JAX and PyTorch but not every dependency: carry grain, array-record,
# portpicker, mne, decorator, pooch, platformdirs, tensorboardX, ml-collections and defusedxml as
# wheels, install them with --target DIR, link DIR/labram_jax_configs to configs/ and put DIR and
# the checkout on PYTHONPATH (BENCHMARKS.md, "GPU", session 39).
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
# (unrolled, a Base step took 27-37 s to compile on an H200's host; scanned, 16-25 s). Measured so far:
# XLA's attention curves (session 28, H200: its [L, L] matrices took 31-62 GB at 2,048 tokens) and cuDNN's
# flash attention for fine-tuning and pretraining (session 39, H100: 4-8 GB there). Next, in order: cuDNN's
# tests on the GPU; cuDNN against XLA's attention in one process, steps alternated (whether `auto` should
# pick cuDNN on NVIDIA GPUs); the training steps next to the original (bfloat16, then float32, never
# measured); the tokenizer's curve with cuDNN; the inference; the other curves again.
steps="--sizes base --steps 20 --warmup 3 --out $out"
curves="--sizes base --grids 19x5 23x8 64x8 128x16 --batch 8 --batch-grid 23x8 --batches 1 8 64 256"
curves="$curves --scan-blocks --inference-sizes --out $out"

part versions 20 python3 -c "
import jax, flax, optax, orbax.checkpoint, grain, mne, labram_jax
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'mne', mne.__version__)
print(jax.devices())" || exit 1
part gpu_tests 60 env JAX_PLATFORMS= python3 -m pytest -q -p no:cacheprovider tests/unit/test_attention.py -k cudnn
part attention_ab 150 python3 -m benchmarks.train_step $steps --stages finetune pretrain --dtype bfloat16 \
    --scan-blocks --attention cudnn --vs-attention xla --tag cudnn_vs_xla
part train_bfloat16 150 python3 -m benchmarks.train_step $steps --dtype bfloat16 --tag bfloat16
[[ -n $ref ]] && part reference_amp 100 python3 -m benchmarks.reference_step --reference "$ref" \
    --device cuda --amp --json "$out/reference_cuda_amp.json"
part train_float32 120 python3 -m benchmarks.train_step $steps --dtype float32 --tag float32
[[ -n $ref ]] && part reference_fp32 90 python3 -m benchmarks.reference_step --reference "$ref" \
    --device cuda --json "$out/reference_cuda_fp32.json"
part curves_tokenizer_cudnn 150 python3 -m benchmarks.cost_curves --stages tokenizer $curves --attention cudnn \
    --tag tokenizer_cudnn
part inference 120 python3 -m benchmarks.cost_curves --stages --inference-sizes tiny base large \
    --out "$out" --tag inference
part curves_finetune_cudnn 150 python3 -m benchmarks.cost_curves --stages finetune $curves --attention cudnn \
    --tag finetune_cudnn
part curves_pretrain_cudnn 210 python3 -m benchmarks.cost_curves --stages pretrain $curves --attention cudnn \
    --tag pretrain_cudnn
echo "=== done in $(elapsed) s"
