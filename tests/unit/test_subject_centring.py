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


def test_a_patch_equal_to_its_reference_comes_out_flat_inside_the_band():
    rng = np.random.default_rng(1)
    patches = rng.normal(size=(3, 2, 4, 200)) * np.linspace(0.1, 3.0, 200)  # [n, C, W, 200], coloured
    reference = subject_centring.log_amplitude(patches[0, :, 0])  # [C, 101]: window 0's own spectrum
    centred = subject_centring.centre_signal(patches[0, :, :1], reference)  # [C, 1, 200]
    amplitude = np.abs(np.fft.rfft(centred.astype(np.float64), axis=-1))[:, 0]
    lo, hi = subject_centring.BAND_HZ
    np.testing.assert_allclose(amplitude[:, lo:hi + 1], np.sqrt(200), rtol=1e-4)
    assert amplitude[:, :lo].max() < 1e-4 and amplitude[:, hi + 1:].max() < 1e-4
    assert centred.dtype == np.float32 and centred.shape == (2, 1, 200)


def test_signal_centring_removes_a_subjects_gain_and_keeps_its_conditions():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(6, 3, 2, 200))
    a[3:] = 2.0 * a[:3]  # the second condition: the same windows at twice the amplitude
    b = 10.0 * a  # another subject: the same EEG through a 10x gain (and another head)
    subjects = np.array(["a"] * 6 + ["b"] * 6)
    centred = subject_centring.centre_signals_per_subject(np.concatenate([a, b]), subjects)
    np.testing.assert_allclose(centred[:6], centred[6:], rtol=1e-4, atol=1e-5)  # the gain is gone
    power = (centred.astype(np.float64) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(power[3:6] / power[:3], 4.0, rtol=1e-4)  # the conditions' difference is not
    with pytest.raises(ValueError, match="one subject per window"):
        subject_centring.centre_signals_per_subject(a, ["a"])
    with pytest.raises(ValueError, match="windows, 200"):
        subject_centring.reference_log_amplitude(a[:, :, 0])
