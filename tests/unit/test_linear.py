"""Linear layers: the XLA path is flax.linen.Dense's arithmetic; the C++ product kernel for AVX2 CPUs
computes the same products (every transpose, the bias, the bias gradient, the contraction split
between threads) and gradients; where each is used."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labram_jax import sharding
from labram_jax.models import config as model_config, cpu_kernels, cpu_matmul, layers, linear
from labram_jax.models import linear_cross_entropy, tokenizer, transformer
from tests.conftest import CPU_CLASSES

needs_kernel = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None,
                                  reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")
HAS_AVX512 = "avx512f" in cpu_kernels.cpu_flags()
# The product kernel's register tiles: 6 x 16 of AVX2 vectors, and 6 x 32 of AVX-512 ones (`wide`).
WIDTHS = [pytest.param(False, id="avx2"),
          pytest.param(True, id="wide", marks=pytest.mark.skipif(not HAS_AVX512, reason="the CPU has no AVX-512"))]


def _normal(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@needs_kernel
@pytest.mark.parametrize("m, k, n", [
    (1, 1, 1), (7, 5, 17), (13, 600, 33),  # one part (under 4 MFLOP), edge tiles of 6 rows and 16 columns
    (25, 13, 40),          # whole 6-row panels packed 8 columns at a time, then 5 one by one; a 1-row panel
    (9, 40, 25),           # the last panel 9 columns wide: a 16-column tile, not the 8-column one
    (11, 30, 16), (8, 9, 49),  # wide: one 16-column vector, whole; the last panel 17 columns (two vectors)
    (500, 64, 80),         # parts by rows, op(b) packed once beforehand (with its column sums)
    (300, 513, 4100),      # parts by columns, op(a) packed once; contraction in 3 blocks; N > 4,080 (4,064) columns
    (40, 200, 520),        # parts by columns (N > M); the last panel 8 columns wide (the half tile, as N = 200)
    (200, 1500, 120),      # the contraction split between parts, summed at the end (a weight gradient)
    (5, 0, 3), (0, 4, 3)])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("wide", WIDTHS)
def test_kernel_product_matches_float64(m, k, n, transpose_a, transpose_b, wide):
    a, b, bias = _normal(m + k, m, k), _normal(n + k, k, n), _normal(n, n)
    stored_a, stored_b = (a.T.copy() if transpose_a else a), (b.T.copy() if transpose_b else b)
    run = jax.jit(lambda x, y, z: cpu_matmul.matmul(x, y, z, transpose_a=transpose_a, transpose_b=transpose_b,
                                                    b_sums=True, wide=wide))
    c, sums = run(stored_a, stored_b, bias)
    truth = a.astype(np.float64) @ b + bias
    scale = np.sqrt(max(k, 1))  # float32 sums of k products of unit normals
    np.testing.assert_allclose(c, truth, rtol=1e-5, atol=2e-6 * scale)
    np.testing.assert_allclose(sums, b.astype(np.float64).sum(0), rtol=1e-5, atol=2e-6 * scale)
    plain = jax.jit(lambda x, y: cpu_matmul.matmul(x, y, transpose_a=transpose_a, transpose_b=transpose_b, wide=wide))
    np.testing.assert_allclose(plain(stored_a, stored_b), truth - bias, rtol=1e-5, atol=2e-6 * scale)


@needs_kernel
@pytest.mark.skipif(not HAS_AVX512, reason="the CPU has no AVX-512")
@pytest.mark.parametrize("m, k, n, transpose_a", [(1848, 200, 600, False), (37, 300, 45, False),
                                                 (200, 1848, 800, True), (40, 200, 520, False),
                                                 (25, 13, 40, True), (1480, 800, 200, False)])
def test_wide_tiles_add_in_the_same_order_as_avx2_ones(m, k, n, transpose_a):
    # Each output element is the same chain of FMAs over the contraction in both widths (the blocks of
    # the contraction and its split between parts do not depend on the tile): the same bits.
    a, b, bias = _normal(m, k, m) if transpose_a else _normal(m, m, k), _normal(n, k, n), _normal(k, n)
    run = jax.jit(lambda x, y, z, wide: cpu_matmul.matmul(x, y, z, transpose_a=transpose_a, b_sums=True, wide=wide),
                  static_argnames="wide")
    for narrow, wide in zip(run(a, b, bias, wide=False), run(a, b, bias, wide=True)):
        np.testing.assert_array_equal(wide, narrow)
    # the epilogues 16 floats at a time where wide (the last columns 8 at a time and one by one): the same bits
    factor = _normal(m + n, m, n)
    epilogues = jax.jit(lambda x, y, z, f, wide: (
        cpu_matmul.matmul(x, y, z, transpose_a=transpose_a, gelu=True, pre_activation=True, wide=wide),
        cpu_matmul.matmul(x, y, z, transpose_a=transpose_a, gelu=True, wide=wide),
        cpu_matmul.matmul(x, y, z, transpose_a=transpose_a, gelu_gradient_of=f, wide=wide),
        cpu_matmul.matmul(x, y, z, transpose_a=transpose_a, factor=f, wide=wide)), static_argnames="wide")
    for narrow, wide in zip(jax.tree.leaves(epilogues(a, b, bias, factor, wide=False)),
                            jax.tree.leaves(epilogues(a, b, bias, factor, wide=True))):
        np.testing.assert_array_equal(wide, narrow)


@needs_kernel
@pytest.mark.parametrize("transpose_b", [False, True])
def test_a_rows_products_do_not_depend_on_the_tile_that_computes_them(transpose_b):
    # AVX2: the last 8 of N = 200 columns are summed in 12 x 8 tiles (two 6-row panels) where 12 rows of a
    # block are left, in 6 x 8 tiles after them, and for a lone row in a tile of one: each element the same
    # chain of FMAs over the contraction (blocked alike: K = 800 is not split at either size), so the same bits.
    m, k, n = 1480, 800, 200
    a, b, bias = _normal(1, m, k), _normal(2, k, n), _normal(3, n)
    stored_b = b.T.copy() if transpose_b else b  # transposed: op(b) packed 8 stored rows at a time
    run = jax.jit(lambda x, y, z: cpu_matmul.matmul(x, y, z, transpose_b=transpose_b, wide=False))
    whole = np.asarray(run(a, stored_b, bias))
    np.testing.assert_allclose(whole, a.astype(np.float64) @ b + bias, rtol=1e-5, atol=2e-6 * np.sqrt(k))
    for r in (0, 5, 6, 11, 12, 167, 168, 1343, 1344, 1475, 1479):  # first, inner and last rows of tiles and blocks
        np.testing.assert_array_equal(np.asarray(run(a[r:r + 1], stored_b, bias))[0], whole[r])


@needs_kernel
@pytest.mark.skipif(HAS_AVX512, reason="the CPU has AVX-512: the wide tiles run here")
def test_wide_tiles_are_refused_without_avx512():
    with pytest.raises(Exception, match="needs a CPU with AVX-512"):
        jax.block_until_ready(cpu_matmul.matmul(jnp.ones((4, 3)), jnp.ones((3, 2)), wide=True))
    with pytest.raises(Exception, match="nearest: wide=true needs a CPU with AVX-512"):
        jax.block_until_ready(cpu_matmul.nearest(jnp.ones((4, 3)), jnp.ones((5, 3)), wide=True))


@needs_kernel
def test_kernel_product_is_repeatable_and_keeps_nan_to_its_row():
    a, b = _normal(1, 2960, 200), _normal(2, 200, 800)
    run = jax.jit(lambda x, y: cpu_matmul.matmul(x, y))
    first = np.asarray(run(a, b))
    for _ in range(3):  # parts claimed by whichever thread comes first: the same numbers every call
        np.testing.assert_array_equal(run(a, b), first)
    a[17, 3] = np.nan
    rows_with_nan = np.isnan(np.asarray(run(a, b))).any(axis=-1)
    assert rows_with_nan[17] and rows_with_nan.sum() == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_module_on_xla_is_flax_dense_bit_for_bit(dtype):
    x = jnp.asarray(_normal(0, 3, 7, 20), dtype)
    ours = layers.dense(30, ("embed", "mlp"), "fc1", dtype=dtype, implementation="xla")
    flax_dense = nn.Dense(30, dtype=dtype, kernel_init=layers.logical(layers.trunc_normal(), ("embed", "mlp")),
                          bias_init=layers.logical(nn.initializers.zeros, ("mlp",)))
    variables = flax_dense.init(jax.random.key(0), x)
    mine = ours.init(jax.random.key(0), x)
    assert jax.tree.structure(mine) == jax.tree.structure(variables)  # same names and boxes
    assert mine["params"]["kernel"].names == ("embed", "mlp")
    jax.tree.map(np.testing.assert_array_equal, nn.unbox(mine), nn.unbox(variables))  # same initial values
    g = jnp.asarray(_normal(1, 3, 7, 30), dtype)

    def run(module):
        out, vjp = jax.vjp(lambda p, x: module.apply(p, x), nn.unbox(variables), x)
        return out, vjp(g)

    (out_o, grads_o), (out_f, grads_f) = run(ours), run(flax_dense)
    assert out_o.dtype == out_f.dtype == dtype
    np.testing.assert_array_equal(out_o, out_f)
    jax.tree.map(np.testing.assert_array_equal, grads_o, grads_f)


@needs_kernel
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 9, 20), (370, 200), (4, 185, 200)])
def test_kernel_matches_xla_with_gradients(shape, with_bias):
    x = jnp.asarray(_normal(0, *shape))
    kernel = jnp.asarray(_normal(1, shape[-1], 48) * 0.1)
    bias = jnp.asarray(_normal(2, 48)) if with_bias else None
    g = jnp.asarray(_normal(3, *shape[:-1], 48))

    def run(impl):
        out, vjp = jax.vjp(jax.jit(lambda x, w, *b: linear.linear(x, w, *(b or [None]), implementation=impl)),
                           x, kernel, *([bias] if with_bias else []))
        return out, vjp(g)

    (out_k, grads_k), (out_x, grads_x) = run("cpu_kernel"), run("xla")
    np.testing.assert_allclose(out_k, out_x, rtol=1e-5, atol=1e-5)
    assert len(grads_k) == (3 if with_bias else 2)
    for a, b in zip(grads_k, grads_x):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4)


@needs_kernel
@pytest.mark.parametrize("impl, products", [("xla", 0), ("cpu_kernel", 2)])
def test_the_tokenizers_task_heads_and_code_patch_embedding_take_the_configs_linear(impl, products):
    x = jnp.asarray(_normal(10, 2, 7, 16))
    head = tokenizer.TaskHead(16, 12, "freq", impl)
    hlo = jax.jit(head.apply).lower(head.init(jax.random.key(0), x), x).as_text()
    assert hlo.count("labram_cpu_matmul") == products
    # a code-input transformer (the tokenizer's decoder): a block's products, then one more (the patch embedding)
    codes, ids = jnp.asarray(_normal(11, 2, 3, 4, 8)), jnp.arange(1, 4)
    counts = []
    for depth in (1, 2):
        model = transformer.NeuralTransformer(
            model_config.labram("tiny").replace(linear=impl, temporal_channels=0, in_dim=8, depth=depth))
        variables = model.init(jax.random.key(0), codes, ids)
        hlo = jax.jit(lambda v: model.apply(v, codes, ids)).lower(variables).as_text()
        counts.append(hlo.count("labram_cpu_matmul"))
    per_block = counts[1] - counts[0]
    assert counts[0] - per_block == products // 2


@needs_kernel
def test_block_and_loss_head_do_not_depend_on_the_implementation():
    cfg = model_config.labram("tiny")
    x = jnp.asarray(_normal(3, 2, 9, cfg.embed_dim))
    valid = jnp.asarray(np.array([[True] * 9, [True] * 6 + [False] * 3]))
    variables = layers.Block(cfg.replace(linear="xla"), 1).init(jax.random.key(0), x, valid)
    results = []
    for impl in ("xla", "cpu_kernel"):
        block = layers.Block(cfg.replace(linear=impl), 1)
        results.append(jax.value_and_grad(lambda v, x: jnp.sum(block.apply(v, x, valid) ** 2), argnums=(0, 1))(
            variables, x))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), results[0][1], results[1][1])

    # the pretraining loss head: its three products (logits, dx, dkernel with dbias) by the kernel
    hidden, kernel, bias = jnp.asarray(_normal(4, 2, 37, 24)), jnp.asarray(_normal(5, 24, 300) * 0.2), jnp.zeros(300)
    labels = jnp.asarray(np.random.default_rng(6).integers(0, 300, (2, 37)))
    weights = jnp.asarray(np.random.default_rng(7).random((2, 37)), jnp.float32)
    outs = {}
    for impl in ("xla", "cpu_kernel"):
        f = lambda h, k, b: linear_cross_entropy.linear_cross_entropy(h, k, b, labels, weights, 3, impl)[0]  # noqa: E731
        outs[impl] = jax.value_and_grad(f, argnums=(0, 1, 2))(hidden, kernel, bias)
    np.testing.assert_allclose(outs["cpu_kernel"][0], outs["xla"][0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), outs["cpu_kernel"][1],
                 outs["xla"][1])

    # the tokenizer's nearest codes
    z, codebook = jnp.asarray(_normal(8, 500, 32)), jnp.asarray(_normal(9, 1024, 32))
    np.testing.assert_allclose(tokenizer.squared_distances(z, codebook, "cpu_kernel"),
                               tokenizer.squared_distances(z, codebook, "xla"), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("flags, ratio", CPU_CLASSES)
def test_auto_uses_the_kernel_wherever_it_applies_with_tiles_as_wide_as_the_units(monkeypatch, flags, ratio):
    x, w = jnp.zeros((4, 20), jnp.float32), jnp.zeros((20, 8), jnp.float32)
    monkeypatch.setattr(cpu_kernels, "refusal", lambda a: None)
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: flags)
    monkeypatch.setattr(cpu_kernels, "avx512_rate_ratio",
                        (lambda: ratio) if ratio else (lambda: pytest.fail("probed a CPU without AVX-512")))
    assert linear.resolve("auto", x, w) == "cpu_kernel"
    assert cpu_kernels.full_width_avx512() == (ratio == 2.0)
    monkeypatch.setattr(cpu_kernels, "refusal", lambda a: "no" if a.dtype == jnp.bfloat16 else None)
    assert linear.resolve("auto", x.astype(jnp.bfloat16), w) == "xla"
    assert linear.resolve("xla", x, w) == "xla"


@needs_kernel
def test_kernel_is_refused_where_it_does_not_compute(monkeypatch):
    x, w = jnp.ones((2, 6, 20), jnp.float32), jnp.ones((20, 8), jnp.float32)
    with pytest.raises(ValueError, match="bfloat16.*use 'xla'"):
        linear.linear(x.astype(jnp.bfloat16), w, implementation="cpu_kernel")
    with pytest.raises(ValueError, match="choose one of"):
        linear.linear(x, w, implementation="fused")
    with pytest.raises(ValueError, match="linear="):
        model_config.labram("tiny", linear="fused")
    mesh = sharding.make_mesh((-1, 1, 1))
    assert mesh.size > 1, "the unit tests run with several fake CPU devices"
    with jax.set_mesh(mesh):
        assert linear.resolve("auto", x, w) == "xla"  # several devices: XLA's partitioned products
        with pytest.raises(ValueError, match=f"{mesh.size} device"):
            linear.linear(x, w, implementation="cpu_kernel")
    monkeypatch.setenv("LABRAM_JAX_CPU_KERNEL", "0")
    assert linear.resolve("auto", x, w) == "xla"
    with pytest.raises(RuntimeError, match="matmul kernel cannot be used: LABRAM_JAX_CPU_KERNEL=0. Use linear='xla'"):
        cpu_matmul.matmul(x[0], w)


def _gelu64(h):
    """GELU and its derivative in float64."""
    from scipy.special import erf
    cdf = 0.5 * (1.0 + erf(h / np.sqrt(2.0)))
    return h * cdf, cdf + h * np.exp(-0.5 * h * h) / np.sqrt(2.0 * np.pi)


@needs_kernel
@pytest.mark.parametrize("m, k, n, transpose_b", [
    (7, 5, 21, False),      # one part; an edge tile of 6 rows, the last 5 columns through the padded copy
    (13, 600, 33, False),   # the contraction in 3 blocks: the epilogue once, on the whole sums
    (500, 64, 803, False),  # parts by columns; columns not a multiple of 8
    (900, 200, 96, True),   # parts by rows; op(b) transposed (an input gradient)
    (40, 3000, 48, False),  # a shape the contraction split would take: not with an epilogue
    (5, 0, 3, False)])      # no contraction: the epilogue on the bias
@pytest.mark.parametrize("wide", WIDTHS)
def test_kernel_epilogues_match_float64(m, k, n, transpose_b, wide):
    a, b, bias, factor = _normal(m, m, k), _normal(k, k, n) * 0.3, _normal(n, n), _normal(m + n, m, n)
    stored_b = b.T.copy() if transpose_b else b
    h = a.astype(np.float64) @ b + bias
    scale = np.sqrt(max(k, 1)) * 0.3
    gelu, pre = jax.jit(lambda x, y, z: cpu_matmul.matmul(x, y, z, transpose_b=transpose_b, gelu=True,
                                                          pre_activation=True, wide=wide))(a, stored_b, bias)
    want_gelu, want_derivative = _gelu64(h)
    np.testing.assert_allclose(gelu, want_gelu, rtol=1e-5, atol=3e-6 * scale)
    np.testing.assert_allclose(pre, h, rtol=1e-5, atol=2e-6 * scale)
    # the sums before GELU to the bit: the product times ones (an epilogue too, so never split along K)
    ones = np.ones((m, n), np.float32)
    np.testing.assert_array_equal(cpu_matmul.matmul(a, stored_b, bias, transpose_b=transpose_b, factor=ones, wide=wide),
                                  pre)
    gelu_only = cpu_matmul.matmul(a, stored_b, bias, transpose_b=transpose_b, gelu=True, wide=wide)
    np.testing.assert_array_equal(gelu_only, gelu)  # one array; the same GELU to the bit
    multiplied = jax.jit(lambda x, y, z, f: cpu_matmul.matmul(x, y, z, transpose_b=transpose_b, factor=f,
                                                              wide=wide))(a, stored_b, bias, factor)
    np.testing.assert_allclose(multiplied, h * factor, rtol=1e-5, atol=3e-6 * scale * np.abs(factor).max())
    # times GELU'(u) of a factor u of pre-activations, and GELU(u): u = the sums above gives the GELU above
    for u in (factor, pre):
        through, again = jax.jit(lambda x, y, z, f: cpu_matmul.matmul(
            x, y, z, transpose_b=transpose_b, gelu_gradient_of=f, wide=wide))(a, stored_b, bias, u)
        want_again, want_slope = _gelu64(np.asarray(u, np.float64))
        # GELU' lies in [-0.17, 1.13]: the float32 sums' error, plus erf's and exp's few ulps
        np.testing.assert_allclose(through, h * want_slope, rtol=1e-5, atol=4e-6 * scale * np.abs(h).max())
        np.testing.assert_allclose(again, want_again, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(again, gelu)  # from the kept pre-activations, the forward's GELU to the bit
    # added to a residual: the sums above plus it, to the bit (float32's one rounding of the addition)
    residual = _normal(2 * m + n, m, n)
    added = jax.jit(lambda x, y, z, r: cpu_matmul.matmul(x, y, z, transpose_b=transpose_b, residual=r,
                                                         wide=wide))(a, stored_b, bias, residual)
    np.testing.assert_array_equal(added, residual + np.asarray(pre))
    for mix in (dict(gelu=True, factor=factor), dict(gelu=True, gelu_gradient_of=factor),
                dict(factor=factor, gelu_gradient_of=factor), dict(residual=factor, gelu=True),
                dict(residual=factor, factor=factor)):
        with pytest.raises(ValueError, match="not several"):
            cpu_matmul.matmul(a, stored_b, transpose_b=transpose_b, **mix)
    with pytest.raises(ValueError, match="needs gelu=True"):
        cpu_matmul.matmul(a, stored_b, transpose_b=transpose_b, pre_activation=True)
    for wrong in (dict(factor=factor[:-1]), dict(gelu_gradient_of=factor.T), dict(residual=factor[:, :-1])):
        with pytest.raises(ValueError, match=rf"{next(iter(wrong))} must have the product's shape \[M, N\]"):
            cpu_matmul.matmul(a, stored_b, transpose_b=transpose_b, **wrong)


@needs_kernel
@pytest.mark.parametrize("impl", ["cpu_kernel", "xla"])
def test_a_residual_is_added_as_the_last_product_is_written_to_the_bit(impl):
    # a branch's last layer adding itself to the residual stream (Block, outside drop path): the same bits and
    # gradients as the addition after it, for linear and for the fused MLP
    x, residual, g = (jnp.asarray(_normal(s, 2, 185, 200)) for s in (20, 21, 22))
    w, b = jnp.asarray(_normal(23, 200, 200) * 0.05), jnp.asarray(_normal(24, 200))
    mlp = (jnp.asarray(_normal(25, 200, 800) * 0.05), jnp.asarray(_normal(26, 800)),
           jnp.asarray(_normal(27, 800, 200) * 0.05), jnp.asarray(_normal(28, 200)))
    layers_ = {"linear": (lambda x, w, b, residual=None: linear.linear(x, w, b, impl, residual=residual), (w, b))}
    if impl == "cpu_kernel":
        layers_["gelu_mlp"] = (lambda x, *w, residual=None: linear.gelu_mlp(x, *w, residual=residual), mlp)
    for name, (layer, weights) in layers_.items():
        folded = jax.vjp(jax.jit(lambda x, r, *w: layer(x, *w, residual=r)), x, residual, *weights)
        after = jax.vjp(jax.jit(lambda x, r, *w: r + layer(x, *w)), x, residual, *weights)
        np.testing.assert_array_equal(folded[0], after[0], err_msg=name)
        for got, want in zip(folded[1](g), after[1](g)):
            np.testing.assert_array_equal(got, want, err_msg=name)
    if impl == "cpu_kernel":  # the addition made by the product: no [2, 185, 200] add left in the program
        hlo = jax.jit(lambda x, r: linear.linear(x, w, b, impl, residual=r)).lower(x, residual).compile().as_text()
        assert "labram_cpu_matmul" in hlo
        assert not re.search(r"f32\[(2,185|370),200\]\{[0-9,]*\} add\(", hlo)


@needs_kernel
def test_kernel_gelu_is_xla_gelu_over_its_range_and_keeps_nan():
    # one row of values from -10 to 10 (erf saturates at |x / sqrt 2| >= 3.83) through an identity product
    x = np.concatenate([np.linspace(-10, 10, 4001, dtype=np.float32), [np.nan, 0.0, -0.0]])[None]
    gelu = cpu_matmul.matmul(x.reshape(-1, 1), np.ones((1, 1), np.float32), gelu=True)
    # an identity product times GELU'(x): the derivative itself
    derivative, again = cpu_matmul.matmul(np.ones_like(x).reshape(-1, 1), np.ones((1, 1), np.float32),
                                          gelu_gradient_of=x.reshape(-1, 1))
    want, want_derivative = jax.vmap(jax.value_and_grad(layers.gelu))(jnp.asarray(x[0]))
    np.testing.assert_allclose(gelu[:, 0], want, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(derivative[:, 0], want_derivative, rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(again, gelu)
    assert np.isnan(gelu[-3, 0]) and np.isnan(derivative[-3, 0])


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 9, 20), (4, 185, 200)])
def test_gelu_mlp_matches_two_layers_with_gradients(shape):
    d, f = shape[-1], 4 * shape[-1]
    operands = (jnp.asarray(_normal(1, *shape)), jnp.asarray(_normal(2, d, f) * d ** -0.5), jnp.asarray(_normal(3, f)),
                jnp.asarray(_normal(4, f, d) * f ** -0.5), jnp.asarray(_normal(5, d)))
    d_y = jnp.asarray(_normal(6, *shape))

    def layers_path(x, k1, b1, k2, b2):
        return linear.linear(layers.gelu(linear.linear(x, k1, b1, "xla")), k2, b2, "xla")

    results = [jax.vjp(fn, *operands) for fn in (linear.gelu_mlp, layers_path)]
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    # not differentiated, GELU's derivative is not computed (no [R, F] second result), the output the same
    hlo = jax.jit(linear.gelu_mlp).lower(*operands).as_text()
    rows = int(np.prod(shape[:-1]))
    assert hlo.count(f"-> (tensor<{rows}x{f}xf32>, tensor<0xf32>, tensor<0xf32>)") == 1, hlo
    np.testing.assert_array_equal(jax.jit(linear.gelu_mlp)(*operands), results[0][0])
    # differentiated, one [R, F] array is kept for the backward pass: the pre-activations (BENCHMARKS.md,
    # "Session 44"); GELU's output and derivative are computed from them again
    kept = [leaf for leaf in jax.tree.leaves(results[0][1]) if getattr(leaf, "shape", None) == (rows, f)]
    assert len(kept) == 1, [getattr(leaf, "shape", None) for leaf in jax.tree.leaves(results[0][1])]
    np.testing.assert_array_equal(kept[0], cpu_matmul.matmul(operands[0].reshape(rows, d), *operands[1:3]))
    for got, want in zip(results[0][1](d_y), results[1][1](d_y)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


@needs_kernel
def test_mlp_runs_fused_where_it_can_and_says_why_not(monkeypatch):
    cfg = model_config.labram("tiny", linear="cpu_kernel")
    x = jnp.asarray(_normal(7, 2, 9, cfg.embed_dim))
    variables = layers.Mlp(cfg.replace(mlp="layers"), 1).init(jax.random.key(0), x)
    assert set(variables["params"]) == {"fc1", "fc2"}  # flax Dense's names: files and converted weights unchanged
    fused_calls, fused = [], linear.gelu_mlp
    monkeypatch.setattr(linear, "gelu_mlp", lambda *a: fused_calls.append(1) or fused(*a))
    outs = {m: layers.Mlp(cfg.replace(mlp=m), 1).apply(variables, x) for m in ("layers", "auto", "fused")}
    assert len(fused_calls) == 2  # auto and fused
    np.testing.assert_allclose(outs["auto"], outs["layers"], rtol=1e-5, atol=1e-6)
    assert not layers.mlp_fused(cfg.replace(linear="xla"), x)  # auto: XLA's products, XLA's GELU
    assert not layers.mlp_fused(cfg.replace(lora_rank=2), x)   # adapters between the layers
    with pytest.raises(ValueError, match=r"on cpu_kernel \(linear='xla' runs them on 'xla' here\).*use mlp='layers'"):
        layers.mlp_fused(cfg.replace(linear="xla", mlp="fused"), x)
    with pytest.raises(ValueError, match="mlp="):
        model_config.labram("tiny", mlp="fast")


@needs_kernel
@pytest.mark.parametrize("wide", WIDTHS)
@pytest.mark.parametrize("m, n, d", [(1472, 8192, 32), (37, 1003, 32), (5, 13, 3), (1, 1, 1), (700, 260, 64)])
def test_nearest_codes_are_xlas_argmin(m, n, d, wide):
    rng = np.random.default_rng(m + n)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731  the quantizer's inputs
    z, codebook = unit(_normal(m, m, d)), unit(_normal(n, n, d))
    first = n // 3  # ties with it in its lane of 8 (first + 8) and in the next lane: the first index wins
    for twin in (first + 8, first + 1):
        codebook[min(twin, n - 1)] = codebook[first]
    z[0] = codebook[first]
    codes, values = jax.jit(functools.partial(cpu_matmul.nearest, wide=wide))(z, codebook)
    distances = tokenizer.squared_distances(jnp.asarray(z), jnp.asarray(codebook), "xla")
    np.testing.assert_array_equal(codes, jnp.argmin(distances, axis=1))
    np.testing.assert_allclose(values, distances[np.arange(m), np.asarray(codes)], rtol=1e-6, atol=1e-6)
    assert codes[0] == first
    np.testing.assert_array_equal(tokenizer.nearest_codes(jnp.asarray(z), jnp.asarray(codebook), "cpu_kernel"), codes)
    # NaNs: a NaN row picks code 0, a NaN code is every row's pick (the first NaN, as jnp.argmin)
    z[min(1, m - 1)] = np.nan
    codebook_nan = codebook.copy()
    codebook_nan[n - 1, 0] = np.nan
    for zz, ww in ((z, codebook), (z, codebook_nan)):
        want = jnp.argmin(tokenizer.squared_distances(jnp.asarray(zz), jnp.asarray(ww), "xla"), axis=1)
        np.testing.assert_array_equal(cpu_matmul.nearest(zz, ww, wide=wide)[0], want)
    if wide:  # the same sums as the AVX2 tiles': the same codes and the same distances, bit for bit
        for got, narrow in zip(cpu_matmul.nearest(z, codebook, wide=True), cpu_matmul.nearest(z, codebook, wide=False)):
            np.testing.assert_array_equal(got, narrow)


@needs_kernel
def test_nearest_codes_without_dimensions_are_the_first():
    codes, values = cpu_matmul.nearest(np.zeros((4, 0), np.float32), np.zeros((9, 0), np.float32))
    np.testing.assert_array_equal(codes, np.zeros(4))  # every distance 0, as jnp.argmin picks
    np.testing.assert_array_equal(values, np.zeros(4))
