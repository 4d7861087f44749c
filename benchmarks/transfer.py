"""Does pretraining transfer to subjects the recipe never saw? Subject-wise CV, several corpora.

    python -m benchmarks.transfer --task eegmat --corpus none eegmat mmidb mmidb+eegmat \\
        --stem spectrum temporal --seeds 0 1 2 [--folds 5] [--mmidb CORPUS_DIR] \\
        [--data data/transfer] [--workdir runs/transfer] [--set STAGE:FIELD=VALUE ...] [--tag NAME]
    python -m benchmarks.transfer --task mmidb_mi --corpus none mmidb --stem spectrum --seeds 0 1 2 --mmidb CORPUS_DIR
    python -m benchmarks.transfer --task mmidb_mi --folds 5 --corpus none mmidb --seeds 0 --mmidb CORPUS_DIR
    python -m benchmarks.transfer --task mmidb_eyes --corpus none --stem spectrum --seeds 0 --mmidb CORPUS_DIR

Tasks (binary, balanced accuracy and AUROC at the last step; no step or checkpoint is picked
on the subjects a number is reported on):

- ``eegmat``: rest vs mental arithmetic, the 20 EEGMAT subjects of ``../shared/eeg/eegmat``
  in ``--folds`` subject-wise folds (``data_prep.folds``, seed 0: 5 folds of 4 subjects).
  In each fold LaBraM-Tiny is fine-tuned (``configs/eegmat.py``) on the other subjects'
  5-s windows taken every second and scored on the fold's non-overlapping windows.
- ``mmidb_mi``: EEGMMIDB imagined left vs right fist (runs 4, 8, 12), one 4-s window per
  trial from its onset; subjects ``MI_TEST_SUBJECTS`` are held out (and never pretrained on),
  the other 20 train (``configs/small_data.py``, 64 channels x 4 s, ``EEGMMIDB_FINETUNE_STEPS``).
  With ``--folds K``: subject-wise K-fold CV over all 25 subjects instead (fold 0 of 5 is the
  held-out split); reported apart, in ``<workdir>/mmidb_mi-cv<K>.json``.
- ``mmidb_mi_exec``: the same test (imagery runs of the same held-out subjects or folds), the
  training subjects' executed left/right fist runs (3, 7, 11) training too: twice the labelled
  trials, for fine-tuning and anchors alike (each subject's records are aligned and centred over
  all six runs, the test subjects' executed runs included: no labels are read for it).
- ``mmidb_eyes``: EEGMMIDB eyes open vs eyes closed (baseline runs 1 and 2, 4-s windows),
  the same held-out subjects: a task with a strong, known signal (alpha), used to check that
  channels placed by position keep what a model learnt (``benchmarks.montage_soundness``).

Pretraining corpora (``--corpus``; each is the tokenizer's and the masked model's training
data, unlabelled): ``none`` (fine-tuning from random weights); ``eegmat`` (the fold's EEGMAT
training subjects only); ``mmidb`` (every public EEGMMIDB run of ``--mmidb`` except the MI
test subjects' runs, or with ``--folds`` the fold's test subjects' runs: no EEGMAT at all, 64
channels at 160 Hz -> EEGMAT's 19); ``mmidb+eegmat`` (both, mixed 1:1 in every batch: 64- and
19-channel samples padded to one grid). Pretraining reads 4-s windows (EEGMAT's every 2 s);
every corpus gets the same budget of steps (``PRETRAIN_STEPS``, batch 64). Pretraining that
sees no EEGMAT subject is shared by every fold (on an EEGMMIDB task's CV each fold has its
own), and one pretraining (``--pretrain-seed``) serves every fine-tuning seed. ``--stem`` sets
``model.patch_embed`` of every stage.

``--probe mean channel`` replaces fine-tuning by linear probes: the encoder stays frozen
(random weights for corpus ``none``, one per seed; the pretrained encoder otherwise), its
embeddings are pooled over every token or per channel (``api.Predictor.embed_windows``) and
the log-spectrum anchor's standardised logistic regression is fitted on the anchors' windows.
``--centring features`` centres each subject's features on its own mean (no labels) in the
probes and the feature anchors; ``--centring signals`` runs everything (pretraining, fine-tuning,
probes, anchors) on subject-centred copies of the records (``data_prep.centring``), and
``--centring aligned`` on Euclidean-aligned copies (``data_prep.centring --method euclidean``),
``--centring aligned-signals`` on copies aligned and then centred (``--method euclidean+spectrum``); see
``labram_jax.subject_centring``.

``--ensemble ROW`` scores a row's finished runs again, the seeds of each fold as one model
(probabilities averaged), and prints each held-out subject's AUROC (with ``--mirror swap`` each
window's score is first averaged with its left-right mirror's, the two classes swapped: a
one-seed row then gives that test-time averaging's figures); ``--compare ROW_A ROW_B``
prints paired differences run by run. Both only read finished runs.

The classical baselines (``labram_jax.baselines``) are fitted on the same training subjects'
non-overlapping windows and scored on the same windows. The report gives, per row, the mean +-
std over folds x seeds and each fold's mean; ``<workdir>/<task>.json`` keeps every number
(``<task>-cv<K>.json`` for an EEGMMIDB task's CV).
Every run resumes (rerun the same command); finished runs are read back, not repeated.
The public EEGMMIDB corpus is rebuilt by ``../shared/eeg/public/extract.py`` (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import functools
import json
import logging
import pathlib
import re
import time

import numpy as np

from labram_jax_configs import eegmat as eegmat_config
from labram_jax_configs import small_data
from data_prep import __main__ as data_prep_cli
from data_prep import centring as centring_lib
from data_prep import folds as folds_lib
from labram_jax import manifest as manifest_lib
from labram_jax import records as records_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
EEGMAT = ROOT.parent / "shared" / "eeg" / "eegmat"
# Held-out motor-imagery subjects: the first 5 of the 25 with MI runs, shuffled with
# np.random.default_rng(0) (chosen before any model was run).
MI_TEST_SUBJECTS = ("S005", "S011", "S012", "S020", "S042")
# EEGMMIDB fine-tuning runs as many steps as the EEGMAT recipe's 3 epochs (about 180 of batch 64,
# 60 warming up): 3 epochs of the 885 MI training trials are 42 steps, after which the training
# loss was still ln 2 (0.6931; decided on that loss, not on held-out scores).
EEGMMIDB_FINETUNE_STEPS = (180, 60)
CORPORA = ("none", "eegmat", "mmidb", "mmidb+eegmat")
STEMS = ("spectrum", "temporal")
TASKS = ("eegmat", "mmidb_mi", "mmidb_mi_exec", "mmidb_eyes")
PRETRAIN_STEPS = eegmat_config.PRETRAIN_STEPS  # every corpus, batch 64 (configs/eegmat.py pretrains the same)
PRETRAIN_GRID = {"eegmat": (19, 4), "mmidb": (64, 4), "mmidb+eegmat": (64, 4)}  # channels x 4-s windows
# --centring: none, subject-centred features, subject-centred records, Euclidean-aligned records, aligned then centred
CENTRINGS = ("none", "features", "signals", "aligned", "aligned-signals")
CENTRED_SUFFIX = {"none": "", "features": "+centred-features", "signals": "+centred-signals",
                  "aligned": "+aligned-signals", "aligned-signals": "+aligned-centred-signals"}
CENTRED_ANCHOR = {"none": "", "features": " + centred features", "signals": " (subject-centred records)",
                  "aligned": " (Euclidean-aligned records)",
                  "aligned-signals": " (Euclidean-aligned, then subject-centred records)"}
RECORD_CENTRINGS = {"signals": ("spectrum", "_centred"), "aligned": ("euclidean", "_aligned"),
                    "aligned-signals": ("euclidean+spectrum", "_aligned_centred")}  # method, folder suffix
TASK_BASELINES = {"eegmat": ("band_power_lr", "log_spectrum_lr", "csp_lda"),
                  "mmidb_mi": ("csp_lda", "band_power_lr", "log_spectrum_lr"),
                  "mmidb_mi_exec": ("csp_lda", "band_power_lr", "log_spectrum_lr"),
                  "mmidb_eyes": ("band_power_lr", "log_spectrum_lr")}
log = logging.getLogger("labram_jax")


@dataclasses.dataclass(frozen=True)
class Split:
    """One evaluation split: name, fine-tuning (train, val) manifests, pretraining spec of its
    own subjects ('' if the task's subjects are not pretrained on), and the EEGMMIDB corpus
    without this split's test subjects when it is not the shared one ('': ``mmidb_corpus``)."""

    name: str
    train: str
    val: str
    baseline: str  # manifest whose train/val splits the classical baselines read
    pretrain_own: str
    mmidb_corpus: str = ""


def _data_prep(inputs: list[str], out: pathlib.Path, args: list[str]) -> str:
    manifest = out / "manifest.json"
    if not manifest.exists():
        code = data_prep_cli.main([*inputs, "--out", str(out), "--quiet", "--workers", "2", *args])
        if code != 0:
            raise SystemExit(f"data_prep failed for {out} (exit {code}); see {manifest}")
    return str(manifest)


EEGMAT_LABELS = ["--label-from", "filename", "--label-pattern", r"_1\.edf$=rest", "--label-pattern",
                 r"_2\.edf$=arithmetic", "--subject-pattern", r"Subject(\d+)_", "--dataset", "eegmat", "--window", "5"]


def _centred(manifest: str, centring: str) -> str:
    """``manifest`` itself, or its copy prepared by ``data_prep.centring`` as ``RECORD_CENTRINGS``
    says (subject-centred, Euclidean-aligned, or both), written once beside it as
    ``<folder>_centred``, ``<folder>_aligned`` or ``<folder>_aligned_centred``."""
    if centring not in RECORD_CENTRINGS:
        return manifest
    method, suffix = RECORD_CENTRINGS[centring]
    source = pathlib.Path(manifest)
    out = source.parent.with_name(source.parent.name + suffix)
    if not (out / "manifest.json").exists():
        centring_lib.centre_manifest(source, out, progress=False, method=method)
    return str(out / "manifest.json")


def eegmat_splits(eegmat: pathlib.Path, data: pathlib.Path, folds: int, centring: str = "none") -> list[Split]:
    """The EEGMAT conversions (1-s and 5-s strides, every subject; subject-centred copies with
    ``centring="signals"``) and their fold manifests."""
    if len(list(eegmat.glob("Subject*_[12].edf"))) < 4:
        raise SystemExit(f"{eegmat} holds no EEGMAT recordings (SubjectNN_1.edf, _2.edf): pass --eegmat")
    overlapping = _data_prep([str(eegmat)], data / "eegmat_s1", [*EEGMAT_LABELS, "--stride", "1"])
    plain = _data_prep([str(eegmat)], data / "eegmat", EEGMAT_LABELS)
    # Pretraining reads 4-s windows every 2 s, like the 4-s EEGMMIDB windows it is mixed with.
    unlabelled = _data_prep([str(eegmat)], data / "eegmat_pre", [*EEGMAT_LABELS, "--window", "4", "--stride", "2"])
    by_fold = [folds_lib.write_folds(_centred(m, centring), folds) for m in (overlapping, plain, unlabelled)]
    out = []
    for i, ((train, subjects), (val, same), (pre, too)) in enumerate(zip(*by_fold)):
        assert subjects == same == too, (subjects, same, too)
        out.append(Split(f"fold{i}", str(train), str(val), str(val), str(pre)))
    return out


def mmidb_corpus(mmidb: pathlib.Path | None, data: pathlib.Path, centring: str = "none") -> str:
    """The unlabelled EEGMMIDB pretraining corpus (4-s windows); MI test subjects in ``val``."""
    if mmidb is None or not mmidb.is_dir():
        raise SystemExit("the mmidb corpus needs --mmidb: the folder written by ../shared/eeg/public/extract.py "
                         "(SNNN/SNNNRkk.edf), see BENCHMARKS.md")
    return _centred(_data_prep([str(mmidb)], data / "mmidb", [
        "--dataset", "eegmmidb", "--window", "4", "--notch", "60", "--subject-pattern", r"(S\d{3})R",
        "--val-subjects", ",".join(MI_TEST_SUBJECTS)]), centring)


# EEGMMIDB tasks: the runs they read and how data_prep labels and windows them (4-s windows,
# 60 Hz notch; the MI test subjects validate).
_MOTOR_LABELS = ["--label-from", "annotations", "--annotation-labels", "T1=left,T2=right",
                 "--event-windows"]  # one window per trial, from its onset
EEGMMIDB_TASKS = {
    "mmidb_mi": (("R04", "R08", "R12"), _MOTOR_LABELS),
    # the same test, the training subjects' executed left/right fist runs (3, 7, 11) training too
    "mmidb_mi_exec": (("R03", "R04", "R07", "R08", "R11", "R12"), _MOTOR_LABELS),
    "mmidb_eyes": (("R01", "R02"), ["--label-from", "filename", "--label-pattern", r"R01\.edf$=open",
                                    "--label-pattern", r"R02\.edf$=closed"]),
}
# Recordings (regex on the manifest's recording name) a task is scored on, when it trains on more.
SCORED_RECORDINGS = {"mmidb_mi_exec": r"R(04|08|12)$"}


def eegmmidb_splits(task: str, mmidb: pathlib.Path | None, data: pathlib.Path, centring: str = "none",
                    folds: int | None = None, corpus: str = "") -> list[Split]:
    """The held-out split of an EEGMMIDB task (``EEGMMIDB_TASKS``), or with ``folds`` its
    subject-wise folds (``cv_splits``; ``corpus``: the EEGMMIDB pretraining manifest to fold
    alike, '' when nothing is pretrained on it)."""
    if mmidb is None or not mmidb.is_dir():
        raise SystemExit(f"--task {task} needs --mmidb (the public EEGMMIDB folder, see BENCHMARKS.md)")
    wanted, label_args = EEGMMIDB_TASKS[task]
    runs = [str(p) for p in sorted(mmidb.glob("S*/S*R*.edf")) if p.stem[-3:] in wanted]
    manifest = _data_prep(runs, data / task, [
        "--dataset", task, "--window", "4", "--notch", "60", *label_args, "--subject-pattern", r"(S\d{3})R",
        "--val-subjects", ",".join(MI_TEST_SUBJECTS)])
    manifest = _centred(manifest, centring)
    if folds is None:
        splits = [Split("heldout", manifest, manifest, manifest, "")]
    else:
        splits = cv_splits(manifest, corpus, folds)
    if task not in SCORED_RECORDINGS:
        return splits
    scored = []
    for split in splits:
        target = pathlib.Path(split.train).with_name(f"manifest_{split.name}_scored.json")
        scored_only(split.train, SCORED_RECORDINGS[task], target)
        scored.append(dataclasses.replace(split, train=str(target), val=str(target), baseline=str(target)))
    return scored


def scored_only(manifest_path: str | pathlib.Path, pattern: str, out: pathlib.Path) -> None:
    """Writes to ``out`` a copy of a manifest whose ``val`` split keeps only the recordings whose
    name matches ``pattern`` (``re.search``); the ``train`` split keeps every recording."""
    manifest = json.loads(pathlib.Path(manifest_path).read_text())
    files = [e for e in manifest["files"] if e["split"] != "val" or re.search(pattern, e["recording"])]
    if not any(e["split"] == "val" and e["status"] == "ok" for e in files):
        raise SystemExit(f"{manifest_path}: no validation recording matches {pattern!r}, so nothing would be "
                         f"scored: the conversion lacks the recordings the task is scored on; delete "
                         f"{pathlib.Path(manifest_path).parent} to convert them again")
    out.write_text(json.dumps(manifest_lib.build(files, manifest_lib.extra_of(manifest), manifest["tool"]), indent=1))


def cv_splits(task_manifest: str, corpus_manifest: str, folds: int) -> list[Split]:
    """Subject-wise folds of a task (``data_prep.folds``, seed 0) and, for each, a copy of the
    unlabelled corpus manifest whose ``val`` split holds that fold's test subjects (every
    other corpus subject trains, subjects without the task's recordings too): pretraining on
    it never sees a subject the fold is scored on. Written beside the corpus manifest as
    ``manifest_<task folder>_fold<i>.json`` (none when ``corpus_manifest`` is '')."""
    out = []
    for i, (fold, val) in enumerate(folds_lib.write_folds(task_manifest, folds)):
        if not corpus_manifest:
            out.append(Split(f"fold{i}", str(fold), str(fold), str(fold), ""))
            continue
        corpus_path = pathlib.Path(corpus_manifest)
        pretraining = folds_lib.fold_manifest(json.loads(corpus_path.read_text()), val)
        pretraining["fold"] = {"index": i, "folds": folds, "val_subjects": val, "source": corpus_path.name,
                               "folded_with": str(fold)}
        target = corpus_path.with_name(f"manifest_{pathlib.Path(task_manifest).parent.name}_fold{i}.json")
        target.write_text(json.dumps(pretraining, indent=1))
        out.append(Split(f"fold{i}", str(fold), str(fold), str(fold), "", str(target)))
    return out


def report_name(task: str, folds: int | None) -> str:
    """The report's (and run folder's) name: the task, ``-cv<K>`` for an EEGMMIDB task's CV."""
    return task if task == "eegmat" or folds is None else f"{task}-cv{folds}"


def set_field(config, assignment: str) -> None:
    """``FIELD=VALUE`` (dotted field, e.g. optim.lr=5e-4) into a ConfigDict, typed as the field."""
    field, _, value = assignment.partition("=")
    if not value:
        raise SystemExit(f"--set {assignment!r}: use STAGE:FIELD=VALUE, e.g. finetune:optim.lr=5e-4")
    *path, node = field.split(".")
    parent = config
    for part in path:
        parent = parent[part]
    current = parent[node]
    parent[node] = (value.lower() in ("1", "true")) if isinstance(current, bool) else type(current)(value)


def stage_config(task: str, stage: str, stem: str, seed: int):
    """The task's recipe for ``stage`` with the stem and seed."""
    config = (eegmat_config if task == "eegmat" else small_data).get_config(stage)
    config.seed = seed
    config.model.patch_embed = stem
    if task in EEGMMIDB_TASKS:
        config.data.max_channels, config.data.max_windows = 64, 4
        if stage == "finetune":
            config.optim.total_steps, config.optim.warmup_steps = EEGMMIDB_FINETUNE_STEPS
    return config


def apply_overrides(config, overrides: list[str]):
    """The ``--set STAGE:FIELD=VALUE``s of ``config.stage``, last (they win over the harness's settings)."""
    for item in overrides:
        where, _, assignment = item.partition(":")
        if where not in ("tokenizer", "pretrain", "finetune"):
            raise SystemExit(f"--set {item!r}: STAGE must be tokenizer, pretrain or finetune")
        if where == config.stage:
            set_field(config, assignment)
    return config


def pretrain_config(corpus: str, stage: str, stem: str, seed: int):
    """The recipe of a corpus's tokenizer or masked-pretraining ``stage``: ``configs/eegmat.py``'s, on
    the corpus's grid (``PRETRAIN_GRID``) for ``PRETRAIN_STEPS`` steps (a tenth warming up)."""
    config = stage_config("eegmat", stage, stem, seed)
    config.data.max_channels, config.data.max_windows = PRETRAIN_GRID[corpus]
    config.optim.total_steps = PRETRAIN_STEPS[stage]
    config.optim.warmup_steps = PRETRAIN_STEPS[stage] // 10
    return config


def pretrain(corpus: str, spec: str, stem: str, seed: int, root: pathlib.Path, overrides: list[str],
             stages: tuple[str, ...] = ("tokenizer", "pretrain")) -> dict:
    """Tokenizer then masked pretraining on ``spec`` (or the tokenizer alone); returns timings
    and the tokenizer's codebook usage on ``spec``."""
    from labram_jax import train
    from labram_jax.tasks import tokenizer as tokenizer_task

    info_file = root / ("pretraining.json" if "pretrain" in stages else "tokenizer_only.json")
    if info_file.exists():  # finished earlier
        return json.loads(info_file.read_text())
    channels, windows = PRETRAIN_GRID[corpus]
    info = {"spec": spec}
    for stage in stages:
        config = pretrain_config(corpus, stage, stem, seed)
        config.data.train = spec
        if stage == "pretrain":
            config.pretrain.tokenizer_checkpoint = str(root / "tokenizer")
        apply_overrides(config, overrides)
        same_recipe_or_exit(config, root.parent.parent.glob(f"*/*/{stage}/config.json"))
        t0 = time.perf_counter()
        out = train.run(config, str(root / stage))
        finished_or_exit(root / stage)
        info[f"{stage}_wall_s"] = time.perf_counter() - t0
        info[f"{stage}_loss"] = out.get("loss")
    info["codebook"] = tokenizer_task.corpus_code_usage(str(root / "tokenizer"), spec, "train", channels, windows)
    info_file.write_text(json.dumps(info, indent=1))
    return info


def finetune(task: str, split: Split, stem: str, seed: int, init: str, workdir: pathlib.Path,
             overrides: list[str]) -> dict:
    """One fine-tuning; its last-step validation metrics."""
    from labram_jax import train

    result_file = workdir / "result.json"
    if result_file.exists():  # finished earlier
        return json.loads(result_file.read_text())
    config = stage_config(task, "finetune", stem, seed)
    config.data.train, config.data.val = split.train, split.val
    config.finetune.init_checkpoint = init
    config.eval_every = 10**9  # the last step only: nothing is picked on the reported subjects
    apply_overrides(config, overrides)
    same_recipe_or_exit(config, workdir.parent.parent.glob("*/*/config.json"))
    t0 = time.perf_counter()
    out = train.run(config, str(workdir))
    finished_or_exit(workdir)
    scores = {k[4:]: float(v) for k, v in out.items() if k.startswith("val/")} or last_validation(workdir)
    result = {**scores, "wall_s": time.perf_counter() - t0}
    result_file.write_text(json.dumps(result, indent=1))
    return result


def same_recipe_or_exit(config, siblings) -> None:
    """Stops the harness when another fold or seed of the same row (``siblings``: their
    config.json files) ran with other model settings: a row is one recipe, and a recipe file
    that changed since (``configs/eegmat.py``) must not slip into it under the old tag."""
    from labram_jax import config_schema

    for path in sorted(siblings):
        conflicts = config_schema.resume_conflicts(json.loads(path.read_text()), config)
        if conflicts:
            raise SystemExit(f"{path.parent} belongs to the same row but ran with other settings "
                             f"({'; '.join(conflicts)}): give this recipe its own --tag, or --set those settings")


def finished_or_exit(workdir: pathlib.Path) -> None:
    """Stops the harness when a run ended before its last step (SIGTERM, ``stop_after``): what
    it holds then is not a result, and the next stage has nothing to start from."""
    from labram_jax import model_file

    if not (workdir / model_file.FILENAME).exists():
        raise SystemExit(f"{workdir} stopped before its last step: rerun the same command to resume it")


PROBE_C = 1e-3  # the log-spectrum anchor's C: the probe and that anchor differ only in their features


def random_encoder(task: str, stem: str, seed: int, overrides: list[str]):
    """The task's fine-tuning model (with the ``finetune:`` overrides) with random weights
    (``seed``), as an ``api.Predictor``: the control of a linear probe (what the architecture
    alone gives, before any training)."""
    import jax
    import jax.numpy as jnp

    from labram_jax import api
    from labram_jax.models import config as model_config, transformer
    from labram_jax.tasks import stage as stage_lib

    config = apply_overrides(stage_config(task, "finetune", stem, seed), overrides)
    model = transformer.LaBraM(model_config.labram(config.model.size, **stage_lib.model_options(config)))
    channels, windows = config.data.max_channels, config.data.max_windows
    variables = model.init(jax.random.key(seed), jnp.zeros((1, channels, windows, records_lib.SAMPLE_RATE)),
                           jnp.arange(1, channels + 1))
    return api.Predictor("finetune", model, dict(variables), "binary", windows)


def linear_probe(split: Split, predictor, pooling: str, centring: str = "none") -> dict:
    """The frozen encoder's embeddings (``pooling``) of the split's non-overlapping windows ->
    standardised L2 logistic regression (``PROBE_C``), fitted on the training subjects and
    scored on the held-out ones: the classical anchors' windows and classifier (and their
    ``centring``, ``baselines.fit_and_score``)."""
    from labram_jax import baselines

    train = baselines.load_windows(split.baseline, "train")

    def embed(x):  # [n, C, T] at 200 Hz -> features
        patches = x.reshape(len(x), x.shape[1], -1, records_lib.SAMPLE_RATE)
        return predictor.embed_windows(patches, train.channel_ids, 64, pooling)

    probe = baselines.Baseline("probe", f"linear probe ({pooling})", embed,
                               functools.partial(baselines.standardised_lr, PROBE_C))
    t0 = time.perf_counter()
    scores = baselines.fit_and_score(probe, train, baselines.load_windows(split.baseline, "val"), centring)
    return {**scores, "wall_s": time.perf_counter() - t0}


def record(report_path: pathlib.Path, keys: tuple[str, ...], value) -> None:
    """Sets ``report[k0][k1]...[kn] = value`` in the JSON report, read and written under a file
    lock, so several harness processes (other rows of the grid) can share one report."""
    with open(report_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
        node = report
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
        tmp = report_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(report_path)


def last_validation(workdir: pathlib.Path) -> dict[str, float]:
    """The last validation metrics in ``workdir/metrics.jsonl`` (a finished run only reloads)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [row for row in rows if any(k.startswith("val/") for k in row)]
    if not rows:
        raise SystemExit(f"{workdir} holds no validation metrics: delete it and rerun")
    return {k[4:]: float(v) for k, v in rows[-1].items() if k.startswith("val/")}


def seed_ensemble(row_dir: pathlib.Path, mirror: str = "none", anchor: str | None = None) -> dict[str, dict]:
    """Per fold of one row's finished fine-tuning runs (``row_dir/<fold>/seed<k>/``): the seeds'
    last-step probabilities averaged window by window and scored (binary metrics), with the
    seeds used and each held-out subject's AUROC (how evenly the row transfers across people).
    Nothing is picked: every finished seed of the fold counts. ``mirror`` (keep, swap): each
    run's scores are first averaged with the left-right mirrored windows' (``evaluate --mirror``);
    ``anchor`` (a classical baseline): each run's scores, and the seeds' mean, are then blended with
    that anchor's, fitted on the fold's training windows (``labram_jax.anchor_blend``);
    ``each`` holds every run's own metrics."""
    from labram_jax import baselines, evaluate, task_metrics

    out = {}
    for fold_dir in sorted(p for p in row_dir.iterdir() if p.is_dir()):
        runs = sorted(path.parent for path in fold_dir.glob("seed*/model.npz"))
        if not runs:
            continue
        scored = [evaluate.score_run(str(run), json.loads((run / "config.json").read_text())["data"]["val"],
                                     "val", "latest", ("subject",), mirror) for run in runs]
        targets, subjects = scored[0].targets, np.asarray(scored[0].provenance["subject"])
        if any(not np.array_equal(s.targets, targets) or list(subjects) != s.provenance["subject"] for s in scored):
            raise SystemExit(f"{fold_dir}: its seeds validated on different windows (data.val in their config.json "
                             "differ): an ensemble averages window by window; rerun the odd seed on the row's records")
        each = [s.scores for s in scored]
        mean = np.mean(each, axis=0)
        if anchor:
            spec = json.loads((runs[0] / "config.json").read_text())["data"]["val"]
            (mean, *each), _ = baselines.blend_with_anchor(anchor, spec, "val", targets, [mean, *each])
        by_subject = task_metrics.by_group("binary", mean, targets, list(subjects))
        out[fold_dir.name] = {"seeds": [run.name for run in runs],
                              "each": {run.name: task_metrics.compute_metrics("binary", one, targets)
                                       for run, one in zip(runs, each)},
                              **task_metrics.compute_metrics("binary", mean, targets),
                              "by_subject_auroc": {k: v["auroc"] for k, v in by_subject.items()}}
    if not out:
        raise SystemExit(f"{row_dir} holds no finished fine-tuning run (fold*/seed*/model.npz)")
    return out


def summarise(values: list[list[float]]) -> dict:
    """values[fold][seed] -> mean, std over all, and each fold's mean."""
    flat = np.asarray([v for fold in values for v in fold], np.float64)
    return {"mean": float(flat.mean()), "std": float(flat.std()), "n": int(flat.size),
            "fold_means": [float(np.mean(fold)) for fold in values]}


def table(report: dict) -> str:
    """Markdown: one row per baseline and per (corpus, stem); mean +- std over folds x seeds."""
    splits = report["splits"]
    head = ["model", "BAcc mean +- std", "AUROC mean +- std", "n"] + [f"{s} BAcc / AUROC" for s in splits]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]

    def row(name, bacc, auroc):
        cells = [name, f"{bacc['mean']:.3f} +- {bacc['std']:.3f}", f"{auroc['mean']:.3f} +- {auroc['std']:.3f}",
                 str(bacc["n"])] + [f"{b:.3f} / {a:.3f}" for b, a in zip(bacc["fold_means"], auroc["fold_means"])]
        lines.append("| " + " | ".join(cells) + " |")

    for name, per_split in report.get("baselines", {}).items():
        if not all(s in per_split for s in splits):
            continue  # incomplete rows are not summarised
        row(name, summarise([[per_split[s]["balanced_accuracy"]] for s in splits]),
            summarise([[per_split[s]["auroc"]] for s in splits]))
    for key, runs in report.get("rows", {}).items():
        seeds = sorted({seed for s in splits for seed in runs.get(s, {})})
        if not all(str(seed) in runs.get(s, {}) for s in splits for seed in map(str, seeds)) or not seeds:
            continue  # incomplete rows are not summarised
        row(key, summarise([[runs[s][str(seed)]["balanced_accuracy"] for seed in seeds] for s in splits]),
            summarise([[runs[s][str(seed)]["auroc"] for seed in seeds] for s in splits]))
    return "\n".join(lines)


def paired(report: dict, first: str, second: str) -> str:
    """Rows ``second`` against ``first`` over the fold x seed runs both have: each metric's
    mean of both, the mean difference and in how many runs ``second`` is higher."""
    rows = report.get("rows", {})
    for name in (first, second):
        if name not in rows:
            raise SystemExit(f"--compare: no row {name!r} in the report (rows: {', '.join(sorted(rows))})")
    runs = [(rows[first][s][seed], rows[second][s][seed]) for s in rows[first] for seed in rows[first][s]
            if seed in rows[second].get(s, {})]
    if not runs:
        raise SystemExit(f"--compare: {first} and {second} share no fold x seed run")
    lines = [f"{second} against {first}, {len(runs)} paired fold x seed runs:"]
    for metric in ("balanced_accuracy", "auroc"):
        a, b = (np.asarray([run[i][metric] for run in runs]) for i in (0, 1))
        lines.append(f"  {metric}: {a.mean():.3f} -> {b.mean():.3f} ({np.mean(b - a):+.3f}), "
                     f"higher in {int((b > a).sum())} of {len(runs)}")
    return "\n".join(lines)


def print_ensemble(workdir: pathlib.Path, report: str, row: str, mirror: str = "none",
                   anchor: str | None = None) -> int:
    """``--ensemble ROW``: scores and records the seed ensemble of ``row`` fold by fold (``report``:
    ``report_name``, the runs' folder and the report's name); ``mirror`` and ``anchor`` as for
    :func:`seed_ensemble`, recorded as the row ``ROW+seed-ensemble`` with ``+mirror-<mirror>`` and
    ``+blend-<anchor>``, and each run alone as ``ROW+mirror-<mirror>+blend-<anchor>`` (``--compare
    ROW ROW+blend-log_spectrum_lr`` pairs them)."""
    logging.basicConfig(level=logging.WARNING, force=True)
    row_dir = workdir / report / row.replace("/", "-", 1)
    if not row_dir.is_dir():
        rows = sorted(p.name.replace("-", "/", 1) for p in (workdir / report).glob("*") if p.is_dir())
        raise SystemExit(f"--ensemble: no runs of {row!r} under {row_dir}; rows with runs: {', '.join(rows) or 'none'}")
    report_path = workdir / f"{report}.json"
    singles = json.loads(report_path.read_text()).get("rows", {}).get(row, {}) if report_path.exists() else {}
    rescored = (f"+mirror-{mirror}" if mirror != "none" else "") + (f"+blend-{anchor}" if anchor else "")
    for fold, result in seed_ensemble(row_dir, mirror, anchor).items():
        record(report_path, ("rows", f"{row}+seed-ensemble{rescored}", fold, "ensemble"),
               {k: v for k, v in result.items() if k not in ("seeds", "each", "by_subject_auroc")})
        each = ""
        if rescored:
            for seed, metrics in result["each"].items():
                record(report_path, ("rows", f"{row}{rescored}", fold, seed[4:]), metrics)
            each = f"; each {rescored[1:]} " + " ".join(f"{seed}: {m['balanced_accuracy']:.3f} / {m['auroc']:.3f}"
                                                       for seed, m in result["each"].items())
        alone = " ".join(f"{seed}: {singles[fold][seed[4:]]['balanced_accuracy']:.3f} / "
                         f"{singles[fold][seed[4:]]['auroc']:.3f}" for seed in result["seeds"]
                         if seed[4:] in singles.get(fold, {}))
        subjects = " ".join(f"{k.split('/')[-1]} {v:.2f}" for k, v in result["by_subject_auroc"].items())
        print(f"{fold}: ensemble of {len(result['seeds'])} BAcc {result['balanced_accuracy']:.3f} AUROC "
              f"{result['auroc']:.3f} (alone {alone or 'not in the report'}{each}); AUROC by subject: {subjects}")
    report = json.loads(report_path.read_text())
    if "splits" in report:  # written by a grid run: the ensemble's row among the others
        print("\n" + table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transfer", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="eegmat")
    parser.add_argument("--corpus", nargs="+", default=["none", "eegmat"], choices=CORPORA)
    parser.add_argument("--stem", nargs="+", default=["spectrum"], choices=STEMS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--pretrain-seed", type=int, default=0, help="seed of the tokenizer and pretraining runs "
                        "(one per corpus, stem and fold, shared by the fine-tuning seeds)")
    parser.add_argument("--folds", type=int, default=None, help="subject-wise folds: EEGMAT's 20 subjects (default "
                        "5); an EEGMMIDB task's 25 subjects (default: none, the fixed held-out split)")
    parser.add_argument("--only-folds", type=int, nargs="+", default=None, help="run only these folds (a part of "
                        "the grid; the table summarises complete rows only)")
    parser.add_argument("--eegmat", default=str(EEGMAT), help="the EEGMAT EDF folder")
    parser.add_argument("--mmidb", default=None, help="the public EEGMMIDB folder (../shared/eeg/public/extract.py)")
    parser.add_argument("--data", default="data/transfer", help="where data_prep writes the conversions")
    parser.add_argument("--workdir", default="runs/transfer")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE:FIELD=VALUE",
                        help="override a recipe field of one stage, e.g. finetune:optim.lr=5e-4")
    parser.add_argument("--tag", default="", help="a name for this recipe variant (its runs and rows are kept apart)")
    parser.add_argument("--pretrain-tag", default=None, help="take the pretraining runs of this tag (default: --tag), "
                        "e.g. to fine-tune differently from the same pretrained encoders")
    parser.add_argument("--no-baselines", action="store_true", help="skip the classical baselines")
    parser.add_argument("--probe", nargs="+", default=None, choices=("mean", "channel"),
                        help="linear probes instead of fine-tuning: the encoder stays frozen (random weights for "
                        "corpus none, one per seed; the pretrained encoder otherwise, its --pretrain-seed), its "
                        "embeddings pooled over all tokens (mean) or per channel, then the log-spectrum anchor's "
                        "standardised LR on the same windows")
    parser.add_argument("--centring", choices=CENTRINGS, default="none",
                        help="features: centre each subject's features on its own mean before the classifier, in the "
                        "classical feature anchors and the linear probes (fine-tuning is not changed by it); "
                        "signals: every stage, probe and anchor reads subject-centred records "
                        "(python -m data_prep.centring); aligned: the same on Euclidean-aligned records (--method "
                        "euclidean); aligned-signals: aligned, then centred (--method euclidean+spectrum). See "
                        "labram_jax.subject_centring; rows get '+centred-<how>', '+aligned-signals' or "
                        "'+aligned-centred-signals'")
    parser.add_argument("--tokenizer-only", action="store_true", help="train only the tokenizers of the corpora "
                        "and report their codebook usage (no pretraining, no fine-tuning)")
    parser.add_argument("--ensemble", metavar="ROW", help="only score ROW's finished runs (e.g. "
                        "none/spectrum-cn) as one model per fold, the seeds' probabilities averaged; recorded as "
                        "the row ROW+seed-ensemble, with each held-out subject's AUROC")
    parser.add_argument("--mirror", default="none", choices=("none", "keep", "swap"),
                        help="with --ensemble: each window's score averaged with its left-right mirror's first "
                        "(swap: left vs right classes, the motor-imagery task); the row gets '+mirror-<how>'")
    parser.add_argument("--blend-anchor", default=None,
                        choices=sorted({name for names in TASK_BASELINES.values() for name in names}),
                        help="with --ensemble: each run's scores (after --mirror) blended with this classical "
                        "anchor's, fitted on the fold's training windows (labram_jax.anchor_blend); the row gets "
                        "'+blend-<anchor>'")
    parser.add_argument("--compare", nargs=2, metavar=("ROW_A", "ROW_B"), help="only print ROW_B against ROW_A "
                        "(e.g. none/spectrum-cn) over the fold x seed runs both finished, from the report")
    args = parser.parse_args(argv)
    for flag, value in (("--mirror", args.mirror != "none"), ("--blend-anchor", args.blend_anchor)):
        if value and not args.ensemble:
            parser.error(f"{flag} rescores finished runs: give it with --ensemble ROW")
    report = report_name(args.task, args.folds)
    if args.compare:
        print(paired(json.loads((pathlib.Path(args.workdir) / f"{report}.json").read_text()), *args.compare))
        return 0
    if args.ensemble:
        return print_ensemble(pathlib.Path(args.workdir), report, args.ensemble, args.mirror, args.blend_anchor)
    # grain and orbax give the root logger a handler when imported: replace it
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    from labram_jax import api, baselines

    data, workdir = pathlib.Path(args.data), pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mmidb = pathlib.Path(args.mmidb) if args.mmidb else None
    corpus_spec = (mmidb_corpus(mmidb, data, args.centring) if any(c.startswith("mmidb") for c in args.corpus)
                   else "")
    if args.task == "eegmat":
        all_splits = eegmat_splits(pathlib.Path(args.eegmat), data, args.folds or 5, args.centring)
    else:
        all_splits = eegmmidb_splits(args.task, mmidb, data, args.centring, args.folds, corpus_spec)
    splits = all_splits if args.only_folds is None else [all_splits[i] for i in args.only_folds]

    report_path = workdir / f"{report}.json"
    record(report_path, ("task",), args.task)
    record(report_path, ("splits",), [s.name for s in all_splits])

    centred = CENTRED_SUFFIX[args.centring]
    feature_centring = "subject" if args.centring == "features" else "none"  # the classifiers' input
    records_suffix = centred if args.centring in RECORD_CENTRINGS else ""  # runs on centred records are kept apart
    probe_suffix = centred if args.centring == "features" else ""
    if not args.no_baselines:
        names = [n for n in TASK_BASELINES[args.task] if args.centring != "features" or n != "csp_lda"]  # CSP: signals
        for split in splits:
            results = baselines.run(split.baseline, names, centring=feature_centring)
            for name, metrics in results.items():
                description = baselines.BASELINES[name].description + CENTRED_ANCHOR[args.centring]
                record(report_path, ("baselines", description, split.name), metrics)
                print(f"{split.name} {description}: BAcc {metrics['balanced_accuracy']:.3f} "
                      f"AUROC {metrics['auroc']:.3f}", flush=True)

    suffix = (f"-{args.tag}" if args.tag else "") + records_suffix
    pretrain_tag = args.tag if args.pretrain_tag is None else args.pretrain_tag
    pretrain_suffix = (f"-{pretrain_tag}" if pretrain_tag else "") + records_suffix
    if args.pretrain_tag is not None and any(o.split(":")[0] in ("tokenizer", "pretrain") for o in args.overrides):
        raise SystemExit("--pretrain-tag reuses pretraining runs made without your tokenizer/pretrain --set's; "
                         "drop one or the other")
    for seed in args.seeds:
        for stem in args.stem:
            for corpus in args.corpus:
                key = f"{corpus}/{stem}{suffix}"
                for split in splits:
                    init = ""
                    if corpus != "none":
                        own = corpus.endswith("eegmat")
                        if own and not split.pretrain_own:
                            raise SystemExit(f"--corpus {corpus}: the {args.task} task's own subjects are not "
                                             "pretrained on (they are the test); use none or mmidb")
                        spec = "+".join(p for p in ((split.mmidb_corpus or corpus_spec)
                                                    if corpus.startswith("mmidb") else "",
                                                    split.pretrain_own if own else "") if p)
                        # shared by every split, unless the split pretrains on subjects of its own
                        scope = (split.name if own else f"{report}-{split.name}" if split.mmidb_corpus
                                 else "shared")
                        root = (workdir / "pretrain" / f"{corpus}-{stem}{pretrain_suffix}" / scope /
                                f"seed{args.pretrain_seed}")
                        stages = ("tokenizer",) if args.tokenizer_only else ("tokenizer", "pretrain")
                        info = pretrain(corpus, spec, stem, args.pretrain_seed, root, args.overrides, stages)
                        record(report_path, ("pretraining", key, scope, str(args.pretrain_seed)), info)
                        init = str(root / "pretrain")
                    if args.tokenizer_only:
                        continue
                    if args.probe:
                        if corpus != "none" and seed != args.seeds[0]:
                            continue  # one probe per pretrained encoder: it is deterministic
                        predictor = (random_encoder(args.task, stem, seed, args.overrides) if corpus == "none"
                                     else api.load(init))
                        for pooling in args.probe:
                            probe_key = f"{corpus}/{stem}-probe-{pooling}{suffix}{probe_suffix}"
                            probe_seed = str(seed if corpus == "none" else args.pretrain_seed)
                            scores = linear_probe(split, predictor, pooling, feature_centring)
                            record(report_path, ("rows", probe_key, split.name, probe_seed), scores)
                            print(f"{probe_key} {split.name} encoder seed {probe_seed}: BAcc "
                                  f"{scores['balanced_accuracy']:.3f} AUROC {scores['auroc']:.3f}", flush=True)
                        continue
                    run_dir = workdir / report / f"{corpus}-{stem}{suffix}" / split.name / f"seed{seed}"
                    scores = finetune(args.task, split, stem, seed, init, run_dir, args.overrides)
                    record(report_path, ("rows", key, split.name, str(seed)), scores)
                    record(report_path, ("overrides", key), args.overrides)
                    print(f"{key} {split.name} seed {seed}: BAcc {scores['balanced_accuracy']:.3f} "
                          f"AUROC {scores['auroc']:.3f} ({scores['wall_s']:.0f} s)", flush=True)
    print("\n" + table(json.loads(report_path.read_text())))
    print(f"\nwrote {report_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
