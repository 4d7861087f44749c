"""Schedule, weight-decay mask and layer-wise lr decay against LABRAM.md section 6."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labram_jax import optim
from labram_jax.models import config as model_config
from labram_jax.models import transformer


def test_warmup_then_cosine():
    s = optim.warmup_cosine(1e-3, 1e-5, total_steps=110, warmup_steps=10)
    assert float(s(0)) == 0.0 and np.isclose(float(s(5)), 5e-4) and np.isclose(float(s(10)), 1e-3)
    assert np.isclose(float(s(60)), 1e-5 + 0.5 * (1e-3 - 1e-5))
    assert np.isclose(float(s(110)), 1e-5) and np.isclose(float(s(500)), 1e-5)


def _params():
    model = transformer.LaBraM(model_config.labram("tiny"), num_outputs=2)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2, 1, 200)), jnp.array([1, 2])))
    import flax.linen as nn
    return nn.unbox(shapes)["params"]


def _flat(tree):
    return {"/".join(str(getattr(p, "key", p)) for p in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_weight_decay_mask():
    mask = _flat(optim.weight_decay_mask(_params()))
    for name in ("encoder/cls_token", "encoder/spatial_embed", "encoder/time_embed", "fc_norm/scale",
                 "encoder/blocks_0/attn/proj_bias", "head/bias", "encoder/blocks_0/gamma_1"):
        assert mask[name] is False, name
    for name in ("encoder/blocks_0/attn/qkv", "encoder/blocks_1/mlp/fc1/kernel", "head/kernel",
                 "encoder/patch_embed/conv1/kernel"):
        assert mask[name] is True, name


def test_layer_decay_scales():
    depth, decay = 2, 0.65
    scales = _flat(optim.layer_decay_scales(_params(), depth, decay))
    assert np.isclose(scales["encoder/cls_token"], decay ** 3)
    assert np.isclose(scales["encoder/spatial_embed"], decay ** 3)
    assert np.isclose(scales["encoder/patch_embed/conv1/kernel"], decay ** 3)
    assert np.isclose(scales["encoder/blocks_0/attn/qkv"], decay ** 2)
    assert np.isclose(scales["encoder/blocks_1/mlp/fc2/kernel"], decay ** 1)
    assert scales["encoder/time_embed"] == 1.0 and scales["head/kernel"] == 1.0  # the reference's grouping


def test_frozen_parameters_do_not_move():
    params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    cfg = optim.OptimConfig(lr=0.1, min_lr=0.1, total_steps=10, warmup_steps=0)
    tx = optim.make_optimizer(cfg, params, trainable={"a": False, "b": True}).tx
    updates, _ = tx.update({"a": jnp.ones((2, 2)), "b": jnp.ones((2,))}, tx.init(params), params)
    assert float(jnp.abs(updates["a"]).max()) == 0.0 and float(jnp.abs(updates["b"]).min()) > 0


def test_lr_scales_multiply_the_named_parameters_steps_on_top_of_layer_decay():
    assert optim.parse_lr_scales("spatial_mix=30, head=2") == (("spatial_mix", 30.0), ("head", 2.0))
    assert optim.parse_lr_scales("") == ()
    for bad in ("spatial_mix", "spatial_mix=fast", "=3", "head=-1"):
        with pytest.raises(ValueError, match="NAME=FACTOR"):
            optim.parse_lr_scales(bad)
    params = {"encoder": {"spatial_mix": {"kernel": jnp.ones((3, 3))}, "blocks_0": {"w": jnp.ones((3, 3))}},
              "head": {"kernel": jnp.ones((3, 1))}}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    steps = {}
    for scales in ((), (("spatial_mix", 30.0),)):
        cfg = optim.OptimConfig(lr=0.01, min_lr=0.01, total_steps=10, warmup_steps=0, weight_decay=0.0,
                                layer_decay=0.5, lr_scales=scales)
        tx = optim.make_optimizer(cfg, params, depth=1).tx
        updates, _ = tx.update(grads, tx.init(params), params)
        steps[scales] = _flat(jax.tree_util.tree_map(lambda u: float(jnp.abs(u).max()), updates))
    plain, scaled = steps[()], steps[(("spatial_mix", 30.0),)]
    assert np.isclose(scaled["encoder/spatial_mix/kernel"], 30 * plain["encoder/spatial_mix/kernel"])
    assert scaled["encoder/blocks_0/w"] == plain["encoder/blocks_0/w"] and scaled["head/kernel"] == plain["head/kernel"]
    assert np.isclose(plain["encoder/blocks_0/w"], 0.5 * plain["head/kernel"])  # layer decay still applies
    with pytest.raises(ValueError, match=r"\['spatial_mx'\].*no parameter"):
        optim.make_optimizer(optim.OptimConfig(lr=0.01, min_lr=0.01, total_steps=10, warmup_steps=0,
                                               lr_scales=(("spatial_mx", 2.0),)), params)


def test_lr_scales_are_checked_in_the_config():
    from labram_jax import config_schema
    from labram_jax_configs import common
    c = common.get_config("tiny", "finetune")
    c.optim.lr_scales = "spatial_mix:30"
    with pytest.raises(config_schema.ConfigError, match="lr_scales.*NAME=FACTOR"):
        config_schema.validate(c, device_count=1)
