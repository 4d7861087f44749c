"""Data specs with URLs (gs://) are listed through etils.epath: manifests, manifest globs, shard globs.

The bucket is simulated by mapping ``gs://bucket`` onto a local directory with
``etils.epath.testing.mock_epath`` (no network here); reading the shards themselves is ArrayRecord's
job and is not exercised.
"""

import glob
import json
import os

import pytest
from etils.epath import testing

from labram_jax import data_spec, records


@pytest.fixture
def bucket(tmp_path):
    for name, n in (("tuh", 3), ("eegmat", 2)):
        d = tmp_path / "shards" / name
        (d / "shards").mkdir(parents=True)
        shards = [f"shards/train-{i:05d}.arrayrecord" for i in range(n)]
        for s in shards:
            (d / s).write_bytes(b"")
        (d / "manifest.json").write_text(json.dumps({
            "schema_version": records.SCHEMA_VERSION, "dataset": name,
            "splits": {"train": {"shards": shards}}}))
    local = lambda p: str(p).replace("gs://bucket", str(tmp_path))  # noqa: E731
    remote = lambda p: str(p).replace(str(tmp_path), "gs://bucket")  # noqa: E731
    with testing.mock_epath(
            exists=lambda _, p: os.path.exists(local(p)),
            glob=lambda _, p: [remote(x) for x in glob.glob(local(p))],
            open=lambda _, p, mode="r", *a, **k: open(local(p), mode)):
        yield tmp_path


def test_manifest_glob_on_a_bucket_gives_one_source_per_dataset(bucket):
    sources = data_spec.resolve("gs://bucket/shards/*/manifest.json@2")
    assert [s.name for s in sources] == ["eegmat", "tuh"] and all(s.weight == 2.0 for s in sources)
    assert sources[1].shards == tuple(f"gs://bucket/shards/tuh/shards/train-{i:05d}.arrayrecord" for i in range(3))


def test_single_remote_manifest_and_shard_glob(bucket):
    (source,) = data_spec.resolve("gs://bucket/shards/eegmat/manifest.json")
    assert source.shards[0] == "gs://bucket/shards/eegmat/shards/train-00000.arrayrecord"
    (by_glob,) = data_spec.resolve("gs://bucket/shards/tuh/shards/*.arrayrecord")
    assert len(by_glob.shards) == 3 and all(s.startswith("gs://bucket/") for s in by_glob.shards)
    with pytest.raises(FileNotFoundError, match="run python -m data_prep"):
        data_spec.resolve("gs://bucket/shards/missing/manifest.json")


def test_local_manifest_glob(bucket):
    sources = data_spec.resolve(f"{bucket}/shards/*/manifest.json+{bucket}/shards/tuh/manifest.json@3")
    assert [(s.name, s.weight) for s in sources] == [("eegmat", 1.0), ("tuh", 1.0), ("tuh", 3.0)]
    assert sources[0].shards[0] == f"{bucket}/shards/eegmat/shards/train-00000.arrayrecord"
