"""Converting many recordings to ArrayRecord shards: parallel, resumable, atomic.

Layout of the output directory::

    manifest.json                      what went in, with which parameters, what came out
    shards/<split>/<recording>.arrayrecord   one shard per recording (group_size:1)
    .state/<key>.json                  per-file outcome, to skip finished files on a rerun

A shard is written to ``*.tmp`` and renamed only when complete, so an interrupted
run never leaves a partial shard that looks valid.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
import time
import traceback

import numpy as np
import tqdm
from array_record.python import array_record_module

from data_prep import labels as labels_lib
from data_prep import supervisor
from labram_jax import manifest as manifest_lib
from labram_jax import montage as montage_lib
from labram_jax import preprocess as prep_lib
from labram_jax import reading
from labram_jax import records

TOOL_VERSION = "data_prep 1"


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything one worker needs to convert one file (picklable across processes)."""

    path: str
    recording: str
    subject: str
    split: str
    dataset: str
    params: prep_lib.Params
    labels: labels_lib.LabelSpec
    label_ids: tuple[tuple[str, int], ...]
    regression: bool
    aliases: tuple[tuple[str, str], ...]
    out_dir: str
    montage: montage_lib.Options = montage_lib.Options()
    companions: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        st = os.stat(self.path)
        blob = json.dumps([records.SCHEMA_VERSION, TOOL_VERSION, self.path, st.st_size, st.st_mtime_ns,
                           self.recording, self.subject, self.split, self.dataset,
                           dataclasses.asdict(self.params), dataclasses.asdict(self.labels),
                           self.label_ids, self.regression, self.aliases, dataclasses.asdict(self.montage),
                           self.companions], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    @property
    def shard(self) -> pathlib.Path:
        return pathlib.Path(self.out_dir) / "shards" / self.split / (self.recording.replace("/", "__") + ".arrayrecord")


def sha256_of(path: str) -> str:
    """SHA-256 of a file; of a recording folder (EGI MFF), over its files' relative paths and bytes."""
    digest = hashlib.sha256()
    root = pathlib.Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for file in files:
        if root.is_dir():
            digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _atomic_json(path: pathlib.Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(type(value))


def process(job: Job) -> dict:
    """Converts one recording; never raises: the outcome says what happened."""
    t_start = time.perf_counter()
    out = {"path": job.path, "recording": job.recording, "subject": job.subject, "split": job.split,
           "status": "ok", "reason": "", "windows": 0, "rejected": {}, "unlabelled_windows": 0, "label_counts": {},
           "channels_kept": [], "channels_dropped": [], "channel_mapping": [], "notes": [], "shard": None,
           "timings": {}, **({"companions": list(job.companions)} if job.companions else {})}
    tmp = job.shard.with_suffix(".arrayrecord.tmp")
    try:
        fmt = reading.format_of(pathlib.Path(job.path))
        out["format"] = fmt.name if fmt else ""
        out["sha256"] = sha256_of(job.path)
        t0 = time.perf_counter()
        recording = reading.read(job.path)
        raw = recording.raw
        out["notes"] = list(recording.notes)
        out["timings"]["read"] = time.perf_counter() - t0
        out["sfreq_in"] = float(raw.info["sfreq"])
        out["duration_s"] = raw.n_times / float(raw.info["sfreq"])
        rec_labels = labels_lib.recording_labels(job.labels, pathlib.Path(job.path), raw.annotations,
                                                 raw.first_time)
        try:
            prepared = prep_lib.preprocess(raw, job.params, dict(job.aliases) or None, job.montage)
        except prep_lib.NoChannelsError as err:
            err.dropped = list(recording.dropped) + list(err.dropped)
            raise
        del raw
        out["timings"].update(prepared.timings)
        out["channels_kept"] = list(prepared.names)
        out["channels_dropped"] = [list(d) for d in list(recording.dropped) + list(prepared.dropped)]
        out["channel_mapping"] = [m for m in prepared.mapping if m["method"] != "name"]
        out["notes"] += prepared.notes
        if job.params.event_windows:
            starts = labels_lib.event_starts(rec_labels, job.params.event_offset_s, job.params.window_s,
                                             prepared.data.shape[1], records.SAMPLE_RATE)
            if starts.size == 0:
                raise _Skip(f"no labelled event leaves room for a {job.params.window_s}-s window")
        else:
            starts = prep_lib.window_starts(prepared.data.shape[1], job.params)
        if starts.size == 0:
            raise _Skip(f"shorter than one window ({out['duration_s']:.2f} s < {job.params.window_s} s)")
        t0 = time.perf_counter()
        written = _write_shard(job, prepared, starts, rec_labels, tmp, out)
        out["timings"]["write"] = time.perf_counter() - t0
        if written == 0:
            raise _Skip(f"no window kept (rejected: {out['rejected']}, unlabelled: {out['unlabelled_windows']})")
        os.replace(tmp, job.shard)
        out["shard"] = str(job.shard.relative_to(job.out_dir))
        out["windows"] = written
    except _Skip as skip:
        out.update(status="skipped", reason=str(skip))
    except (reading.ReadError, labels_lib.LabelError) as err:
        out.update(status="failed" if isinstance(err, reading.ReadError) else "skipped", reason=str(err))
    except prep_lib.NoChannelsError as err:
        out.update(status="skipped", reason=str(err), channels_dropped=[list(d) for d in err.dropped])
    except MemoryError:
        out.update(status="failed", reason="needs more memory than the worker's limit (--max-memory-gb); "
                                           "the file may declare a huge size, or raise the limit")
    except Exception as err:  # noqa: BLE001 - one bad file must not stop the run
        out.update(status="failed", reason=f"internal error {type(err).__name__}: {err}",
                   traceback=traceback.format_exc(limit=5))
    finally:
        if tmp.exists():
            tmp.unlink()
    out["timings"]["total"] = time.perf_counter() - t_start
    if out["status"] != "ok":
        out["windows"] = 0
    return out


class _Skip(Exception):
    pass


def _write_shard(job: Job, prepared: prep_lib.Prepared, starts: np.ndarray, rec_labels, tmp: pathlib.Path,
                 out: dict) -> int:
    tmp.parent.mkdir(parents=True, exist_ok=True)
    length = job.params.window_s * records.SAMPLE_RATE
    label_ids = dict(job.label_ids)
    writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
    written = 0
    try:
        for start in starts:
            window = prepared.data[:, start:start + length]
            reason = prep_lib.window_reject_reason(window, job.params)
            if reason:
                out["rejected"][reason] = out["rejected"].get(reason, 0) + 1
                continue
            start_s = start / records.SAMPLE_RATE
            name = labels_lib.window_label(rec_labels, start_s, job.params.window_s, job.labels.straddle)
            if name == "":
                out["unlabelled_windows"] += 1
                continue
            label, value = -1, math.nan
            if name is not None:
                if job.regression:
                    value = float(name)
                else:
                    label = label_ids[name]
            record = records.Record(
                signal=window.reshape(window.shape[0], job.params.window_s, records.PATCH),
                channel_ids=prepared.rows, label=label, label_name=name or "", value=value,
                dataset=job.dataset, recording=job.recording, subject=job.subject, start_s=start_s,
                sfreq_in=prepared.sfreq_in)
            writer.write(records.encode(record, job.params.signal_dtype))
            written += 1
            key = name if name else "(unlabelled)"
            out["label_counts"][key] = out["label_counts"].get(key, 0) + 1
    finally:
        writer.close()
    return written


def failed_outcome(job: Job, reason: str) -> dict:
    """The outcome of a file whose worker was killed or died."""
    return {"path": job.path, "recording": job.recording, "subject": job.subject, "split": job.split,
            "status": "failed", "reason": reason, "windows": 0, "shard": None, "timings": {}}


def _state_path(job: Job) -> pathlib.Path:
    return pathlib.Path(job.out_dir) / ".state" / f"{job.key}.json"


def run(jobs: list[Job], out_dir: pathlib.Path, workers: int, manifest_extra: dict, progress: bool = True,
        timeout_s: float = 1800.0, memory_bytes: int | None = None) -> dict:
    """Converts every job (skipping ones already done with the same parameters) and writes the manifest.

    ``workers`` >= 1 supervised processes convert the files; one that takes longer than
    ``timeout_s`` on a file, or dies, fails that file only. Each is limited to
    ``memory_bytes`` of address space (None: 80% of the machine's memory shared out,
    0: no limit). ``workers`` = 0 converts in this process, without these guards.
    """
    (out_dir / ".state").mkdir(parents=True, exist_ok=True)
    outcomes: dict[int, dict] = {}
    todo = []
    for i, job in enumerate(jobs):
        state = _state_path(job)
        if state.exists():
            previous = json.loads(state.read_text())
            if previous["status"] != "ok" or (out_dir / previous["shard"]).exists():
                previous["resumed"] = True
                outcomes[i] = previous
                continue
        todo.append(i)
    bar = tqdm.tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="file", disable=not progress,
                    desc="data_prep", file=sys.stderr)

    def finish(i, outcome):
        _atomic_json(_state_path(jobs[i]), outcome)
        outcomes[i] = outcome
        bar.update(1)
        if outcome["status"] != "ok":
            bar.write(f"{outcome['status']}: {outcome['path']}: {outcome['reason']}")

    if workers <= 0:  # in this process: no timeout or memory guard (for debugging)
        for i in todo:
            finish(i, process(jobs[i]))
    else:
        if memory_bytes is None:
            memory_bytes = supervisor.default_memory_limit(workers)
        for i, outcome in supervisor.run(process, [(i, jobs[i]) for i in todo], workers, timeout_s, memory_bytes,
                                         failed_outcome):
            finish(i, outcome)
    bar.close()
    manifest = manifest_lib.build([outcomes[i] for i in range(len(jobs))], manifest_extra, TOOL_VERSION)
    _atomic_json(out_dir / "manifest.json", manifest)
    return manifest
