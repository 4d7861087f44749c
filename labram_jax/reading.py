"""Finding recordings, checking they are whole, and reading them with MNE: the one reader of
data_prep and the API (:func:`labram_jax.api.Predictor.embed` takes a path too).

Every EEG format MNE reads is recognised by its file name (and, where two vendors share an
extension, by its first bytes or its companion files): EDF/EDF+/BDF/GDF, FIF, EEGLAB,
BrainVision, Neuroscan and ANT Neuro CNT, Nihon Kohden, NEDF, EGI MFF (a folder), CURRY,
Persyst, Nicolet, eximia, Blackrock NSx, BCI2000 and MEF. A multi-file recording is read
through its primary file and counts as one recording; its companions (BrainVision's .vmrk
and .eeg, EEGLAB's .fdt, Nihon Kohden's .21E/.PNT/.LOG, ...) are listed with it. Any other
file of an input folder is reported with the reason it is not read, never dropped silently.

A reader that needs an optional package (``antio`` for ANT CNT, ``mffpy`` for EGI MFF,
``curryreader`` for CURRY: ``pip install 'labram_jax[formats]'``; ``pymef`` for MEF) says
which one to install; NEDF's ``defusedxml`` is a dependency. EDF/BDF headers are checked against the specification before MNE opens them:
truncation and inserted bytes fail the file; an impossible calibration (physical or digital
minimum equal to the maximum, a non-finite or zero gain) drops that channel with a note, since
MNE would convert it to a flat line; other violations (version, reserved field) are noted.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import pathlib
import warnings
from collections.abc import Callable

import mne
import numpy as np

MIN_SFREQ, MAX_SFREQ = 1.0, 100_000.0  # Hz; outside this a header is damaged, not a recording


class ReadError(Exception):
    """A recording that cannot be read correctly; the message is the one-line reason."""


@dataclasses.dataclass(frozen=True)
class Format:
    """One file format: its name, MNE reader, the optional package it needs, its companions."""

    name: str
    reader: str  # a function of mne.io
    package: str = ""  # import name of an optional dependency ("" for none)
    companions: tuple[str, ...] = ()  # suffixes of files read through the primary one (same stem)


_NEUROSCAN = Format("Neuroscan CNT", "read_raw_cnt")
_ANT = Format("ANT Neuro CNT", "read_raw_ant", "antio", (".evt", ".seg"))
_BRAINVISION = Format("BrainVision", "read_raw_brainvision", companions=(".vmrk", ".eeg", ".amrk", ".dat"))
_NIHON = Format("Nihon Kohden", "read_raw_nihon", companions=(".21e", ".pnt", ".log", ".11d", ".cmt", ".cn2", ".reg"))
_CURRY = Format("CURRY", "read_raw_curry", "curryreader", (".dap", ".rs3", ".dat", ".cdt.dpa", ".cdt.cef", ".cef"))
_PERSYST = Format("Persyst", "read_raw_persyst", companions=(".dat",))
_BCI2000 = Format("BCI2000", "read_raw_bci2k")

# Primary files by suffix (lower case); where one suffix means several formats, _sniff decides.
FORMATS: dict[str, Format] = {
    ".edf": Format("EDF", "read_raw_edf"), ".bdf": Format("BDF", "read_raw_bdf"), ".gdf": Format("GDF", "read_raw_gdf"),
    ".fif": Format("FIF", "read_raw_fif"), ".fif.gz": Format("FIF", "read_raw_fif"),
    ".set": Format("EEGLAB", "read_raw_eeglab", companions=(".fdt",)),
    ".vhdr": _BRAINVISION, ".ahdr": _BRAINVISION,
    ".cnt": _NEUROSCAN,  # or ANT Neuro (RIFF), told apart by the first bytes
    ".eeg": _NIHON,  # unless it is a BrainVision or ANT data companion
    ".nedf": Format("NEDF", "read_raw_nedf", "defusedxml"),
    ".mff": Format("EGI MFF", "read_raw_egi", "mffpy"),
    ".cdt": _CURRY, ".dat": _BCI2000,  # a .dat beside a .dap/.rs3 is CURRY 7, beside a .lay Persyst's data
    ".lay": _PERSYST,
    ".data": Format("Nicolet", "read_raw_nicolet"),
    ".nxe": Format("eximia", "read_raw_eximia"),
    ".ns3": Format("Blackrock NSx", "read_raw_nsx"), ".ns5": Format("Blackrock NSx", "read_raw_nsx"),
    ".ns6": Format("Blackrock NSx", "read_raw_nsx"),
    ".mefd": Format("MEF", "read_raw_mef", "pymef"),
}
# The optional readers' packages that pip install 'labram_jax[formats]' brings (setup.cfg).
EXTRA, EXTRA_PACKAGES = "formats", ("antio", "mffpy", "curryreader")
_DIRECTORY_FORMATS = (".mff", ".mefd")  # recordings that are folders


def suffix_of(path: pathlib.Path) -> str:
    """The format suffix, lower case (``.fif.gz`` and ``.cdt.dpa`` count as one)."""
    name = path.name.lower()
    for double in (".fif.gz", ".cdt.dpa", ".cdt.cef"):
        if name.endswith(double):
            return double
    return path.suffix.lower()


def _siblings(path: pathlib.Path, *suffixes: str) -> list[pathlib.Path]:
    """Existing files beside ``path`` with its stem and one of ``suffixes`` (any case)."""
    stem = path.name[: len(path.name) - len(suffix_of(path))]
    try:
        names = {p.name.lower(): p for p in path.parent.iterdir()}
    except OSError:
        return []
    return [names[(stem + s).lower()] for s in suffixes if (stem + s).lower() in names]


def format_of(path: pathlib.Path) -> Format | None:
    """The format of a primary file (None for a companion or an unknown file)."""
    suffix = suffix_of(path)
    if suffix in _DIRECTORY_FORMATS:
        return FORMATS[suffix] if path.is_dir() or not path.exists() else None
    if suffix == ".cnt":
        return _ANT if _head(path, 12)[:4] in (b"RIFF", b"RF64") else _NEUROSCAN
    if suffix == ".eeg" and _siblings(path, ".vhdr", ".ahdr", ".cnt"):
        return None  # BrainVision or ANT data companion
    if suffix == ".dat":
        if _siblings(path, ".lay", ".vhdr", ".ahdr"):
            return None  # Persyst's or BrainVision's data companion
        if _siblings(path, ".dap", ".rs3"):
            return _CURRY
    return FORMATS.get(suffix)


def companion_of(path: pathlib.Path) -> pathlib.Path | None:
    """The primary file ``path`` is read through (None if it is not a companion)."""
    suffix = suffix_of(path)
    for primary in _siblings(path, *FORMATS):
        fmt = format_of(primary) if primary != path else None
        if fmt is not None and suffix in fmt.companions:
            return primary
    return None


def _head(path: pathlib.Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a list of inputs holds: recordings (primary files or MFF folders, sorted), the
    companion files of each, and every other file with the reason it is not read."""

    recordings: list[pathlib.Path]
    companions: dict[pathlib.Path, list[pathlib.Path]]
    not_read: list[tuple[pathlib.Path, str]]


def supported() -> str:
    return ", ".join(sorted({f"{fmt.name} ({s})" for s, fmt in FORMATS.items()}))


def find_inputs(inputs: list[str]) -> Inputs:
    """Recordings named by files, directories (searched recursively) or globs.

    Raises:
      FileNotFoundError: an input matches nothing.
      ValueError: a file named explicitly is in no format data_prep reads.
    """
    recordings: set[pathlib.Path] = set()
    companions: dict[pathlib.Path, list[pathlib.Path]] = {}
    not_read: dict[pathlib.Path, str] = {}

    def visit(path: pathlib.Path, explicit: bool) -> None:
        path = path.resolve()
        if format_of(path) is not None:
            recordings.add(path)
            return
        primary = companion_of(path)
        if primary is not None:
            companions.setdefault(primary.resolve(), []).append(path)
        elif explicit:
            raise ValueError(f"{path}: not a recording format data_prep reads (suffix {suffix_of(path) or 'none'!r}); "
                             f"it reads {supported()}")
        else:
            not_read[path] = (f"not a recording format data_prep reads (suffix {suffix_of(path) or 'none'!r})")

    for item in inputs:
        matches = [pathlib.Path(p) for p in glob.glob(item, recursive=True)] or [pathlib.Path(item)]
        for path in matches:
            if path.is_dir() and format_of(path) is None:
                for found in _walk(path):
                    visit(found, explicit=False)
            elif path.exists():
                visit(path, explicit=True)
            else:
                raise FileNotFoundError(f"input {item!r} matches no file or directory")
    for primary in list(companions):
        if primary not in recordings:  # its primary file was not among the inputs
            for path in companions.pop(primary):
                not_read[path] = f"companion of {primary.name}, which is not among the inputs"
    return Inputs(sorted(recordings), {k: sorted(v) for k, v in companions.items()},
                  sorted(not_read.items()))


def _walk(root: pathlib.Path):
    """Files under ``root`` and recording folders (MFF), without descending into the latter."""
    for path in sorted(root.iterdir()):
        if path.is_dir():
            if suffix_of(path) in _DIRECTORY_FORMATS:
                yield path
            else:
                yield from _walk(path)
        elif path.is_file():
            yield path


# ---------------------------------------------------------------------------------------------- EDF/BDF headers
@dataclasses.dataclass(frozen=True)
class HeaderCheck:
    """What the EDF/BDF header check found: channels with impossible calibration (label,
    reason) and notes on fields that violate the specification."""

    bad_channels: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()


def _field(raw: bytes, start: int, width: int, count: int) -> list[str]:
    return [raw[start + i * width:start + (i + 1) * width].decode("latin-1").strip() for i in range(count)]


def check_edf_header(path: pathlib.Path, bytes_per_sample: int) -> HeaderCheck:
    """Checks an EDF/BDF file against its header: size, record layout, calibration, fields.

    MNE opens a truncated EDF silently as a shorter recording and turns a channel whose
    physical (or digital) minimum equals its maximum into a flat line. Raises ReadError for
    a file that cannot be read correctly; returns the channels to drop and notes otherwise.
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
            raise ReadError("damaged EDF/BDF header: non-numeric header size, record count or signal count") from None
        duration_text = head[244:252].decode("latin-1").strip()
        try:
            duration = float(duration_text)
        except ValueError:
            duration = float("nan")
        if not duration > 0 or duration == float("inf"):  # MNE would silently assume 1 s
            raise ReadError(f"damaged EDF/BDF header: data-record duration {duration_text!r} is not a positive number "
                            "of seconds")
        if n_signals <= 0 or header_bytes != 256 * (n_signals + 1):
            raise ReadError(f"damaged EDF/BDF header: {n_signals} signals but {header_bytes} header bytes "
                            f"(expected 256 x (signals + 1) = {256 * (max(n_signals, 0) + 1)})")
        signals = f.read(n_signals * 256)
    if len(signals) < n_signals * 256:
        raise ReadError(f"file too short for its {n_signals}-signal header ({size} bytes)")
    labels = _field(signals, 0, 16, n_signals)
    offset = 16 * n_signals + 80 * n_signals + 8 * n_signals  # labels, transducer, physical dimension
    physical_min = _field(signals, offset, 8, n_signals)
    physical_max = _field(signals, offset + 8 * n_signals, 8, n_signals)
    digital_min = _field(signals, offset + 16 * n_signals, 8, n_signals)
    digital_max = _field(signals, offset + 24 * n_signals, 8, n_signals)
    samples_text = _field(signals, offset + 32 * n_signals + 80 * n_signals, 8, n_signals)
    try:
        samples = [int(s) for s in samples_text]
    except ValueError:
        raise ReadError(f"damaged EDF/BDF header: samples per record {samples_text[:4]} are not whole numbers") from None
    empty = [label for label, n in zip(labels, samples) if n <= 0]
    if empty:
        raise ReadError(f"damaged EDF/BDF header: {len(empty)} signal(s) with no samples per data record "
                        f"(e.g. {empty[0]!r})")
    record_bytes = sum(samples) * bytes_per_sample
    if n_records == -1:  # allowed while recording: infer, but the data must be whole records
        if (size - header_bytes) % record_bytes:
            raise ReadError(f"data size {size - header_bytes} is not a whole number of {record_bytes}-byte records "
                            "(truncated?)")
        n_records = (size - header_bytes) // record_bytes
    if n_records == 0 or size == header_bytes:
        raise ReadError("header only: the file holds no data records")
    expected = header_bytes + n_records * record_bytes
    if size < expected:
        raise ReadError(f"truncated: {size} bytes but the header promises {n_records} records ({expected} bytes)")
    if size > expected:
        raise ReadError(f"{size - expected} bytes more than the header promises ({expected}): damaged (bytes "
                        "inserted or appended, e.g. by a text-mode copy)")
    bad = []
    for i, label in enumerate(labels):
        if label in ("EDF Annotations", "BDF Annotations"):
            continue
        try:
            pmin, pmax, dmin, dmax = (float(physical_min[i]), float(physical_max[i]), float(digital_min[i]),
                                      float(digital_max[i]))
        except ValueError:  # MNE cannot open the file at all then
            raise ReadError(f"damaged EDF/BDF header: the calibration of {label!r} is not a number (physical "
                            f"{physical_min[i]!r}..{physical_max[i]!r}, digital {digital_min[i]!r}..{digital_max[i]!r})"
                            ) from None
        if not all(math.isfinite(v) for v in (pmin, pmax, dmin, dmax)):
            bad.append((label, "non-finite calibration in the header"))
        elif dmin == dmax:
            bad.append((label, f"impossible calibration: digital minimum equals maximum ({dmin:g})"))
        elif pmin == pmax:
            bad.append((label, f"impossible calibration: physical minimum equals maximum ({pmin:g}): zero gain"))
    notes = []
    version = head[0:8]
    if bytes_per_sample == 2 and version != b"0       ":
        notes.append(f"EDF header version field is {version.decode('latin-1')!r}, the specification says '0'")
    if bytes_per_sample == 3 and version != b"\xffBIOSEMI":
        notes.append(f"BDF header version field is {version.decode('latin-1')!r}, the specification says "
                     "'\\xffBIOSEMI'")
    reserved = head[192:236].decode("latin-1").strip()
    allowed = {"", "EDF+C", "EDF+D"} if bytes_per_sample == 2 else {"", "24BIT", "BDF+C", "BDF+D"}
    if reserved not in allowed:
        notes.append(f"reserved header field is {reserved!r} (allowed: {', '.join(repr(a) for a in sorted(allowed))})")
    return HeaderCheck(tuple(bad), tuple(notes))


def check_neuroscan_size(path: pathlib.Path) -> None:
    """Compares a Neuroscan CNT header's sample count with the size of its data block."""
    head = _head(path, 900)
    if len(head) < 900:
        raise ReadError(f"file too short for a Neuroscan CNT header ({len(head)} bytes)")
    n_channels = int.from_bytes(head[370:372], "little")
    n_samples = int.from_bytes(head[864:868], "little", signed=True)
    event_table = int.from_bytes(head[886:890], "little", signed=True)
    data_bytes = event_table - 900 - 75 * n_channels
    if n_channels <= 0 or n_samples <= 0 or data_bytes <= 0:
        return  # a layout we cannot check; the reader decides
    if data_bytes not in (n_samples * n_channels * 2, n_samples * n_channels * 4):
        raise ReadError(f"Neuroscan header declares {n_samples} samples x {n_channels} channels but the data block "
                        f"holds {data_bytes} bytes (neither 16- nor 32-bit): truncated or damaged")


def check_integrity(path: pathlib.Path, fmt: Format) -> HeaderCheck:
    """Raises ReadError with a one-line reason if the file is visibly damaged; returns the
    EDF/BDF header findings (empty for other formats)."""
    if path.is_dir():
        return HeaderCheck()
    size = path.stat().st_size
    if size == 0:
        raise ReadError("empty file (0 bytes)")
    if fmt.name in ("EDF", "BDF"):
        return check_edf_header(path, 2 if fmt.name == "EDF" else 3)
    if fmt.name == "EEGLAB":
        fdt = path.with_suffix(".fdt")
        if not fdt.exists() and size < 1024:
            raise ReadError(f"EEGLAB header of {size} bytes and no {fdt.name} data file")
    elif fmt is _BRAINVISION:
        for companion in (".eeg", ".vmrk"):
            if not _siblings(path, companion):
                raise ReadError(f"BrainVision header without its {companion} file")
    elif fmt is _NEUROSCAN:
        check_neuroscan_size(path)
    return HeaderCheck()


# ---------------------------------------------------------------------------------------------- reading
@dataclasses.dataclass
class Recording:
    """A recording read into memory: ``raw`` without the channels left out for their header
    (``dropped``: (name, reason)), and notes on anything irregular but readable."""

    raw: mne.io.BaseRaw
    format: str
    dropped: list[tuple[str, str]]
    notes: list[str]


def missing_package(fmt: Format) -> str | None:
    """The reason a format cannot be read here (its optional package is not installed), or None."""
    if fmt.package and importlib.util.find_spec(fmt.package) is None:
        extra = f" (or pip install 'labram_jax[{EXTRA}]')" if fmt.package in EXTRA_PACKAGES else ""
        return f"reading {fmt.name} needs the '{fmt.package}' package: pip install {fmt.package}{extra}"
    return None


def read(path: str | pathlib.Path) -> Recording:
    """Reads a whole recording (format from the file) or raises ReadError with a one-line reason."""
    path = pathlib.Path(path)
    fmt = format_of(path)
    if fmt is None:
        primary = companion_of(path)
        hint = f"; read {primary.name} instead" if primary else f"; supported: {supported()}"
        raise ReadError(f"{path.name} is not a recording format data_prep reads{hint}")
    if not path.exists():
        raise ReadError(f"{path} does not exist")
    header = check_integrity(path, fmt)
    why = missing_package(fmt)
    if why:
        raise ReadError(why)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            raw = _READERS.get(fmt.reader, _generic)(path, fmt, [name for name, _ in header.bad_channels])
        except ReadError:
            raise
        except MemoryError:
            raise ReadError("the file declares more data than fits in memory") from None
        except Exception as err:  # noqa: BLE001 - MNE raises many types; report, never crash
            raise ReadError(f"{fmt.name} reader failed: {_cause(err)}") from None
    if raw.n_times == 0 or len(raw.ch_names) == 0:
        raise ReadError("no samples or no channels")
    sfreq = float(raw.info["sfreq"])
    if not MIN_SFREQ <= sfreq <= MAX_SFREQ:
        raise ReadError(f"implausible sampling rate {sfreq:g} Hz (outside {MIN_SFREQ:g}..{MAX_SFREQ:g} Hz): "
                        "damaged header?")
    return Recording(raw, fmt.name, list(header.bad_channels), list(header.notes))


def read_raw(path: str | pathlib.Path) -> mne.io.BaseRaw:
    """Just the MNE Raw of :func:`read` (channels with an impossible calibration left out)."""
    return read(path).raw


def _generic(path: pathlib.Path, fmt: Format, exclude: list[str]) -> mne.io.BaseRaw:
    """``mne.io.<reader>``; EDF/BDF leave out the ``exclude``d channels (impossible calibration)."""
    options = {"exclude": exclude} if exclude else {}
    return getattr(mne.io, fmt.reader)(path, preload=True, verbose="error", **options)


def _read_cnt(path: pathlib.Path, fmt: Format, exclude: list[str]) -> mne.io.BaseRaw:
    """Neuroscan CNT: the header's own layout first, then 16- and 32-bit samples."""
    errors = []
    for data_format in ("auto", "int16", "int32"):
        try:
            return mne.io.read_raw_cnt(path, data_format=data_format, preload=True, verbose="error")
        except Exception as err:  # noqa: BLE001
            errors.append(f"{data_format}: {_cause(err)}")
    raise ReadError("Neuroscan CNT reader failed (" + "; ".join(errors) + ")")


_READERS: dict[str, Callable[[pathlib.Path, Format, list[str]], mne.io.BaseRaw]] = {"read_raw_cnt": _read_cnt}


def _cause(err: BaseException, limit: int = 240) -> str:
    """One line naming the real cause: the innermost exception's message, without tracebacks."""
    while err.__cause__ is not None or err.__context__ is not None:
        inner = err.__cause__ or err.__context__
        if isinstance(inner, (KeyboardInterrupt, SystemExit)):
            break
        err = inner
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # MNE's RuntimeError of a failed multi-reader dispatch quotes a traceback: keep the message lines.
    lines = [line for line in lines if not line.startswith(("File ", "^", "Traceback")) and "^^^" not in line]
    text = " ".join(lines) or type(err).__name__
    text = f"{type(err).__name__}: {text}" if type(err).__name__ not in text else text
    return text[:limit] + "..." if len(text) > limit else text


def signal_issue(data: np.ndarray) -> str | None:
    """Why a channel's samples [T] (volts) cannot be EEG: constant, or None when they can."""
    finite = data[np.isfinite(data)]
    if finite.size and np.ptp(finite) == 0:
        return f"constant signal ({finite[0]:.3g} V at every sample): no EEG recorded"
    return None
