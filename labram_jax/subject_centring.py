"""Subject-wise feature centring: unsupervised adaptation to subjects never trained on.

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
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CENTRINGS = ("none", "subject")


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
