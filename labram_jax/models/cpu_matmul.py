"""Matrix products as a C++ kernel for x86 CPUs with AVX2 + FMA (``cpu_matmul.cc``).

On CPUs without AVX-512, XLA:CPU's products (YNNPACK) at a linear layer's shapes ran at 0.80-0.90x
PyTorch/MKL's rate (BENCHMARKS.md, "Session 22"); this kernel packs both operands BLIS-style and
runs a 6 x 16 register tile of AVX2 vectors (6 x 32 of AVX-512 ones where the CPU's AVX-512 units are
full width: "Session 36"), with the bias added as the result is written and, for a weight
gradient, the bias gradient (the column sums of the output gradient) taken while packing it.
Used by :mod:`labram_jax.models.linear`; :func:`nearest` (each row's nearest code, the [M, N]
distances never in memory) by the tokenizer's quantizer. Building and loading: :mod:`labram_jax.models.cpu_kernels`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from labram_jax.models import cpu_kernels

INSTEAD = "linear='xla'"


def matmul(a: jax.Array, b: jax.Array, bias: jax.Array | None = None, *, transpose_a: bool = False,
           transpose_b: bool = False, b_sums: bool = False, factor: jax.Array | None = None,
           gelu: bool = False, pre_activation: bool = False, gelu_gradient_of: jax.Array | None = None,
           residual: jax.Array | None = None, wide: bool | None = None) -> jax.Array | tuple[jax.Array, ...]:
    """``op(a) @ op(b) (+ bias)`` by the kernel, op transposing where asked, then optionally
    ``* factor``, exact GELU, ``* GELU'(u)``, or ``residual +``, applied as the result is written.

    Args:
      a: [M, K] float32, or [K, M] with ``transpose_a``; b: [K, N], or [N, K] with ``transpose_b``;
      bias: [N] float32 added to every row, or None; b_sums: also return op(b)'s column sums;
      factor: [M, N] float32 multiplying the result element by element, or None;
      gelu: put the result through exact GELU; pre_activation: with ``gelu``, also return the sums
        before it (the GELU is the same to the bit);
      gelu_gradient_of: u [M, N] float32, pre-activations: multiply the result by GELU'(u) and also
        return GELU(u) (a GELU layer's input gradient and output from u alone, the same bits as
        ``gelu`` gives for sums u);
      residual: [M, N] float32 the result is added to (a transformer branch's last layer writing the
        residual stream itself: the same bits as ``residual + c``, without c written and read back).
        At most one of factor, gelu, gelu_gradient_of and residual.
      wide: 6 x 32 register tiles of AVX-512 vectors instead of 6 x 16 ones of AVX2 vectors (a CPU
        with AVX-512 only; the sums are added in the same order either way); None: where this CPU's
        AVX-512 units are full width (:func:`labram_jax.models.cpu_kernels.full_width_avx512`).
    Returns:
      c [M, N]; then, as asked, [N] ``op(b).sum(0)``, [M, N] the sums before GELU
      (``pre_activation``), [M, N] GELU(u) (``gelu_gradient_of``).
    """
    m = a.shape[1] if transpose_a else a.shape[0]
    n = b.shape[0] if transpose_b else b.shape[1]
    if (factor is not None) + gelu + (gelu_gradient_of is not None) + (residual is not None) > 1:
        raise ValueError("matmul: pass one of a factor, gelu=True, gelu_gradient_of and a residual, not several")
    if pre_activation and not gelu:
        raise ValueError("matmul: pre_activation=True returns the sums before GELU: it needs gelu=True")
    if wide is None:
        wide = cpu_kernels.full_width_avx512()
    gradient = gelu_gradient_of is not None
    if gradient:
        factor = gelu_gradient_of
    if factor is not None and tuple(factor.shape) != (m, n):
        name = "gelu_gradient_of" if gradient else "factor"
        raise ValueError(f"matmul: {name} must have the product's shape [M, N] = {[m, n]} (op(a) [M, K], op(b) "
                         f"[K, N]); got {list(factor.shape)}")
    if residual is not None and tuple(residual.shape) != (m, n):
        raise ValueError(f"matmul: residual must have the product's shape [M, N] = {[m, n]}; got "
                         f"{list(residual.shape)}")
    side = pre_activation or gradient
    none = jnp.zeros((0,), jnp.float32)
    result = jax.ShapeDtypeStruct
    c, sums, side_result = cpu_kernels.call(
        "labram_cpu_matmul", (result((m, n), jnp.float32), result((n if b_sums else 0,), jnp.float32),
                              result((m, n) if side else (0,), jnp.float32)),
        a, b, none if bias is None else bias, none if factor is None else factor,
        none if residual is None else residual, what="matmul", instead=INSTEAD,
        vmap_method="sequential", transpose_a=np.bool_(transpose_a), transpose_b=np.bool_(transpose_b),
        gelu=np.bool_(gelu), gelu_gradient=np.bool_(gradient), wide=np.bool_(wide))
    extras = (sums,) * b_sums + (side_result,) * side
    return (c, *extras) if extras else c


def nearest(z: jax.Array, codebook: jax.Array, wide: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """Each row's nearest code by the kernel, without the [M, N] distances ever in memory.

    Args:
      z: [M, d] float32; codebook: [N, d] float32; wide: the products z . w on :func:`matmul`'s AVX-512
        tiles (the same sums, so the same codes); None: where this CPU's AVX-512 units are full width.
    Returns:
      codes [M] int32, ``argmin_j (|z_i|^2 + |w_j|^2) - 2 z_i . w_j`` (the first on ties, the first
      NaN if any, as ``jnp.argmin``), and those squared distances [M] float32.
    """
    if wide is None:
        wide = cpu_kernels.full_width_avx512()
    return cpu_kernels.call("labram_cpu_nearest", (jax.ShapeDtypeStruct(z.shape[:1], jnp.int32),
                                                   jax.ShapeDtypeStruct(z.shape[:1], jnp.float32)),
                            z, codebook, what="nearest-code", instead=INSTEAD, vmap_method="sequential",
                            wide=np.bool_(wide))
