"""The attention implementations compute the same function, with and without padding keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labram_jax.models import attention, config as model_config, cpu_attention, layers


def _inputs(seed, b=3, length=37, heads=4, head=20):
    rng = np.random.default_rng(seed)
    q, k, v, g = (jnp.asarray(rng.standard_normal((b, heads, length, head)), jnp.float32) for _ in range(4))
    valid = np.ones((b, length), bool)
    valid[1, 20:] = False  # padding at the end
    valid[2, 5:30:3] = False  # padding in between (channel-major grids pad each channel's tail)
    return q, k, v, g, jnp.asarray(valid)


@pytest.mark.parametrize("seed", [0, 1])
def test_explicit_matches_xla_forward_and_gradients(seed):
    q, k, v, g, valid = _inputs(seed)

    def run(impl):
        f = lambda q, k, v: attention.dot_product_attention(q, k, v, valid, impl)  # noqa: E731
        out, vjp = jax.vjp(jax.jit(f), q, k, v)
        return out, vjp(g)

    out_x, grads_x = run("xla")
    out_e, grads_e = run("explicit")
    np.testing.assert_allclose(out_e, out_x, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_e, grads_x):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # padding keys get no weight: changing their values changes nothing
    k2 = k.at[1, :, 20:].set(100.0)
    v2 = v.at[1, :, 20:].set(-100.0)
    np.testing.assert_allclose(attention.dot_product_attention(q, k2, v2, valid, "explicit"), out_e, atol=1e-5)


@pytest.mark.parametrize("length", [37, 36])
def test_cudnn_operands_are_the_same_function(length):
    """The padding that cuDNN's flash attention needs (head to a multiple of 8, length to even, the mask
    to [B, 1, L, L]) changes nothing: XLA's attention on the padded operands, cut back, is the unpadded
    one, gradients included. (The cuDNN call itself needs an NVIDIA GPU: the next test.)"""
    q, k, v, g, valid = (x[:, :, :length] if x.ndim == 4 else x[:, :length] for x in _inputs(2))
    swap = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    q, k, v, g = map(swap, (q, k, v, g))

    def padded(q, k, v):
        qp, kp, vp, mask = attention.cudnn_operands(q, k, v, valid)
        assert qp.shape[1] % 2 == 0 and qp.shape[-1] % 8 == 0 and mask.shape == (3, 1, qp.shape[1], qp.shape[1])
        out = jax.nn.dot_product_attention(qp, kp, vp, mask=mask, scale=q.shape[-1] ** -0.5, implementation="xla")
        return out[:, :length, :, :q.shape[-1]]

    def plain(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=valid[:, None, None, :], implementation="xla")

    out_p, vjp_p = jax.vjp(padded, q, k, v)
    out, vjp = jax.vjp(plain, q, k, v)
    np.testing.assert_allclose(out_p, out, rtol=1e-5, atol=1e-6)
    for a, b in zip(vjp_p(g), vjp(g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's flash attention runs on NVIDIA GPUs only")
@pytest.mark.parametrize("length", [37, 36])
def test_cudnn_matches_xla_on_a_gpu(length):
    q, k, v, g, valid = (x[:, :, :length].astype(jnp.bfloat16) if x.ndim == 4 else x[:, :length]
                         for x in _inputs(4))

    def run(impl):
        f = lambda q, k, v: attention.dot_product_attention(q, k, v, valid, impl)  # noqa: E731
        out, vjp = jax.vjp(jax.jit(f), q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *vjp(g))]

    for a, b in zip(run("cudnn"), run("xla")):
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.03)


def test_unknown_implementation_is_refused():
    q, k, v, _, valid = _inputs(0)
    with pytest.raises(ValueError, match="choose one of"):
        attention.dot_product_attention(q, k, v, valid, "flash")
    with pytest.raises(ValueError, match="attention="):
        model_config.labram("tiny", attention="flash")


def test_block_output_does_not_depend_on_the_implementation():
    cfg = model_config.labram("tiny")
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 9, cfg.embed_dim)), jnp.float32)
    valid = jnp.asarray(np.array([[True] * 9, [True] * 6 + [False] * 3]))
    # cpu_kernel (where it runs): on the qkv projection itself, the q/k norms inside the kernel (qkv
    # in_kernel; q/v biases added by the projection), or on q, k, v sliced out of it token-major (sliced)
    kernel = cpu_attention.supports(x[..., :cfg.head_dim])
    impls = [("xla", "auto"), ("explicit", "auto"), *([("cpu_kernel", "in_kernel"), ("cpu_kernel", "sliced")]
                                                      if kernel else [])]
    # LaBraM's q/k norms, the tokenizer's q and v biases, or both (the biases before the norms)
    for qk_norm, qkv_bias in ((True, False), (False, True), (True, True)):
        c = cfg.replace(qk_norm=qk_norm, qkv_bias=qkv_bias)
        variables = layers.Block(c, 1).init(jax.random.key(0), x, valid)
        # non-zero biases and norm scales other than 1, so that where they are applied matters (the
        # kernel applies the q/k norms itself)
        variables = jax.tree_util.tree_map_with_path(
            lambda p, a: a + 0.3 if "bias" in jax.tree_util.keystr(p) else a * 1.3 if "scale" in jax.tree_util.keystr(p)
            else a, variables)
        results = [jax.value_and_grad(lambda v, x: jnp.sum(layers.Block(c.replace(attention=impl, qkv=qkv), 1).apply(
            v, x, valid) ** 2), argnums=(0, 1))(variables, x) for impl, qkv in impls]
        for other in results[1:]:
            np.testing.assert_allclose(other[0], results[0][0], rtol=1e-5)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), other[1], results[0][1])


def test_gelu_is_exact():
    x = jnp.linspace(-6.0, 6.0, 1001)
    exact = 0.5 * x * (1.0 + jax.scipy.special.erf(x / np.sqrt(2.0)))
    np.testing.assert_allclose(layers.gelu(x), exact, atol=1e-6)
    np.testing.assert_allclose(layers.gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)


def test_row_max_is_the_max_and_skips_nothing_finite():
    s = jnp.asarray(np.random.default_rng(4).standard_normal((2, 3, 7, 11)), jnp.float32)
    s = s.at[0, 0, 0].set(-1e30)  # a row of masked keys only
    np.testing.assert_array_equal(attention._row_max(s), jnp.max(s, axis=-1, keepdims=True))
    s_nan = s.at[1, 2, 3, 4].set(jnp.nan)
    out = attention.dot_product_attention(s_nan[..., :4], s[..., :4], s[..., :4], jnp.ones((2, 7), bool), "explicit")
    assert np.isnan(np.asarray(out)).any()  # a NaN score still poisons its row: nothing is silently dropped


@pytest.mark.parametrize("token_major", [False, True])
def test_split_heads_gradient_is_that_of_the_slices(token_major):
    b, length, heads, head = 2, 5, 3, 4
    rng = np.random.default_rng(5)
    qkv = jnp.asarray(rng.standard_normal((b, length, 3 * heads * head)), jnp.float32)
    shape = (b, length, heads, head) if token_major else (b, heads, length, head)
    gs = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3)]

    def by_slices(x):
        t = x.reshape(b, length, 3, heads, head).transpose((2, 0, 1, 3, 4) if token_major else (2, 0, 3, 1, 4))
        return t[0], t[1], t[2]

    for ours, theirs in zip(layers.split_heads(qkv, heads, token_major), by_slices(qkv)):
        np.testing.assert_array_equal(ours, theirs)
    ours = jax.grad(lambda x: sum(jnp.sum(o * g) for o, g in zip(layers.split_heads(x, heads, token_major), gs)))(qkv)
    theirs = jax.grad(lambda x: sum(jnp.sum(o * g) for o, g in zip(by_slices(x), gs)))(qkv)
    np.testing.assert_array_equal(ours, theirs)


def test_qkv_in_kernel_is_chosen_where_it_runs_and_refused_with_a_reason_elsewhere():
    cfg = model_config.labram("tiny")
    assert layers.qkv_in_kernel(cfg, True) and not layers.qkv_in_kernel(cfg, False)  # auto follows the attention
    assert not layers.qkv_in_kernel(cfg.replace(qkv="sliced"), True)
    assert layers.qkv_in_kernel(cfg.replace(qkv_bias=True), True)  # the biases added by the projection, before
    with pytest.raises(ValueError, match="qkv='sliced'"):
        layers.qkv_in_kernel(cfg.replace(qkv="in_kernel"), False)
    with pytest.raises(ValueError, match="choose one of"):
        model_config.labram("tiny", qkv="fused")
