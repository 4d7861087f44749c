"""LayerNorm over the last axis, by XLA or by the C++ kernel for AVX2 CPUs.

:func:`layer_norm` is the function; :class:`LayerNorm` the Flax module every LayerNorm of the
models is (parameters ``scale`` and ``bias`` as ``flax.linen.LayerNorm``'s, so files and converted
weights are unchanged). Implementations (``TransformerConfig.layer_norm``):

- ``xla``: Flax's own formula (statistics in float32, variance as E[x^2] - E[x]^2 clipped at 0);
  the very numbers ``flax.linen.LayerNorm`` gives.
- ``cpu_kernel``: :mod:`labram_jax.models.cpu_layer_norm` (float32 on one CPU device; variance in
  two passes), with its own backward pass. The same function to float32 rounding.
- ``auto``: ``cpu_kernel`` where it builds and applies (measured faster: BENCHMARKS.md, "Session
  21" for AVX2, "Session 26" for AVX-512 on 256-bit units, "Session 36" for full-width AVX-512),
  else ``xla``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from labram_jax.models import cpu_kernels, cpu_layer_norm

IMPLEMENTATIONS = ("auto", "xla", "cpu_kernel")


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float, implementation: str = "auto") -> jax.Array:
    """(x - mean) / sqrt(var + eps) * scale + bias over x's last axis.

    Args:
      x: [..., D]; scale, bias: [D]; eps: added to the (biased) variance;
      implementation: one of :data:`IMPLEMENTATIONS`.
    Returns:
      [..., D], float32 at least (x's dtype promoted with float32, scale and bias).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"layer_norm implementation {implementation!r}: choose one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        implementation = _auto(x, scale, bias)
    if implementation == "cpu_kernel":
        reason = next(filter(None, (cpu_kernels.refusal(a) for a in (x, scale, bias))), None)
        if reason:
            raise ValueError(f"layer_norm='cpu_kernel' cannot run here ({reason}); use 'xla'")
        return _kernel(x, scale, bias, eps)
    return _xla(x, scale, bias, eps)


def _auto(x, scale, bias) -> str:
    if all(cpu_kernels.refusal(a) is None for a in (x, scale, bias)):
        return "cpu_kernel"
    return "xla"


def _xla(x, scale, bias, eps):
    """flax.linen.LayerNorm's arithmetic, operation for operation and in its order (its
    ``_compute_stats`` and ``_normalize``), so that gradients too are the same to the bit."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    square = jax.lax.square(x32)
    mean, mean2 = jnp.mean(x32, axis=-1), jnp.mean(square, axis=-1)
    var = jnp.maximum(0.0, mean2 - jax.lax.square(mean))
    y = x - mean[..., None]
    y = y * (jax.lax.rsqrt(var[..., None] + eps) * scale)
    return y + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel(x, scale, bias, eps):
    return cpu_layer_norm.forward(x, scale, bias, eps)[0]


def _kernel_fwd(x, scale, bias, eps):
    y, mean, rstd = cpu_layer_norm.forward(x, scale, bias, eps)
    return y, (x, scale, mean, rstd)


def _kernel_bwd(eps, residuals, d_y):
    x, scale, mean, rstd = residuals
    return cpu_layer_norm.backward(x, scale, mean, rstd, d_y.astype(jnp.float32))


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with learned ``scale`` and ``bias`` [D] (float32 parameters).

    Attributes:
      epsilon: added to the variance; dtype: the output's dtype; implementation: one of
      :data:`IMPLEMENTATIONS`; scale_init, bias_init: the parameters' initialisers.
    """

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    implementation: str = "auto"
    scale_init: Any = nn.initializers.ones
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> [..., D] in ``dtype``."""
        d = x.shape[-1]
        scale = self.param("scale", self.scale_init, (d,), jnp.float32)
        bias = self.param("bias", self.bias_init, (d,), jnp.float32)
        return layer_norm(x, scale, bias, self.epsilon, self.implementation).astype(self.dtype)


class LayerNormWeights(nn.Module):
    """:class:`LayerNorm`'s parameters alone (the same names, shapes and initialisers), for a kernel that
    applies the norm itself (``attention.on_projection``)."""

    scale_init: Any = nn.initializers.ones
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, features: int) -> tuple[jax.Array, jax.Array]:
        """-> (scale, bias), [features] float32 each."""
        return (self.param("scale", self.scale_init, (features,), jnp.float32),
                self.param("bias", self.bias_init, (features,), jnp.float32))
