"""Labels of windows, subjects of recordings, and subject-level splits."""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import re

import mne
import numpy as np

STRADDLE_POLICIES = ("majority", "strict", "start")


@dataclasses.dataclass(frozen=True)
class Interval:
    start: float
    stop: float
    label: str


class LabelError(ValueError):
    """A recording whose labels cannot be determined; the message is the reason."""


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """Where labels come from.

    Attributes:
      source: ``none``, ``filename``, ``annotations`` or ``csv``.
      patterns: (regex, label) for ``filename``; the first regex found in the path wins.
      annotation_map: annotation description -> label, for ``annotations``.
      csv_path: for ``csv``: rows ``file,label`` or ``file,start,stop,label`` (seconds).
      straddle: for intervals: ``majority`` (the label covering >= half the window),
        ``strict`` (the window must lie inside one interval) or ``start``.
    """

    source: str = "none"
    patterns: tuple[tuple[str, str], ...] = ()
    annotation_map: tuple[tuple[str, str], ...] = ()
    csv_path: str = ""
    straddle: str = "majority"

    def label_names(self) -> list[str]:
        """Label names in id order: first appearance in the patterns / map / CSV."""
        if self.source == "filename":
            return list(dict.fromkeys(label for _, label in self.patterns))
        if self.source == "annotations":
            return list(dict.fromkeys(label for _, label in self.annotation_map))
        if self.source == "csv":
            return list(dict.fromkeys(row[-1] for row in _read_csv(self.csv_path)))
        return []


_HEADER_WORDS = ("file", "path", "subject", "recording")


def _csv_rows(path: str, widths: tuple[int, ...], expected: str) -> list[list[str]]:
    """Rows of a small CSV (comments with #, an optional header row), each of an allowed width."""
    with open(path, newline="") as f:
        rows = [[c.strip() for c in row] for row in csv.reader(f) if row and not row[0].startswith("#")]
    if rows and rows[0][0].lower() in _HEADER_WORDS:
        rows = rows[1:]
    for row in rows:
        if len(row) not in widths:
            raise ValueError(f"{path}: rows must be {expected}, got {row}")
    return rows


def _read_csv(path: str) -> list[list[str]]:
    return _csv_rows(path, (2, 4), "'file,label' or 'file,start,stop,label'")


def _csv_matches(row_file: str, path: pathlib.Path) -> bool:
    return path.as_posix().endswith(row_file) or path.name == row_file or path.stem == row_file


def recording_labels(spec: LabelSpec, path: pathlib.Path, annotations: mne.Annotations | None,
                     first_time: float) -> str | list[Interval] | None:
    """One label for the whole recording, labelled intervals, or None (unlabelled).

    Raises LabelError when the recording should have labels and has none.
    """
    if spec.source == "none":
        return None
    if spec.source == "filename":
        for regex, label in spec.patterns:
            if re.search(regex, path.as_posix()):
                return label
        raise LabelError("no --label-pattern matches the file name")
    if spec.source == "annotations":
        mapping = dict(spec.annotation_map)
        intervals = []
        if annotations is not None:
            for onset, duration, desc in zip(annotations.onset, annotations.duration, annotations.description):
                if desc in mapping and duration > 0:
                    start = float(onset) - first_time
                    intervals.append(Interval(start, start + float(duration), mapping[desc]))
        if not intervals:
            raise LabelError(f"no annotation with a mapped description ({', '.join(mapping)})")
        return intervals
    if spec.source == "csv":
        rows = [r for r in _read_csv(spec.csv_path) if _csv_matches(r[0], path)]
        if not rows:
            raise LabelError(f"{path.name} is not listed in {spec.csv_path}")
        if len(rows[0]) == 2:
            return rows[0][1]
        return [Interval(float(r[1]), float(r[2]), r[3]) for r in rows]
    raise ValueError(f"unknown label source {spec.source!r}")


def window_label(labels: str | list[Interval] | None, start: float, length: float, straddle: str) -> str | None:
    """The label of the window [start, start + length) in seconds; '' if it gets none."""
    if labels is None or isinstance(labels, str):
        return labels
    if straddle == "start":
        for iv in labels:
            if iv.start <= start < iv.stop:
                return iv.label
        return ""
    cover: dict[str, float] = {}
    for iv in labels:
        overlap = min(iv.stop, start + length) - max(iv.start, start)
        if overlap > 0:
            cover[iv.label] = cover.get(iv.label, 0.0) + overlap
    if not cover:
        return ""
    label, amount = max(cover.items(), key=lambda kv: kv[1])
    if straddle == "strict":
        return label if len(cover) == 1 and amount >= length - 1e-6 else ""
    return label if amount >= length / 2.0 else ""


def event_starts(labels: str | list[Interval] | None, offset_s: float, window_s: float, num_samples: int,
                 sfreq: float) -> np.ndarray:
    """Start samples of one window per labelled interval (trial), ``offset_s`` after its onset,
    in onset order; windows that would leave the recording are left out.

    Raises LabelError when the labels are not intervals (a whole-recording label has no events).
    """
    if not isinstance(labels, list):
        raise LabelError("--event-windows needs labelled intervals (--label-from annotations, or a CSV with "
                         "'file,start,stop,label' rows)")
    length = int(round(window_s * sfreq))
    starts = sorted({int(round((iv.start + offset_s) * sfreq)) for iv in labels})
    return np.asarray([s for s in starts if s >= 0 and s + length <= num_samples], np.int64)


def subject_of(path: pathlib.Path, pattern: str | None, table: dict[str, str] | None = None) -> str:
    """Subject id from a CSV table (file -> subject), a regex (first group) or the file stem."""
    if table:
        for key, subject in table.items():
            if _csv_matches(key, path):
                return subject
    if pattern:
        match = re.search(pattern, path.as_posix())
        if match:
            return match.group(1) if match.groups() else match.group(0)
        raise LabelError(f"--subject-pattern {pattern!r} does not match the path")
    return path.stem


def read_table(path: str) -> dict[str, str]:
    """A two-column CSV (key,value) as a dict; a header row is skipped if present."""
    return dict(_csv_rows(path, (2,), "two columns 'key,value'"))


def assign_splits(subjects: list[str], *, val_subjects: list[str] | None = None, split_table: dict[str, str] | None = None,
                  val_fraction: float = 0.0, seed: int = 0) -> dict[str, str]:
    """Subject -> split name. Whole subjects go to one split, never single windows.

    Precedence: an explicit table (subject,split), then a list of validation subjects,
    then a seeded random fraction of subjects for validation.
    """
    unique = sorted(set(subjects))
    if split_table:
        missing = [s for s in unique if s not in split_table]
        if missing:
            raise ValueError(f"the split file has no row for subjects {missing[:5]}: add 'subject,split' rows "
                             "for every subject (or use --val-subjects / --val-fraction)")
        return {s: split_table[s] for s in unique}
    if val_subjects:
        return {s: "val" if s in set(val_subjects) else "train" for s in unique}
    n_val = int(round(val_fraction * len(unique)))
    order = np.random.default_rng(seed).permutation(len(unique))
    val = {unique[i] for i in order[:n_val]}
    return {s: "val" if s in val else "train" for s in unique}
