"""model.input_norm=channel: per-sample, per-channel standardisation before the temporal encoder."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labram_jax import model_file
from labram_jax.models import config as model_config
from labram_jax.models import layers
from labram_jax.models import transformer
from labram_jax.tasks import finetune

IDS = jnp.array([1, 5, 9])


def _signal():
    x = np.asarray(jax.random.normal(jax.random.key(1), (2, 3, 4, 200)))
    return x * np.array([0.1, 2.0, 30.0])[None, :, None, None] + np.array([0.0, 5.0, -1.0])[None, :, None, None]


def test_real_patches_are_standardised_per_channel_and_padding_stays_zero():
    x = _signal()
    mask = np.ones((2, 3, 4), bool)
    mask[1, 2, 2:] = False  # the last two windows of one channel are padding
    x[1, 2, 2:] = 0.0
    x[0, 1] = 3.0  # a flat channel
    out = np.asarray(layers.normalize_channels(jnp.asarray(x), jnp.asarray(mask)))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 1], 0.0, atol=1e-6)
    np.testing.assert_array_equal(out[1, 2, 2:], 0.0)
    real = out[1, 2, :2]
    np.testing.assert_allclose([real.mean(), real.std()], [0.0, 1.0], atol=1e-4)
    for b, c in [(0, 0), (0, 2), (1, 0), (1, 1)]:
        np.testing.assert_allclose([out[b, c].mean(), out[b, c].std()], [0.0, 1.0], atol=1e-4)


def test_model_output_is_invariant_to_channel_gain_and_offset_only_with_input_norm():
    x = _signal()
    rescaled = x * np.array([3.0, 0.2, 1.0])[None, :, None, None] + 0.7
    for norm, invariant in (("channel", True), ("none", False)):
        model = transformer.LaBraM(model_config.labram("tiny", input_norm=norm), num_outputs=2)
        params = model.init(jax.random.key(0), jnp.asarray(x), IDS)
        a, b = (np.asarray(model.apply(params, jnp.asarray(v), IDS, method=transformer.LaBraM.embed)["pooled"])
                for v in (x, rescaled))
        assert np.abs(a).max() > 0.1
        assert np.allclose(a, b, atol=1e-3) == invariant, norm


def test_unknown_input_norm_is_refused():
    with pytest.raises(ValueError, match="input_norm"):
        model_config.labram("tiny", input_norm="global")


def test_fine_tuning_refuses_an_encoder_trained_with_another_input_norm(tmp_path):
    x = jnp.asarray(_signal())
    model = transformer.LaBraMPretrain(model_config.labram("tiny", input_norm="channel"), vocab_size=16)
    variables = nn.unbox(model.init(jax.random.key(0), x, IDS, jnp.zeros((2, 12), bool),
                                    method=transformer.LaBraMPretrain.logits_of))
    path = str(tmp_path / "model.npz")
    model_file.save(path, "pretrain", model, variables)
    assert "patch_embed" in finetune.load_encoder(path, "ours", input_norm="channel")
    with pytest.raises(ValueError, match="input_norm='channel'"):
        finetune.load_encoder(path, "ours", input_norm="none")
