"""The bundled demo: data_prep -> tokenizer -> pretraining -> fine-tuning -> held-out evaluation.

Run by ``python -m labram_jax.main --config=configs/demo.py --workdir=DIR``: it converts the
real recordings shipped in ``labram_jax/demo_data`` (one-minute EEGMAT excerpts of rest and
of mental arithmetic, 20 subjects), trains the three stages of LaBraM-Tiny on subjects 00-15
on the CPU, and evaluates on subjects 16-19, whom no stage has seen (EEGMAT's documented
validation split). It prints what the numbers mean: chance level, and two classical
baselines fitted on the training subjects' windows and scored on the same held-out windows.
Every stage resumes if interrupted.

``python -m labram_jax.demo --make-bundle ../shared/eeg/eegmat`` rebuilds the bundle.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import subprocess
import sys
import time

import ml_collections

from labram_jax import baselines, train

log = logging.getLogger("labram_jax")
DEMO_DATA = pathlib.Path(__file__).resolve().parent / "demo_data"
TRAIN_SUBJECTS = tuple(f"{i:02d}" for i in range(16))
VAL_SUBJECTS = ("16", "17", "18", "19")
EXCERPT_S = 60.0
BASELINES = ("log_spectrum_lr", "band_power_lr")


def data_prep_args(data_dir: pathlib.Path, out: pathlib.Path, stride_s: float | None = None) -> list[str]:
    """data_prep's arguments for the bundle: 5-s windows (every ``stride_s`` seconds, default
    not overlapping), labels from the file names, subjects 16-19 in the validation split."""
    stride = ["--stride", str(stride_s)] if stride_s else []
    return [str(data_dir), "--out", str(out), "--dataset", "eegmat_demo", "--window", "5", *stride,
            "--label-from", "filename", "--label-pattern", r"_1_raw\.fif(\.gz)?$=rest",
            "--label-pattern", r"_2_raw\.fif(\.gz)?$=arithmetic", "--subject-pattern", r"Subject(\d+)_",
            "--val-subjects", ",".join(VAL_SUBJECTS), "--quiet"]


def _data_prep(args: list[str]) -> pathlib.Path:
    """Runs ``python -m data_prep`` (the command a user would type); returns the manifest."""
    manifest = pathlib.Path(args[args.index("--out") + 1]) / "manifest.json"
    done = subprocess.run([sys.executable, "-m", "data_prep", *args], check=False)
    if done.returncode != 0:
        raise RuntimeError(f"data_prep failed on the demo data (exit {done.returncode}); see {manifest}")
    return manifest


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the whole demo in ``workdir``; returns the fine-tuned model's held-out metrics and
    the baselines' on the same windows."""
    t0 = time.perf_counter()
    root = pathlib.Path(workdir)
    data_dir = pathlib.Path(config.data_dir or DEMO_DATA)
    log.info("demo 1/5: data_prep on %s (training windows every second, held-out windows not overlapping)", data_dir)
    train_manifest = _data_prep(data_prep_args(data_dir, root / "data_s1", stride_s=1.0))
    val_manifest = _data_prep(data_prep_args(data_dir, root / "data"))
    results = {}
    for i, name in enumerate(("tokenizer", "pretrain", "finetune"), start=2):
        stage_cfg = config.stages[name]
        with stage_cfg.unlocked():
            stage_cfg.seed = config.seed
            stage_cfg.data.train = str(train_manifest)
            if name == "pretrain":
                stage_cfg.pretrain.tokenizer_checkpoint = str(root / "tokenizer")
            if name == "finetune":
                stage_cfg.data.val = str(val_manifest)
                stage_cfg.finetune.init_checkpoint = str(root / "pretrain")
        log.info("demo %d/5: %s (%d steps)", i, name, stage_cfg.optim.total_steps)
        results[name] = train.run(stage_cfg, str(root / name))
    metrics = {k[4:]: v for k, v in results["finetune"].items() if k.startswith("val/")}
    if not metrics:  # a finished run only reloads: its last validation is in metrics.jsonl
        rows = [json.loads(line) for line in (root / "finetune" / "metrics.jsonl").read_text().splitlines() if line]
        metrics = {k[4:]: v for k, v in [r for r in rows if "val/auroc" in r][-1].items() if k.startswith("val/")}
    log.info("demo 5/5: classical baselines on the same windows")
    anchors = baselines.run(str(val_manifest), BASELINES)
    summary = {"validation": metrics, "baselines": anchors, "wall_s": time.perf_counter() - t0, "seed": config.seed,
               "held_out_subjects": list(VAL_SUBJECTS), "tokenizer_loss": results["tokenizer"].get("loss"),
               "pretrain_loss": results["pretrain"].get("loss")}
    (root / "demo_result.json").write_text(json.dumps(summary, indent=1))
    print(report(summary, json.loads(val_manifest.read_text())["splits"]["val"]))
    return summary


def report(summary: dict, val_split: dict) -> str:
    """The demo's closing lines: the model's held-out metrics and what they mean."""
    m = summary["validation"]
    counts = ", ".join(f"{n} {k}" for k, n in sorted(val_split["by_label"].items()))
    lines = [f"\nLaBraM-Tiny demo: rest vs mental arithmetic (EEGMAT), pretrained and fine-tuned on subjects "
             f"{TRAIN_SUBJECTS[0]}-{TRAIN_SUBJECTS[-1]}, evaluated on held-out subjects {', '.join(VAL_SUBJECTS)} "
             f"({val_split['windows']} windows of 5 s: {counts})"]
    for key in ("balanced_accuracy", "auroc", "auc_pr", "accuracy"):
        if key in m:
            lines.append(f"  {key:<18} {m[key]:.3f}")
    anchors = summary["baselines"]
    described = "; ".join(f"{baselines.BASELINES[name].description} {a['balanced_accuracy']:.3f} / {a['auroc']:.3f}"
                          for name, a in anchors.items())
    lines.append(f"What this means: chance is 0.500 balanced accuracy and 0.500 AUROC on these subjects. Classical "
                 f"baselines fitted on the training subjects' windows and scored on the same held-out windows "
                 f"(balanced accuracy / AUROC): {described}. Four subjects are a small sample: across all 20 "
                 "subjects in 5-fold cross-validation see BENCHMARKS.md (\"Transfer\").")
    lines.append(f"  wall time          {summary['wall_s']:.0f} s")
    return "\n".join(lines)


def make_bundle(source: str, out: pathlib.Path = DEMO_DATA) -> None:
    """Crops EEGMAT recordings to their first 60 s, keeps the 19 EEG channels, resamples to
    200 Hz and stores them as gzipped 16-bit FIF (the demo's input; attribution in
    demo_data/README.md)."""
    import mne

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("Subject*_raw.fif*"):
        old.unlink()
    for subject in TRAIN_SUBJECTS + VAL_SUBJECTS:
        for condition in ("1", "2"):
            raw = mne.io.read_raw_edf(os.path.join(source, f"Subject{subject}_{condition}.edf"), preload=True,
                                      verbose="error")
            raw.pick([n for n in raw.ch_names if n.startswith("EEG") and "A2-A1" not in n])
            raw.crop(0, EXCERPT_S, include_tmax=False).resample(200, verbose="error")
            for ch in raw.info["chs"]:  # 16-bit steps of 0.02 uV: +-655 uV range
                ch["cal"], ch["range"] = 2e-8, 1.0
            raw.save(out / f"Subject{subject}_{condition}_raw.fif.gz", fmt="short", overwrite=True, verbose="error")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="rebuild the bundled demo data")
    parser.add_argument("--make-bundle", required=True, metavar="EEGMAT_DIR")
    make_bundle(parser.parse_args().make_bundle)
