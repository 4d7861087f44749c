"""Padding never changes a real token's output, for all three models.

A sample is embedded in a larger channel x window grid whose extra cells hold
random garbage (not zeros, so that leaking padding shows); its valid outputs must
equal the unpadded run. A batch mixing two montages must equal each sample alone.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labram_jax.models import config as config_lib
from labram_jax.models import tokenizer as tokenizer_lib
from labram_jax.models import transformer

TOL = 1e-5
N, A = 5, 3  # the real sample
NP, AP = 7, 5  # the padded grid


def _sample(seed, n=N, a=A):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.5, (1, n, a, 200)).astype(np.float32)
    ch = rng.choice(np.arange(1, 129), n, replace=False).astype(np.int32)[None]
    return x, ch


def _pad(x, ch, seed=99):
    """Puts x [1, N, A, 200] in the corner of a [1, NP, AP, 200] grid of garbage."""
    rng = np.random.default_rng(seed)
    n, a = x.shape[1:3]
    xp = rng.normal(0, 3.0, (1, NP, AP, 200)).astype(np.float32)
    xp[:, :n, :a] = x
    chp = rng.integers(1, 129, (1, NP)).astype(np.int32)
    chp[:, :n] = ch
    mask = np.zeros((1, NP, AP), bool)
    mask[:, :n, :a] = True
    return xp, chp, mask


def _valid_tokens(t, n=N, a=A):
    """Patch tokens [1, NP*AP, ...] of the padded grid -> the real ones [1, N*A, ...]."""
    return t.reshape((1, NP, AP) + t.shape[2:])[:, :n, :a].reshape((1, n * a) + t.shape[2:])


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


@pytest.fixture(scope="module")
def finetune():
    model = transformer.LaBraM(config_lib.labram("tiny"), num_outputs=3)
    x, ch = _sample(0)
    return model, model.init(jax.random.key(1), x, ch)


def test_finetune_padding_invariance(finetune):
    model, variables = finetune
    x, ch = _sample(0)
    xp, chp, mask = _pad(x, ch)
    ref = model.apply(variables, x, ch, method=model.embed)
    pad = model.apply(variables, xp, chp, mask, method=model.embed)
    assert _rel(pad["pooled"], ref["pooled"]) < TOL
    assert _rel(_valid_tokens(pad["tokens"][:, 1:]), ref["tokens"][:, 1:]) < TOL
    assert _rel(pad["tokens"][:, 0], ref["tokens"][:, 0]) < TOL
    assert _rel(model.apply(variables, xp, chp, mask), model.apply(variables, x, ch)) < TOL
    # Without the mask the garbage would change the result: the test can fail.
    assert _rel(model.apply(variables, xp, chp), model.apply(variables, x, ch)) > 1e-3


def test_finetune_mixed_montages_batch(finetune):
    model, variables = finetune
    x1, ch1 = _sample(1, 5, 3)
    x2, ch2 = _sample(2, 7, 5)
    x1p, ch1p, m1 = _pad(x1, ch1)
    batch_x = np.concatenate([x1p, x2])
    batch_ch = np.concatenate([ch1p, ch2])
    batch_m = np.concatenate([m1, np.ones((1, NP, AP), bool)])
    logits = model.apply(variables, batch_x, batch_ch, batch_m)
    assert _rel(logits[:1], model.apply(variables, x1, ch1)) < TOL
    assert _rel(logits[1:], model.apply(variables, x2, ch2)) < TOL


def test_pretrain_padding_invariance():
    model = transformer.LaBraMPretrain(config_lib.labram("tiny"), vocab_size=64)
    x, ch = _sample(3)
    token_mask = np.random.default_rng(4).random((1, N * A)) < 0.5
    variables = model.init(jax.random.key(0), x, ch, token_mask, method=model.logits_of)
    xp, chp, mask = _pad(x, ch)
    token_mask_p = np.zeros((1, NP, AP), bool)
    token_mask_p[:, :N, :A] = token_mask.reshape(1, N, A)
    ref = model.apply(variables, x, ch, token_mask, method=model.logits_of)
    pad = model.apply(variables, xp, chp, token_mask_p.reshape(1, -1), mask, method=model.logits_of)
    assert _rel(_valid_tokens(pad), ref) < TOL


def test_tokenizer_padding_invariance():
    cfg = config_lib.tokenizer("tiny")
    model = tokenizer_lib.VQNSP(cfg)
    x, ch = _sample(5)
    variables = nn.unbox(model.init(jax.random.key(0), x, ch))
    xp, chp, mask = _pad(x, ch)
    ref, ref_cb = model.apply(variables, x, ch, train=True, update_codebook=True, mutable=["codebook"])
    pad, pad_cb = model.apply(variables, xp, chp, mask, train=True, update_codebook=True, mutable=["codebook"])
    for key in ("loss", "amplitude_loss", "phase_loss", "commitment_loss"):
        assert _rel(pad[key], ref[key]) < TOL, key
    np.testing.assert_array_equal(_valid_tokens(pad["codes"]), ref["codes"])
    for key in ("rec_amplitude", "rec_phase", "quantized"):
        assert _rel(_valid_tokens(pad[key]), ref[key]) < TOL, key
    for key in ("embedding", "cluster_size"):
        assert _rel(pad_cb["codebook"]["quantizer"][key], ref_cb["codebook"]["quantizer"][key]) < TOL, key
    amp, phase = tokenizer_lib.fourier_targets(xp, mask)
    amp_ref, phase_ref = tokenizer_lib.fourier_targets(x)
    assert _rel(amp[:, :N, :A], amp_ref) < TOL and _rel(phase[:, :N, :A], phase_ref) < TOL


def test_too_many_windows_is_a_clear_error(finetune):
    model, variables = finetune
    x = jnp.zeros((1, 2, 17, 200))
    with pytest.raises(ValueError, match="time-embedding table has 16 rows"):
        model.apply(variables, x, jnp.array([1, 2]))
