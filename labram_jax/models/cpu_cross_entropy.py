"""Softmax cross-entropy of rows of logits and its gradient in one C++ call (``cpu_cross_entropy.cc``),
for x86 CPUs with AVX2 + FMA: the glue of :mod:`labram_jax.models.linear_cross_entropy`'s pieces (max,
exp, sums, the picked logit, argmax, the gradient) in three passes over each row while it is in cache,
the gradient written over the logits. Building and loading: :mod:`labram_jax.models.cpu_kernels`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from labram_jax.models import cpu_kernels

INSTEAD = "linear='xla'"


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          weights: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row: cross-entropy, whether the argmax is the label, and the gradient of ``weights * ce``.

    Args:
      logits: [R, V] float32; labels: [R] integer in [0, V); weights: [R] float32.
    Returns:
      gradient [R, V] float32, ``(softmax(logits) - onehot(labels)) * weights`` (computed in place of
      the logits where XLA can reuse their buffer); ce [R] float32, ``logsumexp(logits) -
      logits[label]``; correct [R] bool, the first index of the row's maximum == label (False for a row
      holding NaN, whose ce and gradient are NaN).
    """
    rows = logits.shape[:1]
    gradient, ce, correct = cpu_kernels.call(
        "labram_cpu_softmax_cross_entropy", (jax.ShapeDtypeStruct(logits.shape, jnp.float32),
                                             jax.ShapeDtypeStruct(rows, jnp.float32),
                                             jax.ShapeDtypeStruct(rows, jnp.int8)),
        logits.astype(jnp.float32), labels.astype(jnp.int32), weights.astype(jnp.float32), what="cross-entropy",
        instead=INSTEAD, aliases={0: 0}, vmap_method="sequential")
    return gradient, ce, correct.astype(bool)
