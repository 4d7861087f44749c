"""Checks a training config before anything is compiled, and lists every problem at once.

``validate(config, device_count)`` compares the config with the defaults of its stage
(``configs/common.py``): unknown fields and wrong types, then values: model size and
dtype, batch grid against the time-embedding table, mesh against the devices,
batch against data parallelism, schedule, stage-specific fields and the files they
name. Each problem is one line saying what to change.
"""

from __future__ import annotations

import difflib
import os

import ml_collections

from configs import common
from labram_jax import input_pipeline
from labram_jax.models import config as model_config
from labram_jax.tasks import finetune

NONFINITE_POLICIES = ("skip", "stop")
BEST_METRICS = {"binary": ("balanced_accuracy", "auroc", "auc_pr", "accuracy"),
                "multiclass": ("balanced_accuracy", "cohen_kappa", "weighted_f1", "accuracy"),
                "regression": ("pearson_r",)}  # the best checkpoint maximises its metric


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem found."""


def validate(config: ml_collections.ConfigDict, device_count: int) -> None:
    """Raises ConfigError listing every problem of ``config`` for ``device_count`` devices."""
    problems: list[str] = []
    stage = config.get("stage")
    if stage not in common.STAGES:
        raise ConfigError(f"config.stage={stage!r}: choose one of {common.STAGES}")
    size = config.get("model", {}).get("size")
    if size not in model_config.LABRAM_PRESETS:
        raise ConfigError(f"config.model.size={size!r}: choose one of {sorted(model_config.LABRAM_PRESETS)}")
    _compare(config, common.get_config(size, stage), "config", problems)
    if problems:  # values cannot be checked on a config of the wrong shape
        raise ConfigError(_join(problems))
    _check_values(config, device_count, problems)
    if problems:
        raise ConfigError(_join(problems))


def _join(problems: list[str]) -> str:
    head = "invalid config (" + (f"{len(problems)} problems" if len(problems) > 1 else "1 problem") + "):"
    return "\n  - ".join([head] + problems)


def _compare(config, reference, path: str, problems: list[str]) -> None:
    for key in config.keys():
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=1)
            problems.append(f"unknown field {path}.{key}" + (f" (did you mean {path}.{close[0]}?)" if close else ""))
            continue
        value, expected = config[key], reference[key]
        if isinstance(expected, ml_collections.ConfigDict):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                problems.append(f"{path}.{key} must be a group of fields, got {type(value).__name__}")
            else:
                _compare(value, expected, f"{path}.{key}", problems)
        elif not _same_type(value, expected):
            problems.append(f"{path}.{key} must be {type(expected).__name__}, got {type(value).__name__} {value!r}")
    for key in reference.keys():
        if key not in config:
            problems.append(f"missing field {path}.{key}")


def _same_type(value, expected) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(expected, bool)
    if isinstance(expected, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(expected))


def _check_values(c, device_count: int, problems: list[str]) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(c.model.dtype in ("auto", "float32", "bfloat16"), f"config.model.dtype={c.model.dtype!r}: use auto, "
         "float32 or bfloat16")
    need(c.model.remat in model_config.REMAT_POLICIES, f"config.model.remat={c.model.remat!r}: choose one of "
         f"{model_config.REMAT_POLICIES}")
    need(c.model.attention in model_config.ATTENTION_IMPLEMENTATIONS, f"config.model.attention={c.model.attention!r}: "
         f"choose one of {model_config.ATTENTION_IMPLEMENTATIONS}")
    need(0.0 <= c.model.drop_path < 1.0, f"config.model.drop_path={c.model.drop_path} must be in [0, 1)")
    filters = model_config.LABRAM_PRESETS[c.model.size].temporal_channels
    groups = c.model.get("temporal_groups", 4)
    need(groups >= 1 and filters % groups == 0, f"config.model.temporal_groups={groups} must divide the "
         f"{filters} temporal-encoder filters of size {c.model.size} (4, the paper, or 1)")
    need(c.model.get("patch_embed", "temporal") in model_config.PATCH_EMBEDS, f"config.model.patch_embed="
         f"{c.model.get('patch_embed')!r}: choose one of {model_config.PATCH_EMBEDS}")
    need(c.model.vocab_size > 0, "config.model.vocab_size must be positive")
    # data and the batch grid
    need(bool(c.data.train), "config.data.train is empty: pass --config.data.train=<manifest.json or shard glob>")
    for field in ("train", "val"):
        for part in [p.partition("@")[0] for p in c.data[field].split("+") if p]:
            if part.endswith(".json"):
                need(bool(input_pipeline.expand(part)),
                     f"config.data.{field}: manifest {part} not found (run python -m data_prep)")
    need(1 <= c.data.max_windows <= model_config.NUM_TIME_ROWS,
         f"config.data.max_windows={c.data.max_windows}: a sample holds 1..{model_config.NUM_TIME_ROWS} one-second "
         "windows (the time-embedding table has 16 rows); re-run data_prep with --window <= 16")
    need(1 <= c.data.max_channels <= 128, f"config.data.max_channels={c.data.max_channels}: must be in 1..128 (the "
         "channel vocabulary)")
    need(c.data.batch_size > 0, f"config.data.batch_size={c.data.batch_size} must be positive")
    need(c.data.num_workers >= 0, "config.data.num_workers must be >= 0")
    # mesh and batch
    shape = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        problems.append(f"config.mesh {shape}: each axis is a positive size, one may be -1 (the rest of the devices)")
    else:
        fixed = 1
        for s in shape:
            fixed *= s if s > 0 else 1
        if -1 in shape:
            need(device_count % fixed == 0, f"config.mesh {shape}: {device_count} devices are not divisible by {fixed}")
            shape = [s if s > 0 else device_count // fixed for s in shape]
        else:
            need(fixed == device_count, f"config.mesh data x fsdp x tensor = {fixed} but there are {device_count} "
                 "devices: make the product equal the device count (or set one axis to -1)")
        ways = shape[0] * shape[1]
        need(ways > 0 and c.data.batch_size % ways == 0, f"config.data.batch_size={c.data.batch_size} is not "
             f"divisible by data x fsdp = {ways}: make it a multiple")
    # schedule
    need(c.optim.lr > 0, f"config.optim.lr={c.optim.lr} must be positive")
    need(0 <= c.optim.min_lr <= c.optim.lr, f"config.optim.min_lr={c.optim.min_lr} must be in [0, lr]")
    need(0 <= c.optim.b1 < 1 and 0 <= c.optim.b2 < 1, "config.optim.b1 and b2 must be in [0, 1)")
    need(c.optim.weight_decay >= 0 and c.optim.grad_clip >= 0, "config.optim.weight_decay and grad_clip must be >= 0")
    need(0 < c.optim.layer_decay <= 1, f"config.optim.layer_decay={c.optim.layer_decay} must be in (0, 1]")
    need(c.optim.total_steps > 0 or c.optim.epochs > 0, "set config.optim.total_steps or config.optim.epochs > 0")
    for field in ("log_every", "eval_every", "checkpoint_every", "checkpoint_keep"):
        need(c[field] > 0, f"config.{field}={c[field]} must be positive")
    need(c.nonfinite_policy in NONFINITE_POLICIES, f"config.nonfinite_policy={c.nonfinite_policy!r}: choose one of "
         f"{NONFINITE_POLICIES}")
    need(c.max_skipped_steps >= 0, "config.max_skipped_steps must be >= 0")
    # stages
    if c.stage == "tokenizer":
        need(0 < c.tokenizer.ema_decay < 1, "config.tokenizer.ema_decay must be in (0, 1)")
    if c.stage == "pretrain":
        need(0 < c.pretrain.mask_ratio < 1, f"config.pretrain.mask_ratio={c.pretrain.mask_ratio} must be in (0, 1)")
        path = c.pretrain.tokenizer_checkpoint
        need(bool(path), "pretraining needs config.pretrain.tokenizer_checkpoint: the workdir (or model.npz) of a "
             "tokenizer run; train one with --config=configs/<size>.py:tokenizer")
        if path:
            need(os.path.exists(os.path.join(path, "model.npz") if os.path.isdir(path) else path),
                 f"config.pretrain.tokenizer_checkpoint={path}: no model.npz there (the tokenizer run must finish; "
                 "it writes model.npz at its end)")
    if c.stage == "finetune":
        ft = c.finetune
        need(ft.task in finetune.TASKS, f"config.finetune.task={ft.task!r}: choose one of {finetune.TASKS}")
        if ft.task == "multiclass":
            need(c.model.num_outputs >= 2, f"config.model.num_outputs={c.model.num_outputs}: a multiclass task "
                 "needs the number of classes (>= 2)")
        if ft.class_weight not in ("", "none"):
            need(ft.task != "regression", "config.finetune.class_weight applies to classification; set it to none")
        need(ft.get("mixup_alpha", 0.0) >= 0, f"config.finetune.mixup_alpha={ft.get('mixup_alpha')} must be >= 0 "
             "(0 turns mixup off)")
        need(ft.get("channel_gain_std", 0.0) >= 0, f"config.finetune.channel_gain_std={ft.get('channel_gain_std')} "
             "must be >= 0 (0: no gain jitter)")
        need(0 <= ft.get("channel_drop", 0.0) < 1, f"config.finetune.channel_drop={ft.get('channel_drop')} must be "
             "in [0, 1)")
        need(ft.mode in finetune.MODES, f"config.finetune.mode={ft.mode!r}: choose one of {finetune.MODES}")
        depth = model_config.LABRAM_PRESETS[c.model.size].depth
        if ft.mode == "last_k":
            need(1 <= ft.last_k <= depth, f"config.finetune.last_k={ft.last_k} must be in 1..{depth} (the depth)")
        if ft.mode == "lora":
            need(ft.lora_rank >= 1, f"config.finetune.lora_rank={ft.lora_rank} must be >= 1")
        need(ft.init_kind in ("ours", "official"), f"config.finetune.init_kind={ft.init_kind!r}: ours or official")
        if ft.init_checkpoint:
            need(os.path.exists(ft.init_checkpoint), f"config.finetune.init_checkpoint={ft.init_checkpoint} does "
                 "not exist")
        if ft.task in BEST_METRICS:
            need(ft.best_metric in BEST_METRICS[ft.task], f"config.finetune.best_metric={ft.best_metric!r}: for "
                 f"{ft.task} choose one of {BEST_METRICS[ft.task]}")
