"""The one-call C++ AdamW step (``optim.implementation='cpu_kernel'``) against optax's chain run by XLA: the
same parameters, moments, step counts and norms over several steps, with clipping on and off, the weight-decay
mask, layer-wise and per-row scales and frozen parameters; non-finite steps not applied; in place; where each
implementation is used."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from labram_jax import optim, sharding
from labram_jax.models import cpu_adamw, cpu_kernels

needs_kernel = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None,
                                  reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")


def _params(seed=0):
    """A model-like tree: blocks (with the names layer-wise decay reads), a stacked [3, ...] table
    scaled per row, odd sizes (tails of under 8 elements, arrays cut into several 32 K pieces)."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    return {"encoder": {"cls_token": normal(1, 1, 8), "blocks_0": {"fc": {"kernel": normal(200, 800), "bias": normal(800)},
                                                                   "gamma_1": normal(3)},
                        "blocks_1": {"fc": {"kernel": normal(37, 5), "bias": normal(5)}}},
            "stacked": normal(3, 40001), "head": {"kernel": normal(9, 2), "bias": normal(2)}}


def _grads(params, step, seed=1):
    rng = np.random.default_rng(seed + step)
    return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.2 * (step + 1), jnp.float32), params)


def _optimizer(implementation, clip, layer_decay=0.65, frozen=False):
    params = _params()
    cfg = optim.OptimConfig(lr=3e-3, min_lr=1e-4, total_steps=20, warmup_steps=2, b1=0.9, b2=0.98, weight_decay=0.05,
                            grad_clip=clip, layer_decay=layer_decay, lr_scales=(("head", 2.0),),
                            implementation=implementation)
    trainable = jax.tree.map(lambda _: True, params)
    trainable["stacked"] = np.array([True, False, True]).reshape(3, 1)  # per row, as stacked blocks
    if frozen:
        trainable["encoder"]["blocks_1"] = jax.tree.map(lambda _: False, params["encoder"]["blocks_1"])
    return optim.make_optimizer(cfg, params, depth=2, trainable=trainable), params


def _run(implementation, clip, steps=4, **kw):
    opt, params = _optimizer(implementation, clip, **kw)
    state = opt.tx.init(params)
    step = jax.jit(opt.apply, donate_argnums=(1, 2))
    out = []
    for i in range(steps):
        params, state, grad_norm, param_norm, finite = step(_grads(params, i), state, params, jnp.float32(1.5))
        out.append((grad_norm, param_norm, finite))
    return params, state, out


@needs_kernel
@pytest.mark.parametrize("clip", [0.0, 3.0, 1e6])  # none; every step clipped; never reached
def test_kernel_step_is_optaxs_chain(clip):
    p_xla, s_xla, norms_xla = _run("xla", clip, frozen=clip == 3.0)
    p_k, s_k, norms_k = _run("cpu_kernel", clip, frozen=clip == 3.0)
    assert jax.tree.structure(s_xla) == jax.tree.structure(s_k)  # checkpoints do not depend on the choice
    for a, b in zip(jax.tree.leaves(s_xla), jax.tree.leaves(s_k)):
        if a.dtype == jnp.int32:
            assert int(a) == int(b) == 4  # both step counts
        else:
            np.testing.assert_allclose(b, a, rtol=2e-6, atol=3e-8)  # XLA fuses some multiply-adds
    for a, b in zip(jax.tree.leaves(p_xla), jax.tree.leaves(p_k)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    for (g_a, n_a, f_a), (g_b, n_b, f_b) in zip(norms_xla, norms_k):
        np.testing.assert_allclose([g_b, n_b], [g_a, n_a], rtol=1e-6)
        assert bool(f_a) and bool(f_b)
    # The step moved what it should and nothing else: the frozen row and frozen block stayed.
    start = _params()
    np.testing.assert_array_equal(p_k["stacked"][1], start["stacked"][1])
    assert not np.allclose(p_k["stacked"][0], start["stacked"][0])
    moved = not np.allclose(p_k["encoder"]["blocks_1"]["fc"]["kernel"], start["encoder"]["blocks_1"]["fc"]["kernel"])
    assert moved != (clip == 3.0)


@needs_kernel
@pytest.mark.parametrize("bad", ["grad_nan", "grad_inf", "loss_nan", "grad_overflow"])
def test_kernel_does_not_apply_a_non_finite_step(bad):
    opt, params = _optimizer("cpu_kernel", clip=3.0)
    state = opt.tx.init(params)
    params, state, *_ = opt.apply(_grads(params, 0), state, params, jnp.float32(1.0))  # one good step first
    before = jax.tree.map(np.asarray, (params, state))
    grads, loss = _grads(params, 1), jnp.float32(jnp.nan if bad == "loss_nan" else 2.0)
    poison = {"grad_nan": jnp.nan, "grad_inf": jnp.inf, "grad_overflow": 3e38}.get(bad)
    if poison is not None:  # 3e38 is finite, but the sum of squares is not
        grads["head"]["bias"] = grads["head"]["bias"].at[1].set(poison)
    new_params, new_state, grad_norm, param_norm, finite = jax.jit(opt.apply)(grads, state, params, loss)
    assert not bool(finite)
    assert np.isfinite(float(param_norm)) and np.isfinite(float(grad_norm)) == (bad == "loss_nan")
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((new_params, new_state))):
        np.testing.assert_array_equal(b, a)  # parameters, moments and both counts as they were


@needs_kernel
def test_kernel_updates_a_donated_state_in_place():
    opt, params = _optimizer("cpu_kernel", clip=0.0)
    state = opt.tx.init(params)
    # Donated (parameters, state) and returned in that order, as a train state is: XLA pairs each donated
    # buffer with the next result of its shape.
    step = jax.jit(lambda params, state, grads: opt.apply(grads, state, params, jnp.float32(1.0))[:2],
                   donate_argnums=(0, 1))
    grads = _grads(params, 0)
    # Written elsewhere, the new parameters and moments would be temporaries copied into the donated buffers.
    temporaries = step.lower(params, state, grads).compile().memory_analysis().temp_size_in_bytes
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    assert temporaries < 0.1 * param_bytes, (temporaries, param_bytes)
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state))]
    params, state = step(params, state, grads)
    assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state))] == pointers


@needs_kernel
def test_kernel_refuses_what_it_cannot_compute(monkeypatch):
    opt, params = _optimizer("auto", clip=0.0)
    assert opt.implementation(params) == "cpu_kernel"
    mesh = sharding.make_mesh((-1, 1, 1))
    assert mesh.size > 1, "the unit tests run with several fake CPU devices"
    with jax.set_mesh(mesh):
        assert opt.implementation(params) == "xla"  # several devices: XLA's sharded arithmetic
        forced, _ = _optimizer("cpu_kernel", clip=0.0)
        with pytest.raises(ValueError, match=f"optim.implementation='cpu_kernel' cannot run here.*{mesh.size} device"):
            forced.implementation(params)
    # A scale the kernel cannot cut into rows of the first axis: auto keeps XLA and says why.
    odd = {"w": jnp.ones((4, 6), jnp.float32)}
    cfg = optim.OptimConfig(lr=0.1, min_lr=0.1, total_steps=10, warmup_steps=0)
    by_column = optim.make_optimizer(cfg, odd, trainable={"w": np.array([[True] * 5 + [False]])})
    assert by_column.implementation(odd) == "xla" and "shape (1, 6)" in by_column.plan_refusal
    with pytest.raises(ValueError, match="choose one of"):
        optim.make_optimizer(optim.OptimConfig(lr=0.1, min_lr=0.1, total_steps=10, warmup_steps=0,
                                               implementation="fused"), odd)
    with pytest.raises(ValueError, match="one per row"):
        cpu_adamw.adamw([odd["w"]], [odd["w"]], [odd["w"]], [odd["w"]], loss=1.0, neg_lr=-0.1, c1=0.1, c2=0.1,
                        b1=0.9, b2=0.99, eps=1e-8, clip=0.0, weight_decay=[0.0], rows=[2], scales=[1.0])
    with pytest.raises(ValueError, match="found 0 and 0.*initialise it with Optimizer.tx.init"):
        opt.apply(_grads(params, 0), (), params, jnp.float32(1.0))  # a state this optimizer did not make
    monkeypatch.setenv("LABRAM_JAX_CPU_KERNEL", "0")
    assert opt.implementation(params) == "xla"
