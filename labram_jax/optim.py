"""AdamW with warmup + cosine, weight-decay mask, layer-wise lr decay and clipping.

Defaults equal the recipes of LABRAM.md section 6 (see ``configs/common.py``). :func:`make_optimizer`
builds it as an optax chain (the state's layout, whatever computes the step) and
:meth:`Optimizer.apply` takes one guarded step, computed (``OptimConfig.implementation``):

- ``xla``: the chain's ``update``, ``optax.apply_updates`` and the norms, as XLA operations: ~10 per
  parameter array.
- ``cpu_kernel``: all of it in one C++ call (:mod:`labram_jax.models.cpu_adamw`; float32 on one CPU
  device with the kernels built), in place: ~4 ms instead of the 17.5-23.5 ms XLA spends on a Base step's
  ~2,200 small operations, mostly starting them, on a 2-core CPU (BENCHMARKS.md, "Session 31"). The
  same step to float32 rounding.
- ``auto``: ``cpu_kernel`` where it can run, else ``xla``.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from labram_jax.models import cpu_adamw, cpu_kernels, stacking

# Never decayed, whatever their shape (LABRAM.md 6): embeddings tables and tokens.
_NO_DECAY_NAMES = ("cls_token", "mask_token", "spatial_embed", "time_embed")
_BLOCK = re.compile(r"blocks_(\d+)$")
IMPLEMENTATIONS = ("auto", "xla", "cpu_kernel")
EPS = 1e-8  # Adam's denominator epsilon


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
    implementation: str = "auto"  # what computes a step: IMPLEMENTATIONS (module docstring)


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


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """What the C++ step needs besides the arrays, per parameter array in ``jax.tree.leaves`` order:
    decoupled weight decay (0: none), rows of its own scale along the first axis, and those scales."""

    weight_decay: tuple[float, ...]
    rows: tuple[int, ...]
    scales: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The optax chain (``tx``: its state is the train state's ``opt_state``), the learning-rate
    schedule, and what :meth:`apply` computes a step with."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    cfg: OptimConfig
    plan: KernelPlan | None  # None: the C++ step cannot take these scales (xla only)
    plan_refusal: str | None = None  # why plan is None

    def implementation(self, params) -> str:
        """``xla`` or ``cpu_kernel`` for these (traced) parameters (``auto`` as the module docstring
        says); a ValueError where ``cpu_kernel`` was asked for and cannot run."""
        reason = self.plan_refusal or next(filter(None, (cpu_kernels.refusal(p) for p in jax.tree.leaves(params))),
                                           None)
        if self.cfg.implementation == "auto":
            return "xla" if reason else "cpu_kernel"
        if self.cfg.implementation == "cpu_kernel" and reason:
            raise ValueError(f"optim.implementation='cpu_kernel' cannot run here ({reason}); use 'xla'")
        return self.cfg.implementation

    def apply(self, grads, opt_state, params, loss: jax.Array):
        """One step, not applied where the loss, the gradient norm or the new parameter norm is not
        finite (parameters and state kept as they were; the C++ step decides from the loss and the
        gradient norm: from finite parameters those give finite new ones).

        Returns:
          (params, opt_state, grad_norm, param_norm, finite): the new (or kept) parameters and optimizer
          state, the norms of the gradients and of the new parameters (float32 scalars) and whether the
          step was applied (bool scalar).
        """
        if self.implementation(params) == "cpu_kernel":
            return self._kernel_step(grads, opt_state, params, loss)
        updates, new_state = self.tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(new_params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)

        def keep(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        return keep(new_params, params), keep(new_state, opt_state), grad_norm, param_norm, finite

    def _kernel_step(self, grads, opt_state, params, loss):
        """:meth:`apply` by :func:`labram_jax.models.cpu_adamw.adamw`, reading and writing the moments and
        step counts in the chain's own state (so checkpoints do not depend on the implementation)."""
        adam = _states(opt_state, optax.ScaleByAdamState)
        schedule_state = _states(opt_state, optax.ScaleByScheduleState)
        if len(adam) != 1 or len(schedule_state) != 1:
            raise ValueError(f"optim: the C++ step reads one Adam and one schedule state from the optimizer state, found "
                             f"{len(adam)} and {len(schedule_state)} (a state not made by this optimizer's tx.init?); "
                             "initialise it with Optimizer.tx.init, or use optim.implementation='xla'")
        adam, schedule_state = adam[0], schedule_state[0]
        count_inc = optax.safe_increment(adam.count)  # as optax's scale_by_adam and its bias correction
        cfg, plan = self.cfg, self.plan
        leaves, treedef = jax.tree.flatten(params)
        new_params, mu, nu, stats = cpu_adamw.adamw(
            jax.tree.leaves(grads), leaves, jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu), loss=loss,
            neg_lr=-1 * self.schedule(schedule_state.count), c1=1 - cfg.b1 ** count_inc, c2=1 - cfg.b2 ** count_inc,
            b1=cfg.b1, b2=cfg.b2, eps=EPS, clip=cfg.grad_clip, weight_decay=plan.weight_decay, rows=plan.rows,
            scales=plan.scales)
        finite = stats[2] > 0
        counts = {optax.ScaleByAdamState: jnp.where(finite, count_inc, adam.count),
                  optax.ScaleByScheduleState: jnp.where(finite, optax.safe_increment(schedule_state.count),
                                                        schedule_state.count)}
        mu_tree, nu_tree = (jax.tree.unflatten(jax.tree.structure(adam.mu), x) for x in (mu, nu))

        def replace(node):
            if isinstance(node, optax.ScaleByAdamState):
                return node._replace(count=counts[optax.ScaleByAdamState], mu=mu_tree, nu=nu_tree)
            return node._replace(count=counts[optax.ScaleByScheduleState])

        new_state = jax.tree.map(lambda n: replace(n) if _is_counted(n) else n, opt_state, is_leaf=_is_counted)
        return jax.tree.unflatten(treedef, new_params), new_state, stats[0], stats[1], finite


def _is_counted(node) -> bool:
    return isinstance(node, (optax.ScaleByAdamState, optax.ScaleByScheduleState))


def _states(opt_state, kind) -> list:
    return [n for n in jax.tree.leaves(opt_state, is_leaf=_is_counted) if isinstance(n, kind)]


def kernel_plan(cfg: OptimConfig, params, scales) -> tuple[KernelPlan | None, str | None]:
    """The C++ step's per-array constants for ``params`` (shapes suffice) and per-array lr ``scales``
    (a tree of scalars or arrays [rows, 1, ...], or None for all 1): (plan, None), or (None, why not)."""
    leaves = jax.tree.leaves(params)
    mask = jax.tree.leaves(weight_decay_mask(params))
    scale_leaves = [1.0] * len(leaves) if scales is None else jax.tree.leaves(scales)
    rows, flat = [], []
    for leaf, scale in zip(leaves, scale_leaves):
        s = np.asarray(scale, np.float32)
        if s.size == 1:
            rows.append(1)
            flat.append(float(s.reshape(())))
        elif s.ndim == len(leaf.shape) and s.shape[0] == leaf.shape[0] and s.size == s.shape[0]:
            rows.append(int(s.shape[0]))
            flat.extend(float(x) for x in s.reshape(-1))
        else:
            return None, (f"a per-parameter scale of shape {s.shape} for an array of shape {leaf.shape} "
                          "(the C++ step takes one scale per array or per row of its first axis)")
    decay = tuple(float(cfg.weight_decay) if m else 0.0 for m in mask)
    return KernelPlan(decay, tuple(rows), tuple(flat)), None


def make_optimizer(cfg: OptimConfig, params, depth: int | None = None, trainable=None) -> Optimizer:
    """AdamW(schedule) with clipping, decay mask, optional layer-wise decay, per-name lr scales
    (``cfg.lr_scales``) and frozen parts.

    Args:
      params: the parameter tree (shapes suffice).
      depth: transformer depth for layer-wise decay (required if layer_decay != 1).
      trainable: optional tree of bools (or bool arrays broadcasting against the leaf, e.g.
        per layer of stacked blocks); False parameters get zero updates.
    """
    if cfg.implementation not in IMPLEMENTATIONS:
        raise ValueError(f"optim implementation {cfg.implementation!r}: choose one of {IMPLEMENTATIONS}")
    schedule = warmup_cosine(cfg.lr, cfg.min_lr, cfg.total_steps, cfg.warmup_steps)
    parts = []
    if cfg.grad_clip:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=EPS, weight_decay=cfg.weight_decay,
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
    plan, refusal = kernel_plan(cfg, params, scales)
    return Optimizer(optax.chain(*parts), schedule, cfg, plan, refusal)
