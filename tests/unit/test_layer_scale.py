"""A block's layer scale folded into its branches' last linear layer (layers.scaled_output) computes
what scaling the branch's output computes: outputs and every gradient, on each linear implementation,
and with LoRA (where the scale multiplies the output as before)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labram_jax.models import config as model_config
from labram_jax.models import layers, linear


def _implementations():
    return ["xla"] + (["cpu_kernel"] if linear.resolve("auto", jnp.zeros((2, 2))) == "cpu_kernel" else [])


@pytest.mark.parametrize("implementation", _implementations())
@pytest.mark.parametrize("branch", ["attn", "mlp"])
@pytest.mark.parametrize("lora_rank", [0, 2])
def test_scaled_branch_equals_the_branch_times_the_scale(branch, implementation, lora_rank):
    cfg = model_config.labram("tiny", depth=1, linear=implementation, lora_rank=lora_rank)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 7, cfg.embed_dim)), jnp.float32)
    valid = jnp.asarray(np.arange(7)[None, :] < np.array([[7], [5]]))
    scale = jnp.asarray(rng.uniform(-1.0, 1.0, cfg.embed_dim), jnp.float32)
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    module = layers.Attention(cfg, 1) if branch == "attn" else layers.Mlp(cfg, 1)
    run = (lambda p, x, s: module.apply({"params": p}, x, valid, s)) if branch == "attn" else (
        lambda p, x, s: module.apply({"params": p}, x, s))
    params = nn.unbox(module.init(jax.random.key(0), x, valid) if branch == "attn" else
                      module.init(jax.random.key(0), x))["params"]
    # LoRA's second factor starts at zero: give it weights so that its path counts
    params = jax.tree_util.tree_map(lambda a: a + 0.05 * jnp.ones_like(a), params)

    def folded(p, x, s):
        return jnp.sum(run(p, x, s) * g)

    def scaled_after(p, x, s):
        return jnp.sum(run(p, x, None) * s * g)

    out_folded, out_after = run(params, x, scale), run(params, x, None) * scale
    np.testing.assert_allclose(out_folded, out_after, rtol=1e-5, atol=1e-6)
    grads_folded = jax.grad(folded, argnums=(0, 1, 2))(params, x, scale)
    grads_after = jax.grad(scaled_after, argnums=(0, 1, 2))(params, x, scale)
    for a, b in zip(jax.tree_util.tree_leaves(grads_folded), jax.tree_util.tree_leaves(grads_after)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(grads_folded[2]).max()) > 0  # the scale's own gradient was compared, not zeros
