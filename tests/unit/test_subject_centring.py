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


def _mixed(rng, n, mixing, gain):
    """``n`` windows [n, C, 2, 200] of independent sources seen through ``gain * mixing``."""
    sources = rng.normal(size=(n, mixing.shape[1], 400))
    return (gain * np.einsum("cs,nst->nct", mixing, sources)).reshape(n, mixing.shape[0], 2, 200)


def test_euclidean_alignment_gives_each_subject_the_identity_as_mean_covariance():
    rng = np.random.default_rng(3)
    a = _mixed(rng, 20, rng.normal(size=(4, 4)), 1.0)
    b = _mixed(rng, 30, rng.normal(size=(4, 4)), 50.0)  # another head and cap, through a 50x gain
    subjects = np.array(["a"] * 20 + ["b"] * 30)
    aligned = subject_centring.align_signals_per_subject(np.concatenate([a, b]), subjects)
    assert aligned.dtype == np.float32 and aligned.shape == (50, 4, 2, 200)
    for rows in (subjects == "a", subjects == "b"):
        np.testing.assert_allclose(subject_centring.covariance(aligned[rows]), np.eye(4), atol=1e-4)
    whitening = subject_centring.whitening_matrix(subject_centring.covariance(a))
    np.testing.assert_allclose(whitening, whitening.T, atol=1e-10)  # symmetric: channels keep their places
    # one window's own alignment and the per-subject function agree; the generic entry dispatches to it
    entry = {"method": "euclidean", "source": "x"}
    np.testing.assert_allclose(subject_centring.apply(entry, a[:1], subject_centring.reference(entry, a)),
                               aligned[:1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(subject_centring.per_subject(entry, np.concatenate([a, b]), subjects), aligned)
    with pytest.raises(ValueError, match="one subject per window"):
        subject_centring.align_signals_per_subject(a, ["a"])


def test_euclidean_alignment_drops_directions_without_variance():
    rng = np.random.default_rng(4)
    x = _mixed(rng, 10, rng.normal(size=(3, 3)), 1.0)
    x = x - x.mean(axis=1, keepdims=True)  # a common average reference: rank 2 of 3
    aligned = subject_centring.align_signals_per_subject(x, ["s"] * 10)
    values = np.linalg.eigvalsh(subject_centring.covariance(aligned))
    np.testing.assert_allclose(np.sort(values), [0.0, 1.0, 1.0], atol=1e-4)  # not 1e6 of amplified rounding
    with pytest.raises(ValueError, match="no signal"):
        subject_centring.whitening_matrix(np.zeros((3, 3)))


def test_alignment_then_spectrum_centring_is_the_one_after_the_other():
    rng = np.random.default_rng(5)
    x = np.concatenate([_mixed(rng, 12, rng.normal(size=(3, 3)), 1.0), _mixed(rng, 8, rng.normal(size=(3, 3)), 9.0)])
    subjects = np.array(["a"] * 12 + ["b"] * 8)
    entry = {"method": "euclidean+spectrum", "band_hz": [1, 45]}
    both = subject_centring.per_subject(entry, x, subjects)
    by_hand = subject_centring.centre_signals_per_subject(subject_centring.align_signals_per_subject(x, subjects),
                                                          subjects)
    np.testing.assert_allclose(both, by_hand, rtol=1e-4, atol=1e-5)
    reference = subject_centring.reference(entry, x[:12])
    assert set(reference) == {"whitening", "log_amplitude"}  # the spectrum is the aligned signals'
    np.testing.assert_allclose(subject_centring.apply(entry, x[:12], reference), both[:12], rtol=1e-4, atol=1e-5)


def test_centring_entries_name_their_method():
    old = {"band_hz": [1, 45], "source": "/x/manifest.json", "subjects": 20}  # written before --method existed
    assert subject_centring.canonical(old) == {"band_hz": [1, 45]}
    assert subject_centring.canonical({"method": "euclidean", "subjects": 3}) == {"method": "euclidean"}
    assert subject_centring.canonical(None) is None
    assert subject_centring.canonical({"method": "euclidean+spectrum", "band_hz": [2, 40], "subjects": 3}) == \
        {"method": "euclidean+spectrum", "band_hz": [2, 40]}
    assert subject_centring.describe({"method": "euclidean+spectrum", "band_hz": [2, 40]}) == \
        "Euclidean-aligned (per subject), then subject-centred spectra (2-40 Hz)"
    assert subject_centring.describe(old) == "subject-centred spectra (1-45 Hz)"
    assert "Euclidean" in subject_centring.describe({"method": "euclidean"})
    with pytest.raises(ValueError, match="upgrade"):
        subject_centring.method_of({"method": "riemann"})
