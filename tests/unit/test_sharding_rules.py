"""Logical-axis rules are config data: an override moves a parameter to another mesh axis."""

import jax
import numpy as np
import pytest

from labram_jax_configs import common
from labram_jax import config_schema, sharding, steps
from labram_jax.input_pipeline import Grid


def _specs(config):
    stage = steps.build_stage(config, np.float32)
    abstract = jax.eval_shape(stage.init, jax.random.key(0), steps.dummy_batch(Grid(19, 4)))
    mesh = sharding.make_mesh((2, 2, 2))
    shardings = sharding.logical_shardings(abstract, mesh, sharding.rules_from_config(config))
    return {name: (names, tuple(spec)) for name, _, names, spec in
            sharding.parameter_table(abstract["params"], shardings["params"])}


def test_the_defaults_are_the_config_fields():
    config = common.get_config("tiny", "finetune")
    assert sharding.rules_from_config(config) == sharding.rules_from_config(None) == sharding.DEFAULT_RULES
    assert config.sharding_rules.act_batch == "data+fsdp" and config.sharding_rules.kv == ""


def test_an_override_moves_a_parameter_to_another_mesh_axis():
    config = common.get_config("tiny", "finetune")
    fc1 = "encoder/blocks_0/mlp/fc1/kernel"
    assert _specs(config)[fc1] == (("embed", "mlp"), ("fsdp", "tensor"))
    config.sharding_rules.embed, config.sharding_rules.mlp = "tensor", "fsdp"
    assert _specs(config)[fc1] == (("embed", "mlp"), ("tensor", "fsdp"))
    config.sharding_rules.mlp = ""  # replicated
    assert _specs(config)[fc1] == (("embed", "mlp"), ("tensor", None))


def test_an_unknown_mesh_axis_is_a_config_error(eegmat_shards):
    config = common.get_config("tiny", "finetune")
    config.data.train = str(eegmat_shards)
    config.data.batch_size = 8
    config.sharding_rules.embed = "model"
    with pytest.raises(config_schema.ConfigError, match=r"config.sharding_rules.embed='model': mesh axes are"):
        config_schema.validate(config, 8)
