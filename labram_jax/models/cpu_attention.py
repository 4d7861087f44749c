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
import numpy as np

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


def forward(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *, scale: float = 1.0,
            token_major: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """softmax(scale q k^T + bias) v and its rows' statistics, by the kernel.

    Args:
      q: [..., H, L, K] float32 queries, or [..., L, H, K] with ``token_major`` (a projection's
        [..., L, H * K] output reshaped: no transposes); k, v: the same shape.
      bias: [..., L] float32 added to every head's scores (q's leading dims without H).
      scale: the queries' factor in the scores (LaBraM: 1/sqrt(K)).
    Returns:
      out in q's layout; row_max [..., H, L], the scores' max over the keys in base 2 (times log2 e:
      the kernels take exp(x) as 2^(x log2 e)); row_sum [..., H, L], ``sum(exp(scores - row_max / log2 e))``
      (kept apart: ``row_max + log(row_sum)`` loses ``log(row_sum)`` in
      float32 when a row has no valid key and its scores are all near -1e30).
    """
    stats = jax.ShapeDtypeStruct(_stats_shape(q, token_major), jnp.float32)
    return _call("labram_cpu_attention_forward", (jax.ShapeDtypeStruct(q.shape, jnp.float32), stats, stats),
                 q, k, v, bias, scale=scale, token_major=token_major)


def backward(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, d_out: jax.Array,
             row_max: jax.Array, row_sum: jax.Array, *, scale: float = 1.0,
             token_major: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gradients of :func:`forward`'s ``out`` with respect to q, k and v.

    Args:
      q, k, v, bias, scale, token_major: :func:`forward`'s; row_max, row_sum: its statistics;
      d_out: float32 in q's layout, the gradient with respect to its ``out`` (which the kernel
      does not read: rowsum(d_out * out) is taken as rowsum(P * dP) from rows in cache).
    Returns:
      dq, dk, dv in q's layout.
    """
    grad = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return _call("labram_cpu_attention_backward", (grad, grad, grad), q, k, v, bias, d_out, row_max, row_sum,
                 scale=scale, token_major=token_major)


def qkv_forward(qkv: jax.Array, bias: jax.Array, gamma: jax.Array | None, beta: jax.Array | None, *,
                normalize_q: bool, normalize_k: bool, eps: float,
                scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`forward` on the fused projection's output, each of q, k, v transformed first (or not).

    Args:
      qkv: [..., L, 3, H, K] float32 (a [..., L, 3 * H * K] projection reshaped): q, k, v in slots 0-2.
      bias: [..., L] float32 added to every head's scores.
      gamma, beta: [3, H, K] float32; slot s of each head becomes ``gamma[s] * t(x) + beta[s]``, with t
        the normalisation over K, ``(x - mean) / sqrt(var + eps)``, for q where ``normalize_q`` and k
        where ``normalize_k``, else x (v is never normalised). Both None: no transform (q, k, v as
        they are; the kernel packs them without the transform's passes), which normalising needs.
      scale: the transformed queries' factor in the scores.
    Returns:
      out [..., L, H, K]; row_max, row_sum [..., H, L] (:func:`forward`'s).
    """
    gamma, beta = _affine(gamma, beta, normalize_q or normalize_k)
    *lead, length, _, heads, size = qkv.shape
    stats = jax.ShapeDtypeStruct((*lead, heads, length), jnp.float32)
    out = jax.ShapeDtypeStruct((*lead, length, heads, size), jnp.float32)
    return _call("labram_cpu_qkv_attention_forward", (out, stats, stats), qkv, bias, gamma, beta,
                 normalize_q=normalize_q, normalize_k=normalize_k, eps=eps, scale=scale)


def qkv_backward(qkv: jax.Array, bias: jax.Array, gamma: jax.Array | None, beta: jax.Array | None,
                 d_out: jax.Array, row_max: jax.Array, row_sum: jax.Array, *, normalize_q: bool, normalize_k: bool,
                 eps: float, scale: float) -> tuple[jax.Array, jax.Array | None]:
    """The gradients of :func:`qkv_forward`'s ``out``.

    Args:
      qkv, bias, gamma, beta, normalize_q, normalize_k, eps, scale: :func:`qkv_forward`'s; row_max,
      row_sum: its statistics; d_out: [..., L, H, K] float32, the gradient with respect to its ``out``.
    Returns:
      d_qkv in qkv's shape; d_affine [..., H, 2, 3, K]: per (batch, head) the gradients of that head's
      ``gamma`` (index 0) and ``beta`` (index 1) rows, to be summed over the batch by the caller
      (None without gamma and beta).
    """
    affine = gamma is not None
    gamma, beta = _affine(gamma, beta, normalize_q or normalize_k)
    *lead, _, _, heads, size = qkv.shape
    d_affine = jax.ShapeDtypeStruct((*lead, heads, 2, 3, size) if affine else (0,), jnp.float32)
    d_qkv, d_affine = _call("labram_cpu_qkv_attention_backward",
                            (jax.ShapeDtypeStruct(qkv.shape, jnp.float32), d_affine), qkv, bias, gamma, beta, d_out,
                            row_max, row_sum, normalize_q=normalize_q, normalize_k=normalize_k, eps=eps, scale=scale)
    return d_qkv, d_affine if affine else None


def _affine(gamma: jax.Array | None, beta: jax.Array | None, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """The kernels' gamma and beta operands: as given, or empty for none (no transform); a ValueError
    for one without the other, or for normalising without them."""
    if (gamma is None) != (beta is None):
        raise ValueError("give gamma and beta together ([3, H, K] each), or neither (no transform)")
    if gamma is None:
        if normalize:
            raise ValueError("normalize_q or normalize_k needs gamma and beta ([3, H, K] each)")
        empty = jnp.zeros((0,), jnp.float32)
        return empty, empty
    return gamma, beta


def _stats_shape(q: jax.Array, token_major: bool) -> tuple[int, ...]:
    """[..., H, L]: one statistic per (batch, head, query)."""
    return (*q.shape[:-3], q.shape[-2], q.shape[-3]) if token_major else q.shape[:-1]


def _call(target: str, result_shapes, *args, **attrs: bool | float):
    """One of the attention targets; its attributes as the handlers bind them (bool, float32), with
    ``wide`` (the products' and softmax passes' AVX-512 forms; the same bits) where this CPU's AVX-512 units are full
    width (:func:`labram_jax.models.cpu_kernels.full_width_avx512`)."""
    attrs = {"wide": cpu_kernels.full_width_avx512(), **attrs}
    typed = {k: np.bool_(v) if isinstance(v, (bool, np.bool_)) else np.float32(v) for k, v in attrs.items()}
    return cpu_kernels.call(target, result_shapes, *args, what="attention", instead="attention='explicit'", **typed)
