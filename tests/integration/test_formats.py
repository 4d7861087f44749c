"""Reading any recording a lab owns: formats by content, companions, files not read, optional
readers, and no silent damage (EDF headers with impossible calibration), on real files."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from data_prep import __main__ as cli
from labram_jax import preprocess, reading


def run(args):
    return cli.main([str(a) for a in args] + ["--quiet"])


def test_formats_are_told_apart_by_content_and_companions(eeg_dir, tmp_path):
    formats = eeg_dir / "formats"
    found = reading.find_inputs([str(formats)])
    names = {p.name: reading.format_of(p).name for p in found.recordings}
    assert names == {"test.vhdr": "BrainVision", "duplicate_channel_labels.edf": "EDF", "short_psg.edf": "EDF",
                     "test.bdf": "BDF", "test.edf": "EDF", "test_utf8.edf": "EDF", "eeglab_data.set": "EEGLAB",
                     "sample-very-short-raw.set": "EEGLAB", "neuroscan_test.cnt": "Neuroscan CNT",
                     "test_bin_raw.fif": "FIF"}
    companions = {p.name: sorted(c.name for c in cs) for p, cs in found.companions.items()}
    assert companions == {"test.vhdr": ["test.eeg", "test.vmrk"], "eeglab_data.set": ["eeglab_data.fdt"]}
    assert found.not_read == []
    # .eeg alone is Nihon Kohden; beside a .vhdr it is BrainVision's data. .cnt: RIFF is ANT Neuro.
    shutil.copy(formats / "brainvision" / "test.eeg", tmp_path / "DA00100E.EEG")
    assert reading.format_of(tmp_path / "DA00100E.EEG").name == "Nihon Kohden"
    assert reading.format_of(formats / "brainvision" / "test.eeg") is None
    (tmp_path / "cap.cnt").write_bytes(b"RF64" + b"\0" * 4 + b"CNT " + b"\0" * 100)
    assert reading.format_of(tmp_path / "cap.cnt").name == "ANT Neuro CNT"
    (tmp_path / "rec.mff").mkdir()
    assert reading.format_of(tmp_path / "rec.mff").name == "EGI MFF"
    for name in ("a.nedf", "b.lay", "c.nxe", "d.data", "e.gdf", "f.fif.gz"):
        assert reading.format_of(pathlib.Path(name)) is not None, name


def test_files_not_read_are_listed_never_dropped(eeg_dir, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(eeg_dir / "formats" / "brainvision", inputs / "bv")
    shutil.copy(eeg_dir / "formats" / "edf" / "test_utf8.edf", inputs)
    (inputs / "README.txt").write_text("notes")
    (inputs / "orphan.vmrk").write_text("a marker file without its header")
    code = run([inputs, "--out", tmp_path / "out", "--window", 1])
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["totals"]["files"] == 2 and manifest["totals"]["not_read"] == 2
    reasons = {pathlib.Path(e["path"]).name: e["reason"] for e in manifest["not_read"]}
    assert set(reasons) == {"README.txt", "orphan.vmrk"}
    assert all("not a recording format" in r and "'." in r for r in reasons.values())
    bv = next(e for e in manifest["files"] if e["path"].endswith("test.vhdr"))
    assert sorted(pathlib.Path(c).name for c in bv["companions"]) == ["test.eeg", "test.vmrk"]
    assert bv["format"] == "BrainVision" and bv["status"] == "ok"
    with pytest.raises(ValueError, match="not a recording format data_prep reads .* it reads .*Nihon Kohden"):
        reading.find_inputs([str(inputs / "README.txt")])  # named explicitly: an argument error (exit 2)
    assert run([inputs / "README.txt", "--out", tmp_path / "out2"]) == 2


def test_a_missing_optional_reader_names_its_package(tmp_path, monkeypatch):
    (tmp_path / "cap.cnt").write_bytes(b"RF64" + b"\0" * 4 + b"CNT " + b"\0" * 100)
    real = reading.importlib.util.find_spec
    monkeypatch.setattr(reading.importlib.util, "find_spec", lambda name: None if name == "antio" else real(name))
    with pytest.raises(reading.ReadError) as err:
        reading.read(tmp_path / "cap.cnt")
    assert str(err.value) == ("reading ANT Neuro CNT needs the 'antio' package: pip install antio "
                              "(or pip install 'labram_jax[formats]')")


def test_reader_errors_are_one_line_with_the_cause(tmp_path):
    (tmp_path / "junk.vhdr").write_text("not a header")
    (tmp_path / "junk.vmrk").write_text("")
    (tmp_path / "junk.eeg").write_bytes(b"\0" * 16)
    with pytest.raises(reading.ReadError) as err:
        reading.read(tmp_path / "junk.vhdr")
    text = str(err.value)
    assert text.startswith("BrainVision reader failed: ") and "\n" not in text and "File \"" not in text
    assert len(text) < 300


# ---------------------------------------------------------------------------------------------- damaged EDF headers
def patch_signal_field(src: pathlib.Path, dst: pathlib.Path, field: str, signal: int, value: str) -> None:
    """Copies an EDF and overwrites one signal-header field of one signal (EDF layout)."""
    data = bytearray(src.read_bytes())
    n = int(data[252:256].decode())
    widths = [("label", 16), ("transducer", 80), ("dimension", 8), ("physical_min", 8), ("physical_max", 8),
              ("digital_min", 8), ("digital_max", 8), ("prefilter", 80), ("samples", 8), ("reserved", 32)]
    offset = 256
    for name, width in widths:
        if name == field:
            start = offset + signal * width
            data[start:start + width] = value.ljust(width).encode("ascii")
            break
        offset += width * n
    dst.write_bytes(bytes(data))


def patch_header(src: pathlib.Path, dst: pathlib.Path, start: int, value: bytes) -> None:
    data = bytearray(src.read_bytes())
    data[start:start + len(value)] = value
    dst.write_bytes(bytes(data))


DAMAGE = {  # name -> (how it is made, status, what the manifest must say)
    # S001R04: physical -8092..8092 uV, digital -8092..8092; signal 5 is Fc4.
    "physical_min_eq_max.edf": (("physical_min", 5, "8092"), "ok", "physical minimum equals maximum"),
    "digital_min_eq_max.edf": (("digital_min", 5, "8092"), "ok", "digital minimum equals maximum"),
    "calibration_text.edf": (("physical_max", 5, "abc"), "failed", "the calibration of 'Fc4.' is not a number"),
    "zero_samples.edf": (("samples", 5, "0"), "failed", "no samples per data record"),
    "version_xxx.edf": ((0, b"XXXXXXXX"), "ok", "version field is 'XXXXXXXX'"),
    "reserved_junk.edf": ((192, b"JUNK".ljust(44)), "ok", "reserved header field is 'JUNK'"),
    "duration_zero.edf": ((244, b"0       "), "failed", "data-record duration '0' is not a positive number"),
}


def test_damaged_headers_never_give_a_silent_flat_channel(eeg_dir, tmp_path):
    good = eeg_dir / "eegmmidb" / "S001" / "S001R04.edf"
    folder = tmp_path / "in"
    folder.mkdir()
    for name, (how, _, _) in DAMAGE.items():
        if isinstance(how[0], str):
            patch_signal_field(good, folder / name, *how)
        else:
            patch_header(good, folder / name, *how)
    code = run([folder, "--out", tmp_path / "out", "--window", 4, "--notch", 60])
    assert code == 1  # the three that cannot be read fail; the others are converted
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    by_name = {pathlib.Path(e["path"]).name: e for e in manifest["files"]}
    for name, (how, status, said) in DAMAGE.items():
        entry = by_name[name]
        assert entry["status"] == status, (name, entry["reason"])
        text = entry["reason"] + json.dumps(entry.get("channels_dropped", [])) + json.dumps(entry.get("notes", []))
        assert said in text, (name, text)
        assert "\n" not in entry["reason"]
        if status == "ok":
            dropped = {c for c, _ in entry["channels_dropped"]}
            broken = isinstance(how[0], str)
            assert ("Fc4." in dropped) == broken, name
            assert len(entry["channels_kept"]) == 64 - broken
    # the same file through the API's reader: the channel is left out there too
    recording = reading.read(folder / "physical_min_eq_max.edf")
    assert "Fc4." not in recording.raw.ch_names and recording.dropped[0][0] == "Fc4."
    prepared = preprocess.preprocess(recording.raw, preprocess.Params(window_s=4, stride_s=4.0, notch=60.0))
    peak_to_peak = np.ptp(prepared.data, axis=1) * preprocess.UV_PER_UNIT
    assert peak_to_peak.min() > 50.0  # no flat line among the kept channels (uV)


def test_a_constant_channel_is_dropped_with_its_reason(eeg_dir):
    raw = reading.read_raw(eeg_dir / "eegmmidb" / "S001" / "S001R04.edf")
    raw._data[3] = 1e-5
    prepared = preprocess.preprocess(raw, preprocess.Params(window_s=4, stride_s=4.0, notch=60.0))
    assert len(prepared.names) == 63 and "FCZ" not in prepared.names  # channel 3 is Fcz.
    assert dict(prepared.dropped)[raw.ch_names[3]].startswith("constant signal")


def test_biosemi_file_without_a_known_layout_is_skipped_with_one_reason(eeg_dir, tmp_path):
    code = run([eeg_dir / "formats" / "edf" / "test.edf", "--out", tmp_path, "--window", 1])
    assert code == 0
    entry = json.loads((tmp_path / "manifest.json").read_text())["files"][0]
    assert entry["status"] == "skipped"
    # the reason counts what was dropped, the 138 cap labels first, and says what to do
    assert entry["reason"].startswith("no channel maps to the LaBraM vocabulary: 138 BioSemi ABC cap label (e.g. A1)")
    assert "--montage" in entry["reason"] and "\n" not in entry["reason"]
