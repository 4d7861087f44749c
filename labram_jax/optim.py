"""AdamW with warmup + cosine, weight-decay mask, layer-wise lr decay and clipping.

Defaults equal the recipes of LABRAM.md section 6 (see ``configs/common.py``).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from labram_jax.models import stacking

# Never decayed, whatever their shape (LABRAM.md 6): embeddings tables and tokens.
_NO_DECAY_NAMES = ("cls_token", "mask_token", "spatial_embed", "time_embed")
_BLOCK = re.compile(r"blocks_(\d+)$")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float
    min_lr: float
    total_steps: int
    warmup_steps: int
    b1: float = 0.9
    b2: float = 0.999
    weight_decay: float = 0.05
    grad_clip: float = 0.0  # global-norm clip; 0 = none
    layer_decay: float = 1.0  # 1 = no layer-wise decay
    lr_scales: tuple[tuple[str, float], ...] = ()  # (name, factor): see parse_lr_scales


def warmup_cosine(lr: float, min_lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine down to ``min_lr``."""
    warmup_steps = max(0, min(warmup_steps, total_steps))

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * step / max(warmup_steps, 1)
        progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        cosine = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def _names(path) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def weight_decay_mask(params):
    """True where weight decay applies: not 1-D, not a bias, not an embedding table/token
    (stacked blocks: 1-D per layer)."""
    def decays(path, leaf):
        names = _names(path)
        ndim = leaf.ndim - 1 if stacking.is_stacked_path(names) else leaf.ndim
        if ndim <= 1 or "bias" in names[-1] or names[-1] in _NO_DECAY_NAMES:
            return False
        return True

    return jax.tree_util.tree_map_with_path(decays, params)


def layer_id(path_names: list[str], depth: int) -> int:
    """The reference's layer id: 0 for the cls/mask tokens, spatial table and temporal
    encoder; i + 1 for block i; depth + 1 for everything else (incl. the time table, and the
    spatial-mix table, which is not in the reference: it learns at the head's rate)."""
    for name in path_names:
        m = _BLOCK.match(name)
        if m:
            return int(m.group(1)) + 1
    if path_names[-1] in ("cls_token", "mask_token", "spatial_embed") or "patch_embed" in path_names:
        return 0
    return depth + 1


def layer_decay_scales(params, depth: int, decay: float):
    """Per-parameter lr multipliers ``decay ** (depth + 1 - layer_id)``; for blocks stacked by
    ``nn.scan`` an array [depth, 1, ...] with block i's multiplier in row i."""
    def scale(path, leaf):
        names = _names(path)
        if stacking.is_stacked_path(names):
            rows = decay ** (depth - np.arange(depth, dtype=np.float64))  # layer id i + 1
            return rows.astype(np.float32).reshape((depth,) + (1,) * (leaf.ndim - 1))
        return decay ** (depth + 1 - layer_id(names, depth))

    return jax.tree_util.tree_map_with_path(scale, params)


def parse_lr_scales(text: str) -> tuple[tuple[str, float], ...]:
    """``"spatial_mix=30,head=2"`` -> ``(("spatial_mix", 30.0), ("head", 2.0))``: each parameter with a
    module or parameter of that name on its path learns (and decays) at that multiple of its rate,
    on top of layer-wise decay. ``""``: none."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, factor = item.partition("=")
        try:
            value = float(factor) if sep and name.strip() else None
        except ValueError:
            value = None
        if value is None or value < 0:
            raise ValueError(f"optim.lr_scales item {item!r}: write NAME=FACTOR with a factor >= 0, "
                             "e.g. spatial_mix=30 (comma-separated)")
        out.append((name.strip(), value))
    return tuple(out)


def lr_scales_tree(params, lr_scales: tuple[tuple[str, float], ...]):
    """Per-parameter lr multipliers of ``lr_scales`` (1 where no name matches). Raises ValueError
    for a name no parameter has (a misspelt name would otherwise change nothing)."""
    unused = {name for name, _ in lr_scales}

    def scale(path, leaf):
        names = _names(path)
        factor = 1.0
        for name, value in lr_scales:
            if name in names:
                factor *= value
                unused.discard(name)
        return factor

    tree = jax.tree_util.tree_map_with_path(scale, params)
    if unused:
        raise ValueError(f"optim.lr_scales names {sorted(unused)}, which no parameter of this model has on its path "
                         "(names are module or parameter names, e.g. spatial_mix, patch_embed, head): fix the spelling, "
                         "or drop the item if this model has no such part (model.spatial_mix=false has no spatial_mix)")
    return tree


def scale_by_tree(scales) -> optax.GradientTransformation:
    """Multiplies each update by a fixed per-parameter factor."""
    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u, s: u * s, updates, scales), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg: OptimConfig, params, depth: int | None = None,
                   trainable=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW(schedule) with clipping, decay mask, optional layer-wise decay, per-name lr scales
    (``cfg.lr_scales``) and frozen parts.

    Args:
      params: the parameter tree (shapes suffice).
      depth: transformer depth for layer-wise decay (required if layer_decay != 1).
      trainable: optional tree of bools (or bool arrays broadcasting against the leaf, e.g.
        per layer of stacked blocks); False parameters get zero updates.
    """
    schedule = warmup_cosine(cfg.lr, cfg.min_lr, cfg.total_steps, cfg.warmup_steps)
    parts = []
    if cfg.grad_clip:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=1e-8, weight_decay=cfg.weight_decay,
                             mask=weight_decay_mask(params)))
    scales = None
    if cfg.layer_decay != 1.0:
        if depth is None:
            raise ValueError("layer-wise lr decay needs the model depth")
        scales = layer_decay_scales(params, depth, cfg.layer_decay)
    if cfg.lr_scales:
        extra = lr_scales_tree(params, cfg.lr_scales)
        scales = extra if scales is None else jax.tree_util.tree_map(lambda s, e: s * e, scales, extra)
    if trainable is not None:  # frozen parameters: updates (and weight decay) scaled to zero
        scales = jax.tree_util.tree_map(lambda t, s: np.asarray(t, np.float32) * s, trainable,
                                        scales if scales is not None else jax.tree_util.tree_map(lambda _: 1.0, trainable))
    if scales is not None:
        parts.append(scale_by_tree(scales))
    return optax.chain(*parts), schedule
