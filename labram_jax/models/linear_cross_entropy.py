"""Softmax cross-entropy of a linear head over a large vocabulary, without the [rows, vocab] logits.

Pretraining predicts one of 8,192 tokenizer codes for every patch token: ``logits = x @ kernel +
bias`` is [B, T, 8192], 48 MB at batch 8 and 3 GB at batch 512, and the plain formulation walks
that array a dozen times (logits, max and argmax, exp, sums, the gradient, a one-hot scatter, a
transposed copy for the kernel's gradient, the bias gradient's column sums). On XLA:CPU those
passes cost more than the head's three products (BENCHMARKS.md, "Session 22").

:func:`linear_cross_entropy` takes the loss as a weighted sum of per-token cross-entropies, so
its gradient is known once the forward pass has the softmax: it walks the tokens in ``chunks``
pieces (``lax.scan``), and each piece's logits live only while that piece computes its
cross-entropy, its argmax and its share of the gradients (dx, and sums into dkernel and dbias).
The backward pass then only scales what the forward pass stored by the loss's cotangent: no
product is recomputed. ``chunks=0`` is the plain formulation (the same numbers to float32
rounding; the tests compare them). Where the products run on the C++ kernel, each piece's softmax,
cross-entropy, argmax and logit gradient are one more C++ call
(:mod:`labram_jax.models.cpu_cross_entropy`): ~1.5 ms instead of ~5-7 ms of XLA fusions per
[8, 46, 8192] piece (BENCHMARKS.md, "Session 31").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from labram_jax.models import cpu_cross_entropy, linear


def linear_cross_entropy(x: jax.Array, kernel: jax.Array, bias: jax.Array, labels: jax.Array,
                         weights: jax.Array, chunks: int = 4,
                         implementation: str = "xla") -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weighted cross-entropy of ``softmax(x @ kernel + bias)`` against integer labels.

    Args:
      x: [B, T, D] hidden states (float32 or bfloat16: the products run in x's dtype, the
        softmax in float32).
      kernel: [D, V]; bias: [V] (the head's parameters).
      labels: [B, T] integer class in [0, V).
      weights: [B, T] weight of each token's cross-entropy in the loss (0 drops a token).
      chunks: pieces the T axis is walked in (padded up to a multiple); 0 = the plain
        formulation, all logits at once.
      implementation: of the three products (``TransformerConfig.linear``; labram_jax.models.linear).
    Returns:
      (loss, ce, correct): loss = sum(weights * ce), a float32 scalar and the only output with
      a gradient (with respect to x, kernel, bias and weights); ce [B, T] float32 per-token
      cross-entropy; correct [B, T] bool, argmax of the logits == label.
    """
    if chunks < 0:
        raise ValueError(f"chunks={chunks}: use 0 (all logits at once) or a positive number of pieces")
    weights = weights.astype(jnp.float32)
    implementation = linear.resolve(implementation, x, kernel, bias)
    if chunks == 0:  # one piece of all tokens, differentiated by JAX
        (ce, correct), _ = _piece(x, kernel, bias, labels, weights, implementation, grads=False, fused=False)
        return (weights * ce).sum(), jax.lax.stop_gradient(ce), correct
    loss, ce, correct = _chunked(x, kernel, bias, labels, weights, chunks, implementation)
    return loss, jax.lax.stop_gradient(ce), correct


def _piece(x, kernel, bias, labels, weights, implementation: str, grads: bool, fused: bool = True):
    """One piece of tokens, x [B, C, D] -> ((ce [B, C], correct [B, C]), gradients), the gradients
    of sum(weights * ce) being (dx [B, C, D], dkernel [D, V], dbias [V]) with ``grads``, else ().
    ``fused``: where the products run on ``cpu_kernel``, the softmax, cross-entropy, argmax and
    gradient by :func:`labram_jax.models.cpu_cross_entropy.softmax_cross_entropy` (not differentiable
    by JAX: off for ``chunks=0``)."""
    # [B, C, V] float32, as flax.linen.Dense in x's dtype then cast
    logits = linear.linear(x, kernel.astype(x.dtype), bias.astype(x.dtype), implementation).astype(jnp.float32)
    if implementation == "cpu_kernel" and fused:
        (ce, correct), dlogits = _softmax_in_kernel(logits, labels, weights)
    else:
        (ce, correct), dlogits = _softmax_in_xla(logits, labels, weights, grads)
    if not grads:
        return (ce, correct), ()
    d = dlogits.astype(x.dtype)
    dx = linear.matmul_transposed(d, kernel, implementation)
    return (ce, correct), (dx, *linear.kernel_gradient(x, d, implementation))


def _softmax_in_xla(logits, labels, weights, grads: bool):
    """logits [B, C, V] float32 -> ((ce, correct) [B, C], d sum(weights * ce) / d logits [B, C, V] or None)."""
    m = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))  # cancels out of ce (autodiff at chunks=0)
    e = jnp.exp(logits - m)
    s = e.sum(axis=-1, keepdims=True)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)
    ce = (jnp.log(s) + m - picked)[..., 0]
    # argmax (the first index of the row's maximum) as one min-reduction: XLA:CPU runs argmax's
    # (value, index) reduction one element at a time, 27 ms of a Base pretraining step of 1.2 s.
    # A row holding NaN has no maximum equal to itself: none of its tokens counts as correct.
    vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    correct = jnp.min(jnp.where(logits == m, vocab, logits.shape[-1]), axis=-1) == labels
    if not grads:
        return (ce, correct), None
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    return (ce, correct), (e / s - onehot) * weights[..., None]


def _softmax_in_kernel(logits, labels, weights):
    """:func:`_softmax_in_xla` in one C++ call, the gradient written over the logits."""
    rows = labels.size
    dlogits, ce, correct = cpu_cross_entropy.softmax_cross_entropy(logits.reshape(rows, -1), labels.reshape(rows),
                                                                  weights.reshape(rows))
    return (ce.reshape(labels.shape), correct.reshape(labels.shape)), dlogits.reshape(logits.shape)


def _split(a, chunks):
    """[B, T, ...] -> [chunks, B, T / chunks, ...] (T padded with zeros to a multiple)."""
    b, t = a.shape[:2]
    size = -(-t // chunks)
    a = jnp.pad(a, [(0, 0), (0, size * chunks - t)] + [(0, 0)] * (a.ndim - 2))
    return jnp.moveaxis(a.reshape(b, chunks, size, *a.shape[2:]), 1, 0)


def _join(a, t):
    """Inverse of :func:`_split`: [chunks, B, C, ...] -> [B, T, ...]."""
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(a.shape[0], -1, *a.shape[3:])[:, :t]


def _walk(x, kernel, bias, labels, weights, chunks, implementation, grads: bool):
    """The forward pass piece by piece: (ce, correct) and, with ``grads``, (dx, dkernel, dbias)."""
    t = x.shape[1]
    zero = (jnp.zeros(kernel.shape, jnp.float32), jnp.zeros(bias.shape, jnp.float32)) if grads else ()

    def step(sums, piece):
        x_piece, labels_piece, weights_piece = piece
        (ce, correct), g = _piece(x_piece, kernel, bias, labels_piece, weights_piece, implementation, grads)
        if not grads:
            return sums, (ce, correct)
        dx, dk, db = g
        return (sums[0] + dk, sums[1] + db), (ce, correct, dx)

    # Padded tokens carry weight 0: nothing of theirs reaches the loss or the gradients.
    pieces = (_split(x, chunks), _split(labels, chunks), _split(weights, chunks))
    sums, per_token = jax.lax.scan(step, zero, pieces)
    return tuple(_join(a, t) for a in per_token), sums


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _chunked(x, kernel, bias, labels, weights, chunks, implementation):
    (ce, correct), _ = _walk(x, kernel, bias, labels, weights, chunks, implementation, grads=False)
    return (weights * ce).sum(), ce, correct


def _chunked_forward(x, kernel, bias, labels, weights, chunks, implementation):
    (ce, correct, dx), (dkernel, dbias) = _walk(x, kernel, bias, labels, weights, chunks, implementation,
                                                grads=True)
    stored = (ce, dx, dkernel.astype(kernel.dtype), dbias.astype(bias.dtype), labels)
    return ((weights * ce).sum(), ce, correct), stored


def _chunked_backward(chunks, implementation, stored, cotangents):
    del chunks, implementation
    ce, dx, dkernel, dbias, labels = stored
    g = cotangents[0]  # ce and correct leave linear_cross_entropy without a gradient
    label_cotangent = jnp.zeros(labels.shape, jax.dtypes.float0)
    return (g.astype(dx.dtype) * dx, g.astype(dkernel.dtype) * dkernel, g.astype(dbias.dtype) * dbias,
            label_cotangent, g * ce)


_chunked.defvjp(_chunked_forward, _chunked_backward)
