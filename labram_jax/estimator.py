"""LaBraM as scikit-learn estimators: fine-tuning and prediction inside Pipelines, cross-validation
and MOABB evaluations.

    from labram_jax.estimator import LabramClassifier
    clf = LabramClassifier(pretrained="runs/pretrain")      # or "" to train from scratch
    clf.fit(epochs, y)                                      # mne.Epochs, or an array with ch_names and sfreq
    clf.predict_proba(epochs_test)

``X`` is ``mne.Epochs`` or an array ``[n, channels, samples]`` (in ``unit``, with ``ch_names``
and ``sfreq`` given to the constructor, as a MOABB or scikit-learn pipeline passes arrays); each
epoch is one sample of ``floor(duration)`` one-second patches. The estimator does LaBraM's
preprocessing itself (``labram_jax.api.prepare_windows``: channels onto the vocabulary, 0.1-75 Hz,
notch, 200 Hz, units of 100 uV), writes the windows as records in a temporary folder and runs the
very fine-tuning of ``python -m labram_jax.main`` (``train.run``) on them. The defaults are the
small-data recipe (``configs/small_data.py``) from scratch; ``pretrained`` starts from a
pretrained model (our workdir or ``model.npz``, or official weights with ``pretrained_kind``).
``LabramEmbedder`` is ``transform``-only: the pooled embeddings of a pretrained (or fine-tuned)
model, for any scikit-learn classifier after it. All hyperparameters are constructor
arguments, so ``clone``, ``get_params``/``set_params`` and grid searches work.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile

import numpy as np
from array_record.python import array_record_module
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from labram_jax import api, config_schema, manifest as manifest_lib, records, subject_centring, train

log = logging.getLogger("labram_jax")


def write_records(folder: str, x: np.ndarray, labels: np.ndarray, label_names: list[str],
                  channel_rows: np.ndarray) -> str:
    """Windows ``x [n, channels, windows, 200]`` with ``labels [n]`` (ids into ``label_names``)
    as one shard of records and its manifest (all in the ``train`` split); the manifest's path."""
    shard = pathlib.Path(folder) / "shards" / "train.arrayrecord"
    shard.parent.mkdir(parents=True, exist_ok=True)
    writer = array_record_module.ArrayRecordWriter(str(shard), "group_size:1")
    counts: dict[str, int] = {}
    try:
        for i, (window, label) in enumerate(zip(x, labels)):
            name = label_names[int(label)]
            writer.write(records.encode(records.Record(signal=np.asarray(window, np.float32), channel_ids=channel_rows,
                                                       label=int(label), label_name=name, dataset="sklearn",
                                                       recording=f"sample{i}", subject="fit")))
            counts[name] = counts.get(name, 0) + 1
    finally:
        writer.close()
    outcome = {"path": "(in memory)", "recording": "fit", "subject": "fit", "split": "train", "status": "ok",
               "shard": "shards/train.arrayrecord", "windows": len(x), "label_counts": counts}
    manifest = manifest_lib.build([outcome], {"dataset": "sklearn", "labels": {"names": label_names,
                                                                               "regression": False}},
                                  "labram_jax.estimator")
    path = pathlib.Path(folder) / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return str(path)


class _Prepares:
    """Preprocessing shared by the estimators (the constructor's input description)."""

    def _windows(self, X) -> tuple[np.ndarray, np.ndarray]:
        prepared = api.prepare_windows(X if not isinstance(X, list) else np.asarray(X), self.ch_names, self.sfreq,
                                       unit=self.unit, notch=self.notch)
        return prepared.x, np.asarray(prepared.prepared.rows, np.int32)


class LabramClassifier(_Prepares, ClassifierMixin, BaseEstimator):
    """Fine-tunes LaBraM on labelled epochs; ``predict``, ``predict_proba``, ``transform``.

    Args:
      pretrained: a pretraining workdir / ``model.npz`` (ours), official weights (with
        ``pretrained_kind='official'``), or "" to train from scratch.
      size: model size (tiny, base, large, huge); must match ``pretrained``.
      patch_embed, input_norm: how patches enter (the small-data recipe: spectrum, channel);
        must match ``pretrained``.
      ch_names, sfreq, unit: describe array input (ignored for mne.Epochs).
      notch: mains frequency (Hz) of the recordings.
      steps, batch_size, lr, layer_decay, weight_decay, mode: the fine-tuning (``mode``: full,
        linear_probe, last_k or lora).
      class_weight: ``balanced`` or ``none``.
      seed: initialisation and data order.
      workdir: keep the fine-tuning run there (default: a temporary folder, removed after fit).
      verbose: log the training run (default: warnings only).
    """

    def __init__(self, pretrained: str = "", pretrained_kind: str = "ours", size: str = "tiny",
                 patch_embed: str = "spectrum", input_norm: str = "channel", ch_names=None, sfreq=None,
                 unit: str = "V", notch: float = 50.0, steps: int = 300, batch_size: int = 32, lr: float = 1e-4,
                 layer_decay: float = 0.3, weight_decay: float = 0.05, mode: str = "full",
                 class_weight: str = "balanced", seed: int = 0, workdir: str | None = None, verbose: bool = False):
        self.pretrained, self.pretrained_kind, self.size = pretrained, pretrained_kind, size
        self.patch_embed, self.input_norm = patch_embed, input_norm
        self.ch_names, self.sfreq, self.unit, self.notch = ch_names, sfreq, unit, notch
        self.steps, self.batch_size, self.lr, self.layer_decay = steps, batch_size, lr, layer_decay
        self.weight_decay, self.mode, self.class_weight = weight_decay, mode, class_weight
        self.seed, self.workdir, self.verbose = seed, workdir, verbose

    def _config(self, manifest: str, channels: int, windows: int, classes: int):
        c = config_schema.defaults(self.size, "finetune")
        c.seed = self.seed
        c.model.patch_embed, c.model.input_norm = self.patch_embed, self.input_norm
        c.model.num_outputs = 1 if classes == 2 else classes
        c.data.train = manifest
        c.data.max_channels, c.data.max_windows, c.data.batch_size = channels, windows, self.batch_size
        c.optim.lr, c.optim.min_lr, c.optim.layer_decay = self.lr, self.lr / 100, self.layer_decay
        c.optim.weight_decay, c.optim.total_steps = self.weight_decay, self.steps
        c.optim.warmup_steps = max(1, self.steps // 10)
        c.finetune.task = "binary" if classes == 2 else "multiclass"
        c.finetune.mode, c.finetune.class_weight = self.mode, self.class_weight
        c.finetune.init_checkpoint, c.finetune.init_kind = self.pretrained, self.pretrained_kind
        c.log_every = c.eval_every = c.checkpoint_every = max(1, self.steps)
        return c

    def fit(self, X, y):
        """Fine-tunes on epochs ``X`` with labels ``y`` (any values; two or more classes)."""
        x, rows = self._windows(X)
        self.classes_, labels = np.unique(np.asarray(y), return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"fit needs at least two classes in y, got {self.classes_.tolist()}")
        folder = self.workdir or tempfile.mkdtemp(prefix="labram_fit_")
        previous = log.level
        log.setLevel(logging.INFO if self.verbose else logging.WARNING)
        try:
            manifest = write_records(os.path.join(folder, "data"), x, labels, [str(c) for c in self.classes_], rows)
            config = self._config(manifest, x.shape[1], x.shape[2], len(self.classes_))
            train.run(config, os.path.join(folder, "finetune"))
            self.predictor_ = api.load(os.path.join(folder, "finetune"), window_s=x.shape[2], notch=self.notch)
        finally:
            log.setLevel(previous)
            if self.workdir is None:
                shutil.rmtree(folder, ignore_errors=True)
        self.n_features_in_ = x.shape[1]
        return self

    def predict_proba(self, X) -> np.ndarray:
        """[n, n_classes] class probabilities."""
        check_is_fitted(self, "predictor_")
        x, rows = self._windows(X)
        scores = self.predictor_.predict_windows(x, rows, self.batch_size)
        return np.stack([1.0 - scores, scores], axis=1) if len(self.classes_) == 2 else scores

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def decision_function(self, X) -> np.ndarray:
        """P(the second class) for two classes (what ROC AUC scorers read), else the probabilities."""
        proba = self.predict_proba(X)
        return proba[:, 1] if proba.shape[1] == 2 else proba

    def transform(self, X) -> np.ndarray:
        """The fine-tuned model's pooled embeddings [n, D]."""
        check_is_fitted(self, "predictor_")
        x, rows = self._windows(X)
        return self.predictor_.embed_windows(x, rows, self.batch_size)


class LabramEmbedder(_Prepares, TransformerMixin, BaseEstimator):
    """``transform``: LaBraM embeddings of epochs, from a pretrained or fine-tuned model
    (``model``: a workdir, ``model.npz``, Hub folder or official weights); ``fit`` learns
    nothing. Put any scikit-learn classifier after it (a packaged linear probe: :class:`LinearProbe`).
    ``pooling``: ``"mean"`` gives [n, D] (the head's input), ``"channel"`` [n, channels * D]
    (each channel's tokens averaged over time; one montage for every epoch)."""

    def __init__(self, model: str = "", ch_names=None, sfreq=None, unit: str = "V", notch: float = 50.0,
                 batch_size: int = 32, pooling: str = "mean"):
        self.model, self.ch_names, self.sfreq, self.unit = model, ch_names, sfreq, unit
        self.notch, self.batch_size, self.pooling = notch, batch_size, pooling

    def fit(self, X, y=None):
        if not self.model:
            raise ValueError("LabramEmbedder needs model=: a pretrained or fine-tuned model to embed with")
        if self.pooling not in api.POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: choose one of {api.POOLINGS}")
        self.rows_ = None
        self.predictor_ = api.load(self.model, notch=self.notch)
        if self.predictor_.subject_centring:
            raise ValueError(f"{self.model} was trained on subject-centred records, and epochs reach it uncentred "
                             "here: embed them with labram_jax.api (subject_reference, centre) instead")
        return self

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self, "predictor_")
        x, rows = self._windows(X)
        if self.rows_ is None:
            self.rows_ = rows  # the montage of the first epochs transformed
        elif self.pooling == "channel" and not np.array_equal(rows, self.rows_):
            raise ValueError("pooling='channel' concatenates channels in a fixed order, but these epochs map to other "
                             f"channels ({len(rows)}) than the first ones transformed ({len(self.rows_)}): give every "
                             "epoch the same montage, or use pooling='mean'")
        return self.predictor_.embed_windows(x, rows, self.batch_size, self.pooling)


class LinearProbe(ClassifierMixin, BaseEstimator):
    """A linear probe of a LaBraM model: the frozen encoder's embeddings (:class:`LabramEmbedder`,
    ``pooling``), optionally centred per subject (``centring="subject"``), standardised, then an
    L2 logistic regression with class-balanced weights and inverse regularisation ``C``. ``fit``
    only fits the scaler and the regression (seconds on a CPU, no accelerator needed).

    The classifier is the log-spectrum anchor's (``baselines.standardised_lr``), so a probe and
    that anchor differ only in their features. ``centring="subject"``
    (:mod:`labram_jax.subject_centring`) subtracts each subject's mean embedding, computed on its
    own epochs without labels: pass ``groups`` (one subject id per epoch) to ``fit``,
    ``predict`` and ``predict_proba``; every subject's epochs should mix the conditions alike.

    In the 5-fold subject-wise CV on EEGMAT (BENCHMARKS.md "Transfer", 16 training subjects,
    LaBraM-Tiny) the probe reached 0.63-0.65 balanced accuracy / 0.69-0.70 AUROC with random or
    pretrained encoders, below the log-spectrum anchor (0.653 / 0.718); with subject centring
    probe and anchor both rise by about 0.08 / 0.08-0.10 (BENCHMARKS.md, "Subject centring").
    """

    def __init__(self, model: str = "", pooling: str = "channel", C: float = 1e-3, centring: str = "none",
                 ch_names=None, sfreq=None, unit: str = "V", notch: float = 50.0, batch_size: int = 32):
        self.model, self.pooling, self.C, self.centring = model, pooling, C, centring
        self.ch_names, self.sfreq, self.unit, self.notch, self.batch_size = ch_names, sfreq, unit, notch, batch_size

    def fit(self, X, y, groups=None):
        from labram_jax import baselines

        subject_centring.check_centring(self.centring, groups)
        self.embedder_ = LabramEmbedder(model=self.model, ch_names=self.ch_names, sfreq=self.sfreq, unit=self.unit,
                                        notch=self.notch, batch_size=self.batch_size, pooling=self.pooling).fit(X)
        self.classifier_ = baselines.standardised_lr(self.C).fit(self._features(X, groups), y)
        self.classes_ = self.classifier_.classes_
        return self

    def _features(self, X, groups) -> np.ndarray:
        subject_centring.check_centring(self.centring, groups)
        features = self.embedder_.transform(X)
        return subject_centring.centre_per_subject(features, groups) if self.centring == "subject" else features

    def predict_proba(self, X, groups=None) -> np.ndarray:
        """[n, classes] probabilities (``groups``: one subject id per epoch, with subject centring)."""
        check_is_fitted(self, "classifier_")
        return self.classifier_.predict_proba(self._features(X, groups))

    def predict(self, X, groups=None) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X, groups), axis=1)]
