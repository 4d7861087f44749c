"""The metrics of a task's scores (LABRAM.md section 7), over all samples or per group: what
fine-tuning validates with, evaluation reports and the classical baselines are scored by."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def compute_metrics(task: str, score: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """LABRAM.md section 7 metrics with scikit-learn (binary threshold 0.5)."""
    score, target = np.asarray(score), np.asarray(target)
    if task == "binary":
        pred = (score >= 0.5).astype(int)
        two_classes = len(np.unique(target)) == 2
        return {"balanced_accuracy": skm.balanced_accuracy_score(target, pred),
                "auroc": skm.roc_auc_score(target, score) if two_classes else float("nan"),
                "auc_pr": skm.average_precision_score(target, score) if two_classes else float("nan"),
                "accuracy": skm.accuracy_score(target, pred)}
    if task == "multiclass":
        pred = score.argmax(axis=1)
        return {"balanced_accuracy": skm.balanced_accuracy_score(target, pred),
                "cohen_kappa": skm.cohen_kappa_score(target, pred),
                "weighted_f1": skm.f1_score(target, pred, average="weighted"),
                "accuracy": skm.accuracy_score(target, pred)}
    err = score - target
    r = np.corrcoef(score, target)[0, 1] if len(score) > 1 and np.std(score) > 0 else float("nan")
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err ** 2))), "pearson_r": float(r)}


def by_group(task: str, scores: np.ndarray, targets: np.ndarray, groups: list[str]) -> dict[str, dict]:
    """The task's metrics over each group's samples alone (e.g. per subject), and the count."""
    groups = np.asarray(groups)
    out = {}
    for name in sorted(set(groups.tolist())):
        keep = groups == name
        out[name] = {"samples": int(keep.sum()), **compute_metrics(task, scores[keep], targets[keep])}
    return out
