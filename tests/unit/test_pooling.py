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


def test_the_electrode_head_reads_each_electrode_in_its_own_row_whatever_the_montage():
    from labram_jax.models import layers

    cfg = model_config.labram("tiny", patch_embed="spectrum", head_pooling="electrode")
    model = transformer.LaBraM(cfg, num_outputs=1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 3, 200)), jnp.float32)
    ids = jnp.array([3, 7, 20, 40, 5])
    mask = jnp.ones((2, 5, 3), bool).at[1, 4].set(False)  # sample 1 lacks electrode row 5
    variables = model.init(jax.random.key(1), x, ids, mask)
    assert variables["params"]["head"]["kernel"].value.shape == (cfg.num_spatial_rows * cfg.embed_dim, 1)
    out = model.apply(variables, x, ids, mask, method=model.embed)
    rows = out["electrodes"].reshape(2, cfg.num_spatial_rows, cfg.embed_dim)
    occupied = np.flatnonzero(np.abs(np.asarray(rows)).sum(-1).sum(0))
    np.testing.assert_array_equal(occupied, [3, 5, 7, 20, 40])
    assert not np.asarray(rows[1, 5]).any() and np.asarray(rows[0, 5]).any()
    # each row is the fc_norm of that channel's mean token
    tokens = np.asarray(model.apply(variables, x, ids, mask, method=lambda m, *a: m.encoder(*a)))[:, 1:]
    mean_token = jnp.asarray(tokens.reshape(2, 5, 3, -1)[0, 1].mean(0))
    fc = variables["params"]["fc_norm"]
    expected = layers.layer_norm(name="n").apply({"params": fc}, mean_token)
    np.testing.assert_allclose(rows[0, 7], expected, atol=1e-5)
    # the same electrodes in another channel order give the same logits
    perm = jnp.array([2, 0, 4, 1, 3])
    np.testing.assert_allclose(model.apply(variables, x[:, perm], ids[perm], mask[:, perm]),
                               model.apply(variables, x, ids, mask), rtol=1e-5)
    with pytest.raises(ValueError, match="head_pooling"):
        model_config.labram("tiny", head_pooling="channel")
    from labram_jax import convert  # the reference has no such head: no official file of it

    with pytest.raises(convert.ConversionError, match="head_pooling='electrode'"):
        convert.to_official("finetune", transformer.LaBraM(cfg.replace(patch_embed="temporal")), variables)
