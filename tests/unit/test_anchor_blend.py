"""labram_jax.anchor_blend: a fine-tuned model's scores blended with a classical anchor's."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from labram_jax import anchor_blend


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_standardised_logits_have_mean_zero_and_unit_spread_and_saturated_scores_stay_finite():
    rng = np.random.default_rng(0)
    p = _sigmoid(rng.normal(0.3, 2.0, 50))
    p[:3] = [0.0, 1.0, 1.0]  # float32 sigmoids of a memorising network saturate
    z = anchor_blend.standardised_logits(p)
    assert np.isfinite(z).all()
    assert z.mean() == pytest.approx(0, abs=1e-12) and z.std() == pytest.approx(1)
    # the order of the windows is kept: a monotone map of scores
    assert (np.argsort(z[3:]) == np.argsort(p[3:])).all()


def test_each_model_weighs_the_same_however_confident_its_scores():
    rng = np.random.default_rng(1)
    model_logit, anchor_logit = rng.normal(size=40), rng.normal(size=40)
    plain = anchor_blend.blend(_sigmoid(model_logit), _sigmoid(anchor_logit))
    # a network 4 times as confident, a shrunk LR 50 times less: the blend does not move (within the
    # clip of |logit| <= 13.8)
    confident = anchor_blend.blend(_sigmoid(4 * model_logit + 1), _sigmoid(anchor_logit / 50))
    assert np.abs(4 * model_logit + 1).max() < 13
    np.testing.assert_allclose(confident, plain, atol=1e-7)
    # and it is the sum of the two standardised logits, not either alone
    z = (model_logit - model_logit.mean()) / model_logit.std() + (anchor_logit - anchor_logit.mean()) / anchor_logit.std()
    np.testing.assert_allclose(plain, _sigmoid(z), atol=1e-9)


def test_two_models_that_err_on_different_windows_blend_above_each():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 200)
    signal = 2.0 * y - 1
    model = _sigmoid(signal + rng.normal(0, 1.5, y.size))  # independent noise: different errors
    anchor = _sigmoid(0.01 * (signal + rng.normal(0, 1.5, y.size)))  # strongly shrunk: logits near 0
    blended = anchor_blend.blend(model, anchor)
    assert roc_auc_score(y, blended) > max(roc_auc_score(y, model), roc_auc_score(y, anchor)) + 0.02


@pytest.mark.parametrize("model, anchor, match", [
    (np.full(5, 0.7), np.linspace(0.1, 0.9, 5), "cannot be standardised"),
    (np.array([0.7]), np.array([0.2]), "1 window"),
    (np.linspace(0.1, 0.9, 5), np.linspace(0.1, 0.9, 4), "same windows"),
    (np.full((4, 3), 0.3), np.full((4, 3), 0.3), "binary task"),
])
def test_what_cannot_be_blended_is_refused_with_the_reason(model, anchor, match):
    with pytest.raises(ValueError, match=match):
        anchor_blend.blend(model, anchor)


def _problems(config) -> str:
    from labram_jax import config_schema

    try:
        config_schema.validate(config, 1)
    except config_schema.ConfigError as err:
        return str(err)  # every problem, listed (here also the recipe's data paths, absent in tests)
    return ""


def test_the_config_names_every_anchor_the_baselines_have():
    from labram_jax import baselines
    from labram_jax_configs import motor_imagery

    c = motor_imagery.get_config("finetune")
    assert c.finetune.blend_anchor == "log_spectrum_lr" and "blend_anchor" not in _problems(c)
    for name in baselines.BASELINES:
        c.finetune.blend_anchor = name
        assert "blend_anchor" not in _problems(c)
    c.finetune.blend_anchor = "svm"
    assert "blend_anchor='svm': choose one of" in _problems(c)
    c.finetune.blend_anchor, c.finetune.task, c.finetune.mirror_label = "csp_lda", "multiclass", "keep"
    c.model.num_outputs = 3
    assert "blends binary scores" in _problems(c)
