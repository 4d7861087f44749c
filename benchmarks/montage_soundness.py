"""Is placing channels by electrode position sound? Measured on real 10-10 recordings.

    python -m benchmarks.montage_soundness [--files '../shared/eeg/eegmmidb/*/*.edf'] [--out runs/montage]
        [--model runs/transfer/mmidb_eyes/none-spectrum-cn-e3/heldout/seed0]

EEGMMIDB records 64 electrodes with 10-10 names. Each recording is copied as a position-only
cap would store it: channels renamed ``E1..E64`` (no vocabulary name), the electrodes'
template positions kept as the file's digitisation (a FIF file), optionally only every
second electrode. ``labram_jax.preprocess`` then maps the copy onto the vocabulary by
position, exactly as data_prep does, and every vocabulary channel it produces is compared
with the original channel of that name (both preprocessed identically):

- ``all 64, nearest``: every electrode at its own position: must come back unchanged.
- ``all 64, interpolate``: spherical splines through the electrodes themselves.
- ``32 of 64, interpolate``: the other 32 are interpolated from their neighbours (a sparser
  cap): how well a missing 10-10 electrode is recovered.

Figures: Pearson correlation and relative RMS error per channel (median, 10th percentile).
With ``--model`` (a fine-tuned workdir of ``benchmarks.transfer --task mmidb_eyes`` or
``mmidb_mi``), also the model's balanced accuracy and AUROC on its held-out recordings (the
validation files of its manifest, windowed and labelled the same way) with named,
all-64-interpolated and 32-of-64-interpolated input.
"""

from __future__ import annotations

import argparse
import glob
import json
import pathlib
import tempfile

import mne
import numpy as np

from labram_jax import channels, montage, preprocess, reading

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_FILES = str(ROOT.parent / "shared" / "eeg" / "eegmmidb" / "*" / "*.edf")


def position_only_copy(raw: mne.io.BaseRaw, keep_every: int = 1) -> tuple[mne.io.BaseRaw, dict[str, str]]:
    """A copy of a named 10-10 recording as a position-only cap stores it: EEG channels renamed
    ``X1, X2, ...`` with their template positions as digitisation, every ``keep_every``-th one
    kept. Returns (the copy, new name -> the original vocabulary name)."""
    vocab = montage.vocabulary_positions()
    names = {}
    for name in raw.ch_names:
        mapped = channels.normalize(name).name
        if mapped in vocab:
            names[name] = mapped
    kept = list(names)[::keep_every]
    copy = raw.copy().pick(kept)
    renamed = {old: f"X{i + 1}" for i, old in enumerate(kept)}
    copy.rename_channels(renamed)
    positions = {renamed[old]: vocab[names[old]] * montage.HEAD_RADIUS_MM / 1000.0 for old in kept}
    copy.set_montage(mne.channels.make_dig_montage(positions, coord_frame="head"), verbose="error")
    return copy, {renamed[old]: names[old] for old in kept}


def compare(original: preprocess.Prepared, placed: preprocess.Prepared) -> dict[str, tuple[float, float]]:
    """Vocabulary channel -> (Pearson r, RMS error / RMS of the original) for every channel the
    placed copy produced that the original has, over the whole recording."""
    index = {n: i for i, n in enumerate(original.names)}
    out = {}
    for k, name in enumerate(placed.names):
        if name in index:
            a, b = original.data[index[name]].astype(np.float64), placed.data[k].astype(np.float64)
            ok = np.isfinite(a) & np.isfinite(b)
            a, b = a[ok], b[ok]
            out[name] = (float(np.corrcoef(a, b)[0, 1]), float(np.sqrt(np.mean((a - b) ** 2) / np.mean(a ** 2))))
    return out


VARIANTS = {"all 64, nearest": (1, "nearest"), "all 64, interpolate": (1, "interpolate"),
            "32 of 64, interpolate": (2, "interpolate")}


def _placed(raw: mne.io.BaseRaw, keep_every: int, method: str, params: preprocess.Params,
            held_out_only: bool) -> tuple[preprocess.Prepared, set[str]]:
    copy, origin = position_only_copy(raw, keep_every)
    options = montage.Options(method=method)
    with tempfile.TemporaryDirectory() as tmp:  # through a file, as data_prep reads it
        path = pathlib.Path(tmp) / "copy_raw.fif"
        copy.save(path, verbose="error")
        placed = preprocess.preprocess(reading.read_raw(path), params, options=options)
    return placed, (set(channels.VOCABULARY) - set(origin.values())) if held_out_only else set(origin.values())


def soundness(files: list[str], notch: float = 60.0) -> dict:
    """Per variant: correlation and relative error of every produced channel over ``files``."""
    params = preprocess.Params(notch=notch, window_s=4, stride_s=4.0)
    results: dict[str, dict[str, list]] = {name: {"r": [], "rel_rms": [], "channels": []} for name in VARIANTS}
    for path in files:
        raw = reading.read_raw(path)
        original = preprocess.preprocess(raw, params)
        for name, (keep_every, method) in VARIANTS.items():
            placed, judged = _placed(raw, keep_every, method, params, held_out_only=keep_every > 1)
            for channel, (r, err) in compare(original, placed).items():
                if channel in judged:
                    results[name]["r"].append(r)
                    results[name]["rel_rms"].append(err)
                    results[name]["channels"].append(channel)
    summary = {}
    for name, values in results.items():
        r, err = np.asarray(values["r"]), np.asarray(values["rel_rms"])
        summary[name] = {"channels_compared": int(r.size), "files": len(files),
                         "r_median": float(np.median(r)), "r_p10": float(np.percentile(r, 10)),
                         "rel_rms_median": float(np.median(err)), "rel_rms_p90": float(np.percentile(err, 90))}
    return summary


def held_out_task(model_dir: str) -> tuple[list[str], dict, dict]:
    """(held-out recordings, label settings, window settings) of a fine-tuned workdir: read from
    the manifest it was trained on (its ``val`` files, as data_prep recorded them)."""
    from labram_jax import data_spec

    config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    manifests = [m for pattern in data_spec.DataSpec.parse(config["data"]["val"]).manifests
                 for m in data_spec.expand(pattern)]
    if not manifests:
        raise SystemExit(f"{model_dir}: its config names no validation manifest to take held-out recordings from")
    manifest = json.loads(pathlib.Path(manifests[0]).read_text())
    files = [f["path"] for f in manifest["files"] if f.get("split") == "val" and f.get("status") == "ok"]
    return files, manifest["labels"], manifest["parameters"]


PLACED_CAPS = {"all 64, interpolate": 1, "32 of 64, interpolate": 2}  # name -> keep every k-th electrode


def model_on_placed_caps(model_dir: str, max_files: int | None = None, placed: dict[str, int] = PLACED_CAPS,
                         options: montage.Options = montage.Options()) -> dict:
    """A fine-tuned EEGMMIDB model (``benchmarks.transfer --task mmidb_eyes`` or ``mmidb_mi``) on
    its held-out recordings, windowed and labelled as data_prep did for its validation split,
    with the electrodes named, all 64 placed by position (interpolated), and 32 of 64
    interpolated from their neighbours (``options``: how the placed caps are mapped; by default
    splines onto every 10-10 site within 35 mm, as data_prep does)."""
    from data_prep import labels as labels_lib
    from labram_jax import api
    from labram_jax.tasks import finetune

    predictor = api.load(model_dir)
    files, label_info, window_info = held_out_task(model_dir)
    files = files[:max_files]
    spec = labels_lib.LabelSpec(source=label_info["source"],
                                patterns=tuple(tuple(p) for p in label_info["patterns"]),
                                annotation_map=tuple(tuple(p) for p in label_info["annotation_map"]),
                                straddle=label_info["straddle"])
    positive = label_info["names"][1]
    window, stride = int(window_info["window_s"]), float(window_info["stride_s"])
    params = preprocess.Params(notch=window_info["notch"], window_s=window, stride_s=stride)
    scores: dict[str, list] = {"named": [], **{name: [] for name in placed}}
    targets = []
    length = window * 200
    for path in files:
        raw = reading.read_raw(path)
        intervals = labels_lib.recording_labels(spec, pathlib.Path(path), raw.annotations, raw.first_time)
        variants = {"named": (raw, montage.Options(positions="none"))}
        for name, keep_every in placed.items():
            variants[name] = (position_only_copy(raw, keep_every)[0], options)
        for name, (signal, mapping) in variants.items():
            prepared = preprocess.preprocess(signal, params, options=mapping)
            if window_info.get("event_windows"):
                starts = labels_lib.event_starts(intervals, window_info.get("event_offset_s", 0.0), window,
                                                 prepared.data.shape[1], 200)
            else:
                starts = np.arange(0, prepared.data.shape[1] - length + 1, int(round(stride * 200)))
            labels = [labels_lib.window_label(intervals, s / 200, window, spec.straddle) for s in starts]
            starts = [s for s, label in zip(starts, labels) if label]
            x = np.stack([prepared.data[:, s:s + length].reshape(len(prepared.names), window, 200) for s in starts])
            scores[name].append(predictor.predict_windows(x, prepared.rows))
            if name == "named":
                targets += [int(label == positive) for label in labels if label]
    y = np.asarray(targets)
    probs = {name: np.concatenate(s) for name, s in scores.items()}
    out = {}
    for name, p in probs.items():
        out[name] = {k: float(v) for k, v in finetune.compute_metrics("binary", p, y).items()}
        # how far the placed cap moves the model's answers on the same windows
        out[name]["same_class_as_named"] = float(np.mean((p > 0.5) == (probs["named"] > 0.5)))
        out[name]["mean_abs_prob_change"] = float(np.mean(np.abs(p - probs["named"])))
    return {"files": len(files), "windows": int(y.size), **out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.montage_soundness", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", default=DEFAULT_FILES, help="glob of named 10-10 recordings (EEGMMIDB)")
    parser.add_argument("--max-files", type=int, default=20)
    parser.add_argument("--out", default="runs/montage")
    parser.add_argument("--model", default="", help="a fine-tuned EEGMMIDB workdir (benchmarks.transfer --task "
                        "mmidb_eyes or mmidb_mi) to score on its held-out recordings with named and placed caps")
    args = parser.parse_args(argv)
    files = sorted(glob.glob(args.files))[: args.max_files]
    if not files:
        raise SystemExit(f"no file matches {args.files}")
    summary = soundness(files)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soundness.json").write_text(json.dumps(summary, indent=1))
    print("| variant | files | channels | r median | r 10th pct | rel. RMS error median | 90th pct |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['files']} | {s['channels_compared']} | {s['r_median']:.4f} | {s['r_p10']:.4f} | "
              f"{s['rel_rms_median']:.4f} | {s['rel_rms_p90']:.4f} |")
    if args.model:
        accuracy = model_on_placed_caps(args.model)
        (out / "model_on_placed_caps.json").write_text(json.dumps(accuracy, indent=1))
        print(f"\n{args.model} on its held-out recordings ({accuracy['files']} files, {accuracy['windows']} windows)")
        print("| input | balanced accuracy | AUROC | same class as named | mean abs probability change |")
        print("|---|---|---|---|---|")
        for name, m in accuracy.items():
            if isinstance(m, dict):
                print(f"| {name} | {m['balanced_accuracy']:.3f} | {m['auroc']:.3f} | {m['same_class_as_named']:.3f} | "
                      f"{m['mean_abs_prob_change']:.4f} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
