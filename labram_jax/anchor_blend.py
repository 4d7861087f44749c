"""A fine-tuned model's scores blended with a classical anchor's on the same windows.

    python -m labram_jax.evaluate --workdir=RUN --data=data/mi/manifest.json --blend-anchor log_spectrum_lr

The anchor (``labram_jax.baselines``: ``log_spectrum_lr``, ``band_power_lr``, ``csp_lda``) is
fitted on the ``train`` split of the same data spec (the windows the model was fine-tuned on)
and scores the evaluated windows (``baselines.blend_with_anchor``). Each model's binary logit,
``log(p / (1 - p))``, is standardised over the windows scored (mean 0, std 1; no labels are
used) and the two are summed; the blended probability of label 1 is the sigmoid of that sum. Standardising puts a
fine-tuned network, whose logits grow large once it has memorised its training subjects, and a
strongly regularised linear model, whose logits stay near 0, on one scale, so each counts
equally. Like subject centring (``data_prep.centring``) it needs a batch of unlabelled windows,
not one; the 0.5 threshold then assumes the scored windows hold both classes in similar
numbers (AUROC does not depend on it).

On motor imagery (EEGMMIDB left vs right fist, 5-fold subject-wise CV, BENCHMARKS.md "Session
14") LaBraM-Tiny alone stays below the log spectrum + LR, but blended with it is above it
(0.693 / 0.763 against 0.685 / 0.748 balanced accuracy / AUROC, 15 runs): the two err on
different trials. Blending two classical anchors the same way is not above the better one.
"""

from __future__ import annotations

import numpy as np

PROBABILITY_CLIP = 1e-6  # p is clipped to [clip, 1 - clip] before its logit: |logit| <= 13.8


def standardised_logits(p: np.ndarray) -> np.ndarray:
    """Probabilities of label 1, [n] -> their logits standardised over the n windows, [n]."""
    p = np.asarray(p, np.float64)
    if p.ndim != 1:
        raise ValueError(f"blending needs one probability per window (a binary task); got scores of shape {p.shape}")
    z = np.log(np.clip(p, PROBABILITY_CLIP, 1 - PROBABILITY_CLIP)) - np.log(np.clip(1 - p, PROBABILITY_CLIP, 1))
    if len(z) < 2 or z.std() == 0:
        raise ValueError(f"blending standardises each model's logits over the windows scored: {len(z)} window(s) "
                         "with one score cannot be standardised; score a subject's or a session's windows together")
    return (z - z.mean()) / z.std()


def blend(model_p: np.ndarray, anchor_p: np.ndarray) -> np.ndarray:
    """The two models' standardised logits summed, as a probability of label 1: [n], [n] -> [n]."""
    if np.shape(model_p) != np.shape(anchor_p):
        raise ValueError(f"the model scored {np.shape(model_p)} windows and the anchor {np.shape(anchor_p)}: "
                         "blending needs the same windows")
    return 1 / (1 + np.exp(-(standardised_logits(model_p) + standardised_logits(anchor_p))))
