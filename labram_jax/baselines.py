"""Classical EEG baselines on the same records a model sees: what a deep model must beat.

    python -m labram_jax.baselines --data data/eegmat/manifest.json [--train-split train] [--val-split val] \\
        [--baselines band_power_lr log_spectrum_lr csp_lda] [--C 0.01]

Each baseline is a feature map of the windows (``x [n, channels, samples]`` at 200 Hz in
units of 100 uV, exactly as data_prep stored them) and a scikit-learn classifier, fitted on
one split's windows and scored on another's with the fine-tuning metrics
(:func:`labram_jax.task_metrics.compute_metrics`, binary tasks):

- ``band_power_lr``: log band power (Welch, 2-s segments) in delta, theta, alpha, beta and
  low gamma (1-4, 4-8, 8-13, 13-30, 30-45 Hz) of every channel, standardised, logistic
  regression (C = 1, class-balanced).
- ``log_spectrum_lr``: the log power spectrum of every channel in 1-Hz bins from 1 to 45 Hz,
  standardised, strongly regularised logistic regression (C = 0.001, class-balanced).
- ``csp_lda``: the motor-imagery standard: windows band-passed to 8-30 Hz, 4 common spatial
  patterns (``mne.decoding.CSP``, log variance) and linear discriminant analysis with equal
  class priors (class-balanced, like the others).

Every window of both splits must have the same channels (one montage): the features are per
channel. ``--centring subject`` centres each subject's features on its own mean before the
classifier (``labram_jax.subject_centring``: unsupervised adaptation to new subjects). ``--C``
fits the logistic regressions with that inverse regularisation strength instead of theirs (a
sweep shows how much of an anchor is its regularisation; the named anchors keep theirs).
``--blend-with NAME`` scores each baseline blended with NAME's scores, window by window, the way
``evaluate --blend-anchor`` blends a fine-tuned model (``labram_jax.anchor_blend``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Sequence

import numpy as np

from labram_jax import anchor_blend, input_pipeline, records, subject_centring, task_metrics

BANDS_HZ = ((1, 4), (4, 8), (8, 13), (13, 30), (30, 45))
CSP_BAND_HZ = (8.0, 30.0)


def log_band_power(x: np.ndarray) -> np.ndarray:
    """[n, C, T] at 200 Hz -> [n, C * 5] log mean Welch power (2-s segments) per band."""
    from scipy.signal import welch

    freqs, power = welch(x, fs=records.SAMPLE_RATE, nperseg=min(x.shape[-1], 2 * records.SAMPLE_RATE), axis=-1)
    bands = [power[..., (freqs >= lo) & (freqs < hi)].mean(-1) for lo, hi in BANDS_HZ]
    return np.log(np.stack(bands, -1)).reshape(len(x), -1)


def log_spectrum(x: np.ndarray) -> np.ndarray:
    """[n, C, T] at 200 Hz -> [n, C * 44] log Welch power (1-s segments, 1-Hz bins), 1-45 Hz."""
    from scipy.signal import welch

    freqs, power = welch(x, fs=records.SAMPLE_RATE, nperseg=records.SAMPLE_RATE, axis=-1)
    return np.log(power[..., (freqs >= 1) & (freqs < 45)]).reshape(len(x), -1)


def band_passed(x: np.ndarray, band: tuple[float, float] = CSP_BAND_HZ) -> np.ndarray:
    """[n, C, T] -> the same, zero-phase 4th-order Butterworth band-pass (Hz)."""
    from scipy.signal import butter, sosfiltfilt

    sos = butter(4, band, btype="bandpass", fs=records.SAMPLE_RATE, output="sos")
    return sosfiltfilt(sos, x, axis=-1)


def standardised_lr(C: float):
    """Standardised features -> L2 logistic regression with inverse regularisation ``C`` and
    class-balanced weights: the classifier of the LR anchors and of LaBraM's linear probe
    (``estimator.LinearProbe``), so the two differ only in their features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000, class_weight="balanced"))


def _csp_lda():
    from mne.decoding import CSP
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.pipeline import make_pipeline

    return make_pipeline(CSP(n_components=4, reg=None, log=True, norm_trace=False),
                         LinearDiscriminantAnalysis(priors=[0.5, 0.5]))


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A feature map ``[n, C, T] -> features`` and a factory of an unfitted classifier."""

    name: str
    description: str
    features: Callable[[np.ndarray], np.ndarray]
    classifier: Callable[[], object]


BASELINES = {b.name: b for b in (
    Baseline("band_power_lr", "log band power + LR", log_band_power,
             functools.partial(standardised_lr, 1.0)),
    Baseline("log_spectrum_lr", "log spectrum + LR (C = 0.001)", log_spectrum,
             functools.partial(standardised_lr, 0.001)),
    Baseline("csp_lda", "CSP + LDA (8-30 Hz)", band_passed, _csp_lda),
)}


@dataclasses.dataclass(frozen=True)
class Windows:
    """Every window of a split: ``x [n, C, T]`` (100 uV, 200 Hz), ``labels [n]``, ``subjects [n]``."""

    x: np.ndarray
    labels: np.ndarray
    subjects: np.ndarray
    channel_ids: np.ndarray


def load_windows(spec: str, split: str) -> Windows:
    """All labelled windows of ``split`` of a data spec, in file order (one montage)."""
    x, labels, subjects, montage = [], [], [], None
    for rec in input_pipeline.iter_records(spec, split):
        if rec.label < 0:
            continue
        if montage is None:
            montage = rec.channel_ids
        elif not np.array_equal(rec.channel_ids, montage):
            raise ValueError(f"{rec.dataset}/{rec.recording} has other channels than the first record of {spec!r} "
                             f"({split}): classical baselines need one montage")
        signal = rec.signal.reshape(rec.num_channels, -1)
        if x and signal.shape != x[0].shape:
            raise ValueError(f"{rec.dataset}/{rec.recording}@{rec.start_s}s has shape {signal.shape}, the first "
                             f"window {x[0].shape}: classical baselines need windows of one length")
        x.append(signal)
        labels.append(rec.label)
        subjects.append(rec.subject)
    if not x:
        raise ValueError(f"no labelled window in split {split!r} of {spec!r}")
    return Windows(np.stack(x), np.asarray(labels), np.asarray(subjects), np.asarray(montage))


def fit_and_predict(baseline: Baseline, train: Windows, val: Windows, centring: str = "none") -> np.ndarray:
    """Fits on ``train``, returns the probability of label 1 of every ``val`` window, [n_val].
    ``centring="subject"`` centres each subject's features on its own mean first
    (``labram_jax.subject_centring``), in both splits; feature baselines only (not ``csp_lda``,
    whose input is the signal)."""
    subject_centring.check_centring(centring, train.subjects)
    if not np.array_equal(train.channel_ids, val.channel_ids):
        raise ValueError("the training and validation windows have different channels: classical baselines need "
                         "one montage")
    if len(np.unique(train.labels)) != 2:
        raise ValueError(f"classical baselines are binary; the training windows have labels "
                         f"{np.unique(train.labels).tolist()}")
    import mne

    x_train, x_val = baseline.features(train.x), baseline.features(val.x)
    if centring == "subject":
        if x_train.ndim != 2:
            raise ValueError(f"{baseline.name} classifies signals, not feature vectors: subject centring applies to "
                             "the feature baselines (band_power_lr, log_spectrum_lr)")
        x_train = subject_centring.centre_per_subject(x_train, train.subjects)
        x_val = subject_centring.centre_per_subject(x_val, val.subjects)
    with mne.utils.use_log_level("error"):  # CSP logs its rank estimation
        return baseline.classifier().fit(x_train, train.labels).predict_proba(x_val)[:, 1]


def fit_and_score(baseline: Baseline, train: Windows, val: Windows, centring: str = "none",
                  by_subject: bool = False) -> dict:
    """Fits on ``train``, returns the binary metrics on ``val`` (:func:`fit_and_predict`).
    ``by_subject`` adds ``by_subject_auroc``: each ``val`` subject's windows scored alone
    (NaN for a subject with one class)."""
    return metrics_of(fit_and_predict(baseline, train, val, centring), val, by_subject)


def metrics_of(score: np.ndarray, val: Windows, by_subject: bool = False) -> dict:
    """Binary metrics of scores [n] of the ``val`` windows; ``by_subject`` as in :func:`fit_and_score`."""
    out = {k: float(v) for k, v in task_metrics.compute_metrics("binary", score, val.labels).items()}
    if by_subject:
        out["by_subject_auroc"] = {subject: float(m["auroc"]) for subject, m in
                                   task_metrics.by_group("binary", score, val.labels, val.subjects.tolist()).items()}
    return out


def _fits_lr(baseline: Baseline) -> bool:
    return getattr(baseline.classifier, "func", None) is standardised_lr


def with_C(baseline: Baseline, C: float) -> Baseline:
    """``baseline`` with its logistic regression at inverse regularisation strength ``C``."""
    if not _fits_lr(baseline):
        raise ValueError(f"{baseline.name} has no logistic regression: --C applies to "
                         f"{', '.join(n for n, b in BASELINES.items() if _fits_lr(b))}")
    return dataclasses.replace(baseline, description=f"{baseline.description.split(' (C')[0]} (C = {C:g})",
                               classifier=functools.partial(standardised_lr, C))


def run(spec: str, names: Sequence[str] = tuple(BASELINES), train_split: str = "train",
        val_split: str = "val", val_spec: str | None = None, centring: str = "none",
        by_subject: bool = False, C: float | None = None, blend_with: str | None = None) -> dict[str, dict]:
    """Each named baseline fitted on ``train_split`` of ``spec`` and scored on ``val_split`` of
    ``val_spec`` (default: ``spec``); ``centring`` and ``by_subject`` as in :func:`fit_and_score`;
    ``C``: the logistic regressions' inverse regularisation strength instead of their own;
    ``blend_with``: each one's scores blended with this baseline's (``labram_jax.anchor_blend``,
    as a fine-tuned model's are with ``evaluate --blend-anchor``; its own C; not itself)."""
    unknown = [n for n in (*names, *([blend_with] if blend_with else [])) if n not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {sorted(BASELINES)}")
    chosen = {name: BASELINES[name] if C is None else with_C(BASELINES[name], C) for name in names}
    train, val = load_windows(spec, train_split), load_windows(val_spec or spec, val_split)
    if not blend_with:
        return {name: fit_and_score(b, train, val, centring, by_subject) for name, b in chosen.items()}
    partner = fit_and_predict(BASELINES[blend_with], train, val, centring)
    return {name: metrics_of(anchor_blend.blend(fit_and_predict(b, train, val, centring), partner), val, by_subject)
            for name, b in chosen.items() if name != blend_with}


def anchor_scores(name: str, spec: str, split: str = "val", train_split: str = "train",
                  train_spec: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The baseline ``name`` fitted on ``train_split`` of ``train_spec`` (default: ``spec``):
    (probability of label 1 [n], label [n]) of every labelled window of ``split`` of ``spec``, in
    record order."""
    if name not in BASELINES:
        raise ValueError(f"unknown anchor {name!r}; choose from {sorted(BASELINES)}")
    if split == train_split:
        raise ValueError(f"the anchor is fitted on split {train_split!r}: blend it on another split, not on the "
                         "windows it was fitted on")
    val = load_windows(spec, split)
    return fit_and_predict(BASELINES[name], load_windows(train_spec or spec, train_split), val), val.labels


def blend_with_anchor(name: str, spec: str, split: str, targets: np.ndarray,
                      model_ps: Sequence[np.ndarray], train_spec: str | None = None) -> tuple[list[np.ndarray],
                                                                                               np.ndarray]:
    """Binary models' scores of ``split`` of ``spec`` (``model_ps``: each [n], in record order,
    with their ``targets`` [n]) each blended with the baseline ``name``, fitted once on the
    ``train`` split of ``train_spec`` (default: ``spec``; ``labram_jax.anchor_blend``): (the
    blended scores, each [n]; the anchor's own [n])."""
    anchor_p, anchor_targets = anchor_scores(name, spec, split, train_spec=train_spec)
    check_same_windows(anchor_targets, targets, f"{spec!r} ({split})")
    return [anchor_blend.blend(p, anchor_p) for p in model_ps], anchor_p


def check_same_windows(anchor_labels: np.ndarray, targets: np.ndarray, where: str) -> None:
    """Refuses to blend a model's scores (``targets`` [n]) with an anchor's (``anchor_labels``
    [m]) unless both read the same labelled windows of ``where`` in the same order."""
    if len(anchor_labels) != len(targets) or not np.array_equal(anchor_labels, targets):
        raise ValueError(f"the model scored {len(targets)} windows of {where} and the anchor {len(anchor_labels)} "
                         "labelled ones with other labels: blending needs every window labelled and read in the "
                         "same order")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labram_jax.baselines", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--data", required=True, help="a data spec (manifest.json) with labelled windows")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="val")
    parser.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=sorted(BASELINES))
    parser.add_argument("--centring", choices=subject_centring.CENTRINGS, default="none",
                        help="subject: centre each subject's features on its own mean (both splits; feature "
                        "baselines only), see labram_jax.subject_centring")
    parser.add_argument("--by-subject", action="store_true", help="also score each validation subject's windows "
                        "alone (AUROC): how evenly a baseline transfers across people")
    parser.add_argument("--C", type=float, default=None, help="inverse regularisation strength of the logistic "
                        "regressions (default: each baseline's own: band power 1, log spectrum 0.001)")
    parser.add_argument("--blend-with", default=None, choices=sorted(BASELINES), help="score each baseline "
                        "blended with this one (labram_jax.anchor_blend: standardised logits summed), as "
                        "`evaluate --blend-anchor` blends a fine-tuned model: what two classical models give together")
    parser.add_argument("--out", default="", help="also write the metrics as JSON here")
    args = parser.parse_args(argv)
    try:
        results = run(args.data, args.baselines, args.train_split, args.val_split, centring=args.centring,
                      by_subject=args.by_subject, C=args.C, blend_with=args.blend_with)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, metrics in results.items():
        subjects = metrics.pop("by_subject_auroc", {})
        description = BASELINES[name].description if args.C is None else with_C(BASELINES[name], args.C).description
        if args.blend_with:
            description += f" + {BASELINES[args.blend_with].description}"
        print(f"{description:<32} " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if subjects:
            print(f"{'':<32} AUROC by subject: " + " ".join(f"{k} {v:.2f}" for k, v in subjects.items()))
            metrics["by_subject_auroc"] = subjects
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
