"""Finite evaluation of a fine-tuned model over records; also the validation of training.

    python -m labram_jax.evaluate --workdir=DIR --data=data/eegmat/manifest.json \\
        [--split val] [--checkpoint best|latest|STEP] [--per-recording] [--by-subject] [--mirror keep|swap] \\
        [--blend-anchor log_spectrum_lr] [--out metrics.json]

Prints and writes JSON metrics (binary: balanced accuracy, AUROC, AUC-PR, accuracy at
0.5; multi-class: balanced accuracy, Cohen's kappa, weighted F1, accuracy; regression:
MAE, RMSE, Pearson r), the confusion matrix (classification) and PNGs of it and of
the ROC curve (binary).
``--per-recording`` averages window probabilities per recording first. ``--by-subject`` adds
the metrics of each subject's windows (or recordings) alone: how evenly a model transfers
across people (AUROC is NaN for a subject with one class). ``--mirror`` averages each window's
score with that of the same window left-right mirrored (each electrode's signal under its mirror's
id, C3 <-> C4): ``swap`` for binary left vs right classes (a model fine-tuned with
``finetune.mirror_label=swap``), ``keep`` where a mirrored window keeps its target.
``--blend-anchor NAME`` (binary tasks) fits that classical anchor (``labram_jax.baselines``) on
the ``train`` split of ``--data`` and blends its scores with the model's, window by window
(``labram_jax.anchor_blend``: each model's logits standardised over the windows scored, summed);
the report keeps each model's own metrics under ``alone``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np
from sklearn import metrics as skm

from labram_jax import baselines, config_schema, data_spec, input_pipeline, model_file, records, sharding, steps
from labram_jax.task_metrics import by_group, compute_metrics
from labram_jax.tasks import finetune

log = logging.getLogger("labram_jax")


def predict_split(predict_fn, state, spec, split: str, grid, mesh, batch_size: int, target: str = "label",
                  mirror: str = "none", task: str = "binary"):
    """Scores, targets (the batch field ``target``: ``label`` or ``value``) and global positions
    of every real sample of a split of ``spec`` (a data spec or its sources), in order.
    ``mirror`` (keep or swap; ``task`` says which scores they are): each sample's score averaged
    with its left-right mirror's (:func:`labram_jax.tasks.finetune.mirror_average`)."""
    scores, targets, positions = [], [], []
    guard = input_pipeline.InputGuard(spec, split)  # bad records arrive as invalid samples, and are reported
    for local in input_pipeline.eval_batches(spec, grid, batch_size, split, jax.process_index(),
                                             jax.process_count()):
        position = sharding.to_host(sharding.to_global({"p": guard.take(local)["position"]}, mesh))["p"]
        batch = sharding.to_global(local, mesh)
        out = predict_fn(state.params, state.extra, batch)
        if mirror != "none":
            mirrored, flipped = finetune.mirror_all(batch)
            out = finetune.mirror_average(task, out, predict_fn(state.params, state.extra, mirrored), flipped, mirror)
        out = sharding.to_host(out)
        valid = sharding.to_host(batch["valid"])
        truth = sharding.to_host(batch[target])
        scores.append(out[valid])
        targets.append(truth[valid])
        positions.append(position[valid])
    return np.concatenate(scores), np.concatenate(targets), np.concatenate(positions)


def per_recording(task: str, scores: np.ndarray, targets: np.ndarray, recordings: list[str]):
    """Mean window score (probability or value) per recording; its target must be unique.
    Returns (scores, targets, the recording names), in sorted name order."""
    names = sorted(set(recordings))
    index = {n: i for i, n in enumerate(names)}
    idx = np.asarray([index[r] for r in recordings])
    agg_scores = np.stack([scores[idx == i].mean(axis=0) for i in range(len(names))])
    agg_targets = []
    for i, name in enumerate(names):
        values = np.unique(targets[idx == i])
        if len(values) != 1 and task != "regression":
            raise ValueError(f"recording {name} mixes labels {values.tolist()}: per-recording aggregation needs "
                             "one label per recording")
        agg_targets.append(targets[idx == i].mean() if task == "regression" else values[0])
    return agg_scores, np.asarray(agg_targets), names


def full_report(task: str, scores: np.ndarray, targets: np.ndarray, label_names: list[str] | None = None) -> dict:
    report = {"task": task, "samples": int(len(targets)), **compute_metrics(task, scores, targets)}
    if task != "regression":
        pred = (scores >= 0.5).astype(int) if task == "binary" else scores.argmax(axis=1)
        k = 2 if task == "binary" else scores.shape[1]
        report["confusion_matrix"] = skm.confusion_matrix(targets, pred, labels=list(range(k))).tolist()
        report["labels"] = label_names[:k] if label_names else [str(i) for i in range(k)]
    return report


def plot_confusion(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(report["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(3 + 0.5 * len(cm), 3 + 0.5 * len(cm)))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set_xticks(range(len(cm)), report["labels"], rotation=45)
    ax.set_yticks(range(len(cm)), report["labels"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_roc(scores: np.ndarray, targets: np.ndarray, path: str) -> None:
    """ROC curve of a binary task, with its AUROC in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr, _ = skm.roc_curve(targets, scores)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr)
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC (AUROC {skm.roc_auc_score(targets, scores):.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _label_names(spec: str) -> list[str] | None:
    manifests = [m for pattern in data_spec.DataSpec.parse(spec).manifests for m in data_spec.expand(pattern)]
    if manifests:
        with open(manifests[0]) as f:
            return json.load(f).get("labels", {}).get("names")
    return None


@dataclasses.dataclass(frozen=True)
class RunScores:
    """A fine-tuned run's scores on every real sample of a split, in record order:
    ``scores [n]`` (binary: probability of class 1) or ``[n, K]``, ``targets [n]``, the
    checkpoint's step, the task, and ``provenance`` (field -> one value per sample)."""

    task: str
    step: int
    scores: np.ndarray
    targets: np.ndarray
    provenance: dict[str, list]


def score_run(workdir: str, data: str, split: str = "val", checkpoint: str = "best",
              fields: Sequence[str] = (), mirror: str = "none") -> RunScores:
    """Restores the fine-tuning run in ``workdir`` (its ``checkpoint``: best, latest or a step)
    and scores ``split`` of ``data``; ``fields`` (recording, subject, ...) name the provenance
    to return; ``mirror`` as for :func:`predict_split`. Refuses centred input to an uncentred
    model and the reverse."""
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found: --workdir must be a fine-tuning run's directory")
    with open(config_path) as f:
        config = config_schema.from_saved(json.load(f))
    if config.stage != "finetune":
        raise ValueError(f"{workdir} is a {config.stage} run; evaluation needs a fine-tuning run")
    finished = os.path.exists(os.path.join(workdir, model_file.FILENAME))
    trained_on = model_file.centring_of(workdir) if finished else data_spec.subject_centring(config.data.train)
    data_spec.check_centring_matches(trained_on, data, "--data")
    config.finetune.init_checkpoint = ""  # the checkpoint holds every weight
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
    restored = steps.restore_for_inference(config, workdir, checkpoint)
    scores, targets, positions = predict_split(restored.predict_fn, restored.state, data, split, restored.grid,
                                               restored.mesh, config.data.batch_size, restored.stage.target,
                                               mirror, config.finetune.task)
    provenance = dict(zip(fields, input_pipeline.provenance_at(data, split, positions, *fields))) if fields else {}
    return RunScores(config.finetune.task, restored.step, scores, targets, provenance)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labram_jax.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n")[1])
    parser.add_argument("--workdir", required=True, help="a fine-tuning workdir (config.json + checkpoints)")
    parser.add_argument("--data", required=True, help="manifest.json (or shard glob) of the records to evaluate")
    parser.add_argument("--split", default="val")
    parser.add_argument("--checkpoint", default="best", help="best, latest or a step number")
    parser.add_argument("--per-recording", action="store_true", help="average window scores per recording first")
    parser.add_argument("--by-subject", action="store_true", help="also report the metrics of every subject alone")
    parser.add_argument("--mirror", default="none", choices=finetune.MIRROR_AVERAGES,
                        help="average each window's score with its left-right mirror's (C3 <-> C4): keep (same "
                             "target) or swap (binary left vs right classes, as finetune.mirror_label=swap)")
    parser.add_argument("--blend-anchor", default=None, metavar="ANCHOR",
                        help="binary tasks: blend the model's scores with this classical anchor's (log_spectrum_lr, "
                             "band_power_lr, csp_lda), fitted on the train split of --data (labram_jax.anchor_blend)")
    parser.add_argument("--out", default=None, help="JSON output (default: WORKDIR/eval_<split>_<checkpoint>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        fields = ["recording"] * args.per_recording + ["subject"] * args.by_subject
        run = score_run(args.workdir, args.data, args.split, args.checkpoint, fields, args.mirror)
        task, scores, targets, provenance = run.task, run.scores, run.targets, run.provenance
        alone = {}
        if args.blend_anchor:
            if task != "binary":
                raise ValueError(f"--blend-anchor blends binary scores; {args.workdir} is a {task} model: evaluate it "
                                 "without --blend-anchor")
            (blended,), anchor = baselines.blend_with_anchor(args.blend_anchor, args.data, args.split, targets,
                                                             [scores])
            alone = {"model": compute_metrics(task, scores, targets),
                     args.blend_anchor: compute_metrics(task, anchor, targets)}
            scores = blended
        subjects = provenance.get("subject", [])
        if args.per_recording:
            subject_of = dict(zip(provenance["recording"], subjects))
            scores, targets, names = per_recording(task, scores, targets, provenance["recording"])
            subjects = [subject_of[n] for n in names] if args.by_subject else []
        report = full_report(task, scores, targets, _label_names(args.data))
        report.update(checkpoint_step=run.step, split=args.split, data=args.data,
                      per_recording=args.per_recording, mirror=args.mirror, blend_anchor=args.blend_anchor)
        if alone:
            report["alone"] = {name: {k: float(v) for k, v in m.items()} for name, m in alone.items()}
        if args.by_subject:
            report["by_subject"] = by_group(task, scores, targets, subjects)
    except (FileNotFoundError, ValueError, records.RecordError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.workdir, f"eval_{args.split}_{args.checkpoint}.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    if "confusion_matrix" in report:
        plot_confusion(report, os.path.splitext(out)[0] + "_confusion.png")
    if task == "binary" and len(np.unique(targets)) == 2:
        plot_roc(scores, targets, os.path.splitext(out)[0] + "_roc.png")
    shown = {k: v for k, v in report.items() if isinstance(v, float)}
    print(f"{args.workdir} step {run.step} on {args.split} ({report['samples']} "
          f"{'recordings' if args.per_recording else 'windows'}"
          f"{', blended with ' + args.blend_anchor if args.blend_anchor else ''}):")
    for key, value in shown.items():
        print(f"  {key:<18} {value:.4f}")
    if "confusion_matrix" in report:
        print(f"  confusion matrix (rows true {report['labels']}): {report['confusion_matrix']}")
    for name, row in report.get("alone", {}).items():
        print(f"  {name} alone: " + " ".join(f"{k} {v:.4f}" for k, v in row.items()))
    for subject, row in report.get("by_subject", {}).items():
        print(f"  subject {subject:<12} " + " ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "samples")
              + f" ({row['samples']} samples)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
