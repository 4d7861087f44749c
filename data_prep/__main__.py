"""python -m data_prep: raw EEG recordings -> preprocessed ArrayRecord shards + manifest.json.

Examples:

  # EEGMAT: rest (_1) vs mental arithmetic (_2); subjects 16-19 for validation
  python -m data_prep ../shared/eeg/eegmat --out data/eegmat --dataset eegmat \\
      --window 5 --stride 5 --notch 50 \\
      --label-from filename --label-pattern '_1\\.edf$=rest' --label-pattern '_2\\.edf$=arithmetic' \\
      --subject-pattern 'Subject(\\d+)_' --val-subjects 16,17,18,19

  # EEGMMIDB: labels from the T0/T1/T2 annotations, 4-s windows, US mains
  python -m data_prep ../shared/eeg/eegmmidb --out data/eegmmidb --dataset eegmmidb \\
      --window 4 --stride 4 --notch 60 --label-from annotations \\
      --annotation-labels T0=rest,T1=left,T2=right --subject-pattern '(S\\d{3})R'

  # EEGMMIDB imagined left vs right fist: one 4-s window per trial, from its onset
  python -m data_prep '../shared/eeg/eegmmidb/*/S*R0[48].edf' --out data/mi --window 4 --notch 60 \\
      --label-from annotations --annotation-labels T1=left,T2=right --event-windows \\
      --subject-pattern '(S\\d{3})R'

Every format MNE reads is recognised (EDF/BDF/GDF, FIF, EEGLAB, BrainVision, Neuroscan and
ANT CNT, Nihon Kohden, NEDF, EGI MFF, CURRY, Persyst, Nicolet, eximia, NSx, BCI2000, MEF);
a multi-file recording counts once, and every other file of an input folder is listed in
manifest.json under "not_read" with the reason. Optional readers need their package (the
reason says which; pip install 'labram_jax[formats]' installs them all).

Exit status: 0 when every file was converted or skipped for a stated reason (too
short, no mappable channel, no label), 1 when some file could not be read correctly
(0 with --allow-failures), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys

from data_prep import labels as labels_lib
from data_prep import pipeline
from labram_jax import montage as montage_lib
from labram_jax import preprocess as prep_lib
from labram_jax import reading


def _pairs(text: str, flag: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        if "=" not in item:
            raise ValueError(f"{flag} takes NAME=LABEL items separated by commas, got {item!r}")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), value.strip()))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="files, directories (searched recursively) or globs")
    p.add_argument("--out", required=True, help="output directory (shards/ and manifest.json)")
    p.add_argument("--dataset", default="", help="dataset name stored in every record (default: output dir name)")
    g = p.add_argument_group("preprocessing")
    g.add_argument("--l-freq", type=float, default=0.1, help="high-pass edge in Hz (default 0.1; 0 disables)")
    g.add_argument("--h-freq", type=float, default=75.0, help="low-pass edge in Hz (default 75; 0 disables)")
    g.add_argument("--notch", type=float, default=50.0, help="mains frequency in Hz, harmonics too (50 or 60; 0 disables)")
    g.add_argument("--window", type=int, default=10, help="window length in whole seconds, 1..16 (default 10)")
    g.add_argument("--stride", type=float, default=None, help="window stride in seconds (default: the window)")
    g.add_argument("--event-windows", action="store_true",
                   help="one window per labelled interval (a trial), starting at its onset, instead of windows "
                        "every --stride seconds; needs --label-from annotations or an interval CSV")
    g.add_argument("--event-offset", type=float, default=0.0,
                   help="with --event-windows: start each window this many seconds after the onset (default 0)")
    g.add_argument("--clip-uv", type=float, default=0.0, help="clip amplitudes beyond +-this many uV (default off)")
    g.add_argument("--reject-flat-uv", type=float, default=0.0,
                   help="drop windows where a channel's peak-to-peak is below this (uV; default off)")
    g.add_argument("--reject-saturated-uv", type=float, default=0.0,
                   help="drop windows with |x| above this (uV; default off). Non-finite windows are always dropped")
    g.add_argument("--keep-ref-diff", action="store_true", help="keep channels like 'A2-A1' (as A2)")
    g.add_argument("--channel-map", default=None, help="CSV 'name,vocabulary_name' mapping extra channel names")
    g = p.add_argument_group("electrode positions (caps without 10-20 names: BioSemi A1..D32, EGI E1..E256, ...)")
    g.add_argument("--montage", default="auto",
                   help="where positions of channels without a vocabulary name come from: auto (default: the file's "
                        "digitisation, else a layout recognised from the names, used when most channels have no "
                        "vocabulary name), none (names only), an MNE montage name (biosemi128, GSN-HydroCel-129, "
                        "easycap-M10, ...) or a montage file (.elc, .sfp, .bvef, ...)")
    g.add_argument("--channel-method", default="interpolate", choices=montage_lib.METHODS,
                   help="interpolate (spherical splines onto vocabulary electrodes, default) or nearest (each "
                        "vocabulary electrode takes the nearest cap electrode)")
    g.add_argument("--montage-tolerance", type=float, default=None,
                   help="largest distance in mm between a vocabulary electrode and the nearest cap electrode "
                        "(default: 35 to interpolate, 15 for nearest)")
    g.add_argument("--montage-targets", default="1010", choices=sorted(montage_lib.TARGETS),
                   help="vocabulary electrodes to place onto: 1010 (10-10 names, default) or 1020 (the 19 of 10-20)")
    g.add_argument("--signal-dtype", default="float32", choices=("float32", "float16"))
    g = p.add_argument_group("labels")
    g.add_argument("--label-from", default="none", choices=("none", "filename", "annotations", "csv"))
    g.add_argument("--label-pattern", action="append", default=[],
                   help="REGEX=LABEL (repeatable): the first regex found in the file path gives the label")
    g.add_argument("--annotation-labels", default="", help="DESC=LABEL,... for --label-from annotations")
    g.add_argument("--labels-csv", default="", help="rows 'file,label' or 'file,start,stop,label'")
    g.add_argument("--straddle", default="majority", choices=labels_lib.STRADDLE_POLICIES,
                   help="a window across two labelled intervals: the label covering >= half of it "
                        "(majority), only windows inside one interval (strict), or the label at its start")
    g.add_argument("--regression", action="store_true", help="labels are numbers (stored as the record's value)")
    g = p.add_argument_group("subjects and splits (by subject, never by window)")
    g.add_argument("--subject-pattern", default=None, help="regex whose first group is the subject id")
    g.add_argument("--subjects-csv", default=None, help="CSV 'file,subject'")
    g.add_argument("--val-subjects", default="", help="comma-separated subject ids for the val split")
    g.add_argument("--split-file", default=None, help="CSV 'subject,split' (any split names)")
    g.add_argument("--val-fraction", type=float, default=0.0, help="random fraction of subjects for val")
    g.add_argument("--split-seed", type=int, default=0)
    g = p.add_argument_group("running")
    g.add_argument("--workers", type=int, default=1,
                   help="parallel worker processes (default 1; 0 = in this process, without the guards below)")
    g.add_argument("--file-timeout", type=float, default=1800.0,
                   help="seconds one file may take before its worker is killed and the file failed (default 1800)")
    g.add_argument("--max-memory-gb", type=float, default=None,
                   help="address-space limit per worker in GiB (default: 80%% of RAM shared by the workers; 0 = none)")
    g.add_argument("--allow-failures", action="store_true", help="exit 0 even if some files failed")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def make_jobs(args) -> tuple[list[pipeline.Job], dict]:
    """Validates the arguments and plans one job per input file (raises ValueError)."""
    params = prep_lib.Params(l_freq=args.l_freq, h_freq=args.h_freq, notch=args.notch, window_s=args.window,
                             stride_s=args.stride if args.stride is not None else float(args.window),
                             clip_uv=args.clip_uv, reject_flat_uv=args.reject_flat_uv,
                             reject_saturated_uv=args.reject_saturated_uv, keep_ref_diff=args.keep_ref_diff,
                             signal_dtype=args.signal_dtype, event_windows=args.event_windows,
                             event_offset_s=args.event_offset)
    spec = labels_lib.LabelSpec(
        source=args.label_from,
        patterns=tuple(tuple(x.rsplit("=", 1)) for x in args.label_pattern),
        annotation_map=tuple(_pairs(args.annotation_labels, "--annotation-labels")) if args.annotation_labels else (),
        csv_path=args.labels_csv, straddle=args.straddle)
    if any(len(x) != 2 for x in spec.patterns):
        raise ValueError("--label-pattern takes REGEX=LABEL")
    required = {"filename": spec.patterns, "annotations": spec.annotation_map, "csv": spec.csv_path}
    if args.label_from in required and not required[args.label_from]:
        flag = {"filename": "--label-pattern", "annotations": "--annotation-labels", "csv": "--labels-csv"}
        raise ValueError(f"--label-from {args.label_from} needs {flag[args.label_from]}")
    if args.event_windows and args.label_from not in ("annotations", "csv"):
        raise ValueError("--event-windows needs labelled intervals: --label-from annotations (or csv with "
                         "'file,start,stop,label' rows)")
    names = [] if args.regression else spec.label_names()
    aliases = tuple(labels_lib.read_table(args.channel_map).items()) if args.channel_map else ()
    montage = montage_lib.Options(positions=args.montage, method=args.channel_method,
                                  tolerance_mm=args.montage_tolerance, targets=args.montage_targets)
    found = reading.find_inputs(args.inputs)
    paths = found.recordings
    if not paths:
        listed = "; ".join(f"{p.name}: {why}" for p, why in found.not_read[:3])
        raise ValueError(f"no EEG recording found in {args.inputs}" + (f" ({listed})" if listed else ""))
    root = pathlib.Path(os.path.commonpath([str(p.parent) for p in paths]))
    subjects_table = labels_lib.read_table(args.subjects_csv) if args.subjects_csv else None
    subjects = {}
    for path in paths:
        try:
            subjects[path] = labels_lib.subject_of(path, args.subject_pattern, subjects_table)
        except labels_lib.LabelError as err:
            raise ValueError(f"{path}: {err}") from None
    splits = labels_lib.assign_splits(
        list(subjects.values()), val_subjects=[s for s in args.val_subjects.split(",") if s],
        split_table=labels_lib.read_table(args.split_file) if args.split_file else None,
        val_fraction=args.val_fraction, seed=args.split_seed)
    out_dir = pathlib.Path(args.out).resolve()
    dataset = args.dataset or out_dir.name
    jobs = [pipeline.Job(path=str(p), recording=str(p.relative_to(root).with_suffix("").as_posix()),
                         subject=subjects[p], split=splits[subjects[p]], dataset=dataset, params=params,
                         labels=spec, label_ids=tuple((n, i) for i, n in enumerate(names)),
                         regression=args.regression, aliases=aliases, out_dir=str(out_dir), montage=montage,
                         companions=tuple(str(c) for c in found.companions.get(p, ()))) for p in paths]
    extra = {"dataset": dataset, "inputs_root": str(root), "parameters": dataclasses.asdict(params),
             "montage": dataclasses.asdict(montage),
             "labels": {**dataclasses.asdict(spec), "names": names, "regression": args.regression},
             "subject_splits": splits,
             "not_read": [{"path": str(p), "reason": why} for p, why in found.not_read]}
    return jobs, extra


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        jobs, extra = make_jobs(args)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = pathlib.Path(args.out).resolve()
    memory = None if args.max_memory_gb is None else int(args.max_memory_gb * (1 << 30))
    manifest = pipeline.run(jobs, out_dir, args.workers, extra, progress=not args.quiet,
                            timeout_s=args.file_timeout, memory_bytes=memory)
    totals = manifest["totals"]
    print(f"{totals['ok']} converted, {totals['skipped']} skipped, {totals['failed']} failed; "
          f"{totals['windows']} windows ({totals['hours_in']:.2f} h of EEG) -> {out_dir / 'manifest.json'}")
    for name, split in manifest["splits"].items():
        print(f"  {name}: {split['windows']} windows from {split['recordings']} recordings, "
              f"{len(split['subjects'])} subjects; by label {json.dumps(split['by_label'])}")
    for o in manifest["files"]:
        if o["status"] != "ok":
            print(f"  {o['status']}: {o['path']}: {o['reason']}")
    for o in manifest["not_read"]:
        print(f"  not read: {o['path']}: {o['reason']}")
    return 1 if totals["failed"] and not args.allow_failures else 0


if __name__ == "__main__":
    sys.exit(main())
