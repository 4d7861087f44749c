"""The LaBraM channel vocabulary and the mapping of real-world channel names onto it.

The spatial-embedding table of every LaBraM model has 129 rows: row 0 belongs to the
cls token and row ``i + 1`` to ``VOCABULARY[i]`` (LABRAM.md section 2). Recordings
name their electrodes in many spellings (``EEG Fp1-REF``, ``Fc5.``, ``FP1-A1`` ...);
:func:`normalize` maps one name to the vocabulary or says why it cannot, and
:func:`map_channels` does a whole montage, reporting every channel it drops.

Nothing is guessed: old and new 10-20 names stay distinct (T3 is not T7), bipolar
derivations other than the eight in the vocabulary are refused, and BioSemi
"ABC" cap labels (A1..H32), which collide with 10-20 names, are refused as a montage.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np

# LABRAM.md section 2, in table order (row = index + 1).
VOCABULARY: tuple[str, ...] = tuple(
    """
    FP1 FPZ FP2 AF9 AF7 AF5 AF3 AF1 AFZ AF2 AF4 AF6 AF8 AF10
    F9 F7 F5 F3 F1 FZ F2 F4 F6 F8 F10
    FT9 FT7 FC5 FC3 FC1 FCZ FC2 FC4 FC6 FT8 FT10
    T9 T7 C5 C3 C1 CZ C2 C4 C6 T8 T10
    TP9 TP7 CP5 CP3 CP1 CPZ CP2 CP4 CP6 TP8 TP10
    P9 P7 P5 P3 P1 PZ P2 P4 P6 P8 P10
    PO9 PO7 PO5 PO3 PO1 POZ PO2 PO4 PO6 PO8 PO10
    O1 OZ O2 O9 CB1 CB2 IZ O10 T3 T5 T4 T6 M1 M2 A1 A2
    CFC1 CFC2 CFC3 CFC4 CFC5 CFC6 CFC7 CFC8
    CCP1 CCP2 CCP3 CCP4 CCP5 CCP6 CCP7 CCP8
    T1 T2 FTT9h TTP7h TPP9h FTT10h TPP8h TPP10h
    FP1-F7 F7-T7 T7-P7 P7-O1 FP2-F8 F8-T8 T8-P8 P8-O2
    """.split()
)
assert len(VOCABULARY) == 128

NUM_SPATIAL_ROWS = len(VOCABULARY) + 1  # + the cls row 0
CLS_ROW = 0

_ROW_BY_KEY = {name.upper(): i + 1 for i, name in enumerate(VOCABULARY)}

# Electrodes used as references; "X-REF", "X-A1", "X-LE" mean channel X.
REFERENCE_LABELS = frozenset(
    "REF LE RE AR AVG AV CAR A1 A2 M1 M2 A1A2 M1M2 LM RM EAR EARS LINKED".split()
)
_EAR_ELECTRODES = frozenset({"A1", "A2", "M1", "M2"})
# Prefixes that name the signal type rather than the electrode.
_TYPE_PREFIX = re.compile(r"^(EEG|EEG:|EEG_)\s*", re.IGNORECASE)
# MNE renames duplicate labels "X" to "X-0", "X-1": the suffix is not part of the name.
_MNE_DUPLICATE_SUFFIX = re.compile(r"-\d+$")
# BioSemi ABC caps label electrodes A1..A32, B1..B32, ...: letters that never start
# a 10-20 electrode name give the layout away.
_BIOSEMI_ABC = re.compile(r"^[A-H]\d{1,2}$")
_BIOSEMI_ONLY_LETTERS = frozenset("BDEGH")


@dataclasses.dataclass(frozen=True)
class ChannelName:
    """The outcome of normalising one channel name.

    Attributes:
      original: the name as the file spells it.
      name: the vocabulary name (``VOCABULARY`` spelling) or None if unmappable.
      row: the spatial-table row (1..128), or None.
      reason: why the name could not be mapped ("" when it was).
    """

    original: str
    name: str | None
    row: int | None
    reason: str = ""


def spatial_row(name: str) -> int:
    """The spatial-table row (1..128) of a vocabulary name (any case).

    Raises:
      KeyError: with a message, if ``name`` is not a vocabulary name; use
        :func:`normalize` for names as files spell them.
    """
    try:
        return _ROW_BY_KEY[name.upper()]
    except KeyError:
        raise KeyError(
            f"{name!r} is not in the LaBraM channel vocabulary; normalise file names "
            "with labram_jax.channels.normalize() first"
        ) from None


def _canonical(key: str) -> str:
    return VOCABULARY[_ROW_BY_KEY[key] - 1]


def normalize(name: str, aliases: Mapping[str, str] | None = None) -> ChannelName:
    """Maps one channel name as a recording spells it onto the vocabulary.

    Handles a signal-type prefix (``EEG Fp1``), trailing BCI2000 dots (``Fc5.``,
    ``C3..``), any case, reference suffixes (``Fp1-REF``, ``FP1-LE``, ``FP1-A1``)
    and MNE's duplicate-label suffix (``F1-Ref-0``). The eight bipolar names of the
    vocabulary are matched as such; any other derivation is refused.

    Args:
      name: the channel name.
      aliases: optional user mapping (any case) from a name, as the file spells it
        or after cleaning, to a vocabulary name; it is consulted first.

    Returns:
      A :class:`ChannelName`; ``name`` is None and ``reason`` says why when the
      channel has no row in the table.
    """
    original = name
    if aliases:
        table = {k.strip().upper(): v for k, v in aliases.items()}
        for candidate in (name.strip().upper(), _clean(name)):
            if candidate in table:
                target = table[candidate]
                if target.upper() not in _ROW_BY_KEY:
                    return ChannelName(original, None, None,
                                       f"alias target {target!r} is not a vocabulary name")
                return ChannelName(original, _canonical(target.upper()), spatial_row(target))
    key = _clean(name)
    if not key:
        return ChannelName(original, None, None, "empty channel name")
    if key in _ROW_BY_KEY:
        return ChannelName(original, _canonical(key), _ROW_BY_KEY[key])
    stripped = _MNE_DUPLICATE_SUFFIX.sub("", key)
    for candidate in dict.fromkeys((key, stripped)):
        if candidate in _ROW_BY_KEY:
            return ChannelName(original, _canonical(candidate), _ROW_BY_KEY[candidate])
        if "-" in candidate:
            head, _, tail = candidate.partition("-")
            head, tail = head.strip(), tail.strip()
            if tail in REFERENCE_LABELS:
                if head in _EAR_ELECTRODES and tail in _EAR_ELECTRODES:
                    return ChannelName(original, None, None,
                                       f"reference-difference channel {head}-{tail}")
                if head in _ROW_BY_KEY:
                    return ChannelName(original, _canonical(head), _ROW_BY_KEY[head])
            elif head in _ROW_BY_KEY and tail.rstrip(".") in _ROW_BY_KEY:
                return ChannelName(original, None, None,
                                   f"bipolar derivation {head}-{tail} is not in the vocabulary")
    return ChannelName(original, None, None, f"{key!r} is not a 10-20/10-10 name in the vocabulary")


def _clean(name: str) -> str:
    key = _TYPE_PREFIX.sub("", name.strip()).strip()
    return key.rstrip(".").strip().upper()


@dataclasses.dataclass(frozen=True)
class ChannelMapping:
    """A montage mapped onto the vocabulary.

    Attributes:
      indices: positions (into the input names) of the kept channels, in input order.
      names: their vocabulary names.
      rows: their spatial-table rows, int32 ``[len(indices)]``.
      dropped: ``(original name, reason)`` of every channel not kept.
    """

    indices: tuple[int, ...]
    names: tuple[str, ...]
    rows: np.ndarray
    dropped: tuple[tuple[str, str], ...]


def map_channels(names: Sequence[str], aliases: Mapping[str, str] | None = None) -> ChannelMapping:
    """Maps a montage: keeps mappable channels, the first of any duplicate, in order.

    A montage labelled with BioSemi ABC cap positions (A1..A32, B1..B32 ...) is refused
    as a whole unless ``aliases`` maps it, since its "C3" or "A1" are not 10-20 sites.
    """
    names = [str(n) for n in names]
    if not aliases and _looks_like_biosemi_abc(names):
        reason = ("BioSemi ABC cap label (A1..H32 are cap positions, not 10-20 names): pass --montage with the "
                  "cap's layout (e.g. biosemi128) to place it by position, or a channel mapping file")
        return ChannelMapping((), (), np.zeros((0,), np.int32),
                              tuple((n, reason) for n in names))
    indices, kept, rows, dropped = [], [], [], []
    for i, raw in enumerate(names):
        result = normalize(raw, aliases)
        if result.name is None:
            dropped.append((raw, result.reason))
        elif result.name in kept:
            dropped.append((raw, f"duplicate of an earlier channel mapped to {result.name}"))
        else:
            indices.append(i)
            kept.append(result.name)
            rows.append(result.row)
    return ChannelMapping(tuple(indices), tuple(kept), np.asarray(rows, np.int32), tuple(dropped))


def _looks_like_biosemi_abc(names: Sequence[str]) -> bool:
    cleaned = [_clean(n) for n in names]
    abc = [n for n in cleaned if _BIOSEMI_ABC.match(n)]
    return len(abc) >= 32 and any(n[0] in _BIOSEMI_ONLY_LETTERS for n in abc)


def _mirror_name(name: str) -> str:
    """The left-right mirror of a vocabulary name: odd electrode numbers (left) and even ones
    (right) swap, every number of a bipolar pair alike (C3 -> C4, FP2-F8 -> FP1-F7,
    FTT9h -> FTT10h); midline names (no number) are their own mirror."""
    return re.sub(r"\d+", lambda m: str(int(m.group()) + (1 if int(m.group()) % 2 else -1)), name)


def mirrored_rows() -> np.ndarray:
    """Spatial-table row -> the row of its left-right mirror electrode, int32 ``[129]``.

    Row 0 (cls, and padding in batches) stays 0, midline electrodes keep their row, and a
    name whose mirror is not in the vocabulary (TTP7h, TPP8h) maps to -1.
    """
    rows = np.zeros((NUM_SPATIAL_ROWS,), np.int32)
    for i, name in enumerate(VOCABULARY):
        rows[i + 1] = _ROW_BY_KEY.get(_mirror_name(name).upper(), -1)
    return rows


def input_rows(names: Sequence[str]) -> np.ndarray:
    """Spatial-table rows of vocabulary names with the cls row first, like the
    reference's ``input_chans``: int32 ``[1 + len(names)]``."""
    return np.asarray([CLS_ROW] + [spatial_row(n) for n in names], np.int32)
