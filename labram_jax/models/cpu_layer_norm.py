"""LayerNorm over the last axis as C++ kernels for x86 CPUs with AVX2 + FMA (``cpu_layer_norm.cc``).

XLA:CPU computes a LayerNorm's forward and backward as several fusions and sums the scale's and
bias's gradients over all rows in trees of 32-wide partial sums. LaBraM-Base runs 49 per forward
pass: in each of 12 blocks two over the 200-wide embedding and the q/k norms over its 20-wide heads
(rows: batch x heads x tokens), and the last norm. The kernels finish each row while it is in cache,
forward and backward, and sum the parameter gradients per thread (BENCHMARKS.md, "Session 21").
Where they apply: :func:`labram_jax.models.cpu_kernels.refusal`. Building and loading:
:mod:`labram_jax.models.cpu_kernels`; the custom VJP that uses them:
:func:`labram_jax.models.normalization.layer_norm`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from labram_jax.models import cpu_kernels

INSTEAD = "layer_norm='xla'"


def forward(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """LayerNorm of ``x`` over its last axis, by the kernel.

    Args:
      x: [..., D] float32; scale, bias: [D] float32; eps: added to the variance.
    Returns:
      y [..., D]; mean [...], each row's mean; rstd [...], each row's 1 / sqrt(variance + eps)
      (the variance biased, as LayerNorm's).
    """
    y, stats = jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
    return cpu_kernels.call("labram_cpu_layer_norm_forward", (y, stats, stats),
                            x, scale, bias, what="LayerNorm", instead=INSTEAD, vmap_method="sequential",
                            eps=np.float32(eps))


def backward(x: jax.Array, scale: jax.Array, mean: jax.Array, rstd: jax.Array,
             d_y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gradients of :func:`forward`'s ``y`` with respect to x, scale and bias.

    Args:
      x, scale: :func:`forward`'s inputs; mean, rstd: its outputs; d_y: [..., D] float32, the
      gradient with respect to ``y``.
    Returns:
      dx [..., D]; dscale, dbias [D] (summed over all rows).
    """
    grad, param = jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(scale.shape, jnp.float32)
    return cpu_kernels.call("labram_cpu_layer_norm_backward", (grad, param, param),
                            x, scale, mean, rstd, d_y, what="LayerNorm", instead=INSTEAD, vmap_method="sequential")
