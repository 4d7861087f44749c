"""LayerNorm: the XLA path is flax.linen.LayerNorm's arithmetic; the C++ kernel for AVX2 CPUs computes
the same function and gradients; when each is used."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labram_jax import sharding
from labram_jax.models import config as model_config, cpu_kernels, cpu_layer_norm, layers, normalization
from tests.conftest import CPU_CLASSES

needs_kernel = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None,
                                  reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")


def _inputs(seed, shape, offset=0.0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape) * 3.0 + offset, jnp.float32)
    scale = jnp.asarray(1.0 + 0.3 * rng.standard_normal(shape[-1]), jnp.float32)
    bias = jnp.asarray(0.3 * rng.standard_normal(shape[-1]), jnp.float32)
    g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return x, scale, bias, g


def _run(impl, x, scale, bias, g):
    f = lambda x, s, b: normalization.layer_norm(x, s, b, 1e-6, impl)  # noqa: E731
    out, vjp = jax.vjp(jax.jit(f), x, scale, bias)
    return out, vjp(g)


def _float64(x, scale, bias, g, eps=1e-6):
    """LayerNorm and its gradients in float64 numpy (two-pass variance), the ground truth."""
    x, scale, bias, g = (np.asarray(a, np.float64) for a in (x, scale, bias, g))
    mean = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    gs = g * scale
    dx = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
    rows = tuple(range(x.ndim - 1))
    return xhat * scale + bias, (dx, (g * xhat).sum(rows), g.sum(rows))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_module_on_xla_is_flax_layer_norm_bit_for_bit(dtype):
    x, _, _, g = _inputs(0, (3, 7, 20))
    x = x.astype(dtype)
    ours = layers.layer_norm("kv", dtype=dtype, implementation="xla")
    flax_ln = nn.LayerNorm(epsilon=layers.LN_EPS, dtype=dtype, scale_init=layers.logical(nn.initializers.ones, ("kv",)),
                           bias_init=layers.logical(nn.initializers.zeros, ("kv",)))
    variables = flax_ln.init(jax.random.key(0), x)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)  # same names, boxes
    assert ours.init(jax.random.key(0), x)["params"]["scale"].names == ("kv",)
    params = {"params": {"scale": jnp.linspace(0.5, 1.5, 20), "bias": jnp.linspace(-1.0, 1.0, 20)}}

    def run(module):
        out, vjp = jax.vjp(lambda p, x: module.apply(p, x), params, x)
        return out, vjp(g.astype(out.dtype))

    (out_o, grads_o), (out_f, grads_f) = run(ours), run(flax_ln)
    assert out_o.dtype == out_f.dtype == dtype
    np.testing.assert_array_equal(out_o, out_f)
    jax.tree.map(np.testing.assert_array_equal, grads_o, grads_f)


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 5, 200), (3, 4, 37, 20), (64, 7), (130, 8), (3, 1), (2, 203), (1, 0, 20),
                                   (2, 2801, 200), (2, 2801, 203)])
# the last two: split over the threads (2^15 elements per range at least); 203 with a partial last vector, written whole
# before a range's last row and masked there (the next row may be another thread's, already written)
def test_kernel_matches_xla_and_float64(shape):
    x, scale, bias, g = _inputs(sum(shape), shape)
    out_k, grads_k = _run("cpu_kernel", x, scale, bias, g)
    out_x, grads_x = _run("xla", x, scale, bias, g)
    out_t, grads_t = _float64(x, scale, bias, g)
    np.testing.assert_allclose(out_k, out_x, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(out_k, out_t, rtol=1e-5, atol=2e-6)
    for k, xla, truth in zip(grads_k, grads_x, grads_t):
        np.testing.assert_allclose(k, xla, rtol=1e-4, atol=5e-5)
        np.testing.assert_allclose(k, truth, rtol=1e-4, atol=5e-5)


@needs_kernel
def test_kernel_keeps_precision_far_from_zero_and_nan_to_its_row():
    # mean 1000, spread 3: XLA's E[x^2] - E[x]^2 loses the variance's low digits, the kernel's two passes do not
    x, scale, bias, g = _inputs(5, (70, 20), offset=1000.0)
    out_k, grads_k = _run("cpu_kernel", x, scale, bias, g)
    out_t, grads_t = _float64(x, scale, bias, g)
    np.testing.assert_allclose(out_k, out_t, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads_k[0], grads_t[0], rtol=1e-3, atol=1e-3)
    y = cpu_layer_norm.forward(x.at[3, 4].set(jnp.nan), scale, bias, 1e-6)[0]
    rows_with_nan = np.isnan(np.asarray(y)).any(axis=-1)
    assert rows_with_nan[3] and rows_with_nan.sum() == 1


@needs_kernel
def test_kernel_returns_row_statistics_and_runs_under_vmap():
    x, scale, bias, _ = _inputs(6, (4, 9, 20))
    y, mean, rstd = jax.jit(cpu_layer_norm.forward, static_argnums=3)(x, scale, bias, 1e-6)
    np.testing.assert_allclose(mean, x.mean(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rstd, 1.0 / jnp.sqrt(x.var(-1) + 1e-6), rtol=1e-5)
    f = lambda x, s: normalization.layer_norm(x, s, bias, 1e-6, "cpu_kernel")  # noqa: E731
    batched = jax.vmap(f)(x, jnp.stack([scale * (i + 1) for i in range(4)]))
    for i in range(4):
        np.testing.assert_allclose(batched[i], f(x[i], scale * (i + 1)), rtol=1e-6, atol=1e-6)


@needs_kernel
def test_block_gradients_do_not_depend_on_the_implementation():
    cfg = model_config.labram("tiny")
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 9, cfg.embed_dim)), jnp.float32)
    valid = jnp.asarray(np.array([[True] * 9, [True] * 6 + [False] * 3]))
    block = layers.Block(cfg.replace(layer_norm="xla"), 1)
    variables = block.init(jax.random.key(0), x, valid)
    results = []
    for impl in ("xla", "cpu_kernel"):
        block = layers.Block(cfg.replace(layer_norm=impl), 1)
        results.append(jax.value_and_grad(lambda v, x: jnp.sum(block.apply(v, x, valid) ** 2), argnums=(0, 1))(
            variables, x))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), results[0][1], results[1][1])


def test_auto_uses_the_kernel_on_every_cpu_class_where_it_applies(monkeypatch):
    x = jnp.zeros((4, 20), jnp.float32)
    scale = jnp.ones(20, jnp.float32)
    monkeypatch.setattr(cpu_kernels, "refusal", lambda a: None)
    for flags, ratio in CPU_CLASSES:
        monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: flags)
        monkeypatch.setattr(cpu_kernels, "avx512_rate_ratio", lambda: ratio)
        assert normalization._auto(x, scale, scale) == "cpu_kernel", (flags, ratio)
    monkeypatch.setattr(cpu_kernels, "refusal", lambda a: "no" if a.dtype == jnp.bfloat16 else None)
    assert normalization._auto(x.astype(jnp.bfloat16), scale, scale) == "xla"


@needs_kernel
def test_kernel_is_refused_where_it_does_not_compute():
    x, scale, bias, _ = _inputs(0, (2, 6, 20))
    with pytest.raises(ValueError, match="bfloat16.*use 'xla'"):
        normalization.layer_norm(x.astype(jnp.bfloat16), scale, bias, 1e-6, "cpu_kernel")
    with pytest.raises(ValueError, match="choose one of"):
        normalization.layer_norm(x, scale, bias, 1e-6, "fused")
    with pytest.raises(ValueError, match="layer_norm="):
        model_config.labram("tiny", layer_norm="fused")
    mesh = sharding.make_mesh((-1, 1, 1))
    assert mesh.size > 1, "the unit tests run with several fake CPU devices"
    with jax.set_mesh(mesh):
        assert normalization._auto(x, scale, bias) == "xla"  # several devices: XLA's partitioned LayerNorm
        with pytest.raises(ValueError, match=f"{mesh.size} device"):
            normalization.layer_norm(x, scale, bias, 1e-6, "cpu_kernel")


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("LABRAM_JAX_CPU_KERNEL", "0")
    x = jnp.zeros((3, 20), jnp.float32)
    scale = jnp.ones(20, jnp.float32)
    assert normalization._auto(x, scale, scale) == "xla"
    with pytest.raises(RuntimeError,
                       match="LayerNorm kernel cannot be used: LABRAM_JAX_CPU_KERNEL=0. Use layer_norm='xla'"):
        cpu_layer_norm.forward(x, scale, scale, 1e-6)
    with pytest.raises(ValueError, match="LABRAM_JAX_CPU_KERNEL=0.*use 'xla'"):
        normalization.layer_norm(x, scale, scale, 1e-6, "cpu_kernel")
