"""EEGMAT end to end: pretrained vs from-scratch vs linear probe, several seeds, one table.

    python -m benchmarks.eegmat [--eegmat ../shared/eeg/eegmat] [--data data] [--workdir runs/eegmat] \\
        [--seeds 0 1 2] [--variants pretrained scratch linear_probe] [--pick-step last|inner] \\
        [--band 0.1 75] [--set STAGE:FIELD=VALUE ...]

Subjects 00-15 train, 16-19 validate (``configs/eegmat.py``). Steps: data_prep (5-s windows
every 1 s for training, non-overlapping for validation, band-passed to ``--band``; skipped when
the manifests exist), the classical anchor (log band power, 5 bands x 19 channels, +
class-balanced logistic regression, on the same windows; other classifiers on the same features
for comparison),
then per seed: tokenizer -> masked EEG pretraining on the training recordings without labels
-> fine-tuning (``pretrained``), a linear probe of the same pretrained encoder
(``linear_probe``), and fine-tuning from random weights (``scratch``).
Every run resumes if interrupted. The reported numbers are the validation metrics of the
last step, or with ``--pick-step inner`` of the step picked without the validation subjects:
each fine-tuning runs first with subjects 00-11 training and 12-15 validating, and the final
run (00-15) is read at the same point of training as that run's best AUROC. Writes ``<workdir>/eegmat.json`` and
prints a markdown table with the mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import time

import numpy as np

from configs import eegmat as eegmat_config
from data_prep import __main__ as data_prep_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
EEGMAT = ROOT.parent / "shared" / "eeg" / "eegmat"
VAL_SUBJECTS = "16,17,18,19"
INNER_VAL_SUBJECTS = "12,13,14,15"  # --pick-step inner: validation subjects inside the training ones
PICK_EVERY = 20  # --pick-step inner: evaluate every this many steps
BANDS_HZ = ((1, 4), (4, 8), (8, 13), (13, 30), (30, 45))
RECORD_BAND_HZ = (0.1, 75.0)  # data_prep's band-pass (LABRAM.md 1); --band changes it
VARIANTS = ("pretrained", "scratch", "linear_probe", "lora")
log = logging.getLogger("labram_jax")


def _check_band(manifest: pathlib.Path, band: tuple[float, float]) -> None:
    """Refuses records that an earlier run converted with another band-pass."""
    params = json.loads(manifest.read_text())["parameters"]
    have = (float(params["l_freq"]), float(params["h_freq"]))
    if not np.allclose(have, band):
        raise SystemExit(f"{manifest.parent} holds records band-passed to {have[0]:g}-{have[1]:g} Hz, but --band asks "
                         f"for {band[0]:g}-{band[1]:g} Hz: pass another --data folder, or delete that one")


def _convert(inputs: list[str], data: pathlib.Path, prefix: str, val_subjects: str,
             band: tuple[float, float]) -> tuple[str, str]:
    """data_prep of ``inputs`` into ``<prefix>_s1`` (5-s windows every 1 s) and ``<prefix>``
    (non-overlapping), band-passed to ``band`` (Hz), skipped where the manifest exists (with
    that band): their manifest paths."""
    out = []
    for name, stride in ((f"{prefix}_s1", ["--stride", "1"]), (prefix, [])):
        manifest = data / name / "manifest.json"
        if manifest.exists():
            _check_band(manifest, band)
        else:
            code = data_prep_cli.main([*inputs, "--out", str(data / name), "--dataset", "eegmat", "--window", "5",
                                       "--l-freq", str(band[0]), "--h-freq", str(band[1]),
                                       *stride, "--label-from", "filename", "--label-pattern", r"_1\.edf$=rest",
                                       "--label-pattern", r"_2\.edf$=arithmetic", "--subject-pattern", r"Subject(\d+)_",
                                       "--val-subjects", val_subjects, "--quiet"])
            if code != 0:
                raise SystemExit(f"data_prep failed on {inputs[0] if len(inputs) == 1 else 'EEGMAT'} (exit {code})")
        out.append(str(manifest))
    return out[0], out[1]


def prepare(eegmat: pathlib.Path, data: pathlib.Path, band: tuple[float, float] = RECORD_BAND_HZ) -> tuple[str, str]:
    """(training manifest with 1-s stride, validation manifest without overlap)."""
    return _convert([str(eegmat)], data, "eegmat", VAL_SUBJECTS, band)


def prepare_inner(eegmat: pathlib.Path, data: pathlib.Path,
                  band: tuple[float, float] = RECORD_BAND_HZ) -> tuple[str, str]:
    """The training subjects split again for picking the fine-tuning length: subjects 00-11
    train, 12-15 validate (16-19 are not read). (training manifest with 1-s stride, validation
    manifest without overlap)."""
    files = sorted(str(f) for f in eegmat.glob("Subject*_[12].edf") if int(f.name[7:9]) < 16)
    if len(files) != 32:
        raise SystemExit(f"{eegmat} holds {len(files)} recordings of subjects 00-15, expected 32 (SubjectNN_1.edf and "
                         "_2.edf each): pass --eegmat with the complete EEGMAT folder")
    return _convert(files, data, "eegmat_inner", INNER_VAL_SUBJECTS, band)


def validation_curve(workdir: pathlib.Path) -> dict[int, dict[str, float]]:
    """Step -> validation metrics, from ``workdir/metrics.jsonl``."""
    curve = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if any(k.startswith("val/") for k in row):
            curve[int(row["step"])] = {k[4:]: float(v) for k, v in row.items() if k.startswith("val/")}
    return curve


def pick_step(inner: dict[int, dict[str, float]], final_steps: list[int]) -> tuple[int, int]:
    """(best inner step by AUROC, the first of them on ties; the evaluated step of the final run
    at the same fraction of training). Both runs train for the same epochs, so a fraction of
    the inner run is the same point of the learning-rate schedule in the final one."""
    best = max(sorted(inner), key=lambda step: inner[step]["auroc"])
    target = best / max(inner) * max(final_steps)
    return best, min(final_steps, key=lambda step: (abs(step - target), step))


def _windows(manifest: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All windows of a split as ([n, channels, samples] in 100 uV, labels [n])."""
    from array_record.python import array_record_module

    from labram_jax import input_pipeline, records

    signals, labels = [], []
    for source in input_pipeline.resolve(manifest, split):
        for shard in source.shards:
            reader = array_record_module.ArrayRecordReader(shard, "readahead_buffer_size:0")
            for data in reader.read_all():
                rec = records.decode(data)
                signals.append(rec.signal.reshape(rec.signal.shape[0], -1))
                labels.append(rec.label)
            reader.close()
    return np.stack(signals), np.asarray(labels)


ANCHOR = "log band power + LR (anchor)"
LOG_SPECTRUM = "log power spectrum (1-Hz bins) + LR, C = 0.001"


def classical(val_manifest: str) -> dict[str, dict[str, float]]:
    """The anchor, log band power (5 bands x channels, Welch 2-s segments) + logistic regression
    (standardised features, class-balanced, C = 1), on the non-overlapping windows; and, on the
    same features, a weaker-regularised and a stronger-regularised LR, an MLP and gradient
    boosting: how much a flexible classifier loses across subjects. Last, a strongly
    regularised LR on the whole log power spectrum (1-Hz bins, 1-45 Hz, 19 x 44 features):
    how much of the task is linear in the log spectrum."""
    from scipy.signal import welch
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    from labram_jax.tasks import finetune

    def band_power(x):
        freqs, power = welch(x, fs=200, nperseg=400, axis=-1)
        bands = [power[..., (freqs >= lo) & (freqs < hi)].mean(-1) for lo, hi in BANDS_HZ]
        return np.log(np.stack(bands, -1)).reshape(len(x), -1)

    def log_spectrum(x):
        freqs, power = welch(x, fs=200, nperseg=200, axis=-1)
        return np.log(power[..., (freqs >= 1) & (freqs < 45)]).reshape(len(x), -1)

    def balanced_lr(c):
        return LogisticRegression(C=c, max_iter=5000, class_weight="balanced")

    (xt, yt), (xv, yv) = _windows(val_manifest, "train"), _windows(val_manifest, "val")
    models = {  # name: (features, classifier)
        ANCHOR: (band_power, balanced_lr(1.0)),
        "log band power + LR, C = 0.1": (band_power, balanced_lr(0.1)),
        "log band power + LR, C = 10": (band_power, balanced_lr(10.0)),
        "log band power + MLP (64 hidden)": (band_power, MLPClassifier((64,), max_iter=500, random_state=0)),
        "log band power + gradient boosting": (band_power, HistGradientBoostingClassifier(class_weight="balanced",
                                                                                          random_state=0)),
        LOG_SPECTRUM: (log_spectrum, balanced_lr(0.001)),
    }
    standardised = {}  # features -> (train, val), standardised on the training windows
    out = {}
    for name, (features, clf) in models.items():
        if features not in standardised:
            ft, fv = features(xt), features(xv)
            scaler = StandardScaler().fit(ft)
            standardised[features] = scaler.transform(ft), scaler.transform(fv)
        ft, fv = standardised[features]
        score = clf.fit(ft, yt).predict_proba(fv)[:, 1]
        out[name] = {k: float(v) for k, v in finetune.compute_metrics("binary", score, yv).items()}
    return out


def _config(stage: str, train: str, val: str, seed: int, overrides: list[str]):
    config = eegmat_config.get_config(stage)
    config.data.train, config.seed = train, seed
    if stage == "finetune":
        config.data.val = val
    for item in overrides:
        where, _, assignment = item.partition(":")
        field, _, value = assignment.partition("=")
        if not value:
            raise SystemExit(f"--set {item!r}: use STAGE:FIELD=VALUE, e.g. finetune:optim.lr=5e-4")
        if where != stage:
            continue
        node, *path = field.split(".")[::-1]
        parent = config
        for part in reversed(path):
            parent = parent[part]
        current = parent[node]
        parent[node] = (value.lower() in ("1", "true")) if isinstance(current, bool) else type(current)(value)
    return config


def last_validation(workdir: pathlib.Path) -> dict[str, float]:
    """The last validation metrics logged in ``workdir/metrics.jsonl``: what a finished run,
    which ``train.run`` only reloads, reported when it ended."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [row for row in rows if any(k.startswith("val/") for k in row)]
    if not rows:
        raise SystemExit(f"{workdir} holds no validation metrics: delete it and rerun")
    return {k[4:]: float(v) for k, v in rows[-1].items() if k.startswith("val/")}


def run_seed(seed: int, variants: list[str], train_manifest: str, val_manifest: str, workdir: pathlib.Path,
             overrides: list[str], inner: tuple[str, str] | None = None) -> dict[str, dict]:
    """One seed's runs. ``inner`` (training, validation manifests of the training subjects split
    again): each fine-tuning first runs there, and the reported step is picked on it."""
    from labram_jax import train

    root = workdir / f"seed{seed}"
    results, t0 = {}, time.perf_counter()

    def finetune(name: str, mode: str, init: str) -> None:
        start = time.perf_counter()
        picked = {}
        if inner:
            config = _config("finetune", *inner, seed, overrides)
            config.finetune.mode, config.finetune.init_checkpoint, config.eval_every = mode, init, PICK_EVERY
            train.run(config, str(root / f"{name}_inner"))
        config = _config("finetune", train_manifest, val_manifest, seed, overrides)
        config.finetune.mode, config.finetune.init_checkpoint = mode, init
        if inner:
            config.eval_every = PICK_EVERY
        out = train.run(config, str(root / name))
        scores = {k[4:]: float(v) for k, v in out.items() if k.startswith("val/")} or last_validation(root / name)
        if inner:
            curve = validation_curve(root / name)
            inner_step, step = pick_step(validation_curve(root / f"{name}_inner"), sorted(curve))
            scores, picked = curve[step], {"picked_step": step, "inner_step": inner_step, "last_step": scores}
        results[name] = {**scores, **picked, "wall_s": time.perf_counter() - start}
        print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items()
                                                  if not isinstance(v, dict)), flush=True)

    if set(variants) & {"pretrained", "linear_probe", "lora"}:
        train.run(_config("tokenizer", train_manifest, val_manifest, seed, overrides), str(root / "tokenizer"))
        config = _config("pretrain", train_manifest, val_manifest, seed, overrides)
        config.pretrain.tokenizer_checkpoint = str(root / "tokenizer")
        train.run(config, str(root / "pretrain"))
        pretrain_s = time.perf_counter() - t0
        for name, mode in (("pretrained", "full"), ("linear_probe", "linear_probe"), ("lora", "lora")):
            if name in variants:
                finetune(name, mode, str(root / "pretrain"))
        results["pretrained_pipeline_wall_s"] = pretrain_s + results.get("pretrained", {}).get("wall_s", 0.0)
    if "scratch" in variants:
        finetune("scratch", "full", "")
    return results


def table(report: dict) -> str:
    seeds = report["seeds"]
    lines = ["| model | " + " | ".join(f"seed {s} BAcc / AUROC" for s in seeds) + " | mean +- std BAcc | mean +- std AUROC |",
             "|---" * (len(seeds) + 3) + "|"]
    for name, row in report["classical"].items():
        lines.append(f"| {name} | " + " | ".join(
            f"{row['balanced_accuracy']:.3f} / {row['auroc']:.3f}" for _ in seeds) + " | "
            f"{row['balanced_accuracy']:.3f} | {row['auroc']:.3f} |")
    for variant in report["variants"]:
        rows = [report["runs"][str(s)][variant] for s in seeds]
        bacc = np.asarray([r["balanced_accuracy"] for r in rows])
        auroc = np.asarray([r["auroc"] for r in rows])
        lines.append(f"| {variant} | " + " | ".join(f"{b:.3f} / {a:.3f}" for b, a in zip(bacc, auroc)) +
                     f" | {bacc.mean():.3f} +- {bacc.std():.3f} | {auroc.mean():.3f} +- {auroc.std():.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.eegmat", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eegmat", default=str(EEGMAT), help="the EEGMAT EDF folder")
    parser.add_argument("--data", default="data", help="where data_prep writes eegmat/ and eegmat_s1/")
    parser.add_argument("--workdir", default="runs/eegmat")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["pretrained", "scratch", "linear_probe"], choices=VARIANTS)
    parser.add_argument("--pick-step", choices=["last", "inner"], default="last",
                        help="which step of each fine-tuning to report: the last, or the one with the best "
                             f"AUROC when subjects {INNER_VAL_SUBJECTS} of the training subjects validate a first run "
                             "on the other 12 (one more fine-tuning per variant; the validation subjects stay unseen)")
    parser.add_argument("--band", type=float, nargs=2, default=list(RECORD_BAND_HZ), metavar=("LOW", "HIGH"),
                        help="band-pass of the records in Hz (default 0.1 75, LaBraM's); the classical baselines "
                             "read the same records. A --data folder holds one band")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE:FIELD=VALUE",
                        help="override a field of configs/eegmat.py for one stage, e.g. finetune:optim.lr=5e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)
    if not pathlib.Path(args.eegmat).is_dir():
        raise SystemExit(f"{args.eegmat} is not a folder: pass --eegmat with the EEGMAT .edf files")
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    band = tuple(args.band)
    train_manifest, val_manifest = prepare(pathlib.Path(args.eegmat), pathlib.Path(args.data), band)
    baselines = classical(val_manifest)
    inner = prepare_inner(pathlib.Path(args.eegmat), pathlib.Path(args.data), band) if args.pick_step == "inner" else None
    report = {"seeds": args.seeds, "variants": args.variants, "overrides": args.overrides, "band_hz": band,
              "pick_step": args.pick_step, "classical": baselines, "runs": {}}
    for name, row in baselines.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    for seed in args.seeds:
        report["runs"][str(seed)] = run_seed(seed, args.variants, train_manifest, val_manifest, workdir, args.overrides,
                                             inner)
        (workdir / "eegmat.json").write_text(json.dumps(report, indent=1))
    print("\n" + table(report))
    print(f"\nwrote {workdir / 'eegmat.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
