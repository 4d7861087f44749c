"""Every field of a run's config: its default, what it means, and the check beside it.

``defaults(size, stage)`` builds the locked ``ConfigDict`` that the config files in
``configs/`` start from (they set the recipes of LABRAM.md on top); ``validate(config,
device_count)`` checks a config before anything is compiled and lists every problem at once:
unknown fields and wrong types against the defaults, then each field's own check, which may
read other fields (the mesh against the devices, the files a field names). Model fields are
checked where the model is defined (``labram_jax.models.config``) and only repeated here
through the names of their allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from labram_jax import data_spec, model_file, optim, sharding
from labram_jax.models import config as model_config
from labram_jax.optim import IMPLEMENTATIONS as OPTIMIZER_IMPLEMENTATIONS

STAGES = ("tokenizer", "pretrain", "finetune")
TASKS = ("binary", "multiclass", "regression")  # finetune.task
MODES = ("full", "linear_probe", "last_k", "lora")  # finetune.mode: what trains
NONFINITE_POLICIES = ("skip", "stop")
BEST_METRICS = {"binary": ("balanced_accuracy", "auroc", "auc_pr", "accuracy"),
                "multiclass": ("balanced_accuracy", "cohen_kappa", "weighted_f1", "accuracy"),
                "regression": ("pearson_r",)}  # the best checkpoint maximises its metric

Check = Callable[[str, Any, "Context"], "str | None"]  # (path, value, context) -> the problem, or None


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem found."""


@dataclasses.dataclass(frozen=True)
class Context:
    """What a check sees: the whole config (``ctx.model.size`` ...) and the device count."""

    config: ml_collections.ConfigDict
    device_count: int

    def __getattr__(self, name):
        return self.config[name]


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: default, meaning, and its check (None: the type check only)."""

    default: Any
    doc: str
    check: Check | None = None


# ---------------------------------------------------------------------------------------------- checks
def one_of(choices) -> Check:
    return lambda path, v, c: None if v in choices else f"{path}={v!r}: choose one of {tuple(choices)}"


def within(low: float, high: float, low_open: bool = False, high_open: bool = False, hint: str = "") -> Check:
    def check(path, v, c):
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        return None if ok else f"{path}={v} must be in {interval}{hint}"
    return check


def positive(path, v, c):
    return None if v > 0 else f"{path}={v} must be positive"


def at_least(low: float, hint: str = "") -> Check:
    return lambda path, v, c: None if v >= low else f"{path}={v} must be >= {low:g}{hint}"


def _temporal_groups(path, v, c):
    filters = model_config.LABRAM_PRESETS[c.model.size].temporal_channels
    if v >= 1 and filters % v == 0:
        return None
    return f"{path}={v} must divide the {filters} temporal-encoder filters of size {c.model.size} (4, the paper, or 1)"


def parse_target_band(value: str) -> tuple[int, int]:
    """``tokenizer.target_band_hz``: '' -> (0, 100) (every bin of a 1-s, 200-point DFT), 'LOW-HIGH' -> (LOW, HIGH)."""
    if not value:
        return 0, 100
    low, sep, high = value.partition("-")
    if not (sep and low.strip().isdigit() and high.strip().isdigit() and int(low) <= int(high) <= 100):
        raise ValueError(f"{value!r} is not LOW-HIGH in whole Hz with LOW <= HIGH <= 100 (e.g. 1-45), or '' for "
                         "every bin")
    return int(low), int(high)


def _target_band(path, v, c):
    try:
        parse_target_band(v)
    except ValueError as err:
        return f"{path}: {err}"
    return None


def _lr_scales(path, v, c):
    try:
        optim.parse_lr_scales(v)
    except ValueError as err:
        return str(err)
    return None


def _data_spec(path, v, c):
    if not v:
        return (f"{path} is empty: pass --{path}=<manifest.json or shard glob>" if path.endswith("train") else None)
    try:
        spec = data_spec.DataSpec.parse(v)
    except ValueError as err:
        return f"{path}: {err}"
    missing = [m for m in spec.manifests if not data_spec.expand(m)]
    return f"{path}: manifest {missing[0]} not found (run python -m data_prep)" if missing else None


def _max_windows(path, v, c):
    if 1 <= v <= model_config.NUM_TIME_ROWS:
        return None
    return (f"{path}={v}: a sample holds 1..{model_config.NUM_TIME_ROWS} one-second windows (the time-embedding "
            "table has 16 rows); re-run data_prep with --window <= 16")


def _mesh(path, v, c):
    """The mesh against the devices and the batch against data parallelism (on ``mesh.data``)."""
    devices = c.device_count
    shape = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        return f"config.mesh {shape}: each axis is a positive size, one may be -1 (the rest of the devices)"
    fixed = 1
    for s in shape:
        fixed *= s if s > 0 else 1
    if -1 in shape:
        if devices % fixed:
            return f"config.mesh {shape}: {devices} devices are not divisible by {fixed}"
        shape = [s if s > 0 else devices // fixed for s in shape]
    elif fixed != devices:
        return (f"config.mesh data x fsdp x tensor = {fixed} but there are {devices} devices: make the product "
                "equal the device count (or set one axis to -1)")
    ways = shape[0] * shape[1]
    if ways <= 0 or c.data.batch_size % ways:
        return f"config.data.batch_size={c.data.batch_size} is not divisible by data x fsdp = {ways}: make it a multiple"
    return None


def _sharding_rule(path, v, c):
    axes = sharding.parse_axes(v)
    bad = [a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in sharding.MESH_AXES]
    return f"{path}={v!r}: mesh axes are {sharding.MESH_AXES} (joined by +), or '' to replicate" if bad else None


def _min_lr(path, v, c):
    return None if 0 <= v <= c.optim.lr else f"{path}={v} must be in [0, lr]"


def _total_steps(path, v, c):
    return None if v > 0 or c.optim.epochs > 0 else "set config.optim.total_steps or config.optim.epochs > 0"


def _tokenizer_checkpoint(path, v, c):
    if not v:
        return ("pretraining needs config.pretrain.tokenizer_checkpoint: the workdir (or model.npz) of a tokenizer "
                "run; train one with --config=configs/<size>.py:tokenizer")
    try:
        model_file.resolve(v)
    except FileNotFoundError:
        return (f"{path}={v}: no model.npz there (the tokenizer run must finish; it writes model.npz at its end)")
    return None


def _init_checkpoint(path, v, c):
    return None if not v or os.path.exists(v) else f"{path}={v} does not exist"


def _num_outputs(path, v, c):
    if c.stage == "finetune" and c.finetune.task == "multiclass" and v < 2:
        return f"{path}={v}: a multiclass task needs the number of classes (>= 2)"
    return None if v >= 1 else f"{path}={v} must be >= 1"


def _mirror_label(path, v, c):
    if v not in ("keep", "swap"):
        return f"{path}={v!r}: choose one of ('keep', 'swap')"
    if v == "swap" and c.finetune.task != "binary":
        return f"{path}='swap' swaps the two classes of a binary task; config.finetune.task is {c.finetune.task!r}"
    return None


def _blend_anchor(path, v, c):
    anchors = ("band_power_lr", "csp_lda", "log_spectrum_lr")  # labram_jax.baselines.BASELINES
    if v and v not in anchors:
        return f"{path}={v!r}: choose one of {anchors} or ''"
    if v and c.finetune.task != "binary":
        return f"{path}={v!r} blends binary scores; config.finetune.task is {c.finetune.task!r}"
    if v and not c.data.val:
        return f"{path}={v!r} blends the validation scores: set config.data.val"
    return None


def _class_weight(path, v, c):
    if v not in ("", "none") and c.finetune.task == "regression":
        return f"{path} applies to classification; set it to none"
    return None


def _last_k(path, v, c):
    depth = model_config.LABRAM_PRESETS[c.model.size].depth
    if c.finetune.mode == "last_k" and not 1 <= v <= depth:
        return f"{path}={v} must be in 1..{depth} (the depth)"
    return None


def _lora_rank(path, v, c):
    return f"{path}={v} must be >= 1" if c.finetune.mode == "lora" and v < 1 else None


def _best_metric(path, v, c):
    allowed = BEST_METRICS.get(c.finetune.task)
    if allowed and v not in allowed:
        return f"{path}={v!r}: for {c.finetune.task} choose one of {allowed}"
    return None


def _every(path, v, c):
    return None if v > 0 else f"{path}={v} must be positive"


# ---------------------------------------------------------------------------------------------- the fields
def schema(size: str, stage: str) -> dict:
    """The fields of ``stage``'s config, nested like the ConfigDict."""
    vocab = 8192 if size != "tiny" else 256
    model = {
        "size": Field(size, "tiny, base, large, huge (labram_jax.models.config presets)",
                      one_of(model_config.LABRAM_PRESETS)),
        "tokenizer_size": Field("tiny" if size == "tiny" else "base", "the tokenizer preset (tiny or base)",
                                one_of(("tiny", "base"))),
        "dtype": Field("auto", "auto: bfloat16 on accelerators, float32 on CPU",
                       one_of(("auto",) + model_config.DTYPES)),
        "remat": Field("none", "none, or block: recompute block activations in the backward pass (less memory)",
                       one_of(model_config.REMAT_POLICIES)),
        "scan_blocks": Field(False, "nn.scan over stacked blocks (one block compiled; Huge compiles faster)"),
        "input_norm": Field("none", "none (the paper) or channel: standardise each channel of each sample",
                            one_of(model_config.INPUT_NORMS)),
        "temporal_groups": Field(4, "GroupNorm groups of the temporal encoder (4: the paper; 1 keeps band ratios)",
                                 _temporal_groups),
        "patch_embed": Field("temporal", "temporal (the paper's encoder) or spectrum (log 1-45 Hz amplitudes)",
                             one_of(model_config.PATCH_EMBEDS)),
        "spatial_mix": Field(False, "learned spatial filters (each electrode plus a learned combination of the others) "
                             "ahead of the patch embedding; fine-tuning may add them to an encoder pretrained "
                             "without (official weights too): they start at the identity"),
        "head_pooling": Field("mean", "mean (the paper) or electrode: the head reads each electrode's pooled tokens "
                              "in its own slot (any montage)", one_of(model_config.HEAD_POOLINGS)),
        "attention": Field("auto", "auto (CPU: cpu_kernel on x86 CPUs with AVX2 where it builds, "
                           "else explicit; xla elsewhere), xla, cudnn (GPU, bf16), explicit or cpu_kernel (C++)",
                           one_of(model_config.ATTENTION_IMPLEMENTATIONS)),
        "layer_norm": Field("auto", "auto (CPU: cpu_kernel on x86 CPUs with AVX2 where it builds, "
                            "else xla), xla or cpu_kernel (C++)", one_of(model_config.LAYER_NORM_IMPLEMENTATIONS)),
        "linear": Field("auto", "the blocks' linear layers: auto (CPU: cpu_kernel on x86 CPUs with AVX2 "
                        "where it builds, AVX-512 tiles on full-width units; else xla), xla or cpu_kernel (C++)",
                        one_of(model_config.LINEAR_IMPLEMENTATIONS)),
        "mlp": Field("auto", "the blocks' MLPs: auto (fused where the linear layers run on cpu_kernel, without "
                     "LoRA), fused (GELU in the C++ kernel's first product) or layers (two linear layers, XLA's GELU)",
                     one_of(model_config.MLP_IMPLEMENTATIONS)),
        "qkv": Field("auto", "how the C++ attention gets q, k, v: auto (in_kernel where the attention runs on "
                     "cpu_kernel), in_kernel (it reads the qkv projection and applies the q/k norms itself) or sliced",
                     one_of(model_config.QKV_INPUTS)),
        "drop_path": Field(0.0, "stochastic depth rate of the last block", within(0.0, 1.0, high_open=True)),
        "num_outputs": Field(1, "1: binary or regression; K: K classes", _num_outputs),
        "vocab_size": Field(vocab, "tokenizer codebook size", positive),
        "cls_quirk": Field(False, "the reference's pretraining cls embedding (official weights)"),
    }
    data = {
        "train": Field("", "manifest.json, a glob of manifests, a shard glob, '+'-joined with @weights", _data_spec),
        "val": Field("", "the same, for validation ('' for none)", _data_spec),
        "max_channels": Field(23 if stage == "finetune" else 64, "static batch grid: channels",
                              lambda p, v, c: None if 1 <= v <= 128 else
                              f"{p}={v}: must be in 1..128 (the channel vocabulary)"),
        "max_windows": Field(10 if stage == "finetune" else 4, "static batch grid: one-second windows (<= 16)",
                             _max_windows),
        "batch_size": Field(512, "global batch", positive),
        "num_workers": Field(0, "Grain worker processes (0: in the training process)", at_least(0)),
    }
    optim = {
        "lr": Field(5e-4, "peak learning rate", positive),
        "min_lr": Field(1e-5, "final learning rate of the cosine", _min_lr),
        "epochs": Field(50, "training length in epochs (unless total_steps)", at_least(0)),
        "warmup_epochs": Field(5, "linear warmup in epochs (unless warmup_steps)", at_least(0)),
        "b1": Field(0.9, "AdamW beta 1", within(0.0, 1.0, high_open=True)),
        "b2": Field(0.999, "AdamW beta 2", within(0.0, 1.0, high_open=True)),
        "weight_decay": Field(0.05, "AdamW weight decay (not on 1-D parameters and tables)", at_least(0)),
        "grad_clip": Field(0.0, "global-norm gradient clipping (0: none)", at_least(0)),
        "layer_decay": Field(1.0, "layer-wise learning-rate decay", within(0.0, 1.0, low_open=True)),
        "lr_scales": Field("", "NAME=FACTOR,...: parameters with that module or parameter name on their path learn "
                           "at FACTOR x their rate (e.g. spatial_mix=30)", _lr_scales),
        "total_steps": Field(0, "0: epochs x steps per epoch", _total_steps),
        "warmup_steps": Field(-1, "-1: warmup_epochs x steps per epoch", at_least(-1)),
        "implementation": Field("auto", "what computes each AdamW step: auto (cpu_kernel where it can run: float32 "
                                "on one CPU device with the C++ kernels built; else xla), xla (optax's operations) or "
                                "cpu_kernel (one C++ call over all parameters, in place)", one_of(OPTIMIZER_IMPLEMENTATIONS)),
    }
    fields = {
        "stage": Field(stage, "tokenizer, pretrain or finetune", one_of(STAGES)),
        "seed": Field(0, "seed of initialisation, data order and every random draw"),
        "model": model, "data": data, "optim": optim,
        "mesh": {"data": Field(-1, "data-parallel axis (-1: the remaining devices)", _mesh),
                 "fsdp": Field(1, "fully-sharded data-parallel axis"),
                 "tensor": Field(1, "tensor-parallel axis (heads, MLP, vocabulary)")},
        "sharding_rules": {name: Field(sharding.axes_text(axes), f"mesh axes of the logical axis {name!r}",
                                       _sharding_rule) for name, axes in sharding.DEFAULT_RULES},
        "log_every": Field(50, "steps between logged metrics", _every),
        "eval_every": Field(500, "steps between validations (and the last step)", _every),
        "checkpoint_every": Field(1000, "steps between checkpoints", _every),
        "checkpoint_keep": Field(3, "checkpoints kept", _every),
        "compilation_cache_dir": Field("", "persistent XLA compilation cache (speeds up restarts); '' = off"),
        "nonfinite_policy": Field("skip", "NaN/inf loss or gradient: skip the update (and count it) or stop",
                                  one_of(NONFINITE_POLICIES)),
        "max_skipped_steps": Field(20, "with skip: stop once this many updates were skipped in the run", at_least(0)),
        "stop_after": Field(0, "stop (with a checkpoint) after this many steps of this invocation; 0 = to the end",
                            at_least(0)),
    }
    if stage == "tokenizer":
        fields["tokenizer"] = {
            "ema_decay": Field(0.99, "EMA decay of the codebook", within(0.0, 1.0, True, True)),
            "kmeans_iters": Field(10, "k-means iterations of the codebook's initialisation", at_least(0)),
            "code_dim": Field(64, "code vector size", positive),
            "commitment_weight": Field(1.0, "weight of the commitment loss", at_least(0)),
            "dead_code_threshold": Field(0.0, "> 0: restart codes whose usage EMA falls below it (not in the "
                                              "reference)", at_least(0)),
            "log_amplitude": Field(False, "log(|X| + 0.01) amplitude target (not in the reference)"),
            "target_band_hz": Field("", "LOW-HIGH: amplitude and phase targets z-scored and scored on the 1-Hz DFT "
                                    "bins of LOW..HIGH Hz only, e.g. 1-45 on subject-centred records (zero outside "
                                    "their band); '' = every bin (the reference)", _target_band),
        }
    if stage == "pretrain":
        fields["pretrain"] = {
            "mask_ratio": Field(0.5, "fraction of patches masked", within(0.0, 1.0, True, True)),
            "tokenizer_checkpoint": Field("", "the tokenizer run's workdir or model.npz", _tokenizer_checkpoint),
            "loss_chunks": Field(4, "pieces the lm_head's cross-entropy walks the tokens in, its gradient taken "
                                 "in the forward pass (labram_jax.models.linear_cross_entropy); 0 = all "
                                 "[batch, tokens, 8192] logits at once (the plain formulation)", at_least(0)),
        }
    if stage == "finetune":
        fields["finetune"] = {
            "task": Field("binary", "binary, multiclass or regression", one_of(TASKS)),
            "label_smoothing": Field(0.1, "multi-class only", within(0.0, 1.0, high_open=True)),
            "mixup_alpha": Field(0.0, "> 0: mix samples of the same channel grid, lam ~ Beta(alpha, alpha)",
                                 at_least(0, " (0 turns mixup off)")),
            "channel_gain_std": Field(0.0, "> 0: scale each channel of each training sample by exp(std x N(0, 1))",
                                      at_least(0, " (0: no gain jitter)")),
            "channel_drop": Field(0.0, "> 0: drop each channel of each training sample with this probability",
                                  within(0.0, 1.0, high_open=True)),
            "mirror": Field(0.0, "> 0: present each training sample left-right mirrored with this probability "
                            "(each electrode's signal under its mirror's id: C3 <-> C4)", within(0.0, 1.0)),
            "mirror_label": Field("keep", "keep, or swap (binary classes that are the two sides, e.g. left vs right "
                                  "hand imagery: a mirrored sample's label becomes 1 - label)", _mirror_label),
            "class_weight": Field("none", "none, balanced (1 / (K x label frequency)) or 'w0,w1,...'", _class_weight),
            "init_checkpoint": Field("", "pretrain workdir / model.npz, or an official .pth with init_kind=official",
                                     _init_checkpoint),
            "init_kind": Field("ours", "ours or official", one_of(("ours", "official"))),
            "mode": Field("full", "full, linear_probe, last_k or lora", one_of(MODES)),
            "last_k": Field(2, "mode=last_k: the last k blocks train", _last_k),
            "lora_rank": Field(8, "mode=lora: adapters of this rank on qkv, proj, fc1, fc2 of every block", _lora_rank),
            "lora_alpha": Field(16.0, "the adapters are scaled by lora_alpha / lora_rank"),
            "best_metric": Field("balanced_accuracy", "the validation metric the best checkpoint maximises",
                                 _best_metric),
            "blend_anchor": Field("", "binary tasks: validation also reports the scores blended with this "
                                  "classical anchor, fitted on data.train's train split (blend_* metrics; "
                                  "labram_jax.anchor_blend): log_spectrum_lr, band_power_lr or csp_lda; '' = none",
                                  _blend_anchor),
        }
    return fields


def defaults(size: str, stage: str) -> ml_collections.ConfigDict:
    """The locked config of ``stage`` for model ``size`` with every field at its default."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    if size not in model_config.LABRAM_PRESETS:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(model_config.LABRAM_PRESETS)}")

    def build(fields):
        return ml_collections.ConfigDict({k: build(v) if isinstance(v, dict) else v.default for k, v in fields.items()})

    config = build(schema(size, stage))
    config.lock()
    return config


def from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A run's ``config.json`` as a full config: its values over the defaults of its size and
    stage, so a run written before a field existed still loads (with that field's default)."""
    config = defaults(saved["model"]["size"], saved["stage"])

    def merge(node, values):
        for key, value in values.items():
            if key not in node:
                continue  # a field that no longer exists
            if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
                merge(node[key], value)
            else:
                node[key] = value

    merge(config, saved)
    return config


# ---------------------------------------------------------------------------------------------- validation
# model.* fields that change how a step is computed, not what is learned: free to change on resume
RUNTIME_MODEL_FIELDS = ("dtype", "remat", "scan_blocks", "attention", "layer_norm", "linear", "mlp", "qkv")


def resume_conflicts(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """The ``stage`` and ``model.*`` settings (other than ``RUNTIME_MODEL_FIELDS``) in which
    ``config`` differs from the config ``saved`` with a checkpoint, as ``"model.x: saved -> now"``.
    Resuming across such a change would pair trained weights with another model. A setting that
    ``saved`` lacks (added to the schema after that run started) counts as its default, which is
    what that run's code did."""
    now = json.loads(config.to_json_best_effort())
    conflicts = [f"stage: {saved.get('stage')!r} -> {now['stage']!r}"] if saved.get("stage") != now["stage"] else []
    defaults = {k: f.default for k, f in schema(now["model"]["size"], now["stage"])["model"].items()}
    before, after = {**defaults, **saved.get("model", {})}, now["model"]
    for key in sorted(set(before) | set(after)):
        if key not in RUNTIME_MODEL_FIELDS and before.get(key) != after.get(key):
            conflicts.append(f"model.{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return conflicts


def validate(config: ml_collections.ConfigDict, device_count: int) -> None:
    """Raises ConfigError listing every problem of ``config`` for ``device_count`` devices."""
    stage = config.get("stage")
    if stage not in STAGES:
        raise ConfigError(f"config.stage={stage!r}: choose one of {STAGES}")
    size = config.get("model", {}).get("size")
    if size not in model_config.LABRAM_PRESETS:
        raise ConfigError(f"config.model.size={size!r}: choose one of {sorted(model_config.LABRAM_PRESETS)}")
    fields = schema(size, stage)
    problems: list[str] = []
    _compare(config, fields, "config", problems)
    if problems:  # values cannot be checked on a config of the wrong shape
        raise ConfigError(_join(problems))
    _check(config, fields, "config", Context(config, device_count), problems)
    if problems:
        raise ConfigError(_join(problems))


def _join(problems: list[str]) -> str:
    head = "invalid config (" + (f"{len(problems)} problems" if len(problems) > 1 else "1 problem") + "):"
    return "\n  - ".join([head] + problems)


def _compare(config, fields: dict, path: str, problems: list[str]) -> None:
    for key in config.keys():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            problems.append(f"unknown field {path}.{key}" + (f" (did you mean {path}.{close[0]}?)" if close else ""))
            continue
        value, expected = config[key], fields[key]
        if isinstance(expected, dict):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                problems.append(f"{path}.{key} must be a group of fields, got {type(value).__name__}")
            else:
                _compare(value, expected, f"{path}.{key}", problems)
        elif not _same_type(value, expected.default):
            problems.append(f"{path}.{key} must be {type(expected.default).__name__}, got {type(value).__name__} "
                            f"{value!r}")
    for key in fields:
        if key not in config:
            problems.append(f"missing field {path}.{key}")


def _same_type(value, expected) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(expected, bool)
    if isinstance(expected, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(expected))


def _check(node, fields: dict, path: str, ctx: Context, problems: list[str]) -> None:
    for key, field in fields.items():
        if isinstance(field, dict):
            _check(node[key], field, f"{path}.{key}", ctx, problems)
        elif field.check is not None:
            problem = field.check(f"{path}.{key}", node[key], ctx)
            if problem:
                problems.append(problem)
