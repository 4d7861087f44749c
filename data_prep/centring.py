"""Subject-centred copies of a data_prep conversion: every subject's signals on a common footing.

    python -m data_prep.centring data/eegmat/manifest.json --out data/eegmat_centred [--band 1 45]
    python -m data_prep.centring data/mmidb_mi/manifest.json --out data/mmidb_mi_aligned --method euclidean

writes ``<out>/manifest.json`` and its shards: the same records (windows, labels, provenance,
splits), prepared per subject (``labram_jax.subject_centring``):

- ``--method spectrum`` (default): each 1-s patch's FFT divided by its subject's mean amplitude
  spectrum on that channel (the geometric mean over every patch of the subject in the manifest,
  all splits) inside ``--band`` and zeroed outside it;
- ``--method euclidean``: Euclidean alignment, every window multiplied by ``R^-1/2``, ``R`` the
  subject's mean spatial covariance over all its windows with that montage (all splits);
- ``--method euclidean+spectrum``: alignment, then spectrum centring of the aligned signals.

The references use no labels. Fold manifests (``python -m data_prep.folds``) are made from the
centred manifest like from any other.

Use it when every subject's recordings mix the conditions alike (each new subject brings its own
unlabelled windows); a subject recorded in one condition only is centred onto it and loses it.
Train, validate and predict on records centred the same way: the values are dimensionless.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable

import grain
import numpy as np
import tqdm
from array_record.python import array_record_module

from labram_jax import manifest as manifest_lib, records, subject_centring

TOOL = "data_prep.centring 1"


def _read(path: pathlib.Path):
    source = grain.sources.ArrayRecordDataSource([str(path)])
    return (records.decode(source[i]) for i in range(len(source)))


def _montage(rec) -> tuple:
    return rec.subject, tuple(int(c) for c in rec.channel_ids)


def subject_references(root: pathlib.Path, entries: list[dict], progress: bool = True,
                       signal_of: Callable = lambda rec: rec.signal) -> dict:
    """``{(subject, channel_id): [101] mean log |rfft|}`` over every patch of the entries' shards
    (of ``signal_of(record)``: the record's signal, or its aligned signal)."""
    sums: dict[tuple[str, int], np.ndarray] = {}
    counts: dict[tuple[str, int], int] = {}
    for entry in tqdm.tqdm(entries, desc="references", unit="file", disable=not progress, file=sys.stderr):
        for rec in _read(root / entry["shard"]):
            log_amplitude = subject_centring.log_amplitude(signal_of(rec))  # [C, W, 101]
            for row, channel in enumerate(rec.channel_ids):
                key = (rec.subject, int(channel))
                sums[key] = sums.get(key, 0.0) + log_amplitude[row].sum(0)
                counts[key] = counts.get(key, 0) + rec.num_windows
    return {key: sums[key] / counts[key] for key in sums}


def subject_whitenings(root: pathlib.Path, entries: list[dict], progress: bool = True) -> dict:
    """``{(subject, channel_ids): [C, C] R^-1/2}``, ``R`` the mean spatial covariance of the
    subject's records with that montage over the entries' shards."""
    sums: dict[tuple, np.ndarray] = {}
    counts: dict[tuple, int] = {}
    for entry in tqdm.tqdm(entries, desc="covariances", unit="file", disable=not progress, file=sys.stderr):
        for rec in _read(root / entry["shard"]):
            key = _montage(rec)
            sums[key] = sums.get(key, 0.0) + subject_centring.covariance(rec.signal[None])
            counts[key] = counts.get(key, 0) + 1
    whitenings = {}
    for key in sums:
        try:
            whitenings[key] = subject_centring.whitening_matrix(sums[key] / counts[key])
        except ValueError as err:
            raise ValueError(f"subject {key[0]}: {err}") from None
    return whitenings


def centre_manifest(manifest_path: str | pathlib.Path, out: str | pathlib.Path,
                    band_hz: tuple[int, int] = subject_centring.BAND_HZ, progress: bool = True,
                    method: str = "spectrum") -> dict:
    """Writes the subject-centred copy of a manifest's records under ``out`` (``method``: one of
    ``subject_centring.METHODS``; ``band_hz`` is spectrum centring's); returns its manifest."""
    if method not in subject_centring.METHODS:
        raise ValueError(f"method={method!r}: choose one of {subject_centring.METHODS}")
    manifest_path, out = pathlib.Path(manifest_path), pathlib.Path(out)
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("subject_centring"):
        raise ValueError(f"{manifest_path} is already subject-centred ({manifest['subject_centring']}): centre the "
                         "original conversion (--method euclidean+spectrum does alignment and centring in one go)")
    if out.resolve() == manifest_path.parent.resolve():
        raise ValueError("--out must be a new folder: the centred records do not replace the originals")
    lo, hi = band_hz
    if not 1 <= lo <= hi <= records.PATCH // 2:
        raise ValueError(f"--band {lo} {hi}: need 1 <= low <= high <= {records.PATCH // 2} Hz")
    root = manifest_path.parent
    entries = [e for e in manifest["files"] if e["status"] == "ok"]
    if not entries:
        raise ValueError(f"{manifest_path} lists no converted recording")
    setting = subject_centring.canonical({"method": method, "band_hz": [lo, hi]})
    steps = subject_centring.steps(setting)
    whitenings = subject_whitenings(root, entries, progress) if "euclidean" in steps else {}

    def aligned(rec) -> np.ndarray:
        return subject_centring.align_signal(rec.signal, whitenings[_montage(rec)]) if whitenings else rec.signal

    references = subject_references(root, entries, progress, aligned) if "spectrum" in steps else {}
    for entry in tqdm.tqdm(entries, desc="centring", unit="file", disable=not progress, file=sys.stderr):
        target = out / entry["shard"]
        target.parent.mkdir(parents=True, exist_ok=True)
        writer = array_record_module.ArrayRecordWriter(str(target), "group_size:1")
        try:
            for rec in _read(root / entry["shard"]):
                centred = aligned(rec)
                if references:
                    reference = np.stack([references[(rec.subject, int(c))] for c in rec.channel_ids])
                    centred = subject_centring.centre_signal(centred, reference, band_hz)
                writer.write(records.encode(dataclasses.replace(rec, signal=centred)))
        finally:
            writer.close()
    extra = manifest_lib.extra_of(manifest)
    extra["subject_centring"] = {**setting, "source": str(manifest_path.resolve()),
                                 "subjects": len({e["subject"] for e in entries})}
    centred_manifest = manifest_lib.build(manifest["files"], extra, TOOL)
    (out / "manifest.json").write_text(json.dumps(centred_manifest, indent=1))
    return centred_manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.centring", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("manifest", help="a manifest.json written by python -m data_prep")
    parser.add_argument("--out", required=True, help="a new folder for the centred records and their manifest")
    parser.add_argument("--band", type=int, nargs=2, default=list(subject_centring.BAND_HZ), metavar=("LOW", "HIGH"),
                        help="spectrum centring: 1-Hz bins kept, in Hz (default 1 45: the spectrum stem's)")
    parser.add_argument("--method", choices=subject_centring.METHODS, default="spectrum",
                        help="spectrum: each channel's spectrum over the subject's mean (default); euclidean: "
                        "Euclidean alignment, each window times the subject's R^-1/2 (spatial covariance); "
                        "euclidean+spectrum: the one, then the other")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        written = centre_manifest(args.manifest, args.out, tuple(args.band), progress=not args.quiet,
                                  method=args.method)
    except (ValueError, OSError, KeyError) as err:
        print(f"error: {args.manifest}: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}/manifest.json: {written['subject_centring']['subjects']} subjects "
          f"{subject_centring.describe(written['subject_centring'])}, "
          f"{sum(s['windows'] for s in written['splits'].values())} windows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
