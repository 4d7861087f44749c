"""LaBraM preprocessing of one recording: channels, filters, 200 Hz, units, windows.

The same for data_prep (every record) and the API (``embed``/``predict``): EEG channels onto
the vocabulary by name or electrode position (``labram_jax.montage``), band-pass and notch
filters, 200 Hz, units of 100 uV.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import mne
import numpy as np

from labram_jax import channels
from labram_jax import montage as montage_lib
from labram_jax import reading
from labram_jax import records

# MNE channel types that are never EEG.
_NON_EEG_TYPES = {"eog", "ecg", "emg", "stim", "misc", "resp", "bio", "syst", "exci", "chpi",
                  "ias", "gsr", "temperature", "dipole", "ref_meg", "mag", "grad", "seeg", "ecog", "dbs"}
UV_PER_UNIT = 100.0  # model units: 100 uV


class NoChannelsError(ValueError):
    """No channel of the recording can be used; ``dropped`` lists every one with its reason."""

    def __init__(self, message: str, dropped: list[tuple[str, str]]):
        super().__init__(message)
        self.dropped = dropped


@dataclasses.dataclass(frozen=True)
class Params:
    """Preprocessing parameters (all written to the manifest)."""

    l_freq: float = 0.1
    h_freq: float = 75.0
    notch: float = 50.0  # mains frequency; 0 disables; harmonics below Nyquist are removed too
    window_s: int = 10
    stride_s: float = 10.0
    clip_uv: float = 0.0  # clip |x| above this (uV); 0 disables
    reject_flat_uv: float = 0.0  # drop windows with a channel whose peak-to-peak is below this; 0 off
    reject_saturated_uv: float = 0.0  # drop windows with |x| above this (uV); 0 off
    keep_ref_diff: bool = False  # keep reference-difference channels such as A2-A1 (mapped to A2)
    signal_dtype: str = "float32"
    event_windows: bool = False  # one window per labelled interval, at its onset (instead of the stride grid)
    event_offset_s: float = 0.0  # with event_windows: the window starts this long after the onset

    def __post_init__(self):
        if int(self.window_s) != self.window_s or not 1 <= self.window_s <= 16:
            raise ValueError(f"--window must be a whole number of seconds in 1..16 (got {self.window_s}): "
                             "a patch is 1 s and the time embedding has 16 rows")
        if self.stride_s <= 0:
            raise ValueError(f"--stride must be positive (got {self.stride_s})")
        if self.l_freq < 0 or (self.h_freq and self.h_freq <= self.l_freq):
            raise ValueError(f"band-pass {self.l_freq}-{self.h_freq} Hz is empty")
        if self.signal_dtype not in records.SIGNAL_DTYPES:
            raise ValueError(f"--signal-dtype must be one of {records.SIGNAL_DTYPES}")


@dataclasses.dataclass
class Prepared:
    """A preprocessed recording: ``data [N, T]`` float32 at 200 Hz in units of 100 uV.

    ``mapping`` says where each of the N channels came from (by name, nearest electrode or
    interpolation; ``labram_jax.montage.Plan``), ``dropped`` every input channel not used and why.
    """

    data: np.ndarray
    names: tuple[str, ...]
    rows: np.ndarray
    dropped: list[tuple[str, str]]
    sfreq_in: float
    notes: list[str]
    timings: dict[str, float]
    mapping: tuple[dict, ...] = ()
    positions: str = ""


def pick_eeg(raw: mne.io.BaseRaw, aliases: Mapping[str, str] | None, keep_ref_diff: bool,
             options: montage_lib.Options = montage_lib.Options()):
    """(indices of the EEG candidates of ``raw``, their vocabulary plan, every dropped channel
    with its reason). Non-EEG types and channels with a constant signal are dropped first."""
    types = raw.get_channel_types()
    dropped, candidates = [], []
    for i, (name, kind) in enumerate(zip(raw.ch_names, types)):
        if kind in _NON_EEG_TYPES:
            dropped.append((name, f"channel type {kind}"))
        elif issue := reading.signal_issue(raw.get_data(picks=[i])[0]):  # one channel at a time: no full copy
            dropped.append((name, issue))
        else:
            candidates.append(i)
    names = [raw.ch_names[i] for i in candidates]
    if keep_ref_diff:  # "EEG A2-A1" -> "EEG A2" on request
        names = [n.split("-")[0] if channels.normalize(n).reason.startswith("reference-difference") else n
                 for n in names]
    info = mne.pick_info(raw.info, candidates) if candidates else None
    plan = montage_lib.plan(names, options, info, aliases)
    return candidates, plan, dropped + list(plan.dropped)


_REASON_KINDS = (("is not a 10-20", "not a vocabulary name"), ("bipolar derivation", "bipolar derivation"),
                 ("reference-difference", "reference difference"), ("duplicate", "duplicate name"),
                 ("BioSemi ABC", "BioSemi ABC cap label"), ("constant signal", "constant signal"),
                 ("impossible calibration", "impossible calibration"), ("electrode position", "too far from "
                                                                        "the vocabulary electrodes"))


def no_channels_reason(dropped: list[tuple[str, str]]) -> str:
    """One line: how many channels were dropped for which kind of reason, most common first."""
    kinds: dict[str, list[str]] = {}
    for name, reason in dropped:
        kind = next((k for marker, k in _REASON_KINDS if marker in reason), reason.split(":")[0].split(";")[0])
        kinds.setdefault(kind, []).append(name)
    parts = [f"{len(names)} {kind} (e.g. {names[0]})"
             for kind, names in sorted(kinds.items(), key=lambda kv: -len(kv[1]))]
    hint = "pass --montage with the cap's layout to place them by position, or --channel-map to name them"
    return f"no channel maps to the LaBraM vocabulary: {'; '.join(parts)}; {hint}"


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask), at least 1."""
    return max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else max(1, os.cpu_count() or 1)


def by_rows(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, threads: int) -> np.ndarray:
    """``fn`` (an MNE filter or resampling: each row on its own) over x [N, T] in up to ``threads``
    blocks of rows at once, rows back in order. The same result bit for bit as ``fn(x)``: the FIR
    design depends on the rates only, and the FFTs release the GIL, so the blocks run in parallel.
    MNE's log level is set once here: ``verbose=`` inside threads would race on the global logger."""
    threads = min(threads, x.shape[0])
    with mne.utils.use_log_level("error"):
        if threads <= 1:
            return fn(x)
        with ThreadPoolExecutor(threads) as pool:
            return np.concatenate(list(pool.map(fn, np.array_split(x, threads))))


def preprocess(raw: mne.io.BaseRaw, params: Params, aliases: Mapping[str, str] | None = None,
               options: montage_lib.Options = montage_lib.Options(), threads: int = 1) -> Prepared:
    """Maps the EEG channels onto the vocabulary (by name, else by position), band-pass + notch
    filters, resamples to 200 Hz, converts units. ``threads``: channels filtered and resampled
    at once (the same result for any number; data_prep keeps 1 and runs files in parallel).

    Raises NoChannelsError with the reasons when no channel can be used.
    """
    timings: dict[str, float] = {}
    notes: list[str] = []
    sfreq = float(raw.info["sfreq"])
    if not raw.preload:
        raw = raw.copy().load_data(verbose="error")
    kept, plan, dropped = pick_eeg(raw, aliases, params.keep_ref_diff, options)
    if not plan.names:
        raise NoChannelsError(no_channels_reason(dropped), dropped)
    if plan.positions:
        placed = sum(m["method"] != "name" for m in plan.mapping)
        notes.append(f"{placed} vocabulary channels placed by electrode position ({plan.positions})")
    t0 = time.perf_counter()
    data = plan.matrix @ raw.get_data(picks=kept).astype(np.float64)  # volts, [N, T]
    if not np.all(np.isfinite(data)):
        notes.append("non-finite samples in the file: windows containing them are rejected")
    nyquist = sfreq / 2.0
    h_freq = params.h_freq if params.h_freq and params.h_freq < nyquist else None
    if params.h_freq and h_freq is None:
        notes.append(f"low-pass at {params.h_freq} Hz skipped: at or above the Nyquist frequency {nyquist:g} Hz")
    finite = np.isfinite(data)
    work = np.where(finite, data, 0.0)
    if params.l_freq > 0 or h_freq:
        work = by_rows(functools.partial(mne.filter.filter_data, sfreq=sfreq, l_freq=params.l_freq or None,
                                         h_freq=h_freq), work, threads)
    if params.notch:
        freqs = np.arange(params.notch, nyquist - 1.0, params.notch)
        if freqs.size:
            work = by_rows(functools.partial(mne.filter.notch_filter, Fs=sfreq, freqs=freqs), work, threads)
    timings["filter"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if sfreq != records.SAMPLE_RATE:
        work = by_rows(functools.partial(mne.filter.resample, up=records.SAMPLE_RATE, down=sfreq), work, threads)
        if not finite.all():  # carry the non-finite marks over to the new time base
            bad = np.flatnonzero(~finite.all(axis=0)) * records.SAMPLE_RATE / sfreq
            mark = np.zeros(work.shape[1], bool)
            mark[np.clip(bad.astype(int), 0, work.shape[1] - 1)] = True
            work[:, mark] = np.nan
    elif not finite.all():
        work[~finite] = np.nan
    timings["resample"] = time.perf_counter() - t0
    out = (work * 1e6 / UV_PER_UNIT).astype(np.float32)
    if params.clip_uv:
        limit = params.clip_uv / UV_PER_UNIT
        np.clip(out, -limit, limit, out=out)
    return Prepared(out, plan.names, plan.rows, dropped, sfreq, notes, timings, plan.mapping, plan.positions)


def window_starts(num_samples: int, params: Params) -> np.ndarray:
    """Start samples (at 200 Hz) of every full window."""
    length = params.window_s * records.SAMPLE_RATE
    stride = params.stride_s * records.SAMPLE_RATE
    if num_samples < length:
        return np.zeros((0,), np.int64)
    count = int(np.floor((num_samples - length) / stride + 1e-9)) + 1
    return np.round(np.arange(count) * stride).astype(np.int64)


def window_reject_reason(window: np.ndarray, params: Params) -> str | None:
    """None for a good window [N, T] (units of 100 uV), else nan / flat / saturated."""
    if not np.all(np.isfinite(window)):
        return "nan"
    if params.reject_flat_uv and np.any(np.ptp(window, axis=1) * UV_PER_UNIT < params.reject_flat_uv):
        return "flat"
    if params.reject_saturated_uv and np.any(np.abs(window) * UV_PER_UNIT > params.reject_saturated_uv):
        return "saturated"
    return None
