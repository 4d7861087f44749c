"""Scaled dot-product attention with a key-padding mask, in three implementations.

- ``xla``: ``jax.nn.dot_product_attention`` with XLA's generic lowering.
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (flash attention on
  NVIDIA GPUs, bfloat16/float16 only). cuDNN needs a head size that is a multiple of 8, an
  even length and a full [B, 1, L, L] mask; :func:`cudnn_operands` pads q, k and v to that
  (the scores and the real output rows and columns are unchanged; the scale stays
  1/sqrt(real head size)).
- ``explicit``: the softmax written out with a hand-written backward pass
  (``dS = P * (dP - rowsum(dO * O))``), which XLA:CPU runs about twice as fast as the
  autodiff of the generic version (BENCHMARKS.md).
- ``cpu_kernel``: C++ kernels for AVX2 CPUs (``cpu_attention``), forward and backward, which
  keep each head's [L, L] matrices in cache; the backward pass recomputes the probabilities from
  the rows' max and sum of exponentials (nothing [L, L] is kept between the passes). The
  transformer blocks call them through :func:`on_projection`, on the qkv projection's own
  [B, L, 3, H, K] output with the 1/sqrt(K) scale and the q/k LayerNorm (or the tokenizer's q/v
  biases) applied inside (no slices, copies or transposes around them); :func:`token_major` takes
  q, k, v already apart in that layout.

``auto`` picks ``xla`` off CPU; on CPU ``cpu_kernel`` where the kernel works (float32, head size
<= 32, one device; measured faster than ``explicit`` on every x86 class tried, full-width AVX-512
included: BENCHMARKS.md, "Session 36"), else ``explicit``. All give the same function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from labram_jax.models import config as config_lib
from labram_jax.models import cpu_attention, cpu_kernels

IMPLEMENTATIONS = config_lib.ATTENTION_IMPLEMENTATIONS
_NEG = -1e30  # additive bias of padding keys (finite: a row with no valid key stays finite)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array,
                          implementation: str = "auto") -> jax.Array:
    """softmax(q k^T / sqrt(K) + mask) v per head.

    Args:
      q, k, v: [B, H, L, K] queries, keys, values (heads-major: the layout the explicit
        version computes in, so the projections write it directly).
      key_valid: [B, L] bool; False keys get no attention weight.
      implementation: one of IMPLEMENTATIONS.
    Returns:
      [B, H, L, K] in q's dtype.
    """
    implementation = resolve(implementation, q)
    swap = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, H, L, K] <-> [B, L, H, K]
    if implementation == "xla":
        return swap(jax.nn.dot_product_attention(swap(q), swap(k), swap(v), mask=key_valid[:, None, None, :],
                                                 implementation="xla"))
    if implementation == "cudnn":
        return swap(_cudnn(swap(q), swap(k), swap(v), key_valid))
    bias = jnp.where(key_valid, 0.0, _NEG).astype(jnp.float32)
    scale = q.shape[-1] ** -0.5
    if implementation == "cpu_kernel":
        return _kernel(q, k, v, bias, scale, False)
    return _explicit(q * jnp.asarray(scale, q.dtype), k, v, bias)


def token_major(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array) -> jax.Array:
    """:func:`dot_product_attention` by the C++ kernels on [B, L, H, K] (a fused projection's output
    reshaped, no transposes around the kernel), where :func:`resolve` gives ``cpu_kernel``.

    Args:
      q, k, v: [B, L, H, K] float32; key_valid: [B, L] bool.
    Returns:
      [B, L, H, K] float32.
    """
    _check_kernel(q)
    bias = jnp.where(key_valid, 0.0, _NEG).astype(jnp.float32)
    return _kernel(q, k, v, bias, q.shape[-1] ** -0.5, True)


def on_projection(qkv: jax.Array, key_valid: jax.Array, gamma: jax.Array | None, beta: jax.Array | None, *,
                  normalize_q: bool, normalize_k: bool, eps: float) -> jax.Array:
    """:func:`token_major` on the fused projection's output itself, with q, k and v each transformed first
    by the C++ kernels (``cpu_attention.qkv_forward``): the q/k LayerNorm inside the kernel, so q, k and v
    are never sliced out of qkv nor their gradients concatenated back.

    Args:
      qkv: [B, L, 3, H, K] float32, q, k, v in slots 0-2; key_valid: [B, L] bool.
      gamma, beta: [3, H, K] float32: slot s becomes ``gamma[s] * t(x) + beta[s]``, t the normalisation
        over K with ``eps`` for q where ``normalize_q`` and k where ``normalize_k``, else the identity;
        or both None: q, k, v as they are (no normalisation then).
    Returns:
      [B, L, H, K] float32: softmax(q k^T / sqrt(K) + mask) v of the transformed q, k, v.
    """
    _check_kernel(qkv)
    bias = jnp.where(key_valid, 0.0, _NEG).astype(jnp.float32)
    options = (("normalize_q", bool(normalize_q)), ("normalize_k", bool(normalize_k)), ("eps", float(eps)),
               ("scale", qkv.shape[-1] ** -0.5))  # the kernels' attributes, hashable
    return _qkv_kernel(qkv, bias, gamma, beta, options)


def resolve(implementation: str, q: jax.Array) -> str:
    """The implementation ``implementation`` runs on q [..., K] here (``auto`` as the module
    docstring says); a ValueError for an unknown name, or for ``cpu_kernel`` where it cannot run."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: choose one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        return _auto(q)
    if implementation == "cpu_kernel":
        _check_kernel(q)
    return implementation


def _check_kernel(q):
    reason = cpu_attention.refusal(q)
    if reason:
        raise ValueError(f"attention='cpu_kernel' cannot run here ({reason}); use 'explicit'")


def _auto(q):
    if jax.default_backend() != "cpu":
        return "xla"
    if cpu_attention.supports(q):
        return "cpu_kernel"
    return "explicit"


def _cudnn(q, k, v, key_valid):
    head, length = q.shape[-1], q.shape[1]
    q, k, v, mask = cudnn_operands(q, k, v, key_valid)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=head ** -0.5, implementation="cudnn")
    return out[:, :length, :, :head]


def cudnn_operands(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array):
    """q, k, v and the mask in the shapes cuDNN's flash attention takes, the same function.

    cuDNN wants a head size that is a multiple of 8 (LaBraM's are 20, 25, 50: zero columns add
    nothing to the scores), an even sequence length when a mask is trained through (LaBraM's are
    channels x windows + 1: a padding token whose key is masked out, its query row dropped after),
    and the mask as a full [B, 1, L, L] (a [B, 1, 1, L] one is refused: "Bias must have same seq
    length as QKV").

    Args:
      q, k, v: [B, L, H, K]; key_valid: [B, L] bool.
    Returns:
      q, k, v [B, L', H, K'] with L' = L rounded up to even and K' = K rounded up to a multiple of
      8, and the mask [B, 1, L', L'] bool (False on padding keys).
    """
    length, head = q.shape[1], q.shape[-1]
    widths = ((0, 0), (0, length % 2), (0, 0), (0, (-head) % 8))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    key_valid = jnp.pad(key_valid, ((0, 0), (0, length % 2)))  # False: the added token is never a key
    mask = jnp.broadcast_to(key_valid[:, None, None, :], (q.shape[0], 1, q.shape[1], q.shape[1]))
    return q, k, v, mask


def _row_max(s):
    """max over the last axis of s [..., M], kept: [..., 1].

    A reduction by ``a > b ? a : b`` (it skips a NaN, which still reaches the softmax through
    ``exp(s - max)``). ``jnp.max`` propagates NaNs, which XLA:CPU vectorises poorly: on the
    fine-tuning scores [8, 10, 231, 231] 2.2 ms against 0.5 (BENCHMARKS.md)."""
    return jax.lax.reduce(s, jnp.asarray(-jnp.inf, s.dtype), lambda a, b: jax.lax.select(a > b, a, b),
                          (s.ndim - 1,))[..., None]


def _forward(q, k, v, bias):
    """q (pre-scaled), k, v [B, H, L, K]; bias [B, L] -> (out [B, H, L, K], probabilities [B, H, L, L])."""
    s = jnp.einsum("bhlk,bhmk->bhlm", q, k, preferred_element_type=jnp.float32) + bias[:, None, None, :]
    e = jnp.exp(s - _row_max(s))
    p = (e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))).astype(v.dtype)
    return jnp.einsum("bhlm,bhmk->bhlk", p, v), p


@jax.custom_vjp
def _explicit(q, k, v, bias):
    return _forward(q, k, v, bias)[0]


def _explicit_fwd(q, k, v, bias):
    out, p = _forward(q, k, v, bias)
    return out, (q, k, v, p, out)


def _contract_queries(a, b):
    """``a^T b`` per head, a [B, H, L, M], b [B, H, L, K] -> [B, H, M, K] (a sum over the query axis L).

    XLA:CPU runs this product, written directly, at a third of the rate of the others (its
    kernels want the contracted axis minor in at least one operand). ``b^T a`` ([B, H, K, M])
    runs at their rate; the barrier keeps XLA from folding the transpose back into the product.
    BENCHMARKS.md, "Side by side": the fine-tuning step 1.14x as fast."""
    return jnp.swapaxes(jax.lax.optimization_barrier(jnp.einsum("bhlk,bhlm->bhkm", b, a)), -1, -2)


def _explicit_bwd(residuals, d_out):
    q, k, v, p, out = residuals
    d_v = _contract_queries(p, d_out)
    d_p = jnp.einsum("bhlk,bhmk->bhlm", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_s = (p.astype(jnp.float32) * (d_p - row)).astype(q.dtype)
    d_q = jnp.einsum("bhlm,bhmk->bhlk", d_s, k)
    d_k = _contract_queries(d_s, q)
    return d_q, d_k, d_v, None


_explicit.defvjp(_explicit_fwd, _explicit_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _kernel(q, k, v, bias, scale, token_major):
    return cpu_attention.forward(q, k, v, bias, scale=scale, token_major=token_major)[0]


def _kernel_fwd(q, k, v, bias, scale, token_major):
    out, row_max, row_sum = cpu_attention.forward(q, k, v, bias, scale=scale, token_major=token_major)
    return out, (q, k, v, bias, row_max, row_sum)


def _kernel_bwd(scale, token_major, residuals, d_out):
    q, k, v, bias, row_max, row_sum = residuals
    d_q, d_k, d_v = cpu_attention.backward(q, k, v, bias, d_out.astype(jnp.float32), row_max, row_sum,
                                           scale=scale, token_major=token_major)
    return d_q, d_k, d_v, None


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _qkv_kernel(qkv, bias, gamma, beta, options):
    return cpu_attention.qkv_forward(qkv, bias, gamma, beta, **dict(options))[0]


def _qkv_kernel_fwd(qkv, bias, gamma, beta, options):
    out, row_max, row_sum = cpu_attention.qkv_forward(qkv, bias, gamma, beta, **dict(options))
    return out, (qkv, bias, gamma, beta, row_max, row_sum)


def _qkv_kernel_bwd(options, residuals, d_out):
    qkv, bias, gamma, beta, row_max, row_sum = residuals
    d_qkv, d_affine = cpu_attention.qkv_backward(qkv, bias, gamma, beta, d_out.astype(jnp.float32), row_max, row_sum,
                                                 **dict(options))
    if d_affine is None:  # no gamma, beta
        return d_qkv, None, None, None
    d_affine = d_affine.reshape(-1, *d_affine.shape[-4:]).sum(0)  # [H, 2, 3, K]: summed over the batch
    return d_qkv, None, jnp.swapaxes(d_affine[:, 0], 0, 1), jnp.swapaxes(d_affine[:, 1], 0, 1)


_qkv_kernel.defvjp(_qkv_kernel_fwd, _qkv_kernel_bwd)
