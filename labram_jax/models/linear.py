"""Linear layers, ``x @ kernel + bias``, by XLA or by the C++ product kernel for AVX2 CPUs.

:func:`linear` is the function; :class:`Dense` the Flax module (parameters ``kernel`` [Din, Dout]
and ``bias`` [Dout] as ``flax.linen.Dense``'s, so files and converted weights are unchanged).
Implementations (``TransformerConfig.linear``):

- ``xla``: one ``dot_general`` and a broadcast add, as ``flax.linen.Dense`` computes them.
- ``cpu_kernel``: :mod:`labram_jax.models.cpu_matmul` (float32 on one CPU device) for the
  forward product with the bias added as it is written, the input gradient ``dy kernel^T``, and
  the kernel gradient ``x^T dy`` with the bias gradient taken while packing ``dy``. The same
  function to float32 rounding (products summed in another order).
- ``auto``: ``cpu_kernel`` where it builds and applies (measured faster on every x86 class tried:
  BENCHMARKS.md, "Session 23" for AVX2, "Session 26" for AVX-512 on 256-bit units, "Session 36" for
  full-width AVX-512, where the kernel runs AVX-512 tiles), else ``xla``.

:func:`gelu_mlp` is a transformer block's MLP, ``GELU(x kernel_1 + bias_1) kernel_2 + bias_2``, by
the kernel alone, with GELU applied as the first product is written (BENCHMARKS.md, "Session 24");
:class:`DenseWeights` creates a layer's parameters for it. Both take a ``residual`` the output is
added to, on the kernel as the product is written (a block's branch writing the residual stream
itself: "Session 46").
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from labram_jax.models import cpu_kernels, cpu_matmul

IMPLEMENTATIONS = ("auto", "xla", "cpu_kernel")


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, implementation: str = "auto",
           residual: jax.Array | None = None) -> jax.Array:
    """``x @ kernel (+ bias)`` over x's last axis, added to ``residual`` where given.

    Args:
      x: [..., Din]; kernel: [Din, Dout]; bias: [Dout] or None;
      implementation: one of :data:`IMPLEMENTATIONS`;
      residual: [..., Dout] or None: ``residual + (x @ kernel + bias)`` (a transformer branch's last
        layer adding itself to the residual stream; on the kernel as the product is written, not as
        another pass over [..., Dout]: the same bits).
    Returns:
      [..., Dout] in the dtype x, kernel, bias (and residual) promote to.
    """
    operands = [x, kernel] + ([] if bias is None else [bias]) + ([] if residual is None else [residual])
    if resolve(implementation, *operands) == "cpu_kernel":
        rows = x.reshape(-1, x.shape[-1])
        y = _kernel(rows, kernel, jnp.zeros((0,), jnp.float32) if bias is None else bias,
                    _residual_rows(residual, rows.shape[0], kernel.shape[-1]))
        return y.reshape(*x.shape[:-1], kernel.shape[-1])
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    y = y if bias is None else y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
    return y if residual is None else residual + y


def resolve(implementation: str, *operands: jax.Array) -> str:
    """``xla`` or ``cpu_kernel``: what ``implementation`` computes these operands with (``auto``
    as the module docstring says); a ValueError saying why where ``cpu_kernel`` cannot."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"linear implementation {implementation!r}: choose one of {IMPLEMENTATIONS}")
    reason = next(filter(None, (cpu_kernels.refusal(a) for a in operands)), None)
    if implementation == "auto":
        return "xla" if reason else "cpu_kernel"
    if implementation == "cpu_kernel" and reason:
        raise ValueError(f"linear='cpu_kernel' cannot run here ({reason}); use 'xla'")
    return implementation


def matmul_transposed(a: jax.Array, b: jax.Array, implementation: str) -> jax.Array:
    """``a @ b^T`` (an input's gradient ``d_y kernel^T``; distances to a codebook): a [..., K],
    b [N, K] -> [..., N] in a's dtype; ``implementation`` ``xla`` or ``cpu_kernel`` (:func:`resolve`)."""
    if implementation == "cpu_kernel":
        return cpu_matmul.matmul(a.reshape(-1, a.shape[-1]), b, transpose_b=True).reshape(*a.shape[:-1], b.shape[0])
    return jnp.einsum("...k,nk->...n", a, b.astype(a.dtype))


def kernel_gradient(x: jax.Array, d_y: jax.Array, implementation: str) -> tuple[jax.Array, jax.Array]:
    """``(x^T d_y, d_y summed over rows)``, the kernel's and the bias's gradients, float32:
    x [..., Din], d_y [..., Dout] -> ([Din, Dout], [Dout]); ``implementation`` as
    :func:`matmul_transposed`."""
    x, d_y = x.reshape(-1, x.shape[-1]), d_y.reshape(-1, d_y.shape[-1])
    if implementation == "cpu_kernel":
        return cpu_matmul.matmul(x, d_y, transpose_a=True, b_sums=True)
    # The bias's gradient as the kernel's for an input that is always 1: one product gives both
    # (XLA:CPU's column sums over the rows were far slower than that extra row).
    ones = jnp.ones((x.shape[0], 1), x.dtype)
    both = jnp.einsum("rd,rv->dv", jnp.concatenate([x, ones], axis=-1), d_y, preferred_element_type=jnp.float32)
    return both[:-1], both[-1]


def gelu_mlp(x: jax.Array, kernel_1: jax.Array, bias_1: jax.Array, kernel_2: jax.Array,
             bias_2: jax.Array, residual: jax.Array | None = None) -> jax.Array:
    """``GELU(x kernel_1 + bias_1) kernel_2 + bias_2`` (exact GELU) by the C++ product kernel, added
    to ``residual`` where given (as :func:`linear`'s).

    GELU is computed as the first product is written (XLA:CPU took two passes over the [rows, hidden]
    activations for it). Differentiated, only the pre-activations [rows, F] are kept for the backward
    pass, which computes GELU's derivative and output again from them as ``d_y kernel_2^T`` is
    written: one [rows, F] array kept per block, not two (BENCHMARKS.md, "Session 44"). The same
    function as two ``linear`` calls around ``layers.gelu`` to float32 rounding (erf by the same
    rational approximation XLA:CPU uses).

    Args:
      x: [..., D] float32; kernel_1: [D, F]; bias_1: [F]; kernel_2: [F, E]; bias_2: [E]
        (float32 on one CPU device: :func:`resolve` says where ``cpu_kernel`` runs);
      residual: [..., E] float32 or None.
    Returns:
      [..., E] float32.
    """
    rows = x.reshape(-1, x.shape[-1])
    y = _gelu_mlp(rows, kernel_1, bias_1, kernel_2, bias_2, _residual_rows(residual, rows.shape[0], kernel_2.shape[-1]))
    return y.reshape(*x.shape[:-1], kernel_2.shape[-1])


def _residual_rows(residual: jax.Array | None, rows: int, n: int) -> jax.Array:
    """A residual [..., n] as the custom-VJP functions take it: [rows, n], or [0] for none (see :func:`_added`)."""
    return jnp.zeros((0,), jnp.float32) if residual is None else residual.reshape(rows, n)


def _added(residual: jax.Array) -> jax.Array | None:
    """A residual operand of the custom-VJP functions ([0]: none) as :func:`cpu_matmul.matmul` takes it."""
    return residual if residual.size else None


@jax.custom_vjp
def _gelu_mlp(x, kernel_1, bias_1, kernel_2, bias_2, residual):
    hidden = cpu_matmul.matmul(x, kernel_1, bias_1, gelu=True)  # not differentiated: nothing kept
    return cpu_matmul.matmul(hidden, kernel_2, bias_2, residual=_added(residual))


def _gelu_mlp_fwd(x, kernel_1, bias_1, kernel_2, bias_2, residual):
    hidden, pre = cpu_matmul.matmul(x, kernel_1, bias_1, gelu=True, pre_activation=True)  # [R, F] each
    y = cpu_matmul.matmul(hidden, kernel_2, bias_2, residual=_added(residual))
    return y, (x, kernel_1, kernel_2, pre, residual.size)


def _gelu_mlp_bwd(residuals, d_y):
    x, kernel_1, kernel_2, pre, added = residuals
    d_y = d_y.astype(jnp.float32)
    # the gradient before GELU, and GELU's output again (the same bits as the forward pass's)
    d_pre, hidden = cpu_matmul.matmul(d_y, kernel_2, transpose_b=True, gelu_gradient_of=pre)
    d_kernel_2, d_bias_2 = kernel_gradient(hidden, d_y, "cpu_kernel")
    d_x = matmul_transposed(d_pre, kernel_1, "cpu_kernel")
    d_kernel_1, d_bias_1 = kernel_gradient(x, d_pre, "cpu_kernel")
    return d_x, d_kernel_1, d_bias_1, d_kernel_2, d_bias_2, d_y if added else jnp.zeros((0,), jnp.float32)


_gelu_mlp.defvjp(_gelu_mlp_fwd, _gelu_mlp_bwd)


@jax.custom_vjp
def _kernel(x, kernel, bias, residual):
    """residual ([R, Dout], or [0] for none) + x [R, Din] @ kernel [Din, Dout] + bias ([Dout], or [0]
    for none) by the C++ kernel."""
    return cpu_matmul.matmul(x, kernel, bias if bias.size else None, residual=_added(residual))


def _kernel_fwd(x, kernel, bias, residual):
    return _kernel(x, kernel, bias, residual), (x, kernel, bias.size, residual.size)


def _kernel_bwd(residuals, d_y):
    x, kernel, bias_size, added = residuals
    d_y = d_y.astype(jnp.float32)
    d_x = matmul_transposed(d_y, kernel, "cpu_kernel")
    if bias_size:
        d_kernel, d_bias = kernel_gradient(x, d_y, "cpu_kernel")
    else:
        d_kernel, d_bias = cpu_matmul.matmul(x, d_y, transpose_a=True), jnp.zeros((0,), jnp.float32)
    return d_x, d_kernel, d_bias, d_y if added else jnp.zeros((0,), jnp.float32)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def _parameters(module: nn.Module, in_features: int) -> tuple[jax.Array, jax.Array | None]:
    """``module``'s (a :class:`Dense` or :class:`DenseWeights`) kernel [in_features, features] and
    bias [features] (None without), float32, created on first use."""
    kernel = module.param("kernel", module.kernel_init, (in_features, module.features), jnp.float32)
    bias = module.param("bias", module.bias_init, (module.features,), jnp.float32) if module.use_bias else None
    return kernel, bias


class Dense(nn.Module):
    """A linear layer over the last axis, ``flax.linen.Dense``'s parameters and arithmetic.

    Attributes:
      features: Dout; use_bias: whether it has ``bias``; dtype: the computation dtype (parameters
      stay float32); implementation: one of :data:`IMPLEMENTATIONS`; kernel_init, bias_init: the
      parameters' initialisers.
    """

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    implementation: str = "auto"
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., Din] -> [..., features] in ``dtype``."""
        kernel, bias = _parameters(self, x.shape[-1])
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return linear(x, kernel, None if bias is None else bias.astype(self.dtype), self.implementation)


class DenseWeights(nn.Module):
    """A :class:`Dense` layer's parameters alone (same names, shapes and initialisers), for functions
    that take several layers' weights at once (:func:`gelu_mlp`); calling it with Din returns
    (kernel [Din, features], bias [features] or None), float32."""

    features: int
    use_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
        return _parameters(self, in_features)
