"""Subject-wise feature centring: each subject's rows lose that subject's mean, nothing else."""

import numpy as np
import pytest

from labram_jax import subject_centring


def test_each_subject_is_centred_on_its_own_mean_and_keeps_its_differences():
    rng = np.random.default_rng(0)
    subjects = np.array(["a", "b", "a", "c", "b", "a"])
    offsets = {"a": 5.0, "b": -3.0, "c": 40.0}
    features = rng.normal(size=(6, 4)) + np.array([offsets[s] for s in subjects])[:, None]
    centred = subject_centring.centre_per_subject(features, subjects)
    assert centred.shape == features.shape and centred.dtype == np.float64
    for s in offsets:
        rows = subjects == s
        np.testing.assert_allclose(centred[rows].mean(0), 0.0, atol=1e-12)
        # differences between one subject's windows (the conditions) are untouched
        np.testing.assert_allclose(np.diff(centred[rows], axis=0), np.diff(features[rows], axis=0))
    assert np.abs(centred).max() < 5  # the 40-unit offset of subject c is gone
    # integer subject ids work alike
    np.testing.assert_allclose(subject_centring.centre_per_subject(features, [0, 1, 0, 2, 1, 0]), centred)


def test_centring_says_what_to_pass():
    with pytest.raises(ValueError, match="one subject per row"):
        subject_centring.centre_per_subject(np.zeros((4, 2)), ["a", "b"])
    with pytest.raises(ValueError, match="choose one of"):
        subject_centring.check_centring("recording", ["a"])
    with pytest.raises(ValueError, match="pass groups="):
        subject_centring.check_centring("subject", None)
    subject_centring.check_centring("none", None)
