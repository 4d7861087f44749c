"""model.temporal_groups: how many GroupNorm groups the temporal encoder normalises separately."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labram_jax import convert, model_file
from labram_jax.models import config as model_config
from labram_jax.models import layers
from labram_jax.models import transformer
from labram_jax.tasks import finetune

IDS = jnp.array([1, 5, 9])


def _encode(groups: int, boost: float) -> np.ndarray:
    """Temporal-encoder output with conv1's filter 0 scaled by ``boost`` (4 filters)."""
    x = jax.random.normal(jax.random.key(1), (2, 6, 200))
    valid = jnp.ones((2, 6), bool)
    encoder = layers.TemporalEncoder(4, groups=groups)
    params = nn.unbox(encoder.init(jax.random.key(0), x, valid))
    conv1 = params["params"]["conv1"]
    params["params"]["conv1"] = {"kernel": conv1["kernel"].at[..., 0].multiply(boost),
                                 "bias": conv1["bias"].at[0].multiply(boost)}
    return np.asarray(encoder.apply(params, x, valid))


def test_four_groups_divide_out_each_filters_power_and_one_group_keeps_it():
    # 4 filters in 4 groups (the reference's Tiny-width case): each filter is normalised on
    # its own, so its overall gain is invisible; in one group the power ratio survives.
    assert np.allclose(_encode(4, 1.0), _encode(4, 10.0), atol=1e-4)
    assert not np.allclose(_encode(1, 1.0), _encode(1, 10.0), atol=1e-2)


def test_groups_must_divide_the_filters():
    with pytest.raises(ValueError, match="temporal_groups=3"):
        model_config.labram("tiny", temporal_groups=3)
    assert model_config.labram("base").temporal_groups == 4  # the reference


def test_fine_tuning_refuses_an_encoder_trained_with_other_groups(tmp_path):
    x = jax.random.normal(jax.random.key(2), (2, 3, 4, 200))
    model = transformer.LaBraMPretrain(model_config.labram("tiny", temporal_groups=1), vocab_size=16)
    variables = nn.unbox(model.init(jax.random.key(0), x, IDS, jnp.zeros((2, 12), bool),
                                    method=transformer.LaBraMPretrain.logits_of))
    path = str(tmp_path / "model.npz")
    model_file.save(path, "pretrain", model, variables)
    assert model_file.load(path)[1].cfg.temporal_groups == 1  # stored in the file's spec
    assert "patch_embed" in finetune.load_encoder(path, "ours", temporal_groups=1)
    with pytest.raises(ValueError, match="temporal_groups=1"):
        finetune.load_encoder(path, "ours", temporal_groups=4)
    with pytest.raises(convert.ConversionError, match="model.temporal_groups=1.*temporal_groups=4"):
        convert.to_official("pretrain", model, variables)  # the reference would compute another function


def test_official_weights_need_the_papers_settings(tmp_path):
    with pytest.raises(ValueError, match="temporal_groups=4"):
        finetune.load_encoder(str(tmp_path / "labram-base.pth"), "official", temporal_groups=1)
    with pytest.raises(ValueError, match="model.input_norm='none'"):
        finetune.load_encoder(str(tmp_path / "labram-base.pth"), "official", input_norm="channel")


def test_group_norm_statistics_span_each_samples_valid_patches_per_group():
    # Against float64 numpy: mean and biased variance per (sample, group) over valid patches x T x
    # C/G; padded patches hold large garbage that must not reach the statistics.
    rng = np.random.default_rng(3)
    b, p, t, c, groups = 3, 7, 25, 8, 4
    x = rng.standard_normal((b, p, t, c)) * rng.uniform(0.5, 20.0, (1, 1, 1, c)) + rng.uniform(-5, 5, (1, 1, 1, c))
    valid = np.ones((b, p), bool)
    valid[1, 4:] = False
    valid[2, 1:] = False
    x[~valid] = 1e6 * rng.standard_normal((int((~valid).sum()), t, c))
    got = np.asarray(layers.masked_group_norm(jnp.asarray(x, jnp.float32), jnp.asarray(valid), groups))
    for i in range(b):
        v = x[i, valid[i]].reshape(-1, t, groups, c // groups)
        mean = v.mean(axis=(0, 1, 3), keepdims=True)
        var = v.var(axis=(0, 1, 3), keepdims=True)
        want = ((v - mean) / np.sqrt(var + layers.GN_EPS)).reshape(-1, t, c)
        np.testing.assert_allclose(got[i, valid[i]], want, rtol=0, atol=2e-5)
