"""Subject centring: unsupervised adaptation to subjects never trained on.

Across people, EEG features differ by a subject-specific offset (skull, impedances, the
amplifier's gain, the resting rhythm) that is often larger than the difference between the
conditions a task compares. Subtracting each subject's mean feature vector, computed over that
subject's own windows without their labels, removes the offset: a classifier fitted on centred
features of the training subjects then sees new subjects on the same footing. It is the
feature-space counterpart of the Euclidean alignment used in cross-subject BCI (He & Wu, IEEE
TBME 2019).

What it needs: every subject's windows to cover the conditions in a similar mix (say, some rest
and some task), on the training subjects and on each new one. A subject recorded in one
condition only is centred onto that condition and loses it. The new subject's windows are all
used for its mean at once (transductive: a calibration recording without labels, not the labels).

Two places to centre:

- features (:func:`centre_per_subject`): a classifier's input vectors, e.g. a linear probe's
  embeddings or a log spectrum (``baselines --centring subject``, ``estimator.LinearProbe``);
- signals (:func:`centre_signals_per_subject`, ``python -m data_prep.centring``): each 1-s patch's
  FFT divided by the subject's mean amplitude spectrum of that channel (geometric mean over all
  its patches), inside ``BAND_HZ``, and zero outside it. The log amplitude spectrum of every patch
  is then centred per subject and channel: what the spectrum stem (``model.patch_embed=spectrum``)
  reads. Models trained on such records expect inputs centred the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from labram_jax.records import PATCH  # samples per 1-s patch at 200 Hz

CENTRINGS = ("none", "subject")
BAND_HZ = (1, 45)  # signal centring keeps these 1-Hz bins of each 1-s patch (the spectrum stem's)
FLOOR = 1e-8  # added to |FFT| before the log (units of 100 uV x samples)


def centre_per_subject(features: np.ndarray, subjects: Sequence) -> np.ndarray:
    """``features [n, F]`` minus the mean of each subject's rows -> ``[n, F]`` (float64).

    ``subjects [n]``: any hashable id per row (str or int).
    """
    features = np.asarray(features, np.float64)
    subjects = np.asarray(subjects)
    if features.ndim != 2 or subjects.shape != features.shape[:1]:
        raise ValueError(f"centre_per_subject takes features [n, F] and one subject per row; got features "
                         f"{features.shape} and subjects {subjects.shape}")
    centred = np.empty_like(features)
    for subject in np.unique(subjects):
        rows = subjects == subject
        centred[rows] = features[rows] - features[rows].mean(0)
    return centred


def check_centring(centring: str, subjects) -> None:
    """Raises a ValueError saying what to pass when ``centring`` is unknown, or is
    ``"subject"`` without ``subjects``."""
    if centring not in CENTRINGS:
        raise ValueError(f"centring={centring!r}: choose one of {CENTRINGS}")
    if centring == "subject" and subjects is None:
        raise ValueError("centring='subject' centres each subject's features on its own mean: pass groups= (one "
                         "subject id per epoch) to fit, predict and predict_proba")


def log_amplitude(signals: np.ndarray) -> np.ndarray:
    """``[..., 200]`` patches -> ``[..., 101]`` ``log(|rfft| + FLOOR)`` in float64 (1-Hz bins 0-100 Hz)."""
    return np.log(np.abs(np.fft.rfft(np.asarray(signals, np.float64), axis=-1)) + FLOOR)


def reference_log_amplitude(signals: np.ndarray) -> np.ndarray:
    """``signals [n, C, W, 200]`` (one subject's windows, one montage) -> ``[C, 101]``, the mean
    over windows and patches of ``log |rfft(patch)|`` per channel and 1-Hz bin."""
    signals = np.asarray(signals, np.float64)
    if signals.ndim != 4 or signals.shape[-1] != PATCH:
        raise ValueError(f"signals must be [n, channels, windows, {PATCH}], got {signals.shape}")
    return log_amplitude(signals).mean(axis=(0, 2))


def centre_signal(signal: np.ndarray, reference: np.ndarray, band_hz: tuple[int, int] = BAND_HZ) -> np.ndarray:
    """``signal [..., C, W, 200]`` with each patch's spectrum divided by ``exp(reference)``
    ``[C, 101]`` inside ``band_hz`` (1-Hz bins, both ends kept) and zeroed outside -> float32,
    same shape. Scaled by sqrt(200): a patch whose amplitude spectrum equals the reference in
    every bin of the band comes out with unit power per bin (dimensionless, no longer 100 uV)."""
    lo, hi = band_hz
    gain = np.zeros(PATCH // 2 + 1)
    gain[lo:hi + 1] = np.sqrt(PATCH)
    gain = gain * np.exp(-np.asarray(reference, np.float64))  # [C, 101]
    spectrum = np.fft.rfft(np.asarray(signal, np.float64), axis=-1)
    return np.fft.irfft(spectrum * gain[:, None, :], n=PATCH, axis=-1).astype(np.float32)


def centre_signals_per_subject(signals: np.ndarray, subjects: Sequence,
                               band_hz: tuple[int, int] = BAND_HZ) -> np.ndarray:
    """``signals [n, C, W, 200]`` (one montage) -> each subject's windows centred on that
    subject's own reference (:func:`reference_log_amplitude`, :func:`centre_signal`)."""
    signals, subjects = np.asarray(signals), np.asarray(subjects)
    if subjects.shape != signals.shape[:1]:
        raise ValueError(f"one subject per window: {signals.shape[0]} windows, subjects {subjects.shape}")
    out = np.empty(signals.shape, np.float32)
    for subject in np.unique(subjects):
        rows = subjects == subject
        out[rows] = centre_signal(signals[rows], reference_log_amplitude(signals[rows]), band_hz)
    return out
