"""The record schema: exact round trips, precision options and clear decode errors."""

import math

import msgpack
import numpy as np
import pytest

from labram_jax import records


def _record(dtype=np.float32):
    rng = np.random.default_rng(0)
    return records.Record(signal=rng.normal(size=(3, 2, 200)).astype(dtype), channel_ids=np.array([1, 40, 128]),
                          label=2, label_name="arithmetic", dataset="eegmat", recording="Subject00_2",
                          subject="00", start_s=5.0, sfreq_in=500.0)


def test_round_trip_float32_is_exact():
    rec = _record()
    back = records.decode(records.encode(rec))
    np.testing.assert_array_equal(back.signal, rec.signal)
    np.testing.assert_array_equal(back.channel_ids, rec.channel_ids)
    assert (back.label, back.label_name, back.dataset, back.recording, back.subject, back.start_s, back.sfreq_in) == (
        2, "arithmetic", "eegmat", "Subject00_2", "00", 5.0, 500.0)
    assert math.isnan(back.value) and back.num_channels == 3 and back.num_windows == 2


def test_float16_storage_is_half_the_size_and_close():
    rec = _record()
    small = records.encode(rec, "float16")
    assert len(small) < 0.6 * len(records.encode(rec))
    np.testing.assert_allclose(records.decode(small).signal, rec.signal, rtol=1e-3, atol=1e-3)


def test_schema_mismatch_and_garbage_are_record_errors():
    data = msgpack.unpackb(records.encode(_record()))
    data["schema"] = 99
    with pytest.raises(records.RecordError, match="schema version 99"):
        records.decode(msgpack.packb(data))
    for junk in (b"", b"\x00\x01garbage", records.encode(_record())[:-10]):
        with pytest.raises(records.RecordError):
            records.decode(junk)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="channels, windows, 200"):
        records.encode(records.Record(signal=np.zeros((3, 199)), channel_ids=np.arange(3)))
    with pytest.raises(ValueError, match="channel_ids"):
        records.encode(records.Record(signal=np.zeros((3, 1, 200)), channel_ids=np.arange(2)))
