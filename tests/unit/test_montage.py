"""Channels placed by electrode position (labram_jax.montage), on real EEGMMIDB recordings."""

import mne
import numpy as np
import pytest

from benchmarks import montage_soundness
from labram_jax import channels, montage, preprocess, reading


def test_sphere_fit_and_distances():
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(40, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    centre, radius = montage.fit_sphere(np.array([0.01, -0.02, 0.03]) + 0.09 * directions)
    np.testing.assert_allclose(centre, [0.01, -0.02, 0.03], atol=1e-9)
    assert radius == pytest.approx(0.09)
    np.testing.assert_allclose(montage.on_unit_sphere(5.0 + 2.0 * directions), directions, atol=1e-9)
    quarter = montage.angular_mm(np.array([[1.0, 0, 0]]), np.array([[0, 1.0, 0], [1.0, 0, 0]]))
    np.testing.assert_allclose(quarter, [[np.pi / 2 * montage.HEAD_RADIUS_MM, 0.0]], atol=1e-6)


def test_vocabulary_positions_cover_the_targets():
    vocab = montage.vocabulary_positions()
    for name, target in montage.TARGETS.items():
        assert set(target) <= set(channels.VOCABULARY) and set(target) <= set(vocab), name
    assert len(montage.TARGETS["1020"]) == 19 and {"T3", "T5"} <= set(montage.TARGETS["1020"])
    # left is -x, front is +y, up is +z in MNE's head frame
    assert vocab["T7"][0] < -0.9 and vocab["FPZ"][1] > 0.9 and vocab["CZ"][2] > 0.9


@pytest.mark.parametrize("names, expected", [
    ([f"{c}{i}" for c in "ABCD" for i in range(1, 33)] + ["EXG1", "Status"], "biosemi128"),
    ([f"{c}{i}" for c in "ABCDEFGH" for i in range(1, 33)], "biosemi256"),
    ([f"E{i}" for i in range(1, 129)] + ["Cz"], "GSN-HydroCel-129"),
    ([f"E{i}" for i in range(1, 257)], "GSN-HydroCel-257"),
    ([f"E{i}" for i in range(1, 65)], "GSN-HydroCel-65_1.0"),
    # the 139-channel BioSemi file of ../shared/eeg/formats/edf/test.edf: A1..H16 + I1..I8 is no
    # layout MNE ships (BioSemi 128 is A1..D32), so nothing is guessed
    ([f"{c}{i}" for c in "ABCDEFGH" for i in range(1, 17)] + [f"I{i}" for i in range(1, 9)], None),
    (["Fp1", "Fp2", "C3", "C4"], None), ([str(i) for i in range(1, 129)], None),
])
def test_layouts_recognised_from_names(names, expected):
    assert montage.recognise(names) == expected


def test_display_layouts_are_not_head_positions():
    biosemi = np.asarray(list(montage.montage_positions("biosemi128").values()))
    assert montage.head_shape_issue(biosemi) is None
    squashed = biosemi * np.array([1.0, 0.3, 1.0])  # a 2-D layout stretched left-right
    assert "spread ratio" in montage.head_shape_issue(squashed)
    top = biosemi[biosemi[:, 2] > 0.07]  # a small patch on the crown
    assert "not positions on a head" in montage.head_shape_issue(top)


def test_bad_options_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="neither an MNE built-in montage"):
        montage.Options(positions="biosemi129")
    with pytest.raises(ValueError, match="--channel-method"):
        montage.Options(method="closest")
    with pytest.raises(ValueError, match="--montage-targets"):
        montage.Options(targets="1005")
    (tmp_path / "cap.elc").write_text("garbage\n")
    with pytest.raises(ValueError, match="cannot read it as a montage"):
        montage.Options(positions=str(tmp_path / "cap.elc"))


@pytest.fixture(scope="module")
def mmidb(eeg_dir):
    raw = reading.read_raw(eeg_dir / "eegmmidb" / "S001" / "S001R04.edf")
    params = preprocess.Params(notch=60.0, window_s=4, stride_s=4.0)
    return raw, params, preprocess.preprocess(raw, params)


def _as_file(raw, tmp_path, name="cap_raw.fif"):
    path = tmp_path / name
    raw.save(path, verbose="error", overwrite=True)
    return reading.read_raw(path)


def test_position_only_cap_comes_back_exactly_with_nearest(mmidb, tmp_path):
    raw, params, original = mmidb
    copy, origin = montage_soundness.position_only_copy(raw)
    assert all(channels.normalize(n).name is None for n in copy.ch_names)  # no vocabulary name left
    placed = preprocess.preprocess(_as_file(copy, tmp_path), params, options=montage.Options(method="nearest"))
    assert placed.positions == "the file's digitisation" and len(placed.names) == 64
    for entry in placed.mapping:  # each site taken by the electrode that sits on it
        assert entry["method"] == "nearest" and entry["distance_mm"] < 0.1
        assert origin[entry["sources"][0]] == entry["name"]
    for channel, (r, err) in montage_soundness.compare(original, placed).items():
        assert r > 0.99999 and err < 1e-4, channel


def test_sparser_cap_is_interpolated_soundly(mmidb, tmp_path):
    raw, params, original = mmidb
    copy, origin = montage_soundness.position_only_copy(raw, keep_every=2)
    placed = preprocess.preprocess(_as_file(copy, tmp_path), params)  # auto: positions, interpolate
    held_out = set(original.names) - set(origin.values())
    produced = montage_soundness.compare(original, placed)
    recovered = {c: v for c, v in produced.items() if c in held_out}
    assert len(recovered) >= 20  # of the 32 withheld 10-10 electrodes, those inside the tolerance
    r = np.asarray([v[0] for v in recovered.values()])
    assert np.median(r) > 0.9 and r.min() > 0.3  # measured on this file: median 0.95
    for entry in placed.mapping:
        assert entry["method"] == "interpolated" and entry["source_count"] == 32
        assert entry["distance_mm"] <= montage.DEFAULT_TOLERANCE_MM["interpolate"]
    assert not held_out & {e["name"] for e in placed.mapping if e["distance_mm"] > 35}


def test_named_layout_and_montage_file(mmidb, tmp_path):
    """A cap labelled X1..X64 without digitisation: refused with what to do, then placed by a
    montage file the user passes (as --montage FILE)."""
    raw, params, original = mmidb
    copy, origin = montage_soundness.position_only_copy(raw)
    positions = copy.get_montage().get_positions()["ch_pos"]
    bare = copy.copy().set_montage(None)
    with pytest.raises(preprocess.NoChannelsError, match="64 not a vocabulary name .* pass --montage"):
        preprocess.preprocess(bare, params)
    elc = tmp_path / "cap.elc"  # ASA electrode file: positions in mm
    lines = ["ReferenceLabel\tavg", f"NumberPositions=\t{len(positions)}", "UnitPosition\tmm", "Positions"]
    lines += [" ".join(f"{1000 * v:.4f}" for v in positions[n]) for n in positions] + ["Labels"] + list(positions)
    elc.write_text("\n".join(lines) + "\n")
    placed = preprocess.preprocess(bare, params, options=montage.Options(positions=str(elc), method="nearest"))
    assert placed.positions == f"montage {elc}" and len(placed.names) == 64
    assert all(origin[m["sources"][0]] == m["name"] for m in placed.mapping)


def test_biosemi_names_are_placed_by_the_recognised_layout(mmidb):
    """EEGMMIDB interpolated onto BioSemi 128 positions and labelled A1..D32 (no digitisation):
    data_prep recognises the layout and maps it back onto the 10-10 sites."""
    raw, params, original = mmidb
    named = raw.copy().pick([n for n in raw.ch_names if channels.normalize(n).name])
    vocab = montage.vocabulary_positions()
    named.set_montage(mne.channels.make_dig_montage(
        {n: vocab[channels.normalize(n).name] * montage.HEAD_RADIUS_MM / 1000 for n in named.ch_names},
        coord_frame="head"), verbose="error")
    biosemi = mne.channels.make_standard_montage("biosemi128")
    cap = named.copy().interpolate_to(biosemi, origin=(0.0, 0.0, 0.0), method="spline")
    cap.set_montage(None)
    assert cap.ch_names[:3] == ["A1", "A2", "A3"] and len(cap.ch_names) == 128
    placed = preprocess.preprocess(cap, params)
    assert placed.positions == "biosemi128 (recognised from the channel names)"
    produced = montage_soundness.compare(original, placed)
    assert len(produced) >= 55
    assert np.median([r for r, _ in produced.values()]) > 0.9


def test_data_prep_records_the_mapping_in_the_manifest(mmidb, tmp_path):
    import json

    from data_prep import __main__ as cli

    raw, params, original = mmidb
    copy, origin = montage_soundness.position_only_copy(raw, keep_every=2)
    copy.save(tmp_path / "S001R04_cap_raw.fif", verbose="error")
    out = tmp_path / "out"
    assert cli.main([str(tmp_path / "S001R04_cap_raw.fif"), "--out", str(out), "--window", "4", "--notch", "60",
                     "--channel-method", "nearest", "--quiet"]) == 0
    entry = json.loads((out / "manifest.json").read_text())["files"][0]
    assert len(entry["channels_kept"]) == 32 and entry["notes"] == [
        "32 vocabulary channels placed by electrode position (the file's digitisation)"]
    assert [m["name"] for m in entry["channel_mapping"]] == entry["channels_kept"]
    assert all(m["method"] == "nearest" and origin[m["sources"][0]] == m["name"] and m["distance_mm"] < 0.1
               for m in entry["channel_mapping"])
    assert json.loads((out / "manifest.json").read_text())["montage"]["method"] == "nearest"
    assert cli.main([str(tmp_path / "S001R04_cap_raw.fif"), "--out", str(out / "x"), "--montage", "nope"]) == 2
