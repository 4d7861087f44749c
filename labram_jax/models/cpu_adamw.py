"""One AdamW step over all parameter arrays in one C++ call (``cpu_adamw.cc``), for x86 CPUs with AVX2.

XLA:CPU runs optax's AdamW chain, the gradient and parameter norms and the finite-step guard as ~10
small operations per parameter array (~2,200 a step for LaBraM-Base, 17-24 ms, mostly the cost of
starting each: BENCHMARKS.md, "Session 31"). :func:`adamw` does the same arithmetic in two passes over
the arrays, updating parameters and moments in place where XLA can alias them (a donated train
state). :mod:`labram_jax.optim` decides when to use it (``config.optim.implementation``) and keeps the
optimizer state in optax's layout, so checkpoints do not depend on the choice. Building and loading:
:mod:`labram_jax.models.cpu_kernels`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from labram_jax.models import cpu_kernels

INSTEAD = "optim.implementation='xla'"


def adamw(grads: Sequence[jax.Array], params: Sequence[jax.Array], mu: Sequence[jax.Array],
          nu: Sequence[jax.Array], *, loss: jax.Array, neg_lr: jax.Array, c1: jax.Array, c2: jax.Array, b1: float,
          b2: float, eps: float, clip: float, weight_decay: Sequence[float], rows: Sequence[int],
          scales: Sequence[float]) -> tuple[list[jax.Array], list[jax.Array], list[jax.Array], jax.Array]:
    """One AdamW step by the kernel, per element in optax's order of operations.

    Args:
      grads, params, mu, nu: n float32 arrays each, array i of one shape in all four (mu, nu: Adam's first
        and second moments).
      loss: scalar; the step is not applied where it, or the gradient norm, is not finite.
      neg_lr: scalar, minus this step's learning rate (optax's ``scale_by_learning_rate``).
      c1, c2: scalars, the bias corrections ``1 - b1**t`` and ``1 - b2**t`` of step t (counted from 1).
      b1, b2, eps: Adam's decays and denominator epsilon.
      clip: the global gradient norm clipped to (0: no clipping).
      weight_decay: n floats, each array's decoupled weight decay (0: none).
      rows: n ints: array i is cut along its first axis into rows[i] rows, each with its own scale.
      scales: sum(rows) floats, the multipliers of the update of each row (layer-wise decay, per-name
        scales, 0 for frozen parameters).
    Returns:
      (new params, new mu, new nu) as lists like the inputs (each the input itself where the step was
      not applied), and stats [3] float32: the gradient norm, the new parameter norm, 1.0 where the step
      was applied, else 0.0.
    """
    n = len(params)
    if not (len(grads) == len(mu) == len(nu) == len(weight_decay) == len(rows) == n) or sum(rows) != len(scales):
        raise ValueError(f"adamw: {len(grads)} gradients, {n} parameters, {len(mu)} and {len(nu)} moments, "
                         f"{len(weight_decay)} weight decays and {len(rows)} row counts must agree, and "
                         f"{len(scales)} scales must be one per row ({sum(rows)})")
    hyper = jnp.stack([jnp.asarray(x, jnp.float32).reshape(()) for x in (loss, neg_lr, c1, c2)])
    like = [jax.ShapeDtypeStruct(p.shape, jnp.float32) for p in params]
    aliases = {1 + (group + 1) * n + i: group * n + i for group in range(3) for i in range(n)}
    out = cpu_kernels.call(
        "labram_cpu_adamw", (*like, *like, *like, jax.ShapeDtypeStruct((3,), jnp.float32)), hyper, *grads, *params,
        *mu, *nu, what="AdamW", instead=INSTEAD, aliases=aliases, b1=np.float64(b1), b2=np.float64(b2),
        eps=np.float64(eps), clip=np.float64(clip), weight_decay=np.asarray(weight_decay, np.float32),
        rows=np.asarray(rows, np.int64), scales=np.asarray(scales, np.float32))
    return list(out[:n]), list(out[n:2 * n]), list(out[2 * n:3 * n]), out[3 * n]
