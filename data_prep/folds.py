"""Subject-wise k-fold cross-validation manifests from one data_prep manifest.

    python -m data_prep.folds data/eegmat/manifest.json --folds 5 [--seed 0] [--from-splits train val]

writes ``manifest_fold0.json ... manifest_fold4.json`` next to the manifest: in fold i the
subjects of group i form the ``val`` split and every other subject the ``train`` split.
Nothing is converted again: a fold manifest lists the same shards (one per recording) under
new split names, with label counts recomputed, so it works wherever a manifest does
(``config.data.train`` / ``config.data.val``, class weights, evaluation).

Subjects are shuffled with ``--seed`` and cut into ``--folds`` groups whose sizes differ by at
most one; the same subjects, seed and fold count always give the same folds, so two conversions
of the same recordings (for example 1-s and 5-s window strides) fold alike.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from labram_jax import manifest as manifest_lib


def subject_folds(subjects: Sequence[str], folds: int, seed: int = 0) -> list[list[str]]:
    """``folds`` disjoint, sorted groups of the unique ``subjects`` (shuffled with ``seed``),
    sizes differing by at most one."""
    unique = sorted(set(subjects))
    if not 2 <= folds <= len(unique):
        raise ValueError(f"--folds {folds}: need between 2 and the number of subjects ({len(unique)})")
    order = np.random.default_rng(seed).permutation(len(unique))
    return [sorted(unique[i] for i in part) for part in np.array_split(order, folds)]


def fold_manifest(manifest: dict, val_subjects: Sequence[str], from_splits: Sequence[str] | None = None) -> dict:
    """A copy of ``manifest`` whose recordings of ``val_subjects`` form the ``val`` split and all
    others the ``train`` split (only recordings of ``from_splits``, when given)."""
    val = set(val_subjects)
    outcomes = []
    for entry in manifest["files"]:
        if entry["status"] == "ok" and (from_splits is None or entry["split"] in from_splits):
            outcomes.append({**entry, "split": "val" if entry["subject"] in val else "train"})
    if not any(o["split"] == "val" for o in outcomes):
        raise ValueError(f"no converted recording of the validation subjects {sorted(val)}")
    extra = manifest_lib.extra_of(manifest)
    extra["subject_splits"] = {o["subject"]: o["split"] for o in outcomes}
    return manifest_lib.build(outcomes, extra, manifest["tool"])


def write_folds(manifest_path: str | pathlib.Path, folds: int, seed: int = 0,
                from_splits: Sequence[str] | None = None) -> list[tuple[pathlib.Path, list[str]]]:
    """Writes ``manifest_fold<i>.json`` beside ``manifest_path``; returns (path, validation
    subjects) per fold."""
    path = pathlib.Path(manifest_path)
    manifest = json.loads(path.read_text())
    subjects = [e["subject"] for e in manifest["files"]
                if e["status"] == "ok" and (from_splits is None or e["split"] in from_splits)]
    out = []
    for i, val in enumerate(subject_folds(subjects, folds, seed)):
        fold = fold_manifest(manifest, val, from_splits)
        fold["fold"] = {"index": i, "folds": folds, "seed": seed, "val_subjects": val, "source": path.name}
        target = path.with_name(f"manifest_fold{i}.json")
        target.write_text(json.dumps(fold, indent=1))
        out.append((target, val))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.folds", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("manifest", help="a manifest.json written by python -m data_prep")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subject shuffle (default 0)")
    parser.add_argument("--from-splits", nargs="+", default=None, metavar="SPLIT",
                        help="fold only the recordings of these splits (default: every split)")
    args = parser.parse_args(argv)
    try:
        written = write_folds(args.manifest, args.folds, args.seed, args.from_splits)
    except (ValueError, OSError, KeyError) as err:
        print(f"error: {args.manifest}: {err}", file=sys.stderr)
        return 2
    for path, val in written:
        print(f"{path}: validation subjects {', '.join(val)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
