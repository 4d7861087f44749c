"""Channels onto the vocabulary by name and, where names fail, by electrode position.

Many research caps do not name their electrodes in the 10-20/10-10 system: BioSemi (A1..D32),
EGI/Geodesic (E1..E256), numbered caps. Their electrodes still have positions: from the
file's own digitisation, from a standard montage the user names (``biosemi128``,
``GSN-HydroCel-129``, a ``.elc``/``.sfp``/``.bvef`` file, anything
``mne.channels.read_custom_montage`` reads), or recognised from the names (A1..D32 of 128
channels is BioSemi 128, E1..E128 a 129-channel HydroCel net). :func:`plan` turns them into
vocabulary channels, as a matrix applied to the recording's EEG channels:

- by name first (``labram_jax.channels``): such a channel is kept as it is;
- ``nearest``: each vocabulary electrode not present by name takes the nearest position-only
  electrode within ``tolerance_mm`` (each source electrode used once, closest pairs first);
- ``interpolate``: each vocabulary electrode not present by name whose nearest electrode
  lies within ``tolerance_mm`` is interpolated from all the cap's electrodes with spherical
  splines (``mne.io.Raw.interpolate_to``).

Positions are compared on spheres fitted to each montage (the cap's, and the vocabulary's
10-05 template), so distances are angles, reported in mm on a 95-mm head. The
targets are a fixed set of vocabulary electrodes (``TARGETS``). Every output channel's
origin (method, source electrodes, distance) is recorded in the plan.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence

import mne
import numpy as np

from labram_jax import channels

HEAD_RADIUS_MM = 95.0
METHODS = ("interpolate", "nearest")
# Default tolerance per method (mm): neighbouring 10-10 electrodes are 30 mm apart (18 degrees) on a 95-mm
# head. nearest: half of that, so an electrode stands in only for the site it sits on;
# interpolate: a little more than one spacing, so sites between a sparser cap's electrodes are produced but none
# outside the cap.
DEFAULT_TOLERANCE_MM = {"interpolate": 35.0, "nearest": 15.0}
# Vocabulary electrodes that position-only caps are mapped onto. 1020: the 19 electrodes of
# the 10-20 system, named as in the 10-20 recordings LaBraM was pretrained on (T3/T4/T5/T6).
# 1010: the 10-10 electrodes of the vocabulary with modern names (T7/T8/P7/P8), without the
# reference sites (A1/A2/M1/M2) and the rows official weights never trained (the ``h`` names).
TARGETS = {
    "1020": tuple("FP1 FP2 F7 F3 FZ F4 F8 T3 C3 CZ C4 T4 T5 P3 PZ P4 T6 O1 O2".split()),
    "1010": tuple("""FP1 FPZ FP2 AF9 AF7 AF5 AF3 AF1 AFZ AF2 AF4 AF6 AF8 AF10 F9 F7 F5 F3 F1 FZ F2 F4 F6 F8 F10
                     FT9 FT7 FC5 FC3 FC1 FCZ FC2 FC4 FC6 FT8 FT10 T9 T7 C5 C3 C1 CZ C2 C4 C6 T8 T10
                     TP9 TP7 CP5 CP3 CP1 CPZ CP2 CP4 CP6 TP8 TP10 P9 P7 P5 P3 P1 PZ P2 P4 P6 P8 P10
                     PO9 PO7 PO5 PO3 PO1 POZ PO2 PO4 PO6 PO8 PO10 O1 OZ O2 IZ""".split()),
}


@dataclasses.dataclass(frozen=True)
class Options:
    """How channels without a vocabulary name are placed.

    Attributes:
      positions: ``auto``: when most EEG channels have no vocabulary name, their positions
        from the file's digitisation, else from a standard montage recognised from the names;
        ``none``: names only; or an MNE built-in montage name or a montage file, used for
        every channel without a vocabulary name.
      method: ``interpolate`` (spherical splines) or ``nearest`` (nearest electrode).
      tolerance_mm: the largest distance from a vocabulary electrode to the nearest cap
        electrode for it to be produced (None: ``DEFAULT_TOLERANCE_MM`` of the method).
      targets: ``1010`` or ``1020`` (``TARGETS``).
    """

    positions: str = "auto"
    method: str = "interpolate"
    tolerance_mm: float | None = None
    targets: str = "1010"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--channel-method {self.method!r}: choose one of {METHODS}")
        if self.targets not in TARGETS:
            raise ValueError(f"--montage-targets {self.targets!r}: choose one of {sorted(TARGETS)}")
        if self.tolerance_mm is not None and not self.tolerance_mm > 0:
            raise ValueError(f"--montage-tolerance must be positive (mm), got {self.tolerance_mm}")
        if self.positions not in ("auto", "none"):
            montage_positions(self.positions)  # fails early, with what to do

    @property
    def tolerance(self) -> float:
        return DEFAULT_TOLERANCE_MM[self.method] if self.tolerance_mm is None else self.tolerance_mm


@dataclasses.dataclass(frozen=True)
class Plan:
    """Vocabulary channels from a recording's EEG channels: ``data_out = matrix @ data_in``.

    Attributes:
      names: the vocabulary names of the output channels, in order.
      rows: their spatial-table rows, int32 [n_out].
      matrix: [n_out, n_in] float64 weights over the input channels.
      mapping: per output channel ``{"name", "method", "distance_mm"}`` and, by method:
        ``name`` and ``nearest``: ``"sources"`` (the one input channel); ``interpolated``:
        ``"source_count"`` (electrodes it is interpolated from) and ``"nearest"`` (the closest).
      dropped: (input channel, reason) of the input channels no output uses.
      positions: where the positions came from ("" when none were used).
    """

    names: tuple[str, ...]
    rows: np.ndarray
    matrix: np.ndarray
    mapping: tuple[dict, ...]
    dropped: tuple[tuple[str, str], ...]
    positions: str = ""


def fit_sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares sphere through points [n, 3]: (centre [3], radius)."""
    a = np.c_[2.0 * points, np.ones(len(points))]
    solution = np.linalg.lstsq(a, np.sum(points ** 2, axis=1), rcond=None)[0]
    centre = solution[:3]
    return centre, float(np.sqrt(solution[3] + centre @ centre))


def on_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Directions [n, 3] of points from the centre of their fitted sphere."""
    centre, _ = fit_sphere(points)
    offsets = points - centre
    return offsets / np.linalg.norm(offsets, axis=1, keepdims=True)


def angular_mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Great-circle distances [n, m] in mm (on a 95-mm head) between unit vectors a [n, 3], b [m, 3]."""
    return np.arccos(np.clip(a @ b.T, -1.0, 1.0)) * HEAD_RADIUS_MM


@functools.lru_cache(maxsize=1)
def vocabulary_positions() -> dict[str, np.ndarray]:
    """Vocabulary name -> unit direction, from MNE's 10-05 template (``colin27_1005``, called
    ``standard_1005`` before MNE 1.13), for the names it has."""
    builtin = mne.channels.get_builtin_montages()
    montage = mne.channels.make_standard_montage("colin27_1005" if "colin27_1005" in builtin else "standard_1005")
    pos = montage.get_positions()["ch_pos"]
    names = list(pos)
    units = on_unit_sphere(np.asarray([pos[n] for n in names]))
    by_key = {n.upper(): u for n, u in zip(names, units)}
    return {v: by_key[v.upper()] for v in channels.VOCABULARY if v.upper() in by_key}


@functools.lru_cache(maxsize=16)
def montage_positions(name_or_path: str) -> dict[str, np.ndarray]:
    """Channel name (upper case) -> position [3] of an MNE built-in montage or a montage file."""
    if name_or_path in mne.channels.get_builtin_montages():
        montage = mne.channels.make_standard_montage(name_or_path)
    elif os.path.exists(name_or_path):
        try:
            montage = mne.channels.read_custom_montage(name_or_path)
        except Exception as err:  # noqa: BLE001 - MNE raises several types for unreadable files
            raise ValueError(f"--montage {name_or_path}: MNE cannot read it as a montage ({err})") from None
    else:
        raise ValueError(f"--montage {name_or_path!r} is neither an MNE built-in montage "
                         f"({', '.join(mne.channels.get_builtin_montages())}) nor a montage file")
    return {n.upper(): np.asarray(p, np.float64) for n, p in montage.get_positions()["ch_pos"].items()
            if np.all(np.isfinite(p))}


def recognise(names: Sequence[str]) -> str | None:
    """The standard montage a position-only naming scheme implies, or None.

    BioSemi ABC labels (A1..D32: biosemi128; A1..H32: biosemi256) and EGI HydroCel labels
    (E1..E64: GSN-HydroCel-65_1.0; E1..E128: GSN-HydroCel-129; E1..E256: GSN-HydroCel-257),
    when at least three quarters of that montage's labels are there.
    """
    keys = {str(n).strip().upper() for n in names}
    abc = {k for k in keys if len(k) in (2, 3) and k[0] in "ABCDEFGH" and k[1:].isdigit() and 1 <= int(k[1:]) <= 32}
    letters = {k[0] for k in abc}
    if letters <= set("ABCD") and len(abc) >= 96:
        return "biosemi128"
    if len(abc) >= 192:
        return "biosemi256"
    egi = {int(k[1:]) for k in keys if k[:1] == "E" and k[1:].isdigit()}
    for montage, count in (("GSN-HydroCel-257", 256), ("GSN-HydroCel-129", 128), ("GSN-HydroCel-65_1.0", 64)):
        if egi and count // 2 < max(egi) <= count and len(egi) >= 0.75 * count:
            return montage
    return None


def file_positions(info: mne.Info) -> dict[str, np.ndarray]:
    """Channel name (upper case) -> digitised position of the EEG channels that have one
    (empty unless at least 4 do)."""
    montage = info.get_montage()
    if montage is None:
        return {}
    out = {}
    for name, pos in montage.get_positions()["ch_pos"].items():
        pos = np.asarray(pos, np.float64)
        if np.all(np.isfinite(pos)) and np.linalg.norm(pos) > 1e-6:
            out[name.upper()] = pos
    return out if len(out) >= 4 else {}


def plan(names: Sequence[str], options: Options = Options(), info: mne.Info | None = None,
         aliases: Mapping[str, str] | None = None) -> Plan:
    """Maps the EEG channels ``names`` (in order) onto the vocabulary; see the module docstring.

    Args:
      names: the recording's EEG channel names (non-EEG channels already removed).
      options: where positions come from and how they are used.
      info: the recording's ``mne.Info`` (for its digitisation), or None.
      aliases: user name mapping (``--channel-map``), consulted first.
    """
    names = [str(n) for n in names]
    by_name = channels.map_channels(names, aliases)
    named = dict(zip(by_name.indices, by_name.names))
    dropped = dict(zip([i for i in range(len(names)) if i not in named], [r for _, r in by_name.dropped]))
    unmapped = [i for i in range(len(names)) if i not in named and "duplicate" not in dropped.get(i, "")]
    positions, source, rejected = {}, "", ""
    # Positions place the channels without a vocabulary name when asked to (a named montage or
    # file), or, by default, when they are most of the cap (a position-labelled cap).
    wanted = options.positions not in ("auto", "none") or (options.positions == "auto"
                                                            and len(unmapped) > len(named))
    if unmapped and wanted:
        positions, source, rejected = _positions(names, options, info)
    placed = [i for i in unmapped if names[i].strip().upper() in positions]
    if not placed:
        if unmapped and wanted:
            hint = (f"; no electrode position known{' (' + rejected + ')' if rejected else ''}: pass --montage with "
                    "the cap's layout (an MNE montage name or file)")
            for i in unmapped:
                if "--montage" not in dropped[i]:
                    dropped[i] = dropped[i] + (hint if not positions else "; no position for it in " + source)
        return _assemble(names, named, {}, np.zeros((0, len(names))), [], dropped, "")

    # ---- sources (electrodes with positions) and targets (vocabulary electrodes not present by name)
    sources = [i for i in range(len(names)) if names[i].strip().upper() in positions
               and (i in placed or (options.method == "interpolate" and i in named))]
    source_units = on_unit_sphere(np.asarray([positions[names[i].strip().upper()] for i in sources]))
    vocab = vocabulary_positions()
    present = set(named.values())
    targets = [t for t in TARGETS[options.targets] if t not in present and t in vocab]
    distances = angular_mm(np.asarray([vocab[t] for t in targets]), source_units)  # [targets, sources]
    mapping: list[dict] = []
    if options.method == "nearest":
        chosen: dict[int, int] = {}  # target -> source, closest pairs first, each used once
        for t, s in sorted(np.argwhere(distances <= options.tolerance), key=lambda ts: distances[ts[0], ts[1]]):
            if t not in chosen and s not in chosen.values():
                chosen[int(t)] = int(s)
        matrix = np.zeros((len(chosen), len(names)))
        ordered = sorted(chosen)
        for k, t in enumerate(ordered):
            s = chosen[t]
            matrix[k, sources[s]] = 1.0
            mapping.append({"name": targets[t], "method": "nearest", "sources": [names[sources[s]]],
                            "distance_mm": round(float(distances[t, s]), 1)})
        out_targets = [targets[t] for t in ordered]
    else:
        covered = [t for t in range(len(targets)) if distances[t].min() <= options.tolerance]
        weights = _spline_weights(source_units, np.asarray([vocab[targets[t]] for t in covered]))
        matrix = np.zeros((len(covered), len(names)))
        matrix[:, sources] = weights
        for t in covered:
            s = int(distances[t].argmin())
            mapping.append({"name": targets[t], "method": "interpolated", "source_count": len(sources),
                            "nearest": names[sources[s]], "distance_mm": round(float(distances[t, s]), 1)})
        out_targets = [targets[t] for t in covered]
    used = set(np.flatnonzero(np.abs(matrix).sum(axis=0) > 0))
    for i in placed:
        if i not in used:
            dropped[i] = (f"electrode position more than {options.tolerance:g} mm from every free "
                          f"{options.targets} vocabulary electrode" if options.method == "nearest" else
                          "electrode position used by no vocabulary electrode")
        else:
            dropped.pop(i, None)
    return _assemble(names, named, dict(zip(out_targets, matrix)), matrix, mapping, dropped, source)


MIN_SPREAD_DEG = 90.0  # a real cap spans at least this much of the head between its farthest electrodes
MAX_ASPECT = 2.0  # ... and about as far from left to right as from front to back


def head_shape_issue(points: np.ndarray) -> str | None:
    """Why electrode positions [n, 3] (head frame: x right, y front) cannot be a cap on a head,
    or None: they must span at least ``MIN_SPREAD_DEG`` between the farthest two, and spread
    left-right and front-back within a factor ``MAX_ASPECT`` (a 2-D display layout put on a
    sphere, as Neuroscan headers hold, fails)."""
    units = on_unit_sphere(points)
    spread = float(np.degrees(np.arccos(np.clip((units @ units.T).min(), -1.0, 1.0))))
    sx, sy = units[:, 0].std(), units[:, 1].std()
    aspect = max(sx, sy) / max(min(sx, sy), 1e-9)
    if spread < MIN_SPREAD_DEG or aspect > MAX_ASPECT:
        return (f"its electrode positions span {spread:.0f} degrees with a left-right/front-back spread ratio of "
                f"{aspect:.1f}: not positions on a head (a 2-D display layout?)")
    return None


def _positions(names: list[str], options: Options,
               info: mne.Info | None) -> tuple[dict[str, np.ndarray], str, str]:
    """Positions (by upper-case name) for the recording's channels, where they came from, and
    why the file's own positions were not used ("" if they were, or there were none).
    File positions that are no cap on a head (:func:`head_shape_issue`) are not used."""
    if options.positions not in ("auto", "none"):
        return montage_positions(options.positions), f"montage {options.positions}", ""
    rejected = ""
    if info is not None:
        found = file_positions(info)
        issue = head_shape_issue(np.asarray(list(found.values()))) if found else None
        if found and issue is None:
            return found, "the file's digitisation", ""
        rejected = f"the file has positions, but {issue}" if issue else ""
    recognised = recognise(names)
    if recognised:
        return montage_positions(recognised), f"{recognised} (recognised from the channel names)", ""
    return {}, "", rejected


def _spline_weights(sources: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """[n_targets, n_sources] spherical-spline interpolation weights between unit directions
    (MNE's EEG interpolation, through ``Raw.interpolate_to`` applied to the identity)."""
    names = [f"s{i}" for i in range(len(sources))]
    target_names = [f"t{i}" for i in range(len(targets))]
    raw = mne.io.RawArray(np.eye(len(sources)), mne.create_info(names, 1000.0, "eeg"), verbose="error")
    scale = HEAD_RADIUS_MM / 1000.0
    raw.set_montage(mne.channels.make_dig_montage(dict(zip(names, scale * sources)), coord_frame="head"),
                    verbose="error")
    target = mne.channels.make_dig_montage(dict(zip(target_names, scale * targets)), coord_frame="head")
    with mne.utils.use_log_level("error"):
        out = raw.interpolate_to(target, origin=(0.0, 0.0, 0.0), method="spline")
    return out.get_data(picks=target_names)


def _assemble(names, named: dict[int, str], positioned: dict[str, np.ndarray], matrix_positioned: np.ndarray,
              mapping_positioned: list[dict], dropped: dict[int, str], source: str) -> Plan:
    order = sorted(named)
    matrix = np.zeros((len(order) + len(positioned), len(names)))
    mapping = []
    for k, i in enumerate(order):
        matrix[k, i] = 1.0
        mapping.append({"name": named[i], "method": "name", "sources": [names[i]], "distance_mm": 0.0})
    out_names = [named[i] for i in order]
    for k, (target, row) in enumerate(positioned.items()):
        matrix[len(order) + k] = row
        out_names.append(target)
    mapping += mapping_positioned
    rows = np.asarray([channels.spatial_row(n) for n in out_names], np.int32)
    return Plan(tuple(out_names), rows, matrix, tuple(mapping),
                tuple((names[i], reason) for i, reason in sorted(dropped.items())), source)
