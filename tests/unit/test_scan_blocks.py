"""nn.scan over stacked blocks computes the same model as the per-block loop."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labram_jax import optim
from labram_jax.models import config as model_config
from labram_jax.models import stacking
from labram_jax.models import transformer
from labram_jax.tasks import finetune

X = jax.random.normal(jax.random.key(1), (2, 3, 2, 200))
IDS = jnp.array([1, 5, 9])


def _models(**overrides):
    cfg = model_config.labram("tiny", depth=3, **overrides)
    loop = transformer.LaBraM(cfg, num_outputs=2)
    scan = transformer.LaBraM(cfg.replace(scan_blocks=True), num_outputs=2)
    params = nn.unbox(loop.init(jax.random.key(0), X, IDS))["params"]
    return loop, scan, params


def test_stack_and_unstack_are_inverse():
    _, _, params = _models()
    stacked = stacking.stack_blocks(params)
    assert "blocks" in stacked["encoder"] and "blocks_0" not in stacked["encoder"]
    assert stacked["encoder"]["blocks"]["attn"]["qkv"].shape == (3, 100, 3, 4, 25)
    back = stacking.unstack_blocks(stacked)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert stacking.match_layout(params, stacked)["encoder"].keys() == stacked["encoder"].keys()
    with pytest.raises(ValueError, match="numbered"):
        stacking.stack_blocks({"blocks_0": {"w": np.ones(2)}, "blocks_2": {"w": np.ones(2)}})


def test_scanned_forward_and_gradients_equal_the_loop():
    loop, scan, params = _models()
    stacked = stacking.stack_blocks(params)
    out_loop = loop.apply({"params": params}, X, IDS)
    out_scan = scan.apply({"params": stacked}, X, IDS)
    np.testing.assert_allclose(out_scan, out_loop, rtol=1e-5, atol=1e-6)

    def loss(model):
        return lambda p: jnp.sum(model.apply({"params": p}, X, IDS) ** 2)

    g_loop = stacking.stack_blocks(jax.tree_util.tree_map(np.asarray, jax.grad(loss(loop))(params)))
    g_scan = jax.grad(loss(scan))(stacked)
    for a, b in zip(jax.tree_util.tree_leaves(g_scan), jax.tree_util.tree_leaves(g_loop)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9)


def test_remat_and_drop_path_under_scan():
    _, scan, params = _models(drop_path_rate=0.5, remat="block")
    stacked = stacking.stack_blocks(params)
    base = scan.apply({"params": stacked}, X, IDS)
    trained = [scan.apply({"params": stacked}, X, IDS, train=True, rngs={"dropout": jax.random.key(k)})
               for k in range(4)]
    assert not all(np.allclose(t, base) for t in trained)  # some residual branches dropped
    assert np.isfinite(jax.grad(lambda p: jnp.sum(scan.apply({"params": p}, X, IDS, train=True,
                                                               rngs={"dropout": jax.random.key(0)})))(stacked)
                       ["encoder"]["blocks"]["mlp"]["fc1"]["kernel"]).all()


def test_scanned_init_scales_each_block_like_the_loop():
    cfg = model_config.labram("base", depth=12)
    model = transformer.LaBraM(cfg.replace(scan_blocks=True), num_outputs=1)
    params = nn.unbox(model.init(jax.random.key(0), X, IDS))["params"]
    proj = np.asarray(params["encoder"]["blocks"]["attn"]["proj"])  # [12, H, hd, D]
    names = flax.traverse_util.flatten_dict(model.init(jax.random.key(0), X, IDS)["params"])
    assert names[("encoder", "blocks", "attn", "qkv")].names[0] == "layers"
    stds = proj.reshape(12, -1).std(axis=1)
    want = 0.02 / np.sqrt(2.0 * np.arange(1, 13)) * 0.88  # truncated at 2 std
    np.testing.assert_allclose(stds, want, rtol=0.05)
    layers = proj.reshape(12, -1)
    assert not np.allclose(layers[0][:100], layers[1][:100] * np.sqrt(2))  # independent draws per block


def test_optimizer_sees_the_same_layers_in_both_layouts():
    _, scan, params = _models()
    stacked = stacking.stack_blocks(params)
    depth = 3
    loop_scales = optim.layer_decay_scales(params, depth, 0.65)
    scan_scales = optim.layer_decay_scales(stacked, depth, 0.65)
    got = stacking.unstack_blocks(jax.tree_util.tree_map(lambda s, p: np.broadcast_to(s, np.shape(p)),
                                                         scan_scales, stacked))
    want = jax.tree_util.tree_map(lambda s, p: np.broadcast_to(s, np.shape(p)), loop_scales, params)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    got = stacking.unstack_blocks(jax.tree_util.tree_map(lambda m, p: np.broadcast_to(m, np.shape(p)),
                                                         optim.weight_decay_mask(stacked), stacked))
    want = optim.weight_decay_mask(params)
    assert jax.tree_util.tree_map(lambda m: bool(np.all(m)), got) == want
    for mode in ("last_k", "lora", "linear_probe"):
        loop_mask = finetune.trainable_mask(params, mode, 1, depth)
        scan_mask = finetune.trainable_mask(stacked, mode, 1, depth)
        got = stacking.unstack_blocks(jax.tree_util.tree_map(lambda m, p: np.broadcast_to(m, np.shape(p)),
                                                             scan_mask, stacked))
        want = jax.tree_util.tree_map(lambda m, p: np.broadcast_to(m, np.shape(p)), loop_mask, params)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(a, b)
