"""Shared configuration: the LaBraM recipes of LABRAM.md section 6 as data.

Every size file calls ``get_config(size, stage)``; the stage is chosen on the command
line with ``--config=configs/<size>.py:<stage>`` (tokenizer, pretrain, finetune) and
fields are overridden with ``--config.optim.lr=...``. The returned ConfigDict is
locked: a misspelled field is an error, not a silent default.
"""

import ml_collections

STAGES = ("tokenizer", "pretrain", "finetune")

# LABRAM.md section 6, per stage.
RECIPES = {
    "tokenizer": dict(batch_size=1024, lr=4e-4, min_lr=1e-5, epochs=100, warmup_epochs=10,
                      b1=0.9, b2=0.99, weight_decay=1e-4, grad_clip=0.0),
    "pretrain": dict(batch_size=512, lr=5e-4, min_lr=1e-5, epochs=50, warmup_epochs=5,
                     b1=0.9, b2=0.98, weight_decay=0.05, grad_clip=3.0),
    "finetune": dict(batch_size=512, lr=5e-4, min_lr=1e-6, epochs=50, warmup_epochs=5,
                     b1=0.9, b2=0.999, weight_decay=0.05, grad_clip=0.0),
}
# Fine-tuning differs by size (LABRAM.md section 6).
FINETUNE_BY_SIZE = {
    "tiny": dict(layer_decay=0.65, drop_path=0.1, epochs=50, warmup_epochs=5),
    "base": dict(layer_decay=0.65, drop_path=0.1, epochs=50, warmup_epochs=5),
    "large": dict(layer_decay=0.8, drop_path=0.1, epochs=30, warmup_epochs=3),
    "huge": dict(layer_decay=0.8, drop_path=0.2, epochs=30, warmup_epochs=3),
}


def parse_arg(arg: str | None, default_stage: str = "pretrain") -> str:
    stage = arg or default_stage
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} after ':' in --config; choose one of {STAGES}")
    return stage


def get_config(size: str, stage: str) -> ml_collections.ConfigDict:
    """The full configuration of one stage for one model size."""
    recipe = dict(RECIPES[stage])
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.size = size  # tiny, base, large, huge (labram_jax.models.config presets)
    c.model.tokenizer_size = "tiny" if size == "tiny" else "base"
    c.model.dtype = "auto"  # auto: bfloat16 on accelerators, float32 on CPU
    c.model.remat = "none"  # none, or block: recompute block activations in the backward pass (saves memory)
    c.model.scan_blocks = False  # True: nn.scan over stacked blocks (one block compiled; Huge compiles faster)
    c.model.input_norm = "none"  # none (the paper), or channel: standardise each channel of each sample
    c.model.temporal_groups = 4  # GroupNorm groups of the temporal encoder (4: the paper; 1 keeps band power ratios)
    c.model.patch_embed = "temporal"  # temporal (the paper's encoder) or spectrum (log 1-45 Hz amplitudes, Linear)
    c.model.attention = "auto"  # auto (explicit on CPU, xla elsewhere), xla, cudnn (GPU, bf16) or explicit
    c.model.drop_path = 0.0
    c.model.num_outputs = 1  # 1: binary or regression; K: K classes
    c.model.vocab_size = 8192 if size != "tiny" else 256  # tokenizer codebook size
    c.model.cls_quirk = False  # True: the reference's pretraining cls embedding (official weights)

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # manifest.json or shard glob of the training records
    c.data.val = ""
    c.data.max_channels = 23 if stage == "finetune" else 64  # static batch grid: channels
    c.data.max_windows = 10 if stage == "finetune" else 4  # ... and windows (<= 16)
    c.data.batch_size = recipe["batch_size"]
    c.data.num_workers = 0

    c.optim = ml_collections.ConfigDict()
    for key in ("lr", "min_lr", "epochs", "warmup_epochs", "b1", "b2", "weight_decay", "grad_clip"):
        setattr(c.optim, key, recipe[key])
    c.optim.layer_decay = 1.0
    c.optim.total_steps = 0  # 0: epochs x steps per epoch
    c.optim.warmup_steps = -1  # -1: warmup_epochs x steps per epoch

    if stage == "tokenizer":
        c.tokenizer = ml_collections.ConfigDict(dict(
            ema_decay=0.99, kmeans_iters=10, code_dim=64,
            commitment_weight=1.0,
            dead_code_threshold=0.0,  # > 0: restart codes whose usage EMA falls below it (not in the reference)
            log_amplitude=False))  # True: log(|X| + 0.01) amplitude target (not in the reference)
    if stage == "pretrain":
        c.pretrain = ml_collections.ConfigDict(dict(mask_ratio=0.5, tokenizer_checkpoint=""))
    if stage == "finetune":
        by_size = FINETUNE_BY_SIZE[size]
        c.optim.layer_decay = by_size["layer_decay"]
        c.optim.epochs = by_size["epochs"]
        c.optim.warmup_epochs = by_size["warmup_epochs"]
        c.model.drop_path = by_size["drop_path"]
        c.finetune = ml_collections.ConfigDict(dict(
            task="binary",  # binary, multiclass or regression
            label_smoothing=0.1,  # multi-class only
            mixup_alpha=0.0,  # > 0: mix samples of the same channel grid, lam ~ Beta(alpha, alpha)
            channel_gain_std=0.0,  # > 0: scale each channel of each training sample by exp(std x N(0, 1))
            channel_drop=0.0,  # > 0: drop each channel of each training sample with this probability
            class_weight="none",  # none, balanced (1 / (K x label frequency) from the manifest) or "w0,w1,..."
            init_checkpoint="",  # pretrain workdir / model.npz, or an official .pth with init_kind=official
            init_kind="ours",
            mode="full",  # full, linear_probe, last_k or lora
            last_k=2,
            lora_rank=8,  # mode=lora: adapters of this rank on qkv, proj, fc1, fc2 of every block
            lora_alpha=16.0,  # ... scaled by lora_alpha / lora_rank
            best_metric="balanced_accuracy"))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 1000
    c.checkpoint_keep = 3
    c.compilation_cache_dir = ""  # persistent XLA compilation cache (speeds up restarts); "" = off
    c.nonfinite_policy = "skip"  # NaN/inf loss or gradient: "skip" the update (and count it) or "stop"
    c.max_skipped_steps = 20  # with "skip": stop once this many updates were skipped in the run
    c.stop_after = 0  # stop (with a checkpoint) after this many steps of this invocation; 0 = run to the end
    c.lock()
    return c
