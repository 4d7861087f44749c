"""The bundled demo: data_prep -> tokenizer -> pretraining -> fine-tuning -> evaluation.

Run by ``python -m labram_jax.main --config=configs/demo.py --workdir=DIR``: it converts
the small real recordings shipped in ``labram_jax/demo_data`` (EEGMAT excerpts, rest vs
mental arithmetic), trains the three stages of a tiny LaBraM on the CPU in a few
minutes, and prints the validation metrics. Every stage resumes if interrupted.

``python -m labram_jax.demo --make-bundle ../shared/eeg/eegmat`` rebuilds the bundle.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import time

import ml_collections

from data_prep import __main__ as data_prep_cli
from labram_jax import train

log = logging.getLogger("labram_jax")
DEMO_DATA = pathlib.Path(__file__).resolve().parent / "demo_data"
TRAIN_SUBJECTS = ("00", "01", "02", "03", "04", "05")
VAL_SUBJECTS = ("16", "17")
EXCERPT_S = 60.0


def data_prep_args(data_dir: pathlib.Path, out: pathlib.Path) -> list[str]:
    return [str(data_dir), "--out", str(out), "--dataset", "eegmat_demo", "--window", "5",
            "--label-from", "filename", "--label-pattern", r"_1_raw\.fif$=rest",
            "--label-pattern", r"_2_raw\.fif$=arithmetic", "--subject-pattern", r"Subject(\d+)_",
            "--val-subjects", ",".join(VAL_SUBJECTS), "--quiet"]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the whole demo in ``workdir``; returns the fine-tuned model's validation metrics."""
    t0 = time.perf_counter()
    root = pathlib.Path(workdir)
    data_dir = pathlib.Path(config.data_dir or DEMO_DATA)
    manifest = root / "data" / "manifest.json"
    log.info("demo 1/4: data_prep on %s", data_dir)
    code = data_prep_cli.main(data_prep_args(data_dir, root / "data"))
    if code != 0:
        raise RuntimeError(f"data_prep failed on the demo data (exit {code}); see {manifest}")
    results = {}
    for i, name in enumerate(("tokenizer", "pretrain", "finetune"), start=2):
        stage_cfg = config.stages[name]
        with stage_cfg.unlocked():
            stage_cfg.data.train = str(manifest)
            if name == "pretrain":
                stage_cfg.pretrain.tokenizer_checkpoint = str(root / "tokenizer")
            if name == "finetune":
                stage_cfg.data.val = str(manifest)
                stage_cfg.finetune.init_checkpoint = str(root / "pretrain")
        log.info("demo %d/4: %s (%d steps)", i, name, stage_cfg.optim.total_steps)
        results[name] = train.run(stage_cfg, str(root / name))
    metrics = {k[4:]: v for k, v in results["finetune"].items() if k.startswith("val/")}
    summary = {"validation": metrics, "wall_s": time.perf_counter() - t0,
               "tokenizer_loss": results["tokenizer"].get("loss"), "pretrain_loss": results["pretrain"].get("loss")}
    (root / "demo_result.json").write_text(json.dumps(summary, indent=1))
    print("\nLaBraM demo (EEGMAT excerpts, rest vs mental arithmetic, validation subjects "
          f"{', '.join(VAL_SUBJECTS)}):")
    for key, value in metrics.items():
        print(f"  {key:<18} {value:.3f}")
    print(f"  wall time          {summary['wall_s']:.0f} s   -> {root / 'demo_result.json'}")
    return summary


def make_bundle(source: str, out: pathlib.Path = DEMO_DATA) -> None:
    """Crops EEGMAT recordings to 60 s, keeps the 19 EEG channels, resamples to 200 Hz
    and stores them as 16-bit FIF (the demo's input; attribution in demo_data/README.md)."""
    import mne

    out.mkdir(parents=True, exist_ok=True)
    for subject in TRAIN_SUBJECTS + VAL_SUBJECTS:
        for condition in ("1", "2"):
            raw = mne.io.read_raw_edf(os.path.join(source, f"Subject{subject}_{condition}.edf"), preload=True,
                                      verbose="error")
            raw.pick([n for n in raw.ch_names if n.startswith("EEG") and "A2-A1" not in n])
            raw.crop(0, EXCERPT_S, include_tmax=False).resample(200, verbose="error")
            for ch in raw.info["chs"]:  # 16-bit steps of 0.02 uV: +-655 uV range
                ch["cal"], ch["range"] = 2e-8, 1.0
            raw.save(out / f"Subject{subject}_{condition}_raw.fif", fmt="short", overwrite=True, verbose="error")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="rebuild the bundled demo data")
    parser.add_argument("--make-bundle", required=True, metavar="EEGMAT_DIR")
    make_bundle(parser.parse_args().make_bundle)
