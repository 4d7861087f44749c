"""Finding recordings, checking they are whole, and reading them with MNE."""

from __future__ import annotations

import glob
import pathlib
import warnings

import mne

# Primary files of each format; companions (.fdt, .vmrk, .eeg, .vmk) are read through them.
FORMATS = {
    ".edf": "EDF", ".bdf": "BDF", ".gdf": "GDF", ".fif": "FIF", ".set": "EEGLAB",
    ".vhdr": "BrainVision", ".cnt": "CNT",
}
MIN_SFREQ, MAX_SFREQ = 1.0, 100_000.0  # Hz; outside this a header is damaged, not a recording


class ReadError(Exception):
    """A recording that cannot be read correctly; the message is the one-line reason."""


def format_of(path: pathlib.Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".fif.gz"):
        return "FIF"
    return FORMATS.get(path.suffix.lower())


def find_inputs(inputs: list[str]) -> list[pathlib.Path]:
    """Recordings named by files, directories (searched recursively) or globs, sorted."""
    found: set[pathlib.Path] = set()
    for item in inputs:
        matches = [pathlib.Path(p) for p in glob.glob(item, recursive=True)] or [pathlib.Path(item)]
        for path in matches:
            if path.is_dir():
                found.update(p for p in path.rglob("*") if p.is_file() and format_of(p))
            elif path.is_file():
                if not format_of(path):
                    raise ValueError(f"{path}: unknown EEG format (supported: {sorted(FORMATS)})")
                found.add(path)
            else:
                raise FileNotFoundError(f"input {item!r} matches no file or directory")
    return sorted(p.resolve() for p in found)


def check_edf_size(path: pathlib.Path, bytes_per_sample: int) -> None:
    """Compares an EDF/BDF file's size with what its header promises.

    MNE opens a truncated EDF silently as a shorter recording; this catches
    truncation, header-only files and bytes inserted by text-mode copies.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(256)
        if len(head) < 256:
            raise ReadError(f"file too short for an EDF/BDF header ({size} bytes)")
        try:
            header_bytes = int(head[184:192].decode("ascii").strip())
            n_records = int(head[236:244].decode("ascii").strip())
            n_signals = int(head[252:256].decode("ascii").strip())
        except ValueError:
            raise ReadError("damaged EDF/BDF header (non-numeric size fields)") from None
        try:
            duration = float(head[244:252].decode("ascii").strip())
        except ValueError:
            duration = float("nan")
        if not duration > 0 or duration == float("inf"):  # MNE would silently assume 1 s
            raise ReadError(f"damaged EDF/BDF header: data-record duration {head[244:252].decode('latin-1').strip()!r} "
                            "is not a positive number of seconds")
        if n_signals <= 0 or header_bytes != 256 * (n_signals + 1):
            raise ReadError(f"damaged EDF/BDF header: {n_signals} signals but {header_bytes} header bytes")
        f.seek(256 + n_signals * 216)
        raw = f.read(n_signals * 8)
    try:
        samples = [int(raw[i * 8:(i + 1) * 8].decode("ascii").strip()) for i in range(n_signals)]
    except ValueError:
        raise ReadError("damaged EDF/BDF header (samples per record)") from None
    record_bytes = sum(samples) * bytes_per_sample
    if n_records == -1:  # allowed while recording: infer, but the data must be whole records
        if (size - header_bytes) % record_bytes:
            raise ReadError(f"data size {size - header_bytes} is not a whole number of "
                            f"{record_bytes}-byte records (truncated?)")
        n_records = (size - header_bytes) // record_bytes
    if n_records == 0 or size == header_bytes:
        raise ReadError("header only: the file holds no data records")
    expected = header_bytes + n_records * record_bytes
    if size < expected:
        raise ReadError(f"truncated: {size} bytes but the header promises {n_records} records "
                        f"({expected} bytes)")
    if size > expected:
        raise ReadError(f"{size - expected} bytes more than the header promises ({expected}): "
                        "damaged (e.g. a text-mode line-ending conversion)")


def check_integrity(path: pathlib.Path) -> None:
    """Raises ReadError with a one-line reason if the file is visibly damaged."""
    size = path.stat().st_size
    if size == 0:
        raise ReadError("empty file (0 bytes)")
    fmt = format_of(path)
    if fmt in ("EDF", "BDF"):
        check_edf_size(path, 2 if fmt == "EDF" else 3)
    elif fmt == "EEGLAB":
        fdt = path.with_suffix(".fdt")
        if not fdt.exists() and size < 1024:
            raise ReadError(f"EEGLAB header of {size} bytes and no {fdt.name} data file")
    elif fmt == "BrainVision":
        for companion in (".eeg", ".vmrk"):
            if not path.with_suffix(companion).exists():
                raise ReadError(f"BrainVision header without its {companion} file")


def read_raw(path: pathlib.Path) -> mne.io.BaseRaw:
    """Reads a whole recording into memory (format from the file name) or raises ReadError."""
    check_integrity(path)
    fmt = format_of(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if fmt == "CNT":
                raw = _read_cnt(path)
            else:
                raw = mne.io.read_raw(path, preload=True, verbose="error")
        except ReadError:
            raise
        except MemoryError:
            raise ReadError("the file declares more data than fits in memory") from None
        except Exception as err:  # noqa: BLE001 - MNE raises many types; report, never crash
            raise ReadError(f"{fmt} reader failed: {_one_line(err)}") from None
    if raw.n_times == 0 or len(raw.ch_names) == 0:
        raise ReadError("no samples or no channels")
    sfreq = float(raw.info["sfreq"])
    if not MIN_SFREQ <= sfreq <= MAX_SFREQ:
        raise ReadError(f"implausible sampling rate {sfreq:g} Hz (outside {MIN_SFREQ:g}..{MAX_SFREQ:g} Hz): "
                        "damaged header?")
    return raw


def check_neuroscan_size(path: pathlib.Path) -> None:
    """Compares a Neuroscan CNT header's sample count with the size of its data block."""
    with open(path, "rb") as f:
        head = f.read(900)
    if len(head) < 900:
        raise ReadError(f"file too short for a Neuroscan CNT header ({len(head)} bytes)")
    n_channels = int.from_bytes(head[370:372], "little")
    n_samples = int.from_bytes(head[864:868], "little", signed=True)
    event_table = int.from_bytes(head[886:890], "little", signed=True)
    data_bytes = event_table - 900 - 75 * n_channels
    if n_channels <= 0 or n_samples <= 0 or data_bytes <= 0:
        return  # not a Neuroscan layout we can check (ANT CNT, for example)
    if data_bytes not in (n_samples * n_channels * 2, n_samples * n_channels * 4):
        raise ReadError(f"Neuroscan header declares {n_samples} samples x {n_channels} channels but the "
                        f"data block holds {data_bytes} bytes (neither 16- nor 32-bit): truncated or damaged")


def _read_cnt(path: pathlib.Path) -> mne.io.BaseRaw:
    check_neuroscan_size(path)
    errors = []
    for data_format in ("auto", "int16", "int32"):
        try:
            return mne.io.read_raw_cnt(path, data_format=data_format, preload=True, verbose="error")
        except Exception as err:  # noqa: BLE001
            errors.append(f"{data_format}: {_one_line(err)}")
    try:
        return mne.io.read_raw_ant(path, preload=True, verbose="error")
    except Exception as err:  # noqa: BLE001
        errors.append(f"ANT: {_one_line(err)}")
    raise ReadError("not readable as Neuroscan (" + "; ".join(errors[:3]) + ") or ANT CNT")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(err).__name__)

