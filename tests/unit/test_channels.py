"""The channel vocabulary and the name normaliser, on every recording in ../shared/eeg."""

import warnings

import mne
import numpy as np
import pytest

from labram_jax import channels


def test_vocabulary_matches_the_spec():
    assert len(channels.VOCABULARY) == 128 and len(set(channels.VOCABULARY)) == 128
    assert channels.VOCABULARY[0] == "FP1" and channels.VOCABULARY[-1] == "P8-O2"
    assert channels.spatial_row("FP1") == 1 and channels.spatial_row("P8-O2") == 128
    # The TUAB montage example of LABRAM.md section 2.
    tuab = "FP1 FP2 F3 F4 C3 C4 P3 P4 O1 O2 F7 F8 T3 T4 T5 T6 A1 A2 FZ CZ PZ T1 T2".split()
    np.testing.assert_array_equal(
        channels.input_rows(tuab),
        [0, 1, 3, 18, 22, 40, 44, 62, 66, 81, 83, 16, 24, 89, 91, 90, 92, 95, 96, 20, 42, 64, 113, 114])


@pytest.mark.parametrize("raw, expected", [
    ("EEG Fp1-REF", "FP1"), ("EEG FP1-LE", "FP1"), ("Fp1", "FP1"), ("Fc5.", "FC5"), ("C3..", "C3"),
    ("EEG Fp1", "FP1"), ("FP1-A1", "FP1"), ("fp1", "FP1"), ("  Cz ", "CZ"), ("EEG F1-Ref-0", "F1"),
    ("T3", "T3"), ("T7", "T7"), ("M1", "M1"), ("A2", "A2"), ("fp1-f7", "FP1-F7"), ("FTT9h", "FTT9h"),
    ("ftt9H", "FTT9h"), ("Iz..", "IZ"), ("EEG T5-REF", "T5"),
])
def test_normalize_known_spellings(raw, expected):
    result = channels.normalize(raw)
    assert result.name == expected, result
    assert result.row == channels.spatial_row(expected)


@pytest.mark.parametrize("raw, reason", [
    ("EEG A2-A1", "reference-difference"), ("EEG Fpz-Cz", "bipolar derivation"), ("ECG ECG", "not a 10-20"),
    ("EEG 001", "not a 10-20"), ("", "empty"), ("FP1-F3", "bipolar derivation"), ("STI 014", "not a 10-20"),
])
def test_normalize_refuses_with_a_reason(raw, reason):
    result = channels.normalize(raw)
    assert result.name is None and reason in result.reason, result


def test_old_and_new_names_stay_distinct():
    assert channels.normalize("T3").row != channels.normalize("T7").row
    assert channels.normalize("T5").row != channels.normalize("P7").row
    assert channels.normalize("A1").row != channels.normalize("M1").row


def test_user_aliases():
    result = channels.normalize("E36", aliases={"e36": "C3"})
    assert result.name == "C3"
    assert channels.normalize("E36", aliases={"E36": "nope"}).reason.startswith("alias target")
    mapping = channels.map_channels(["A1", "A2"] + [f"B{i}" for i in range(1, 33)], aliases={"B1": "CZ"})
    assert "CZ" in mapping.names


def test_spatial_row_error_tells_what_to_do():
    with pytest.raises(KeyError, match="normalize"):
        channels.spatial_row("EEG Fp1")


def _names(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.suffix == ".cnt":
            raw = mne.io.read_raw_cnt(path, data_format="int16", preload=False, verbose="error")
        else:
            raw = mne.io.read_raw(path, preload=False, verbose="error")
    return raw.ch_names


# file -> (kept count, some kept names, some dropped names)
EXPECTED = {
    "eegmat/Subject00_1.edf": (19, {"FP1", "T3", "PZ"}, {"EEG A2-A1", "ECG ECG"}),
    "eegmmidb/S001/S001R04.edf": (64, {"FC5", "C3", "IZ", "T9", "T10"}, set()),
    "formats/brainvision/test.vhdr": (28, {"FP1", "POZ", "P7"}, {"HL", "HR", "Vb", "ReRef"}),
    "formats/edf/duplicate_channel_labels.edf": (2, {"F1", "F2"}, {"EEG F1-Ref-1"}),
    "formats/edf/short_psg.edf": (0, set(), {"EEG Fpz-Cz", "EEG Pz-Oz", "EOG horizontal"}),
    "formats/edf/test.bdf": (66, {"FP1", "IZ", "M1", "M2", "P10"}, {"EXG1", "Status", "LEOG"}),
    "formats/edf/test.edf": (0, set(), {"A1", "B1", "C3", "Ergo-Left"}),
    "formats/edf/test_utf8.edf": (1, {"FP1"}, set()),
    "formats/eeglab/eeglab_data.set": (30, {"FPZ", "T7", "OZ"}, {"EOG1", "EOG2"}),
    "formats/eeglab/sample-very-short-raw.set": (30, {"FPZ", "PO8"}, set()),
    "formats/test_bin_raw.fif": (0, set(), {"EEG 001", "STI 014"}),
    "formats/neuroscan_test.cnt": (0, set(), {"VEOG", "HEOG"}),
}


@pytest.mark.parametrize("rel", sorted(EXPECTED))
def test_channel_names_of_shared_recordings(eeg_dir, rel):
    names = _names(eeg_dir / rel)
    mapping = channels.map_channels(names)
    kept, must_keep, must_drop = EXPECTED[rel]
    assert len(mapping.names) == kept, (mapping.names, mapping.dropped)
    assert must_keep <= set(mapping.names)
    dropped = {name for name, _ in mapping.dropped}
    assert must_drop <= dropped
    assert len(mapping.names) + len(mapping.dropped) == len(names)
    assert all(reason for _, reason in mapping.dropped)
    np.testing.assert_array_equal(mapping.rows, [channels.spatial_row(n) for n in mapping.names])


def test_every_shared_recording_is_covered(eeg_dir):
    """Every EEG file in ../shared/eeg maps without error (edge cases are data_prep's)."""
    suffixes = {".edf", ".bdf", ".set", ".vhdr", ".fif", ".cnt"}
    files = [p for p in eeg_dir.rglob("*") if p.suffix in suffixes and "edge_cases" not in p.parts]
    assert len(files) >= 50
    for path in files:
        mapping = channels.map_channels(_names(path))
        assert len(mapping.names) == len(set(mapping.names)), path
        if path.parent.name == "eegmat":
            assert len(mapping.names) == 19, path
        if "eegmmidb" in path.parts:
            assert len(mapping.names) == 64, path
