"""Bad numbers and bad records: non-finite steps per policy, the input guard, config errors."""

import dataclasses
import json
import logging
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from array_record.python import array_record_module

from labram_jax import config_schema, input_pipeline, model_file, records, train
from tests.integration.test_train import tiny_config


def _good_records(manifest, n):
    root = pathlib.Path(manifest).parent
    shards = json.loads(pathlib.Path(manifest).read_text())["splits"]["train"]["shards"]
    reader = array_record_module.ArrayRecordReader(str(root / shards[0]))
    out = [records.decode(reader.read([i])[0]) for i in range(n)]
    reader.close()
    return out


def _write(path, payloads):
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    for p in payloads:
        writer.write(p)
    writer.close()


@pytest.fixture(scope="module")
def poisoned(eegmat_shards, tmp_path_factory):
    """16 real records with regression targets; one has a finite but absurd amplitude (1e38 x 100 uV)
    and target (1e30): its squared error overflows, deterministically."""
    out = tmp_path_factory.mktemp("poisoned") / "train.arrayrecord"
    recs = [dataclasses.replace(r, value=float(r.label)) for r in _good_records(eegmat_shards, 16)]
    payloads = [records.encode(r) for r in recs]
    bad = input_pipeline.GlobalOrder([16], [1.0], seed=0)(12)[1]  # the record at position 12: step 2 of batch 8
    r = recs[bad]
    big = r.signal / np.abs(r.signal).max() * 1e38
    payloads[bad] = records.encode(dataclasses.replace(r, signal=big.astype(np.float32), value=1e30,
                                                       recording="poisoned_recording", start_s=12.0))
    _write(out, payloads)
    return str(out)


def test_nonfinite_stop_names_step_batch_and_checkpoint(poisoned, tmp_path):
    cfg = tiny_config("finetune", poisoned, **{"optim.total_steps": 6, "log_every": 1, "nonfinite_policy": "stop",
                                               "checkpoint_every": 1, "finetune.task": "regression",
                                               "finetune.best_metric": "pearson_r"})
    with pytest.raises(train.NonFiniteError) as err:
        train.run(cfg, str(tmp_path))
    message = str(err.value)
    assert "at step 2 " in message and "poisoned_recording@12.0s (peak 1e+40 uV)" in message, message
    step = 2
    assert "Last good checkpoint: step 1" in message
    listed = json.loads((tmp_path / f"nonfinite_step_{step}.json").read_text())
    assert len(listed) == 8 and any(e["recording"] == "poisoned_recording" for e in listed)
    # Nothing non-finite was ever saved.
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) < step


@pytest.mark.parametrize("devices", [8, 1])  # 1: the optimizer step in C++ (optim.implementation auto)
def test_nonfinite_skip_counts_and_keeps_parameters_finite(poisoned, tmp_path, devices):
    regression = {"finetune.task": "regression", "finetune.best_metric": "pearson_r"}
    cfg = tiny_config("finetune", poisoned, **{"optim.total_steps": 8, "log_every": 1, "nonfinite_policy": "skip",
                                               "mesh.data": devices, **regression})
    result = train.run(cfg, str(tmp_path), devices=jax.devices()[:devices])
    assert result["skipped_steps"] >= 1 and result["step"] == 8
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    flags = [r["train/finite"] for r in rows if "train/finite" in r]
    assert flags.count(0.0) == result["skipped_steps"] and flags.count(1.0) == 8 - result["skipped_steps"]
    _, _, variables = model_file.load(str(tmp_path / "model.npz"))
    assert all(np.isfinite(v).all() for v in _leaves(variables["params"]))
    if devices == 1:
        return
    # Over the limit, skipping turns into stopping.
    cfg = tiny_config("finetune", poisoned, **{"optim.total_steps": 8, "nonfinite_policy": "skip",
                                               "max_skipped_steps": 0, **regression})
    with pytest.raises(train.NonFiniteError, match="skipped updates > config.max_skipped_steps=0"):
        train.run(cfg, str(tmp_path / "strict"))


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield np.asarray(tree)


@pytest.fixture(scope="module")
def damaged(eegmat_shards, tmp_path_factory):
    """8 records: good ones, and at 2, 3, 6 an undecodable one, a NaN signal and a future schema."""
    out = tmp_path_factory.mktemp("damaged") / "train.arrayrecord"
    recs = _good_records(eegmat_shards, 8)
    payloads = [records.encode(r) for r in recs]
    payloads[2] = b"\x93not a record"
    nan = recs[3].signal.copy()
    nan[0, 0, 7] = np.nan
    payloads[3] = records.encode(records.Record(nan, recs[3].channel_ids, recording="nan_recording"))
    payloads[6] = payloads[6].replace(b"\xa6schema\x01", b"\xa6schema\x02")
    assert payloads[6] != records.encode(recs[6])
    _write(out, payloads)
    return str(out), recs


def test_input_guard_skips_and_reports_bad_records(damaged, caplog):
    spec, recs = damaged
    grid = input_pipeline.Grid(23, 4)
    guard = input_pipeline.InputGuard(spec, "train")
    it = input_pipeline.train_iterator(spec, grid, 8, seed=0)
    seen = []
    with caplog.at_level(logging.WARNING, logger="labram_jax"):
        for _ in range(3):  # three epochs' worth
            batch = next(it)
            guard.take(batch)
            assert np.isfinite(batch["x"]).all()
            seen += [batch["x"][j, :, :1, :5].tobytes() for j in range(8)]
    good = {i for i in range(8) if i not in (2, 3, 6)}
    expected = {grid.place(recs[i])["x"][:, :1, :5].tobytes() for i in good}
    assert set(seen) == expected  # only good records were fed
    # Per epoch: record 2's slot skips 2 and 3 (then 4), record 3's skips 3, record 6's skips 6.
    assert guard.count == 12
    text = caplog.text
    assert "skipped record 2 of" in text and "undecodable record" in text
    assert "skipped record 3 of" in text and "1 non-finite values in the signal" in text
    assert "skipped record 6 of" in text and "record schema version 2" in text

    batch = next(input_pipeline.eval_batches(spec, grid, 8, split="train"))
    fields = input_pipeline.InputGuard(spec, "train").take(batch)
    assert batch["valid"].tolist() == [i not in (2, 3, 6) for i in range(8)]
    assert fields["bad_records"].tolist() == [int(i in (2, 3, 6)) for i in range(8)]


def test_training_over_damaged_records_runs(damaged, tmp_path):
    spec, _ = damaged
    result = train.run(tiny_config("finetune", spec, **{"optim.total_steps": 3, "log_every": 1}), str(tmp_path))
    assert result["step"] == 3 and result["bad_records"] >= 3


def _config_error(stage="finetune", devices=8, **overrides):
    cfg = tiny_config(stage, "", **overrides)
    cfg.unlock()
    with pytest.raises(config_schema.ConfigError) as err:
        config_schema.validate(cfg, devices)
    return str(err.value)


@pytest.mark.parametrize("overrides, expected", [
    ({"data.train": ""}, "config.data.train is empty"),
    ({"data.max_windows": 20}, "config.data.max_windows=20: a sample holds 1..16"),
    ({"mesh.data": 3, "mesh.fsdp": 1, "mesh.tensor": 1}, "data x fsdp x tensor = 3 but there are 8 devices"),
    ({"mesh.data": -1, "mesh.fsdp": 3}, "8 devices are not divisible by 3"),
    ({"data.batch_size": 12}, "batch_size=12 is not divisible by data x fsdp = 8"),
    ({"optim.lr": -1.0}, "config.optim.lr=-1.0 must be positive"),
    ({"finetune.task": "segmentation"}, "config.finetune.task='segmentation'"),
    ({"finetune.mode": "lora!"}, "config.finetune.mode='lora!'"),
    ({"finetune.init_checkpoint": "/nonexistent/model.npz"}, "init_checkpoint=/nonexistent/model.npz does not exist"),
    ({"nonfinite_policy": "ignore"}, "config.nonfinite_policy='ignore'"),
    ({"model.dtype": "float16"}, "config.model.dtype='float16'"),
    ({"model.temporal_groups": 3}, "config.model.temporal_groups=3 must divide the 4 temporal-encoder filters"),
    ({"model.patch_embed": "wavelet"}, "config.model.patch_embed='wavelet': choose one of"),
    ({"finetune.channel_drop": 1.0}, "config.finetune.channel_drop=1.0 must be in [0, 1)"),
])
def test_config_errors(overrides, expected, eegmat_shards):
    assert expected in _config_error(**{"data.train": str(eegmat_shards), **overrides})


def test_config_shape_errors(eegmat_shards):
    # A config file that builds its own ConfigDict (no type safety from our defaults).
    d = tiny_config("finetune", eegmat_shards).to_dict()
    d["optim"].update(lr="fast", learning_rate=1e-3)
    d["data"]["batch_size"] = 8.5
    cfg = ml_collections.ConfigDict(d)
    message = str(pytest.raises(config_schema.ConfigError, config_schema.validate, cfg, 8).value)
    assert "3 problems" in message
    assert "config.optim.lr must be float, got str 'fast'" in message
    assert "unknown field config.optim.learning_rate" in message
    assert "config.data.batch_size must be int, got float 8.5" in message
    cfg = tiny_config("pretrain", eegmat_shards)
    assert "needs config.pretrain.tokenizer_checkpoint" in str(
        pytest.raises(config_schema.ConfigError, config_schema.validate, cfg, 8).value)
    cfg.pretrain.tokenizer_checkpoint = "/tmp/no_such_tokenizer_run"
    assert "no model.npz there" in str(pytest.raises(config_schema.ConfigError, config_schema.validate,
                                                     cfg, 8).value)


def test_run_rejects_a_bad_config_before_doing_anything(eegmat_shards, tmp_path):
    cfg = tiny_config("finetune", eegmat_shards, **{"data.batch_size": 12})
    with pytest.raises(config_schema.ConfigError, match="not divisible"):
        train.run(cfg, str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()
