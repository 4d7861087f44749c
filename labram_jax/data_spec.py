"""Data specs: which records a run reads, parsed once.

A spec names ``manifest.json`` files (their split), globs of manifests (one dataset each),
shard globs, or several of these joined by ``+``, each optionally weighted with ``@w``;
paths may be local or URLs (``gs://...``, listed through ``etils.epath``). ``DataSpec.parse``
turns the text into parts, ``resolve`` into sources (shards and weights of a split), and
``label_frequencies`` reads the label counts that class weights need, ``subject_centring``
whether the records are subject-centred (``python -m data_prep.centring``).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from labram_jax import records
from labram_jax import subject_centring as centring_lib


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset: its shard files and sampling weight."""

    shards: tuple[str, ...]
    weight: float = 1.0
    name: str = ""


_GLOB_CHARS = "*?["


def expand(pattern: str) -> list[str]:
    """Paths matching ``pattern`` (sorted): local (``**`` recursive) or a remote URL such as
    ``gs://bucket/shards/*/manifest.json``, listed through ``etils.epath`` (the filesystem layer
    Grain uses; remote schemes need their backend installed, e.g. ``gcsfs`` for gs://). A pattern
    without wildcards is returned as is if it exists."""
    if "://" not in pattern:
        if not any(c in pattern for c in _GLOB_CHARS):
            return [pattern] if os.path.exists(pattern) else []
        return sorted(glob.glob(pattern, recursive=True))
    if not any(c in pattern for c in _GLOB_CHARS):
        return [pattern] if epath.Path(pattern).exists() else []
    scheme, rest = pattern.split("://", 1)
    parts = rest.split("/")
    first = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
    base = epath.Path(f"{scheme}://" + "/".join(parts[:first]))
    return sorted(str(p) for p in base.glob("/".join(parts[first:])))


def _read_manifest(path: str, split: str) -> Source:
    manifest = json.loads(epath.Path(path).read_text())
    if manifest.get("schema_version") != records.SCHEMA_VERSION:
        raise ValueError(f"{path} has record schema {manifest.get('schema_version')}, this labram_jax "
                         f"reads {records.SCHEMA_VERSION}: re-run data_prep")
    if split not in manifest["splits"]:
        raise ValueError(f"{path} has no split {split!r} (it has {sorted(manifest['splits'])})")
    root = epath.Path(path if "://" in path else os.path.abspath(path)).parent
    shards = tuple(str(root / s) for s in manifest["splits"][split]["shards"])
    return Source(shards, 1.0, manifest.get("dataset", path))


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """A data spec, parsed once: ``manifest.json`` (its split), a glob of manifests (one dataset
    each), a shard glob, or several separated by ``+``, each optionally followed by ``@weight``.
    Paths may be local or URLs (``gs://...``, see :func:`expand`).

    Example: ``data/tuh/manifest.json@3+data/eegmat/manifest.json@1``,
    ``gs://bucket/shards/*/manifest.json``.
    """

    parts: tuple[tuple[str, float], ...]  # (path or glob, sampling weight)

    @classmethod
    def parse(cls, spec: "str | DataSpec") -> "DataSpec":
        if isinstance(spec, DataSpec):
            return spec
        parts = []
        for part in [p for p in str(spec).split("+") if p]:
            path, _, weight = part.partition("@")
            try:
                value = float(weight or 1.0)
            except ValueError:
                raise ValueError(f"data spec {spec!r}: the weight {weight!r} of {path} is not a number") from None
            if not value > 0:
                raise ValueError(f"data spec {spec!r}: the weight of {path} must be positive, got {weight}")
            parts.append((path, value))
        if not parts:
            raise ValueError("empty data spec: set config.data.train / config.data.val")
        return cls(tuple(parts))

    def __str__(self) -> str:
        return "+".join(f"{path}@{weight:g}" if weight != 1.0 else path for path, weight in self.parts)

    @property
    def manifests(self) -> list[str]:
        """The manifest paths (or globs) of the spec."""
        return [path for path, _ in self.parts if path.endswith(".json")]

    def sources(self, split: str = "train") -> list[Source]:
        """The datasets of ``split``: their shards and weights."""
        sources = []
        for path, weight in self.parts:
            if path.endswith(".json"):
                manifests = expand(path)
                if not manifests:
                    raise FileNotFoundError(f"manifest {path} not found: run python -m data_prep first")
                found = [_read_manifest(m, split) for m in manifests]
            else:
                found = [Source(tuple(expand(path)), 1.0, path)]
            for source in found:
                if not source.shards:
                    raise FileNotFoundError(f"no shards for {path!r} (split {split!r})")
                sources.append(dataclasses.replace(source, weight=weight))
        return sources


Data = str | DataSpec | Sequence[Source]  # a data spec, as text or parsed, or its sources


def resolve(data: Data, split: str = "train") -> list[Source]:
    """The sources of a data spec (text or parsed), or the sources themselves."""
    if isinstance(data, (list, tuple)) and all(isinstance(s, Source) for s in data):
        return list(data)
    return DataSpec.parse(data).sources(split)


def label_frequencies(spec: "str | DataSpec", split: str = "train") -> tuple[list[str], np.ndarray]:
    """(label names, frequency of each label in the training stream) from the manifests'
    ``by_label`` counts, with datasets mixed by their ``@weight`` as :class:`GlobalOrder` does.

    Needs manifests (not bare shard globs) that share one label list.
    """
    names, mix = None, []
    for path, weight in DataSpec.parse(spec).parts:
        if not path.endswith(".json"):
            raise ValueError(f"class weights need label counts from a manifest; {path!r} is not one: point "
                             "config.data.train at data_prep's manifest.json, or give explicit weights")
        paths = expand(path)
        if not paths:
            raise FileNotFoundError(f"class weights need the manifest {path!r}, which does not exist: run data_prep "
                                    "first or fix config.data.train (relative paths are from the working directory)")
        for manifest_path in paths:
            manifest = json.loads(epath.Path(manifest_path).read_text())
            found = manifest.get("labels", {}).get("names") or []
            if names is None:
                names = found
            elif found != names:
                raise ValueError(f"{manifest_path} labels {found} differ from {names}: class weights need one "
                                 "label list across the datasets of config.data.train")
            counts = manifest["splits"].get(split, {}).get("by_label", {})
            total = sum(counts.values())
            if total:
                mix.append((weight, np.asarray([counts.get(n, 0) for n in found], np.float64) / total))
    if not names or not mix:
        raise ValueError(f"no labelled {split!r} windows in the manifests of {spec!s}")
    weights = np.asarray([w for w, _ in mix])
    return names, sum(w * f for w, f in zip(weights / weights.sum(), (f for _, f in mix)))


def subject_centring(spec: "str | DataSpec") -> dict | None:
    """The ``subject_centring`` setting (:func:`labram_jax.subject_centring.canonical`, e.g.
    ``{"band_hz": [lo, hi]}`` or ``{"method": "euclidean"}``) that every manifest of ``spec`` shares, or None
    when none is centred. Bare shard globs carry no manifest and are not counted. Raises a
    ValueError naming the manifests when differently prepared records would be mixed: a model
    must see one kind of input."""
    found: dict[str, str] = {}
    settings: dict[str, dict | None] = {}
    for path, _ in DataSpec.parse(spec).parts:
        if path.endswith(".json"):
            for manifest_path in expand(path):
                entry = json.loads(epath.Path(manifest_path).read_text()).get("subject_centring")
                setting = centring_lib.canonical(entry)
                found[manifest_path] = json.dumps(setting)
                settings[found[manifest_path]] = setting
    if len(settings) > 1:
        described = ", ".join(f"{path}: " + (centring_lib.describe(settings[key]) if settings[key] else "not centred")
                              for path, key in found.items())
        raise ValueError(f"{spec!s} mixes records prepared differently ({described}); centre every conversion the same "
                         "way (python -m data_prep.centring MANIFEST --out DIR [--method ...]) or none")
    return next(iter(settings.values())) if settings else None


def check_centring_matches(trained_on: dict | None, spec: "str | DataSpec", what: str) -> None:
    """Raises a ValueError saying what to do unless the records of ``spec`` (``what`` names
    them: "config.data.val", "--data") are subject-centred exactly when the model's training
    records were (``trained_on``: their :func:`subject_centring`)."""
    found = subject_centring(spec)
    if found != trained_on:
        trained = centring_lib.describe(trained_on) if trained_on else "not centred"
        raise ValueError(f"the training records are {trained} "
                         f"but {what} ({spec!s}) {'is ' + centring_lib.describe(found) if found else 'is not'}: use "
                         "records prepared like the training ones (python -m data_prep.centring with the same "
                         "--method on both, or on neither)")
