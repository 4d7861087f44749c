"""Stage 3: supervised fine-tuning (binary, multi-class or regression) and its metrics."""

from __future__ import annotations

import functools
import logging

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from labram_jax import anchor_blend, baselines, channels, config_schema, convert, data_spec, model_file
from labram_jax.task_metrics import compute_metrics
from labram_jax.models import config as model_config
from labram_jax.models import stacking
from labram_jax.models import transformer
from labram_jax.tasks import stage as stage_lib

log = logging.getLogger("labram_jax")

TASKS, MODES = config_schema.TASKS, config_schema.MODES


def num_outputs(task: str, num_classes: int) -> int:
    if task not in TASKS:
        raise ValueError(f"finetune.task must be one of {TASKS}, got {task!r}")
    return num_classes if task == "multiclass" else 1


def task_loss(task: str, outputs: jax.Array, batch: dict, label_smoothing: float) -> jax.Array:
    """Per-sample loss [b]: BCE on one logit, smoothed CE, or squared error."""
    if task == "binary":
        return optax.sigmoid_binary_cross_entropy(outputs[:, 0], batch["label"].astype(jnp.float32))
    if task == "multiclass":
        k = outputs.shape[-1]
        labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], k), label_smoothing)
        return optax.softmax_cross_entropy(outputs, labels)
    return jnp.square(outputs[:, 0] - batch["value"])


def mixup(batch: dict, key: jax.Array, alpha: float) -> tuple[dict, jax.Array, jax.Array]:
    """Mixup of each sample with a random partner of the same batch.

    x <- lam * x + (1 - lam) * x[perm] with lam ~ Beta(alpha, alpha) per sample; lam is 1
    (no mixing) where the partner has other channels or other padding, or is a padding sample,
    since patches at one grid position must be the same electrode. Returns (the batch with
    mixed ``x``, lam [b], perm [b]); the loss mixes the two targets with the same lam.
    """
    perm_key, lam_key = jax.random.split(key)
    b = batch["x"].shape[0]
    perm = jax.random.permutation(perm_key, b)
    mask = stage_lib.effective_patch_mask(batch)
    same_grid = ((batch["channel_ids"] == batch["channel_ids"][perm]).all(-1)
                 & (mask == mask[perm]).all((-2, -1)) & batch["valid"][perm])
    lam = jnp.where(same_grid, jax.random.beta(lam_key, alpha, alpha, (b,)), 1.0)
    w = lam.reshape((b,) + (1,) * (batch["x"].ndim - 1)).astype(batch["x"].dtype)
    return {**batch, "x": w * batch["x"] + (1 - w) * batch["x"][perm]}, lam, perm


def mirror_ids(ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Spatial-table rows ``ids [b, C]`` (0 = padding) under their left-right mirrors' rows, and
    whether each sample has a mirror, bool [b]: every electrode's mirror is in the vocabulary."""
    mirrored = jnp.asarray(channels.mirrored_rows())[ids]
    return mirrored, (mirrored >= 0).all(-1)


def mirror(batch: dict, key: jax.Array, rate: float, swap_label: bool) -> dict:
    """Each training sample, with probability ``rate``, presented left-right mirrored: every
    electrode's signal under its mirror electrode's id (C3's under C4's, midline unchanged;
    :func:`labram_jax.channels.mirrored_rows`). ``swap_label``: binary classes that are the
    two sides (left vs right hand imagery) swap, label -> 1 - label. A sample with an electrode
    that has no mirror in the vocabulary, and a padding sample, stay as they are.
    channel_ids [b, C] int32 (0 = padding)."""
    ids = batch["channel_ids"]
    mirrored, mirrorable = mirror_ids(ids)
    flip = jax.random.bernoulli(key, rate, ids.shape[:1]) & mirrorable & batch["valid"].astype(bool)
    out = {**batch, "channel_ids": jnp.where(flip[:, None], mirrored, ids)}
    if swap_label:
        out["label"] = jnp.where(flip, 1 - batch["label"], batch["label"])
    return out


MIRROR_AVERAGES = ("none", "keep", "swap")


def mirror_for_scoring(ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``ids [b, C]`` as scored mirrored at test time, and which samples that changes, bool [b]:
    not those with an electrode that has no mirror (they keep their ids), nor padding or an
    all-midline montage (their mirror is themselves)."""
    mirrored, mirrorable = mirror_ids(ids)
    flipped = mirrorable & (mirrored != ids).any(-1)
    return jnp.where(flipped[:, None], mirrored, ids), flipped


def mirror_all(batch: dict) -> tuple[dict, jax.Array]:
    """Every sample of an evaluation batch left-right mirrored (labels untouched), and which
    samples changed, bool [b] (:func:`mirror_for_scoring`)."""
    ids, flipped = mirror_for_scoring(batch["channel_ids"])
    return {**batch, "channel_ids": ids}, flipped


def mirror_average(task: str, scores: jax.Array, mirrored_scores: jax.Array, flipped: jax.Array,
                   how: str) -> jax.Array:
    """Test-time mirror averaging: each sample's score averaged with its mirror's (``mirrored_scores``,
    the model's scores of :func:`mirror_all`'s batch), where ``flipped``; elsewhere the score alone.

    ``how="keep"``: the mirror has the same target (any task): (s + s') / 2. ``how="swap"``: binary
    classes that are the two sides (left vs right hand), the mirror of P(label 1) is P(label 0):
    (p + 1 - p') / 2, as ``finetune.mirror_label=swap`` trains. scores [b] or [b, K]."""
    if how not in MIRROR_AVERAGES[1:]:
        raise ValueError(f"mirror averaging {how!r}: choose one of {MIRROR_AVERAGES[1:]}")
    if how == "swap" and task != "binary":
        raise ValueError(f"mirror averaging 'swap' swaps the two classes of a binary task, not of a {task} one: "
                         "use 'keep' if a mirrored sample keeps its target")
    partner = 1 - mirrored_scores if how == "swap" else mirrored_scores
    where = flipped.reshape(flipped.shape + (1,) * (scores.ndim - 1))
    return jnp.where(where, (scores + partner) / 2, scores)


def augment_channels(batch: dict, key: jax.Array, gain_std: float, drop_rate: float) -> dict:
    """Per-sample, per-channel amplitude jitter and channel dropout of a training batch.

    Every channel of every sample is scaled by exp(gain_std * N(0, 1)) (electrode impedance and
    skull differ between recordings), and with probability ``drop_rate`` removed: its patches
    leave ``patch_mask`` and are zeroed. A sample keeps at least one channel. x [b, C, W, P].
    """
    gain_key, drop_key = jax.random.split(key)
    b, c = batch["x"].shape[:2]
    x, mask = batch["x"], batch["patch_mask"]
    if gain_std > 0:
        gain = jnp.exp(gain_std * jax.random.normal(gain_key, (b, c)))
        x = x * gain[:, :, None, None].astype(x.dtype)
    if drop_rate > 0:
        present = mask.any(-1)  # [b, C]
        keep = jax.random.bernoulli(drop_key, 1.0 - drop_rate, (b, c)) & present
        keep = jnp.where(keep.any(-1, keepdims=True), keep, present)
        mask = mask & keep[:, :, None]
        x = jnp.where(mask[..., None], x, 0).astype(x.dtype)
    return {**batch, "x": x, "patch_mask": mask}


def scores(task: str, outputs: jax.Array) -> jax.Array:
    """Probabilities (binary [b], multi-class [b, K]) or values [b]."""
    if task == "binary":
        return jax.nn.sigmoid(outputs[:, 0])
    if task == "multiclass":
        return jax.nn.softmax(outputs, axis=-1)
    return outputs[:, 0]


def blended_metrics(anchor: str, train_spec: str, val_spec: str):
    """``metrics(scores [n], targets [n])`` of a binary task's validation windows (``val_spec``'s
    val split, in record order): :func:`compute_metrics`, and the same of the scores blended with
    the classical ``anchor`` fitted on ``train_spec``'s train split (``labram_jax.anchor_blend``)
    as ``blend_<metric>``. The anchor is fitted at the first call, once."""
    anchor_p = []

    def metrics(score: np.ndarray, target: np.ndarray) -> dict[str, float]:
        if not anchor_p:
            anchor_p.append(baselines.anchor_scores(anchor, val_spec, "val", train_spec=train_spec))
        p, labels = anchor_p[0]
        baselines.check_same_windows(labels, target, f"data.val {val_spec!r}")
        blended = compute_metrics("binary", anchor_blend.blend(score, p), target)
        return {**compute_metrics("binary", score, target), **{f"blend_{k}": v for k, v in blended.items()}}

    return metrics


def class_weights(setting: str, spec: str, num_classes: int) -> np.ndarray | None:
    """Per-class loss weights [K] (binary: K = 2) from ``finetune.class_weight``.

    ``none``: None (plain mean). ``balanced``: ``1 / (K * frequency)`` of each label in the
    training stream (scikit-learn's ``class_weight='balanced'``), from the manifests' counts.
    ``w0,w1,...``: explicit weights. The loss becomes the weighted mean over the batch.
    """
    if setting in ("", "none"):
        return None
    if setting == "balanced":
        names, freq = data_spec.label_frequencies(spec, "train")
        if len(names) != num_classes:
            raise ValueError(f"the training manifest has {len(names)} labels {names}, the task {num_classes}: set "
                             "config.model.num_outputs to the number of classes")
        if np.any(freq == 0):
            missing = [n for n, f in zip(names, freq) if f == 0]
            raise ValueError(f"labels {missing} have no training windows: balanced class weights are undefined")
        return 1.0 / (num_classes * freq)
    try:
        weights = np.asarray([float(w) for w in setting.split(",")])
    except ValueError:
        raise ValueError(f"finetune.class_weight={setting!r}: use none, balanced or comma-separated numbers") from None
    if len(weights) != num_classes or np.any(weights <= 0):
        raise ValueError(f"finetune.class_weight={setting!r}: give {num_classes} positive weights")
    return weights


def sample_weights(batch: dict, weights: np.ndarray | None) -> jax.Array:
    """Loss weight of each sample [b]: 0 for padding, the class weight of its label otherwise."""
    valid = batch["valid"].astype(jnp.float32)
    if weights is None:
        return valid
    return valid * jnp.asarray(weights, jnp.float32)[jnp.clip(batch["label"], 0, len(weights) - 1)]


# Input settings a fine-tuned model may add to an encoder trained without them: their parameters
# start at the identity (layers.SpatialMix's table at zero), so the model begins as the encoder.
# Each field also names the encoder's parameter subtree (params["encoder"][field]).
ADDABLE_INPUTS = {"spatial_mix": (False, True)}  # field: (the encoder's value, the fine-tuning's)


def _addable(field: str, encoder_value, value) -> bool:
    return ADDABLE_INPUTS.get(field) == (encoder_value, value)


def load_encoder(path: str, kind: str, **options):
    """Encoder params of a pretrained model: our ``model.npz`` (or its workdir) or an
    official checkpoint (``kind='official'``: labram-base.pth style, or a fine-tuned one).
    ``options`` are the fine-tuning model's ``model_config.REFERENCE_INPUTS`` fields
    (defaults: the reference's); they must be the ones the encoder was trained with, but for
    ``ADDABLE_INPUTS`` (spatial filters on an encoder pretrained without: the table starts at zero)."""
    reference = model_config.REFERENCE_INPUTS
    ours = {**reference, **options}
    if kind == "official":
        changed = {k: v for k, v in ours.items() if v != reference[k] and not _addable(k, reference[k], v)}
        if changed:
            wanted = ", ".join(f"model.{k}={reference[k]!r}" for k in changed)
            raise ValueError(f"official weights were trained with {wanted}, but fine-tuning uses "
                             f"{', '.join(f'{k}={v!r}' for k, v in changed.items())}: set them back to the defaults")
        try:
            _, variables = convert.load_official(path, "pretrain")
        except convert.ConversionError:
            _, variables = convert.load_official(path, "finetune")
    else:
        try:
            path = model_file.resolve(path, "the fine-tuning init checkpoint")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}: pretrain first, or set --config.finetune.init_checkpoint='' to train "
                                    "from scratch") from None
        _, module, variables = model_file.load(path)
        trained = getattr(module.cfg, "encoder", module.cfg)
        for field, value in ours.items():
            theirs = getattr(trained, field)
            if theirs != value and not _addable(field, theirs, value):
                raise ValueError(f"{path} was trained with model.{field}={theirs!r} but fine-tuning uses "
                                 f"{value!r}: set --config.model.{field}={theirs}")
    encoder = dict(variables["params"]["encoder"])
    encoder.pop("mask_token", None)  # the fine-tuning model has none
    return encoder


def build(config: ml_collections.ConfigDict, dtype) -> stage_lib.Stage:
    ft = config.finetune
    lora = dict(lora_rank=ft.lora_rank, lora_alpha=ft.lora_alpha) if ft.mode == "lora" else {}
    cfg = model_config.labram(config.model.size, drop_path_rate=config.model.drop_path, dtype=dtype,
                              **stage_lib.model_options(config), **lora)
    model = transformer.LaBraM(cfg, num_outputs=num_outputs(ft.task, config.model.num_outputs))
    pretrained = (load_encoder(ft.init_checkpoint, ft.init_kind,
                               **{k: getattr(cfg, k) for k in model_config.REFERENCE_INPUTS})
                  if ft.init_checkpoint else None)
    weights = None if ft.task == "regression" else class_weights(
        ft.class_weight, config.data.train, 2 if ft.task == "binary" else config.model.num_outputs)

    def init(key, batch):
        variables = model.init(key, batch["x"][:1], batch["channel_ids"][:1], batch["patch_mask"][:1])
        if pretrained is not None:
            variables = _with_encoder(variables, pretrained)
        return variables

    mixup_alpha, gain_std, drop_rate = ft.mixup_alpha, ft.channel_gain_std, ft.channel_drop
    mirror_rate, swap_label = ft.mirror, ft.mirror_label == "swap"

    def loss_fn(params, extra, batch, key, frozen):
        del frozen
        if mirror_rate > 0:  # first: mixup pairs and swapped labels then agree
            key, mirror_key = jax.random.split(key)
            batch = mirror(batch, mirror_key, mirror_rate, swap_label)
        if mixup_alpha > 0:  # before channel dropout, which would give partners different grids
            key, mix_key = jax.random.split(key)
            batch, lam, perm = mixup(batch, mix_key, mixup_alpha)
        if gain_std > 0 or drop_rate > 0:
            key, aug_key = jax.random.split(key)
            batch = augment_channels(batch, aug_key, gain_std, drop_rate)
        out = model.apply({"params": params, **extra}, batch["x"], batch["channel_ids"],
                          stage_lib.effective_patch_mask(batch), train=True, rngs={"dropout": key})
        per_sample, weight = task_loss(ft.task, out, batch, ft.label_smoothing), sample_weights(batch, weights)
        if mixup_alpha > 0:  # lam of the own target, 1 - lam of the partner's (class-weighted alike)
            partner = {k: v[perm] for k, v in batch.items() if k in ("label", "value", "valid")}
            partner_weight = sample_weights(partner, weights) * batch["valid"]
            mixed = (lam * weight * per_sample
                     + (1 - lam) * partner_weight * task_loss(ft.task, out, partner, ft.label_smoothing))
            loss = mixed.sum() / jnp.maximum((lam * weight + (1 - lam) * partner_weight).sum(), 1.0)
        else:
            loss = stage_lib.weighted_mean(per_sample, weight)
        return loss, ({"loss": loss}, extra)

    def predict(params, extra, batch):
        out = model.apply({"params": params, **extra}, batch["x"], batch["channel_ids"],
                          stage_lib.effective_patch_mask(batch))
        return scores(ft.task, out)

    metrics = (blended_metrics(ft.blend_anchor, config.data.train, config.data.val) if ft.blend_anchor
               else functools.partial(compute_metrics, ft.task))
    return stage_lib.Stage(name="finetune", model=model, init=init, loss_fn=loss_fn, depth=cfg.depth,
                           predict=predict, target="value" if ft.task == "regression" else "label",
                           metrics=metrics, best_metric=ft.best_metric,
                           trainable=lambda params: trainable_mask(params, ft.mode, ft.last_k, cfg.depth))


def trainable_mask(params, mode: str, last_k: int, depth: int):
    """Which parameters train: ``full``; ``linear_probe`` (fc_norm + head only); ``last_k``
    (the last k blocks + fc_norm + head); ``lora`` (the LoRA adapters + fc_norm + head).
    Leaves are bools, or for ``last_k`` on stacked blocks bool arrays [depth, 1, ...]."""
    def train(path, leaf):
        names = [str(getattr(p, "key", p)) for p in path]
        if mode == "full":
            return True
        if names[0] in ("fc_norm", "head"):
            return True
        if mode == "linear_probe":
            return False
        if mode == "lora":
            return any(n.endswith("_lora") for n in names)
        if mode == "last_k":
            if stacking.is_stacked_path(names):  # one flag per layer along the stacked axis
                return (np.arange(depth) >= depth - last_k).reshape((depth,) + (1,) * (leaf.ndim - 1))
            blocks = [n for n in names if n.startswith("blocks_")]
            return bool(blocks) and int(blocks[0].split("_")[1]) >= depth - last_k
        raise ValueError(f"finetune.mode must be one of {MODES}, got {mode!r}")

    return jax.tree_util.tree_map_with_path(train, params)


def _describe_encoder(flat: dict) -> str:
    """'depth D, width W' of a flat encoder tree in either block layout."""
    depth = len({k[0] for k in flat if k[0].startswith("blocks_")})
    if not depth:
        depth = next((np.shape(v)[0] for k, v in flat.items() if k[0] == stacking.STACKED), 0)
    width = next((v.shape[-1] for k, v in flat.items() if k[-1] == "cls_token"), "?")
    return f"depth {depth}, width {width}"


def _with_encoder(variables, encoder):
    """Replaces the encoder params (keeping logical-axis boxes) with pretrained values; LoRA
    adapters, which the pretrained model has none of, keep their initial values, and so does a
    spatial-filter table the encoder was pretrained without (``ADDABLE_INPUTS``)."""
    params = variables["params"]
    target = flax.traverse_util.flatten_dict(params["encoder"], is_leaf=lambda _, v: isinstance(v, nn.Partitioned))
    described = _describe_encoder(flax.traverse_util.flatten_dict(encoder))
    source = flax.traverse_util.flatten_dict(stacking.match_layout(encoder, params["encoder"]))
    shapes_differ = [k for k in target if k in source and np.shape(source[k]) != nn.unbox(target[k]).shape]
    added = {k for k in target if k[0] in ADDABLE_INPUTS and k not in source}
    if added:
        log.info("the encoder was pretrained without %s: it starts at the identity",
                 ", ".join(sorted({k[0] for k in added})))
    fresh = added | {k for k in target if any(str(n).endswith("_lora") for n in k)}  # keep their initial values
    if set(target) - fresh != set(source) or shapes_differ:
        raise ValueError(f"the pretrained encoder ({described}) does not fit this model "
                         f"({_describe_encoder({k: nn.unbox(v) for k, v in target.items()})}): set config.model.size "
                         "to the pretrained model's size")
    merged = {k: box.replace_boxed(jnp.asarray(source[k], box.value.dtype)) if isinstance(box, nn.Partitioned)
              else jnp.asarray(source[k], box.dtype) for k, box in target.items() if k not in fresh}
    merged.update({k: target[k] for k in fresh})
    return {**variables, "params": {**params, "encoder": flax.traverse_util.unflatten_dict(merged)}}
