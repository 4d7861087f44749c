"""``manifest.json``: what a folder of records holds and how it was made.

Written by data_prep (one entry per input file) and by the scikit-learn estimator (one per
call of ``fit``); read by ``input_pipeline`` (splits and shards), class weights (label counts)
and the benchmarks. Shard paths are relative to the manifest's folder.
"""

from __future__ import annotations

import datetime

from labram_jax import records


def build(outcomes: list[dict], extra: dict, tool: str) -> dict:
    """The manifest of a conversion: ``extra`` (dataset, parameters, labels ...), the splits
    (shards, windows, recordings, subjects and windows by label of each), totals, and every
    file's outcome (``status`` ok / skipped / failed, ``split``, ``subject``, ``shard``,
    ``windows``, ``label_counts`` ...), written by ``tool``."""
    splits: dict[str, dict] = {}
    for o in outcomes:
        if o["status"] != "ok":
            continue
        s = splits.setdefault(o["split"], {"shards": [], "windows": 0, "by_label": {}, "recordings": 0,
                                           "subjects": set()})
        s["shards"].append(o["shard"])
        s["windows"] += o["windows"]
        s["recordings"] += 1
        s["subjects"].add(o["subject"])
    by_label = count_labels(outcomes)
    for name, s in splits.items():
        s["subjects"] = sorted(s["subjects"])
        s["by_label"] = by_label.get(name, {})
    status = [o["status"] for o in outcomes]
    return {
        "schema_version": records.SCHEMA_VERSION,
        "tool": tool,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
        "splits": splits,
        "totals": {"files": len(outcomes), "not_read": len(extra.get("not_read", ())),
                   "ok": status.count("ok"), "skipped": status.count("skipped"),
                   "failed": status.count("failed"), "windows": sum(o["windows"] for o in outcomes),
                   "hours_in": sum(o.get("duration_s", 0.0) for o in outcomes if o["status"] == "ok") / 3600},
        "files": outcomes,
    }


BUILT = ("schema_version", "tool", "created", "splits", "totals", "files")  # what build() writes itself


def extra_of(manifest: dict) -> dict:
    """The ``extra`` a manifest was built with (dataset, parameters, labels ...): what a tool
    that rewrites a manifest from its ``files`` (folds, centring) passes on to :func:`build`."""
    return {k: v for k, v in manifest.items() if k not in BUILT}


def count_labels(outcomes: list[dict]) -> dict[str, dict[str, int]]:
    """Windows per split and label, read back from the written shards."""
    counts: dict[str, dict[str, int]] = {}
    for o in outcomes:
        if o["status"] != "ok" or "label_counts" not in o:
            continue
        split = counts.setdefault(o["split"], {})
        for name, n in o["label_counts"].items():
            split[name] = split.get(name, 0) + n
    return counts
