"""model.patch_embed=spectrum: log 1-45 Hz FFT amplitudes of each patch through one Linear layer."""

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


def _sine(hz: float, amplitude: float = 0.2) -> jnp.ndarray:
    t = jnp.arange(200) / 200.0
    return amplitude * jnp.sin(2 * jnp.pi * hz * t)


def test_embedding_is_a_linear_map_of_the_log_spectrum():
    encoder = layers.SpectrumEncoder(8)
    noise = 0.05 * jax.random.normal(jax.random.key(4), (2, 200))  # no near-empty bins (log precision)
    x = (jnp.stack([_sine(10.0), _sine(30.0)]) + noise)[None]  # [1, 2 patches, 200]
    params = nn.unbox(encoder.init(jax.random.key(0), x))
    out = np.asarray(encoder.apply(params, x))
    kernel, bias = (np.asarray(params["params"]["proj"][k]) for k in ("kernel", "bias"))
    assert kernel.shape == (45, 8)  # bins 1..45 Hz
    spectrum = np.abs(np.fft.rfft(np.asarray(x), axis=-1))[..., 1:46]
    np.testing.assert_allclose(out, np.log(spectrum + layers.SPECTRUM_EPS) @ kernel + bias, rtol=1e-4, atol=1e-4)
    # a 10-Hz sine of amplitude 0.2 adds 0.2 * 200 / 2 = 20 to the 10-Hz bin (noise: ~0.5 a bin)
    assert 18.0 < spectrum[0, 0, 9] < 22.0 and spectrum[0, 0, 29] < 3.0
    assert 18.0 < spectrum[0, 1, 29] < 22.0 and spectrum[0, 1, 9] < 3.0


def test_absolute_power_reaches_the_tokens_where_four_groups_divide_it_out():
    # Doubling the signal doubles every amplitude; the spectrum embedding keeps that, the
    # paper's temporal encoder (4 GroupNorm groups over the sample) does not.
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 200))
    outs = {}
    for embed in ("spectrum", "temporal"):
        model = transformer.LaBraM(model_config.labram("tiny", patch_embed=embed), num_outputs=2)
        variables = model.init(jax.random.key(0), x, IDS)
        outs[embed] = [np.asarray(model.apply(variables, s * x, IDS, method=model.embed)["pooled"])
                       for s in (1.0, 2.0)]
    assert not np.allclose(*outs["spectrum"], atol=1e-2)
    np.testing.assert_allclose(*outs["temporal"], atol=2e-3)  # up to GroupNorm eps


def test_padding_patches_do_not_change_real_tokens():
    model = transformer.LaBraM(model_config.labram("tiny", patch_embed="spectrum"), num_outputs=1)
    x = jax.random.normal(jax.random.key(2), (1, 3, 4, 200)) * 0.1
    mask = jnp.ones((1, 3, 4), bool).at[:, 2].set(False)
    variables = model.init(jax.random.key(0), x, IDS, mask)
    noisy = x.at[:, 2].set(100.0)
    np.testing.assert_allclose(np.asarray(model.apply(variables, x, IDS, mask)),
                               np.asarray(model.apply(variables, noisy, IDS, mask)), atol=1e-5)


def test_unknown_patch_embed_is_refused():
    with pytest.raises(ValueError, match="patch_embed='wavelet'"):
        model_config.labram("tiny", patch_embed="wavelet")


def test_fine_tuning_refuses_an_encoder_with_another_embedding_and_export_refuses_it(tmp_path):
    x = jax.random.normal(jax.random.key(3), (2, 3, 4, 200))
    model = transformer.LaBraMPretrain(model_config.labram("tiny", patch_embed="spectrum"), vocab_size=16)
    variables = nn.unbox(model.init(jax.random.key(0), x, IDS, jnp.zeros((2, 12), bool),
                                    method=transformer.LaBraMPretrain.logits_of))
    path = str(tmp_path / "model.npz")
    model_file.save(path, "pretrain", model, variables)
    assert model_file.load(path)[1].cfg.patch_embed == "spectrum"  # stored in the file's spec
    assert "proj" in finetune.load_encoder(path, "ours", patch_embed="spectrum")["patch_embed"]
    with pytest.raises(ValueError, match="patch_embed='spectrum'"):
        finetune.load_encoder(path, "ours")
    with pytest.raises(ValueError, match="model.patch_embed='temporal'"):
        finetune.load_encoder(str(tmp_path / "labram-base.pth"), "official", patch_embed="spectrum")
    with pytest.raises(convert.ConversionError, match="model.patch_embed='spectrum'.*patch_embed='temporal'"):
        convert.to_official("pretrain", model, variables)


def test_the_tokenizer_stage_embeds_with_the_spectrum_and_its_decoder_is_unchanged():
    from labram_jax_configs import common
    from labram_jax.tasks import tokenizer as tokenizer_task

    c = common.get_config("tiny", "tokenizer")
    c.model.patch_embed = "spectrum"
    model = tokenizer_task.model_from_config(c, jnp.float32)
    x = jax.random.normal(jax.random.key(5), (2, 3, 2, 200))
    variables = nn.unbox(model.init(jax.random.key(0), x, IDS))
    assert "proj" in variables["params"]["encoder"]["patch_embed"]
    assert "conv1" not in variables["params"]["encoder"]["patch_embed"]
    assert variables["params"]["decoder"]["patch_embed"]["kernel"].shape[0] == c.tokenizer.code_dim
    out = model.apply(variables, x, IDS)
    assert np.isfinite(float(out["loss"]))
