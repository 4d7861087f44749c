"""data_prep on the real recordings of ../shared/eeg: formats, labels, splits, damage, resume."""

import json
import math
import os
import pathlib

import mne
import numpy as np
import pytest
from array_record.python import array_record_module

from data_prep import __main__ as cli
from labram_jax import preprocess, reading
from labram_jax import channels, records


def read_shard(path):
    reader = array_record_module.ArrayRecordReader(str(path))
    try:
        return [records.decode(reader.read([i])[0]) for i in range(reader.num_records())]
    finally:
        reader.close()


def run(args, capsys=None):
    code = cli.main([str(a) for a in args] + ["--quiet"])
    return code


@pytest.fixture(scope="module")
def eegmat(eeg_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eegmat")
    code = run([eeg_dir / "eegmat", "--out", out, "--window", 5, "--label-from", "filename",
                "--label-pattern", r"_1\.edf$=rest", "--label-pattern", r"_2\.edf$=arithmetic",
                "--subject-pattern", r"Subject(\d+)_", "--val-subjects", "16,17,18,19", "--workers", 2])
    assert code == 0
    return out, json.loads((out / "manifest.json").read_text())


def test_eegmat_windows_labels_and_splits(eegmat):
    out, manifest = eegmat
    assert manifest["totals"] == {**manifest["totals"], "files": 40, "ok": 40, "failed": 0}
    assert manifest["labels"]["names"] == ["rest", "arithmetic"]
    assert manifest["splits"]["val"]["subjects"] == ["16", "17", "18", "19"]
    assert len(manifest["splits"]["train"]["subjects"]) == 16
    vocab_rows = [channels.spatial_row(n) for n in
                  "FP1 FP2 F3 F4 F7 F8 T3 T4 C3 C4 T5 T6 P3 P4 O1 O2 FZ CZ PZ".split()]
    for entry in manifest["files"]:
        assert entry["windows"] == math.floor(entry["duration_s"] / 5 + 1e-6), entry["path"]
        assert entry["sfreq_in"] == 500.0
        assert {"EEG A2-A1", "ECG ECG"} == {name for name, _ in entry["channels_dropped"]}
        assert entry["split"] == ("val" if entry["subject"] in {"16", "17", "18", "19"} else "train")
        shard = read_shard(out / entry["shard"])
        assert len(shard) == entry["windows"]
        want_label = 0 if entry["path"].endswith("_1.edf") else 1
        for rec in shard[:3]:
            assert rec.signal.shape == (19, 5, 200) and rec.label == want_label
            np.testing.assert_array_equal(rec.channel_ids, vocab_rows)
            assert rec.subject == entry["subject"] and rec.dataset == out.name
        assert [r.start_s for r in shard] == [5.0 * i for i in range(len(shard))]
    by_label = manifest["splits"]["train"]["by_label"]
    assert by_label["rest"] > 2 * by_label["arithmetic"] > 0


def test_round_trip_equals_in_memory_preprocessing(eegmat, eeg_dir):
    out, manifest = eegmat
    entry = next(e for e in manifest["files"] if e["path"].endswith("Subject03_2.edf"))
    prepared = preprocess.preprocess(reading.read_raw(pathlib.Path(entry["path"])),
                                     preprocess.Params(window_s=5, stride_s=5.0))
    shard = read_shard(out / entry["shard"])
    for k in (0, len(shard) - 1):
        want = prepared.data[:, k * 1000:(k + 1) * 1000].reshape(19, 5, 200)
        np.testing.assert_array_equal(shard[k].signal, want)
    # Units: microvolts / 100, so EEG sits around 0.1-1, not 1e-5 (volts) or 10-100 (uV).
    assert 0.01 < float(np.std(prepared.data)) < 5.0
    # the channels filtered and resampled in blocks on threads (as the API does): the same bits, and
    # MNE's global log level as it was
    level = mne.utils.logger.level
    threaded = preprocess.preprocess(reading.read_raw(pathlib.Path(entry["path"])),
                                     preprocess.Params(window_s=5, stride_s=5.0), threads=4)
    np.testing.assert_array_equal(threaded.data, prepared.data)
    assert threaded.names == prepared.names and mne.utils.logger.level == level


def test_rerun_resumes_without_rewriting(eegmat, eeg_dir):
    out, manifest = eegmat
    shard = out / manifest["files"][0]["shard"]
    before = shard.stat().st_mtime_ns
    code = run([eeg_dir / "eegmat", "--out", out, "--window", 5, "--label-from", "filename",
                "--label-pattern", r"_1\.edf$=rest", "--label-pattern", r"_2\.edf$=arithmetic",
                "--subject-pattern", r"Subject(\d+)_", "--val-subjects", "16,17,18,19"])
    assert code == 0
    again = json.loads((out / "manifest.json").read_text())
    assert all(e.get("resumed") for e in again["files"])
    assert shard.stat().st_mtime_ns == before
    assert again["totals"]["windows"] == manifest["totals"]["windows"]


def test_eegmmidb_labels_from_annotations(eeg_dir, tmp_path):
    code = run([eeg_dir / "eegmmidb", "--out", tmp_path, "--window", 4, "--notch", 60,
                "--label-from", "annotations", "--annotation-labels", "T0=rest,T1=left,T2=right",
                "--subject-pattern", r"(S\d{3})R", "--val-fraction", 0.25, "--split-seed", 1])
    assert code == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["totals"]["ok"] == 7
    assert sum(len(s["subjects"]) for s in manifest["splits"].values()) == 4
    assert len(manifest["splits"]["val"]["subjects"]) == 1
    for entry in manifest["files"]:
        recs = read_shard(tmp_path / entry["shard"])
        assert recs[0].signal.shape == (64, 4, 200) and recs[0].sfreq_in == 160.0
        names = {r.label_name for r in recs}
        if entry["path"].endswith(("R01.edf", "R02.edf")):
            assert names == {"rest"} and len(recs) == 15  # 61 s baseline, one T0
        else:
            assert names == {"rest", "left", "right"}  # imagery runs: ~4-s T0/T1/T2 blocks
            assert len(recs) + entry["unlabelled_windows"] == 31


# file -> (status, windows with 1-s windows, kept channels)
FORMATS = {
    "brainvision/test.vhdr": ("ok", 7, 26),  # CP5/CP6 are typed misc in its header
    "edf/test.bdf": ("ok", 1, 66),
    "edf/test_utf8.edf": ("ok", None, 1),
    "edf/duplicate_channel_labels.edf": ("ok", None, 2),
    "eeglab/eeglab_data.set": ("ok", 238, 30),
    "eeglab/sample-very-short-raw.set": ("skipped", 0, None),
    "edf/short_psg.edf": ("skipped", 0, None),
    "edf/test.edf": ("skipped", 0, None),
    "test_bin_raw.fif": ("skipped", 0, None),
    "neuroscan_test.cnt": ("failed", 0, None),
}


def test_every_format(eeg_dir, tmp_path):
    code = run([eeg_dir / "formats", "--out", tmp_path, "--window", 1])
    assert code == 1  # the damaged CNT
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    by_rel = {os.path.relpath(e["path"], (eeg_dir / "formats").resolve()): e for e in manifest["files"]}
    assert set(by_rel) == set(FORMATS)
    for rel, (status, windows, kept) in FORMATS.items():
        entry = by_rel[rel]
        assert entry["status"] == status, (rel, entry["reason"])
        if status != "ok":
            assert entry["reason"] and entry["shard"] is None
            if "no channel maps" in entry["reason"]:
                assert entry["channels_dropped"] and all(r for _, r in entry["channels_dropped"])
            continue
        if windows is not None:
            assert entry["windows"] == windows, rel
        assert entry["windows"] == math.floor(entry["duration_s"] + 1e-6), rel
        assert len(entry["channels_kept"]) == kept, rel
        recs = read_shard(tmp_path / entry["shard"])
        assert len(recs) == entry["windows"] and recs[0].signal.shape == (kept, 1, 200)
        assert np.isfinite(np.stack([r.signal for r in recs])).all()


EDGE_REASONS = {
    "S001R04_truncated_mid_record.edf": "truncated",
    "S001R04_header_only.edf": "header only",
    "empty.edf": "empty file",
    "S001R04_crlf_mangled.edf": "more than the header promises",
}


def test_damaged_files_fail_with_reasons_and_good_ones_are_written(eeg_dir, tmp_path):
    good = eeg_dir / "eegmmidb" / "S001" / "S001R04.edf"
    args = [eeg_dir / "edge_cases", good, "--out", tmp_path, "--window", 4]
    assert run(args) == 1
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for entry in manifest["files"]:
        name = pathlib.Path(entry["path"]).name
        if name in EDGE_REASONS:
            assert entry["status"] == "failed" and EDGE_REASONS[name] in entry["reason"], entry
            assert entry["windows"] == 0 and entry["shard"] is None
        else:
            assert entry["status"] == "ok" and entry["windows"] == 31
    written = list((tmp_path / "shards").rglob("*"))
    assert [p.name for p in written if p.is_file()] == ["eegmmidb__S001__S001R04.arrayrecord"]
    assert not list(tmp_path.rglob("*.tmp"))
    assert run(args + ["--allow-failures"]) == 0


def test_bad_arguments_exit_2(eeg_dir, tmp_path):
    assert run([eeg_dir / "eegmat", "--out", tmp_path, "--window", 20]) == 2
    assert run([eeg_dir / "eegmat", "--out", tmp_path, "--label-from", "filename"]) == 2
    assert run([tmp_path / "missing", "--out", tmp_path]) == 2
    with pytest.raises(SystemExit) as err:
        cli.main(["--out", str(tmp_path)])
    assert err.value.code == 2


def test_csv_labels_split_file_channel_map_and_rejection(eeg_dir, tmp_path):
    """Interval labels from a CSV, subjects from a CSV, splits from a file, a channel
    mapping file, and flat-window rejection, on EEGMMIDB."""
    files = [eeg_dir / "eegmmidb" / "S001" / "S001R04.edf", eeg_dir / "eegmmidb" / "S002" / "S002R01.edf"]
    (tmp_path / "labels.csv").write_text("file,start,stop,label\nS001R04.edf,0,40,early\nS001R04.edf,40,125,late\n"
                                         "S002R01.edf,0,61,baseline\n")
    (tmp_path / "subjects.csv").write_text("file,subject\nS001R04.edf,alice\nS002R01.edf,bob\n")
    (tmp_path / "splits.csv").write_text("subject,split\nalice,train\nbob,test\n")
    (tmp_path / "channels.csv").write_text("name,vocabulary\nFc5.,FC5\nIz..,OZ\n")
    out = tmp_path / "out"
    code = run([*files, "--out", out, "--window", 4, "--label-from", "csv", "--labels-csv", tmp_path / "labels.csv",
                "--straddle", "strict", "--subjects-csv", tmp_path / "subjects.csv",
                "--split-file", tmp_path / "splits.csv", "--channel-map", tmp_path / "channels.csv",
                "--reject-flat-uv", "1e9"])  # every window is "flat" below 1e9 uV: all rejected
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(e["status"] == "skipped" and e["rejected"].get("flat") for e in manifest["files"])
    code = run([*files, "--out", out, "--window", 4, "--label-from", "csv", "--labels-csv", tmp_path / "labels.csv",
                "--straddle", "strict", "--subjects-csv", tmp_path / "subjects.csv",
                "--split-file", tmp_path / "splits.csv", "--channel-map", tmp_path / "channels.csv"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"]["names"] == ["early", "late", "baseline"]
    assert set(manifest["splits"]) == {"train", "test"}
    by_subject = {e["subject"]: e for e in manifest["files"]}
    assert by_subject["alice"]["split"] == "train" and by_subject["bob"]["split"] == "test"
    alice = read_shard(out / by_subject["alice"]["shard"])
    # strict: the window across 40 s (36-40 ok, 40-44 ok; none straddles with 4-s windows at 0, 4, ...)
    assert [r.label_name for r in alice].count("early") == 10
    assert {r.label_name for r in alice} == {"early", "late"}
    # the mapping file maps Iz.. onto OZ, which Oz.. also normalises to: the first one wins
    kept = by_subject["alice"]["channels_kept"]
    assert kept.count("OZ") == 1 and "FC5" in kept
    assert any("duplicate" in reason for _, reason in by_subject["alice"]["channels_dropped"])


def test_subject_centring_puts_every_subject_on_one_footing(eegmat, tmp_path):
    from data_prep import centring
    from labram_jax import baselines, input_pipeline, subject_centring

    out, manifest = eegmat
    assert centring.main([str(out / "manifest.json"), "--out", str(tmp_path / "c"), "--quiet"]) == 0
    centred = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert centred["subject_centring"]["band_hz"] == [1, 45] and centred["subject_centring"]["subjects"] == 20
    for split in ("train", "val"):  # the same windows, labels and subjects, split alike
        assert centred["splits"][split] == manifest["splits"][split]
    lo, hi = subject_centring.BAND_HZ
    levels, spread = {}, []
    for split in ("train", "val"):
        for before, after in zip(input_pipeline.iter_records(str(out / "manifest.json"), split),
                                 input_pipeline.iter_records(str(tmp_path / "c" / "manifest.json"), split)):
            assert (after.label, after.subject, after.recording, after.start_s) == \
                (before.label, before.subject, before.recording, before.start_s)
            for name, rec in (("before", before), ("after", after)):
                amplitude = subject_centring.log_amplitude(rec.signal)[..., lo:hi + 1].mean(axis=(1, 2))  # [C]
                levels.setdefault((name, rec.subject, rec.label), []).append(amplitude)
    for name in ("before", "after"):
        by_subject = {}
        for (which, subject, label), rows in levels.items():
            if which == name:
                by_subject.setdefault(subject, {})[label] = np.mean(rows, 0)
        overall = np.array([np.mean([v for v in labels.values()], 0) for labels in by_subject.values()])  # [S, C]
        condition = np.array([labels[1] - labels[0] for labels in by_subject.values()])  # arithmetic - rest
        spread.append((overall.std(0).mean(), np.abs(condition).mean()))
    # subjects' overall levels (mean log amplitude per channel, std over subjects) differ before and
    # shrink to a sixth after (measured 0.214 -> 0.033; what remains is that the reference weighs
    # each condition by its windows, three rest for one arithmetic); the difference between the
    # conditions within a subject is untouched (a per-subject constant in the log domain)
    (before_spread, before_condition), (after_spread, after_condition) = spread
    assert before_spread > 0.15 and after_spread < 0.25 * before_spread, spread
    assert after_condition == pytest.approx(before_condition, rel=1e-3), spread
    # the log spectrum anchor on subjects 16-19 gains from it (measured AUROC 0.819 -> 0.909)
    plain = baselines.run(str(out / "manifest.json"), ["log_spectrum_lr"])["log_spectrum_lr"]
    centred_scores = baselines.run(str(tmp_path / "c" / "manifest.json"), ["log_spectrum_lr"])["log_spectrum_lr"]
    assert centred_scores["auroc"] > max(0.88, plain["auroc"] + 0.05), (plain, centred_scores)
    # what it refuses
    assert centring.main([str(tmp_path / "c" / "manifest.json"), "--out", str(tmp_path / "cc"), "--quiet"]) == 2
    assert centring.main([str(out / "manifest.json"), "--out", str(out), "--quiet"]) == 2
    assert centring.main([str(out / "manifest.json"), "--out", str(tmp_path / "b"), "--band", "0", "45",
                          "--quiet"]) == 2


def test_euclidean_alignment_whitens_each_subject_and_keeps_the_records(eegmat, tmp_path):
    from data_prep import centring
    from labram_jax import data_spec, input_pipeline, subject_centring

    out, manifest = eegmat
    aligned_path = tmp_path / "a" / "manifest.json"
    assert centring.main([str(out / "manifest.json"), "--out", str(tmp_path / "a"), "--method", "euclidean",
                          "--quiet"]) == 0
    aligned = json.loads(aligned_path.read_text())
    assert aligned["subject_centring"]["method"] == "euclidean" and aligned["subject_centring"]["subjects"] == 20
    assert data_spec.subject_centring(str(aligned_path)) == {"method": "euclidean"}
    assert aligned["splits"] == manifest["splits"]
    by_subject: dict[str, list] = {}
    raw: dict[str, list] = {}
    for split in ("train", "val"):
        for before, after in zip(input_pipeline.iter_records(str(out / "manifest.json"), split),
                                 input_pipeline.iter_records(str(aligned_path), split)):
            assert (after.label, after.subject, after.recording, after.start_s) == \
                (before.label, before.subject, before.recording, before.start_s)
            np.testing.assert_array_equal(after.channel_ids, before.channel_ids)
            by_subject.setdefault(after.subject, []).append(after.signal)
            raw.setdefault(before.subject, []).append(before.signal)
    assert len(by_subject) == 20
    for subject, windows in by_subject.items():
        # every subject's windows, over all its recordings, now have the identity as mean covariance
        cov = subject_centring.covariance(np.stack(windows))
        np.testing.assert_allclose(cov, np.eye(len(cov)), atol=2e-3, err_msg=subject)
    # the records differ in level between subjects before (mean channel variance, in (100 uV)^2)
    levels = [np.trace(subject_centring.covariance(np.stack(w))) for w in raw.values()]
    assert max(levels) > 2 * min(levels), levels
    # spectrum-centred and aligned records are not one kind of input
    assert centring.main([str(out / "manifest.json"), "--out", str(tmp_path / "c"), "--quiet"]) == 0
    with pytest.raises(ValueError, match="mixes records prepared differently.*Euclidean"):
        data_spec.subject_centring(f"{aligned_path}+{tmp_path / 'c' / 'manifest.json'}")
    assert centring.main([str(aligned_path), "--out", str(tmp_path / "aa"), "--method", "euclidean",
                          "--quiet"]) == 2  # already aligned: align the original
    # aligned, then spectrum-centred: the records equal the two steps done on a subject's windows in memory
    assert centring.main([str(out / "manifest.json"), "--out", str(tmp_path / "ac"), "--method",
                          "euclidean+spectrum", "--quiet"]) == 0
    both_path = str(tmp_path / "ac" / "manifest.json")
    assert data_spec.subject_centring(both_path) == {"method": "euclidean+spectrum", "band_hz": [1, 45]}
    subject = sorted(raw)[0]
    done = [r.signal for split in ("train", "val") for r in input_pipeline.iter_records(both_path, split)
            if r.subject == subject]
    np.testing.assert_allclose(np.stack(done), subject_centring.per_subject(
        {"method": "euclidean+spectrum", "band_hz": [1, 45]}, np.stack(raw[subject]), [subject] * len(done)),
        rtol=1e-3, atol=1e-4)
