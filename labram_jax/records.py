"""The one record schema shared by data_prep (writer) and the input pipeline (reader).

One record = one preprocessed window of one recording, serialised with msgpack
(no pickle: decoding never runs code). Fields:

- ``schema``: SCHEMA_VERSION.
- ``signal``: the window, ``[channels, windows, 200]``, raw little-endian bytes of
  ``dtype`` (``float32`` by default, ``float16`` optional: ~3 significant digits),
  in units of 100 uV (LABRAM.md section 1), at 200 Hz.
- ``channel_ids``: int16 bytes, spatial-table rows (1..128) of the channels, in order.
- ``label`` (int, -1 if none), ``label_name`` (str), ``value`` (float, regression target, NaN if none).
- ``dataset``, ``recording``, ``subject`` (str) and ``start_s`` (float): provenance.
- ``sfreq_in`` (float): the file's sampling rate before resampling to 200 Hz.
"""

from __future__ import annotations

import dataclasses
import math

import msgpack
import numpy as np

SCHEMA_VERSION = 1
SAMPLE_RATE = 200  # Hz
PATCH = 200  # samples per patch
SIGNAL_DTYPES = ("float32", "float16")


class RecordError(ValueError):
    """A record that cannot be decoded, or from another schema version."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One window. ``signal`` is ``[N, A, 200]`` float32 in units of 100 uV."""

    signal: np.ndarray
    channel_ids: np.ndarray
    label: int = -1
    label_name: str = ""
    value: float = math.nan
    dataset: str = ""
    recording: str = ""
    subject: str = ""
    start_s: float = 0.0
    sfreq_in: float = float(SAMPLE_RATE)

    @property
    def num_channels(self) -> int:
        return self.signal.shape[0]

    @property
    def num_windows(self) -> int:
        return self.signal.shape[1]


def encode(record: Record, dtype: str = "float32") -> bytes:
    """Serialises a record; ``dtype`` sets the stored precision of the signal."""
    if dtype not in SIGNAL_DTYPES:
        raise ValueError(f"signal dtype {dtype!r} not supported; use one of {SIGNAL_DTYPES}")
    signal = np.asarray(record.signal)
    if signal.ndim != 3 or signal.shape[2] != PATCH:
        raise ValueError(f"signal must be [channels, windows, {PATCH}], got {signal.shape}")
    ids = np.asarray(record.channel_ids)
    if ids.shape != (signal.shape[0],):
        raise ValueError(f"channel_ids {ids.shape} do not match {signal.shape[0]} channels")
    return msgpack.packb({
        "schema": SCHEMA_VERSION,
        "signal": signal.astype("<" + np.dtype(dtype).str[1:]).tobytes(),
        "dtype": dtype,
        "shape": list(signal.shape),
        "channel_ids": ids.astype("<i2").tobytes(),
        "label": int(record.label),
        "label_name": record.label_name,
        "value": float(record.value),
        "dataset": record.dataset,
        "recording": record.recording,
        "subject": record.subject,
        "start_s": float(record.start_s),
        "sfreq_in": float(record.sfreq_in),
    }, use_bin_type=True)


def decode(data: bytes) -> Record:
    """Parses a record; raises RecordError on damage, a schema mismatch or non-finite samples."""
    try:
        d = msgpack.unpackb(data, raw=False)
        version = d.get("schema")
        if version != SCHEMA_VERSION:
            raise RecordError(f"record schema version {version}, this labram_jax reads "
                              f"{SCHEMA_VERSION}: re-run data_prep with this version")
        shape = tuple(d["shape"])
        signal = np.frombuffer(d["signal"], dtype="<" + np.dtype(d["dtype"]).str[1:]).reshape(shape)
        ids = np.frombuffer(d["channel_ids"], dtype="<i2").astype(np.int32)
        if ids.shape != (shape[0],):
            raise RecordError(f"{ids.size} channel ids for {shape[0]} channels")
        if not np.isfinite(signal).all():
            raise RecordError(f"{int(np.size(signal) - np.isfinite(signal).sum())} non-finite values in the signal")
        return Record(signal=signal.astype(np.float32), channel_ids=ids, label=int(d["label"]),
                      label_name=d["label_name"], value=float(d["value"]), dataset=d["dataset"],
                      recording=d["recording"], subject=d["subject"], start_s=float(d["start_s"]),
                      sfreq_in=float(d["sfreq_in"]))
    except RecordError:
        raise
    except (ValueError, KeyError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException) as err:
        raise RecordError(f"undecodable record: {type(err).__name__}: {err}") from None
