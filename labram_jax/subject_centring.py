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
- signals (``python -m data_prep.centring --method``); a manifest's ``subject_centring`` entry
  says how (:func:`canonical`: ``{"band_hz": [lo, hi]}``, ``{"method": "euclidean"}`` or
  ``{"method": "euclidean+spectrum", "band_hz": [lo, hi]}``), and models trained
  on such records expect inputs prepared the same way (:func:`reference`, :func:`apply`):

  - ``spectrum`` (:func:`centre_signals_per_subject`): each 1-s patch's FFT divided by the
    subject's mean amplitude spectrum of that channel (geometric mean over all its patches),
    inside ``BAND_HZ``, and zero outside it. The log amplitude spectrum of every patch is then
    centred per subject and channel: what the spectrum stem (``model.patch_embed=spectrum``) reads.
  - ``euclidean`` (:func:`align_signals_per_subject`): Euclidean alignment proper. Every window is
    multiplied by ``R^-1/2``, ``R`` the subject's mean spatial covariance (channels x channels,
    over all its windows), so each subject's windows have the identity as their mean covariance.
    It removes gains and the spatial mixing a head and a cap put between sources and electrodes,
    which per-channel spectra cannot: on EEGMMIDB motor imagery it lifts every classical anchor on
    held-out subjects (BENCHMARKS.md, "Euclidean alignment"). ``R^-1/2`` is symmetric, so each output
    channel stays dominated by its own electrode, with its neighbours' common part subtracted
    (like a surface Laplacian); the values are dimensionless (unit variance per channel).
  - ``euclidean+spectrum``: the two in turn, alignment first, then the aligned signals' spectra
    centred per subject and channel. On EEGMAT it gives the classical anchors far more than
    either alone (BENCHMARKS.md, "Euclidean alignment").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from labram_jax.records import PATCH  # samples per 1-s patch at 200 Hz

CENTRINGS = ("none", "subject")
METHODS = ("spectrum", "euclidean", "euclidean+spectrum")  # how records are centred (data_prep.centring --method)
BAND_HZ = (1, 45)  # signal centring keeps these 1-Hz bins of each 1-s patch (the spectrum stem's)
FLOOR = 1e-8  # added to |FFT| before the log (units of 100 uV x samples)
RANK_TOL = 1e-6  # Euclidean alignment drops covariance directions below this fraction of the largest


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
    return per_subject({"band_hz": list(band_hz)}, signals, subjects)


def align_signal(signal: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """``signal [..., C, W, 200]`` -> ``whitening [C, C]`` applied to its channels at every sample,
    float32, same shape."""
    return np.einsum("cd,...dwt->...cwt", np.asarray(whitening, np.float64),
                     np.asarray(signal, np.float64)).astype(np.float32)


def covariance(signals: np.ndarray) -> np.ndarray:
    """``signals [n, C, W, 200]`` -> ``[C, C]``: the mean over windows of each window's spatial
    covariance (channels demeaned within the window; units of (100 uV)^2)."""
    signals = np.asarray(signals, np.float64)
    if signals.ndim != 4 or signals.shape[-1] != PATCH:
        raise ValueError(f"signals must be [n, channels, windows, {PATCH}], got {signals.shape}")
    x = signals.reshape(signals.shape[0], signals.shape[1], -1)
    x = x - x.mean(-1, keepdims=True)
    return np.einsum("nct,ndt->cd", x, x) / (x.shape[0] * x.shape[-1])


def whitening_matrix(covariance_: np.ndarray) -> np.ndarray:
    """``[C, C]`` spatial covariance ``R`` -> ``R^-1/2`` ``[C, C]`` (symmetric). Directions with
    variance below ``RANK_TOL`` of the largest (a common average reference, a duplicated or flat
    channel) are dropped, not blown up. Raises a ValueError for a covariance without signal."""
    values, vectors = np.linalg.eigh(np.asarray(covariance_, np.float64))
    if not values.max() > 0:
        raise ValueError("the spatial covariance is zero: these windows carry no signal to align; check the "
                         "recordings (flat channels, wrong units) or leave them out")
    kept = values > RANK_TOL * values.max()
    inverse_root = np.where(kept, 1.0 / np.sqrt(np.where(kept, values, 1.0)), 0.0)
    return (vectors * inverse_root) @ vectors.T


def align_signals_per_subject(signals: np.ndarray, subjects: Sequence) -> np.ndarray:
    """``signals [n, C, W, 200]`` (one montage) -> each subject's windows multiplied by the
    inverse square root of that subject's mean spatial covariance (:func:`covariance`)."""
    return per_subject({"method": "euclidean"}, signals, subjects)


def method_of(entry: dict) -> str:
    """The method of a manifest's (or model's) ``subject_centring`` entry; entries written before
    Euclidean alignment existed hold only ``band_hz`` and are ``spectrum``."""
    method = entry.get("method", "spectrum")
    if method not in METHODS:
        raise ValueError(f"unknown subject centring {method!r} (known: {METHODS}); this labram_jax is older than the "
                         "records or model: upgrade it")
    return method


def steps(entry: dict) -> list[str]:
    """The operations of ``entry``'s method, in order: ``["spectrum"]``, ``["euclidean"]`` or
    ``["euclidean", "spectrum"]`` (align, then centre the aligned signals' spectra)."""
    return method_of(entry).split("+")


def canonical(entry: dict | None) -> dict | None:
    """What a ``subject_centring`` entry says about the input, nothing else (no provenance):
    ``{"band_hz": [lo, hi]}`` for spectrum centring, ``{"method": "euclidean"}``,
    ``{"method": "euclidean+spectrum", "band_hz": [lo, hi]}``, or None."""
    if not entry:
        return None
    method = method_of(entry)
    out = {} if method == "spectrum" else {"method": method}
    if "spectrum" in steps(entry):
        out["band_hz"] = [int(b) for b in entry["band_hz"]]
    return out


def describe(entry: dict) -> str:
    """A short phrase for errors and model cards, e.g. "subject-centred spectra (1-45 Hz)",
    "Euclidean-aligned (per subject)"."""
    words = {"euclidean": "Euclidean-aligned (per subject)"}
    if "band_hz" in entry:
        lo, hi = entry["band_hz"]
        words["spectrum"] = f"subject-centred spectra ({lo}-{hi} Hz)"
    return ", then ".join(words[step] for step in steps(entry))


def reference(entry: dict, signals: np.ndarray) -> dict[str, np.ndarray]:
    """One subject's reference for ``entry``'s method from its windows ``[n, C, W, 200]``:
    ``{"whitening": [C, C]}`` (euclidean) and/or ``{"log_amplitude": [C, 101]}`` (spectrum; of the
    aligned signals when it follows alignment)."""
    out = {}
    for step in steps(entry):
        if step == "euclidean":
            out["whitening"] = whitening_matrix(covariance(signals))
            signals = align_signal(signals, out["whitening"])
        else:
            out["log_amplitude"] = reference_log_amplitude(signals)
    return out


def apply(entry: dict, signals: np.ndarray, reference_: dict[str, np.ndarray]) -> np.ndarray:
    """``signals [..., C, W, 200]`` prepared with one subject's :func:`reference` as ``entry`` says."""
    for step in steps(entry):
        if step == "euclidean":
            signals = align_signal(signals, reference_["whitening"])
        else:
            signals = centre_signal(signals, reference_["log_amplitude"], tuple(entry["band_hz"]))
    return signals


def per_subject(entry: dict, signals: np.ndarray, subjects: Sequence) -> np.ndarray:
    """``signals [n, C, W, 200]`` (one montage) prepared per subject as ``entry`` says, each
    subject's reference taken from all of its windows here."""
    signals, subjects = np.asarray(signals), np.asarray(subjects)
    if subjects.shape != signals.shape[:1]:
        raise ValueError(f"one subject per window: {signals.shape[0]} windows, subjects {subjects.shape}")
    out = np.empty(signals.shape, np.float32)
    for subject in np.unique(subjects):
        rows = subjects == subject
        out[rows] = apply(entry, signals[rows], reference(entry, signals[rows]))
    return out
