"""How embeddings are pooled for a linear probe: over every token, or per channel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labram_jax import api
from labram_jax.models import config as model_config, transformer


@pytest.fixture(scope="module")
def predictor():
    model = transformer.LaBraM(model_config.labram("tiny", patch_embed="spectrum", input_norm="channel"))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 3, 2, 200)), jnp.arange(1, 4))
    return api.Predictor("finetune", model, dict(variables), "binary", 2)


def test_channel_pooling_keeps_each_channel_apart(predictor):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3, 2, 200)).astype(np.float32)
    rows = np.array([4, 9, 17], np.int32)
    mean = predictor.embed_windows(x, rows, batch_size=4)
    per_channel = predictor.embed_windows(x, rows, batch_size=4, pooling="channel")
    _, tokens = predictor._run(predictor._embed, x, rows, 4)
    d = mean.shape[1]
    assert per_channel.shape == (5, 3 * d)
    expected = tokens.reshape(5, 3, 2, d).mean(axis=2)
    np.testing.assert_allclose(per_channel.reshape(5, 3, d), expected, rtol=1e-6)
    embeddings = api.Embeddings(mean, tokens.reshape(5, 3, 2, d), ("a", "b", "c"), np.arange(5), ())
    np.testing.assert_allclose(embeddings.per_channel.reshape(5, -1), per_channel, rtol=1e-6)
    # each channel keeps its own embedding, which the mean over all tokens averages away
    gaps = [np.abs(expected[:, i] - expected[:, j]).mean() for i, j in ((0, 1), (0, 2), (1, 2))]
    assert min(gaps) > 0.1
    # "mean" is the head's input, fc_norm of the token mean: not the mean of the per-channel embeddings
    assert not np.allclose(per_channel.reshape(5, 3, d).mean(1), mean)


def test_unknown_pooling_is_refused(predictor):
    with pytest.raises(ValueError, match="choose one of"):
        predictor.embed_windows(np.zeros((1, 3, 2, 200), np.float32), np.arange(1, 4), pooling="max")
