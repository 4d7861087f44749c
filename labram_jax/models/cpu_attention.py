"""Softmax attention as C++ kernels for x86 CPUs with AVX2 + FMA (``cpu_attention.cc``).

XLA:CPU computes softmax attention as separate operations (scores product, softmax, value
product; five products and the softmax's gradient backward) and writes the [B, H, L, L]
matrices to memory between them; on LaBraM's 20-wide heads those products run at a fraction of
the matrix units' rate. The kernels do one (batch, head) at a time with those matrices in the
core's cache: the forward pass returns the output and each row's max and sum of exponentials,
the backward pass recomputes the probabilities from them (BENCHMARKS.md, "Session 19").
Building and loading: :mod:`labram_jax.models.cpu_kernels`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from labram_jax.models import cpu_kernels

MAX_HEAD = 32  # head sizes the kernel computes (LaBraM: 20 Base, 25 Tiny and Large; 50 Huge stays in XLA)


def refusal(q: jax.Array) -> str | None:
    """Why the kernels cannot compute attention on ``q`` here, or None: they take float32 heads of at
    most :data:`MAX_HEAD` on the CPU backend with one device (a mesh of several keeps XLA's
    partitioned attention), and need the kernels built (:func:`cpu_kernels.refusal`)."""
    if q.shape[-1] > MAX_HEAD:
        return f"it computes heads of at most {MAX_HEAD}; got heads of {q.shape[-1]}"
    return cpu_kernels.refusal(q)


def supports(q: jax.Array) -> bool:
    """Whether the kernels compute attention on ``q`` here (:func:`refusal` gives the reason if not)."""
    return refusal(q) is None


def forward(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """softmax(q k^T + bias) v and its rows' statistics, by the kernel.

    Args:
      q: [..., H, L, K] float32 queries, already scaled by 1/sqrt(K); k, v: the same shape.
      bias: [..., L] float32 added to every head's scores (q's leading dims without H).
    Returns:
      out [..., H, L, K]; row_max [..., H, L], the scores' max over the keys; row_sum [..., H, L],
      ``sum(exp(scores - row_max))`` (kept apart: ``row_max + log(row_sum)`` loses ``log(row_sum)`` in
      float32 when a row has no valid key and its scores are all near -1e30).
    """
    stats = jax.ShapeDtypeStruct(q.shape[:-1], jnp.float32)
    return _call("labram_cpu_attention_forward", (jax.ShapeDtypeStruct(q.shape, jnp.float32), stats, stats),
                 q, k, v, bias)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, out: jax.Array, d_out: jax.Array,
             row_max: jax.Array, row_sum: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gradients of :func:`forward`'s ``out`` with respect to q (the pre-scaled one), k and v.

    Args:
      q, k, v, bias: :func:`forward`'s inputs; out, row_max, row_sum: its outputs;
      d_out: [..., H, L, K] float32, the gradient with respect to ``out``.
    Returns:
      dq, dk, dv [..., H, L, K].
    """
    grad = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return _call("labram_cpu_attention_backward", (grad, grad, grad), q, k, v, bias, out, d_out, row_max, row_sum)


def _call(target: str, result_shapes, *args):
    return cpu_kernels.call(target, result_shapes, *args, what="attention", instead="attention='explicit'")
