"""Hostile inputs for data_prep: a seeded generator of damaged recordings made from the
shared EDF/BDF/FIF files, and a campaign that converts them and classifies every outcome.

Full campaign (the slow test runs the same):
    python -m tests.fuzz_data_prep --files 520 --out /tmp/fuzz

Outcomes: ``converted`` (records written, every one decodes and is finite),
``rejected`` (skipped or failed with a one-line reason), ``crash`` (an internal error,
a dead worker, or the CLI itself failing) and ``hang`` (a file timed out, or the CLI).
A mutation that makes a file unreadable as written (truncation, wrong sizes, not EEG
at all) must be rejected: records for it would be wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

from labram_jax import records

SHARED_EEG = pathlib.Path(__file__).resolve().parents[2] / "shared" / "eeg"
BASES = ["eegmat/Subject00_2.edf", "eegmat/Subject07_2.edf", "eegmmidb/S001/S001R01.edf", "formats/edf/test_utf8.edf",
         "formats/edf/duplicate_channel_labels.edf", "formats/edf/test.bdf"]


# ---------------------------------------------------------------------------- EDF/BDF header surgery
@dataclasses.dataclass
class Edf:
    """The fields of an EDF/BDF file that the mutations touch."""

    data: bytearray
    bytes_per_sample: int

    @property
    def ns(self) -> int:
        return int(self.data[252:256].decode("ascii").strip())

    @property
    def header_bytes(self) -> int:
        return 256 * (self.ns + 1)

    def signal_field(self, name: str, i: int) -> tuple[int, int]:
        """(offset, width) of field ``name`` of signal ``i``."""
        widths = [("label", 16), ("transducer", 80), ("unit", 8), ("phys_min", 8), ("phys_max", 8),
                  ("dig_min", 8), ("dig_max", 8), ("prefilter", 80), ("samples", 8), ("reserved", 32)]
        offset = 256
        for field, width in widths:
            if field == name:
                return offset + i * width, width
            offset += width * self.ns
        raise KeyError(name)

    def get(self, name: str, i: int) -> str:
        o, w = self.signal_field(name, i)
        return self.data[o:o + w].decode("latin-1").strip()

    def put(self, name: str, i: int, value: bytes | str) -> None:
        o, w = self.signal_field(name, i)
        self.data[o:o + w] = _pad(value, w)

    def put_main(self, offset: int, width: int, value: bytes | str) -> None:
        self.data[offset:offset + width] = _pad(value, width)

    def samples(self) -> list[int]:
        return [int(self.get("samples", i)) for i in range(self.ns)]


def _pad(value: bytes | str, width: int) -> bytes:
    raw = value.encode("latin-1") if isinstance(value, str) else value
    return raw[:width].ljust(width, b" ")


def _records(edf: Edf) -> np.ndarray:
    samples = edf.samples()
    body = np.frombuffer(bytes(edf.data[edf.header_bytes:]), np.uint8)
    size = sum(samples) * edf.bytes_per_sample
    return body[: body.size // size * size].reshape(-1, size)


def m_truncate(edf, rng):
    return edf.data[: int(rng.integers(0, len(edf.data)))], "reject"


def m_truncate_data(edf, rng):
    return edf.data[: int(rng.integers(edf.header_bytes + 1, len(edf.data)))], "reject"


def m_flip_header(edf, rng):
    out = bytearray(edf.data)
    for pos in rng.integers(0, edf.header_bytes, size=int(rng.integers(1, 6))):
        out[pos] ^= 1 << int(rng.integers(0, 8))
    return out, "any"


def m_flip_data(edf, rng):
    out = bytearray(edf.data)
    for pos in rng.integers(edf.header_bytes, len(out), size=int(rng.integers(1, 200))):
        out[pos] = int(rng.integers(0, 256))
    return out, "any"


def m_records_count(edf, rng):
    n = int(edf.data[236:244].decode().strip())
    value = rng.choice([n + int(rng.integers(1, 50)), max(n - int(rng.integers(1, 50)), 1), 99_999_999, 0])
    edf.put_main(236, 8, str(int(value)))
    if value == 0:
        return edf.data[: edf.header_bytes], "reject"
    return edf.data, "reject" if value != n else "any"


def m_samples_per_record(edf, rng):
    i = int(rng.integers(0, edf.ns))
    old = int(edf.get("samples", i))
    new = int(rng.choice([old + int(rng.integers(1, 100)), max(old - int(rng.integers(1, 100)), 1), 99_999_999]))
    edf.put("samples", i, str(new))
    return edf.data, "reject" if new != old else "any"


def m_zero_length_signal(edf, rng):
    """One signal declares 0 samples per record and its bytes are removed: a legal-looking file."""
    i = int(rng.integers(0, edf.ns))
    samples, bps = edf.samples(), edf.bytes_per_sample
    recs = _records(edf)
    start = sum(samples[:i]) * bps
    kept = np.concatenate([recs[:, :start], recs[:, start + samples[i] * bps:]], axis=1)
    edf.put("samples", i, "0")
    return edf.data[: edf.header_bytes] + kept.tobytes(), "any"


def m_duration(edf, rng):
    value = str(rng.choice(["0", "-1", "0.000001", "1e-7", "1e9", "abc", "0.5", "2", ""]))
    edf.put_main(244, 8, value)
    return edf.data, "any" if value in ("0.5", "2") else "reject"


def m_signal_count(edf, rng):
    edf.put_main(252, 4, str(rng.choice(["0", "-3", "9999", "x", str(edf.ns + 1)])))
    return edf.data, "reject"


def m_header_bytes(edf, rng):
    edf.put_main(184, 8, str(rng.choice(["0", "256", "99999999", "abc", "-1"])))
    return edf.data, "reject"


def m_digital_range(edf, rng):
    i = int(rng.integers(0, edf.ns))
    if rng.random() < 0.5:
        edf.put("dig_max", i, edf.get("dig_min", i))  # gain 1/0: inf or NaN samples
    else:
        edf.put("dig_min", i, str(rng.choice(["abc", "", "1e400", "nan"])))
    return edf.data, "any"


def m_physical_range(edf, rng):
    i = int(rng.integers(0, edf.ns))
    value = str(rng.choice(["1e300", "-1e300", "nan", "inf", edf.get("phys_min", i)]))
    edf.put("phys_max", i, value)
    return edf.data, "any"


def m_duplicate_names(edf, rng):
    for i in rng.integers(1, edf.ns, size=int(rng.integers(1, max(2, edf.ns // 2)))):
        edf.put("label", int(i), edf.get("label", 0))
    return edf.data, "any"


def m_empty_names(edf, rng):
    for i in rng.integers(0, edf.ns, size=int(rng.integers(1, edf.ns + 1))):
        edf.put("label", int(i), "")
    return edf.data, "any"


def m_non_ascii_names(edf, rng):
    names = ["Fp1\u00e9", "\u6b63\u4e2d", "C3\u2013A2", "\u00d8z", "EEG \u00b5V"]
    for i in rng.integers(0, edf.ns, size=int(rng.integers(1, edf.ns + 1))):
        name = str(rng.choice(names))
        edf.put("label", int(i), name.encode("utf-8") if rng.random() < 0.5 else name.encode("latin-1", "replace"))
    return edf.data, "any"


def m_annotation_only(edf, rng):
    """An EDF+ file with an annotation signal and nothing else."""
    n_records, spr = int(rng.integers(1, 20)), 60
    head = bytearray(_pad("0", 8) + _pad("X X X X", 80) + _pad("Startdate X X X X", 80) + _pad("01.01.01", 8)
                     + _pad("00.00.00", 8) + _pad("512", 8) + _pad("EDF+C", 44) + _pad(str(n_records), 8)
                     + _pad("1", 8) + _pad("1", 4))
    for field, width, value in [("label", 16, "EDF Annotations"), ("transducer", 80, ""), ("unit", 8, ""),
                                ("phys_min", 8, "-1"), ("phys_max", 8, "1"), ("dig_min", 8, "-32768"),
                                ("dig_max", 8, "32767"), ("prefilter", 80, ""), ("samples", 8, str(spr)),
                                ("reserved", 32, "")]:
        head += _pad(value, width)
    body = b""
    for r in range(n_records):
        tal = f"+{r}\x14\x14\x00+{r}.5\x15{0.5}\x14event {r}\x14\x00".encode()
        body += tal[: spr * 2].ljust(spr * 2, b"\x00")
    return head + body, "reject"


def m_not_eeg(edf, rng):
    kind = str(rng.choice(["random", "text", "png", "zip", "json", "zeros"]))
    size = int(rng.integers(1, 200_000))
    if kind == "random":
        data = rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
    elif kind == "text":
        data = ("Lorem ipsum dolor sit amet\r\n" * (size // 28 + 1)).encode()
    elif kind == "png":
        data = b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
    elif kind == "zip":
        data = b"PK\x03\x04" + rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
    elif kind == "json":
        data = json.dumps({"eeg": list(range(size // 8))}).encode()
    else:
        data = bytes(size)
    return data, "reject"


EDF_MUTATIONS = [m_truncate, m_truncate_data, m_flip_header, m_flip_data, m_records_count, m_samples_per_record,
                 m_zero_length_signal, m_duration, m_signal_count, m_header_bytes, m_digital_range, m_physical_range,
                 m_duplicate_names, m_empty_names, m_non_ascii_names, m_annotation_only, m_not_eeg]


# ---------------------------------------------------------------------------- FIF with non-finite samples
def fif_with_nonfinite(path: pathlib.Path, rng) -> str:
    """A FIF copy of an EEGMAT recording with NaN/inf spans or whole non-finite channels."""
    import mne

    raw = mne.io.read_raw_edf(SHARED_EEG / "eegmat/Subject00_2.edf", preload=True, verbose="error")
    data = raw.get_data()
    for _ in range(int(rng.integers(1, 4))):
        value = float(rng.choice([np.nan, np.inf, -np.inf]))
        ch = int(rng.integers(0, data.shape[0]))
        if rng.random() < 0.2:
            data[ch] = value
        else:
            start = int(rng.integers(0, data.shape[1] - 1))
            data[ch, start:start + int(rng.integers(1, 5000))] = value
    mne.io.RawArray(data, raw.info, verbose="error").save(path, overwrite=True, verbose="error")
    return "any"


# ---------------------------------------------------------------------------- the campaign
def generate(out: pathlib.Path, count: int, seed: int) -> dict[str, dict]:
    """Writes ``count`` mutated files into ``out``; returns {file name: {mutation, base, expect}}."""
    rng = np.random.default_rng(seed)
    bases = {b: (SHARED_EEG / b).read_bytes() for b in BASES}
    out.mkdir(parents=True, exist_ok=True)
    plan = {}
    for k in range(count):
        if k % 25 == 24:  # one in 25: a FIF with non-finite samples
            name = f"f{k:04d}_nonfinite_raw.fif"
            plan[name] = {"mutation": "fif_nonfinite", "base": BASES[0], "expect": fif_with_nonfinite(out / name, rng)}
            continue
        base = BASES[int(rng.integers(0, len(BASES)))]
        kind = "BDF" if base.endswith(".bdf") else "EDF"
        mutation = EDF_MUTATIONS[int(rng.integers(0, len(EDF_MUTATIONS)))]
        try:
            data, expect = mutation(Edf(bytearray(bases[base]), 3 if kind == "BDF" else 2), rng)
        except ValueError:  # the mutation does not apply to this base (too few signals, ...)
            data, expect = bases[base], "any"
        suffix = ".bdf" if kind == "BDF" else ".edf"
        if mutation is m_not_eeg:
            suffix = str(rng.choice([".edf", ".bdf", ".fif", ".set", ".gdf", ".cnt"]))
        name = f"f{k:04d}_{mutation.__name__[2:]}{suffix}"
        (out / name).write_bytes(bytes(data))
        plan[name] = {"mutation": mutation.__name__[2:], "base": base, "expect": expect}
    return plan


def run_measured(cmd: list[str], work: pathlib.Path, timeout: float,
                 cwd: pathlib.Path) -> tuple[int, str, float] | None:
    """Runs ``cmd``; returns (exit status, stderr, peak resident memory in MiB) or None past ``timeout`` s.

    The peak is this one process tree's: wait4's usage covers the child and the descendants it
    waited for (data_prep's workers), where getrusage(RUSAGE_CHILDREN) would also count every
    earlier child of the calling process (in a test session, other tests' training runs).
    """
    with open(work / "cli_stderr.txt", "w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=cwd)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                os.wait4(proc.pid, 0)
                return None
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        err.seek(0)
        return proc.returncode, err.read(), usage.ru_maxrss / 1024


def campaign(count: int, seed: int, work: pathlib.Path, workers: int = 2, file_timeout: float = 120.0,
             max_memory_gb: float = 4.0, cli_timeout: float = 3600.0) -> dict:
    """Generates, converts with the data_prep CLI and classifies; returns the counts and the problems."""
    inputs = work / "inputs"
    plan = generate(inputs, count, seed)
    out = work / "out"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "data_prep", str(inputs), "--out", str(out), "--window", "1", "--workers", str(workers),
           "--file-timeout", str(file_timeout), "--max-memory-gb", str(max_memory_gb), "--allow-failures", "--quiet"]
    finished = run_measured(cmd, work, cli_timeout, cwd=pathlib.Path(__file__).resolve().parents[1])
    if finished is None:
        return {"tried": count, "hangs": 1, "crashes": 0, "problems": ["the data_prep CLI did not finish"]}
    returncode, stderr, peak_rss_mib = finished
    wall = time.perf_counter() - t0
    counts = {"tried": count, "converted": 0, "rejected": 0, "crashes": 0, "hangs": 0}
    problems = []
    if returncode != 0:
        counts["crashes"] += 1
        problems.append(f"CLI exit {returncode}: {stderr[-2000:]}")
        return {**counts, "problems": problems}
    manifest = json.loads((out / "manifest.json").read_text())
    by_mutation: dict[str, dict[str, int]] = {}
    for o in manifest["files"]:
        name = pathlib.Path(o["path"]).name
        entry = plan.pop(name)
        reason = o.get("reason", "")
        if "timed out" in reason:
            kind = "hangs"
        elif "internal error" in reason or "worker process" in reason:
            kind = "crashes"
        elif o["status"] == "ok":
            kind = "converted"
            problems += _check_records(out / o["shard"], name)
            if entry["expect"] == "reject":
                problems.append(f"{name} ({entry['mutation']} of {entry['base']}) was converted; it must be rejected")
        elif reason:
            kind = "rejected"
        else:
            kind = "crashes"
            problems.append(f"{name}: {o['status']} without a reason")
        if kind in ("hangs", "crashes"):
            problems.append(f"{name} ({entry['mutation']} of {entry['base']}): {kind}: {reason}")
        counts[kind] += 1
        stats = by_mutation.setdefault(entry["mutation"], {"converted": 0, "rejected": 0, "crashes": 0, "hangs": 0})
        stats[kind] += 1
    problems += [f"{name} missing from the manifest" for name in plan]
    return {**counts, "wall_s": round(wall, 1), "peak_rss_mib": round(peak_rss_mib), "by_mutation": by_mutation,
            "problems": problems}


def _check_records(shard: pathlib.Path, name: str) -> list[str]:
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(str(shard))
    try:
        for i in range(reader.num_records()):
            rec = records.decode(reader.read([i])[0])
            if not np.isfinite(rec.signal).all():
                return [f"{name}: record {i} of {shard.name} has non-finite samples"]
    finally:
        reader.close()
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=520)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    result = campaign(args.files, args.seed, pathlib.Path(args.out), args.workers)
    print(json.dumps(result, indent=1))
    return 1 if result["problems"] or result["crashes"] or result["hangs"] else 0


if __name__ == "__main__":
    sys.exit(main())
