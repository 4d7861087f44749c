"""Parameter counts of the fine-tune presets equal the reference's (one-logit head)."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from labram_jax.models import config as config_lib
from labram_jax.models import transformer

REFERENCE_COUNTS = {"base": 5_820_137, "large": 46_259_121, "huge": 369_236_513}


def count_params(size: str) -> int:
    model = transformer.LaBraM(config_lib.labram(size), num_outputs=1)
    x = jnp.zeros((1, 2, 1, 200), jnp.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.array([1, 2])))
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(nn.unbox(shapes["params"])))


@pytest.mark.parametrize("size", sorted(REFERENCE_COUNTS))
def test_finetune_parameter_count(size):
    assert count_params(size) == REFERENCE_COUNTS[size]


def test_every_parameter_has_logical_axes():
    model = transformer.LaBraM(config_lib.labram("tiny"), num_outputs=2)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2, 1, 200)), jnp.array([1, 2])))
    leaves = jax.tree_util.tree_leaves(shapes["params"], is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape)
