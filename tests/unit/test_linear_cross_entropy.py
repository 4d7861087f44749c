"""The lm_head's cross-entropy walked in pieces, its gradient taken in the forward pass
(labram_jax.models.linear_cross_entropy), against the plain formulation: optax on all logits."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from labram_jax import sharding
from labram_jax.models import cpu_kernels, linear_cross_entropy as lce

IMPLEMENTATIONS = ["xla", pytest.param("cpu_kernel", marks=pytest.mark.skipif(
    cpu_kernels.unavailable_reason() is not None, reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}"))]


def _inputs(b=3, t=7, d=16, v=50, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (b, t, d))
    kernel = jax.random.normal(k[1], (d, v)) * 0.3
    bias = jax.random.normal(k[2], (v,)) * 0.3
    labels = jax.random.randint(k[3], (b, t), 0, v)
    weights = jax.random.uniform(k[4], (b, t)) * (jnp.arange(t) % 3 != 1)  # some tokens weigh 0
    return x, kernel, bias, labels, weights


def _optax(x, kernel, bias, labels, weights):
    """Independent of the module: Dense's arithmetic, optax's cross-entropy, argmax."""
    logits = x @ kernel + bias
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return (weights * ce).sum(), ce, jnp.argmax(logits, -1) == labels


def _loss_and_grads(fn, *args):
    loss_only = lambda x, k, b, w: fn(x, k, b, args[3], w)[0]  # noqa: E731
    grads = jax.jit(jax.grad(loss_only, argnums=(0, 1, 2, 3)))(*args[:3], args[4])
    return jax.jit(fn)(*args), grads


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)  # cpu_kernel: products and softmax in C++
@pytest.mark.parametrize("chunks", [0, 1, 3, 7, 10])
def test_every_piece_count_gives_optax_loss_and_gradients(chunks, implementation):
    # t=7: 3 pieces pad the tokens to 9, 10 pieces to 10 (pieces of one token, three all padding)
    args = _inputs()
    (loss, ce, correct), grads = _loss_and_grads(
        lambda *a: lce.linear_cross_entropy(*a, chunks=chunks, implementation=implementation), *args)
    (loss0, ce0, correct0), grads0 = _loss_and_grads(_optax, *args)
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    np.testing.assert_allclose(ce, ce0, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(correct, correct0)
    assert 0 < correct.mean() < 1 and ce.shape == (3, 7) and correct.dtype == jnp.bool_
    for name, g, g0 in zip(("x", "kernel", "bias", "weights"), grads, grads0):
        assert g.shape == g0.shape and np.abs(g0).max() > 0
        np.testing.assert_allclose(g, g0, rtol=2e-5, atol=2e-6, err_msg=name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("chunks", [0, 2])
def test_correct_is_argmax_first_index_on_ties(chunks, implementation):
    # logits = bias: the maximum 1.0 at codes 1 and 3 (argmax says 1), and a row's worth of NaN
    x = jnp.zeros((1, 4, 2)).at[0, 3].set(jnp.nan)
    kernel, bias = jnp.zeros((2, 5)), jnp.array([0.0, 1.0, -1.0, 1.0, 0.5])
    labels = jnp.array([[1, 3, 4, 1]])
    _, ce, correct = lce.linear_cross_entropy(x, kernel, bias, labels, jnp.ones((1, 4)), chunks=chunks,
                                              implementation=implementation)
    assert correct.tolist() == [[True, False, False, False]]
    assert np.isnan(ce[0, 3]) and np.isfinite(ce[0, :3]).all()
    np.testing.assert_array_equal(correct[:, :3], (jnp.argmax(bias) == labels)[:, :3])


def test_backward_scales_by_the_cotangent_and_ce_carries_no_gradient():
    x, kernel, bias, labels, weights = _inputs(seed=1)

    def f(x, kernel, scale):
        loss, ce, _ = lce.linear_cross_entropy(x, kernel, bias, labels, weights, chunks=2)
        return scale * loss + ce.sum()  # ce is reported, not differentiated

    gx, gk = jax.grad(f, argnums=(0, 1))(x, kernel, -2.5)
    ox, ok = jax.grad(lambda x, k: -2.5 * _optax(x, k, bias, labels, weights)[0], argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(gx, ox, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(gk, ok, rtol=2e-5, atol=2e-6)
    # tokens of weight 0 get no gradient
    assert np.all(np.asarray(gx)[:, 1::3] == 0)


def _products(fn, *args) -> int:
    """Matrix products in the program of fn(*args), the scan's body included."""
    text = jax.jit(fn).lower(*args).as_text()
    return text.count("stablehlo.dot_general")


def test_evaluation_does_not_compute_the_gradients():
    x, kernel, bias, labels, weights = _inputs(seed=4)
    loss = lambda x, k, b: lce.linear_cross_entropy(x, k, b, labels, weights, chunks=2)[0]  # noqa: E731
    assert _products(loss, x, kernel, bias) == 1  # the logits only
    assert _products(jax.grad(loss, argnums=(0, 1, 2)), x, kernel, bias) == 3  # + dx, dkernel with dbias


def test_bfloat16_products_stay_close():
    x, kernel, bias, labels, weights = _inputs(seed=2)
    loss, ce, _ = lce.linear_cross_entropy(x.astype(jnp.bfloat16), kernel, bias, labels, weights, chunks=3)
    assert ce.dtype == jnp.float32
    np.testing.assert_allclose(loss, _optax(x, kernel, bias, labels, weights)[0], rtol=3e-2)
    g = jax.grad(lambda k: lce.linear_cross_entropy(x.astype(jnp.bfloat16), k, bias, labels, weights, 3)[0])(kernel)
    assert g.dtype == kernel.dtype and np.isfinite(np.asarray(g)).all()


def test_negative_piece_count_is_refused():
    with pytest.raises(ValueError, match="chunks=-1"):
        lce.linear_cross_entropy(*_inputs(), chunks=-1)


def test_sharded_batch_and_vocabulary_give_the_same_numbers():
    """Tokens split over data x fsdp and the vocabulary over tensor, as the pretraining step shards them."""
    args = _inputs(b=4, t=6, d=8, v=64, seed=3)
    mesh = sharding.make_mesh((2, 2, 2))
    spec = jax.sharding.PartitionSpec
    placed = [jax.device_put(a, jax.sharding.NamedSharding(mesh, s)) for a, s in zip(
        args, (spec(("data", "fsdp")), spec(None, "tensor"), spec("tensor"), spec(("data", "fsdp")),
               spec(("data", "fsdp"))))]
    (loss, ce, _), grads = _loss_and_grads(lambda *a: lce.linear_cross_entropy(*a, chunks=4), *placed)
    (loss0, ce0, _), grads0 = _loss_and_grads(_optax, *args)
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    np.testing.assert_allclose(ce, ce0, rtol=1e-5, atol=1e-6)
    for g, g0 in zip(grads, grads0):
        np.testing.assert_allclose(g, g0, rtol=2e-5, atol=2e-6)


def test_pretraining_loss_and_gradients_do_not_depend_on_the_piece_count():
    from labram_jax.input_pipeline import Grid
    from labram_jax.tasks import pretrain
    from labram_jax_configs import common

    batch = {k: jnp.stack([v] * 2) for k, v in Grid(3, 4).empty().items()}
    batch["x"] = jax.random.normal(jax.random.key(0), batch["x"].shape)
    batch["channel_ids"] = jnp.broadcast_to(jnp.arange(3), batch["channel_ids"].shape)
    batch["patch_mask"], batch["valid"] = jnp.ones_like(batch["patch_mask"]), jnp.ones_like(batch["valid"])
    out = {}
    for chunks in (0, 4):
        config = common.get_config("tiny", "pretrain")
        config.pretrain.loss_chunks = chunks
        stage = pretrain.build(config, jnp.float32, tokenizer=pretrain.random_tokenizer(config, jnp.float32))
        params = nn.unbox(stage.init(jax.random.key(1), batch))["params"]
        grad_fn = jax.jit(jax.grad(stage.loss_fn, has_aux=True))
        grads, (metrics, _) = grad_fn(params, {}, batch, jax.random.key(2), stage.frozen)
        out[chunks] = grads, metrics
    (g0, m0), (g4, m4) = out[0], out[4]
    assert set(m0) == set(m4) and float(m0["loss"]) > 0
    for name in m0:
        np.testing.assert_allclose(m4[name], m0[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(m4["loss"], m4["loss_masked"] + m4["loss_symmetric"], rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g4), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
