"""Several local processes (jax.distributed on localhost, gloo CPU collectives) = one process; a
checkpoint written by 4 processes resumes on 2 and on 1."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from labram_jax import metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, manifest, devices_per_process, num_processes, extra=(), stage="finetune"):
    """Runs a tiny ``stage`` for 4 steps (logging every step) with ``num_processes`` cooperating processes."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
    data = [f"--config.data.train={manifest}"]
    if stage == "finetune":
        data += [f"--config.data.val={manifest}", "--config.eval_every=4", "--config.model.drop_path=0.0"]
    args = [sys.executable, "-m", "labram_jax.main", f"--config=configs/tiny.py:{stage}", f"--workdir={workdir}",
            *data, "--config.optim.total_steps=4", "--config.log_every=1", *extra]
    port = _free_port()
    logs, procs = [], []
    for i in range(num_processes):
        cmd = args if num_processes == 1 else args + [
            f"--coordinator=127.0.0.1:{port}", f"--num_processes={num_processes}", f"--process_id={i}"]
        logs.append(pathlib.Path(f"{workdir}.process{i}.log"))
        with open(logs[-1], "w") as log:  # files, not pipes: a full pipe would stall a process
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = [log.read_text() for log in logs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _series(workdir, key):
    rows = metrics.read_jsonl(str(pathlib.Path(workdir) / "metrics.jsonl"))
    return [r[key] for r in sorted(rows, key=lambda r: r["step"]) if key in r]


def test_two_processes_equal_one(eegmat_shards, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(one, eegmat_shards, 8, 1)
    outputs = _launch(two, eegmat_shards, 4, 2)
    assert "process 1/2" in outputs[1]
    np.testing.assert_allclose(_series(two, "train/loss"), _series(one, "train/loss"), rtol=2e-4)
    assert _series(two, "val/auroc") == pytest.approx(_series(one, "val/auroc"), rel=1e-4)
    assert (two / "model.npz").exists()


@pytest.fixture(scope="module")
def tiny_tokenizer(eegmat_shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tokenizer")
    _launch(workdir, eegmat_shards, 8, 1, stage="tokenizer")
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["tokenizer", "pretrain", "finetune"])
def test_two_and_four_processes_equal_one_for_every_stage(stage, eegmat_shards, tiny_tokenizer, tmp_path):
    extra = [f"--config.pretrain.tokenizer_checkpoint={tiny_tokenizer}"] if stage == "pretrain" else []
    losses = {}
    for processes in (1, 2, 4):
        workdir = tmp_path / f"p{processes}"
        outputs = _launch(workdir, eegmat_shards, 8 // processes, processes, extra, stage=stage)
        assert f"process {processes - 1}/{processes}" in outputs[-1]
        losses[processes] = _series(workdir, "train/loss")
        assert len(losses[processes]) == 4 and (workdir / "model.npz").exists()
    np.testing.assert_allclose(losses[2], losses[1], rtol=2e-4)
    np.testing.assert_allclose(losses[4], losses[1], rtol=2e-4)


@pytest.mark.slow
def test_checkpoint_of_four_processes_resumes_on_two_then_one(eegmat_shards, tmp_path):
    reference = tmp_path / "reference"
    _launch(reference, eegmat_shards, 8, 1)
    workdir = tmp_path / "moving"
    _launch(workdir, eegmat_shards, 2, 4, ["--config.stop_after=2"])  # steps 1-2 on 4 processes, then saves
    _launch(workdir, eegmat_shards, 4, 2, ["--config.stop_after=1"])  # step 3 on 2 processes
    outputs = _launch(workdir, eegmat_shards, 8, 1)  # step 4 on 1 process
    assert "resumed from" in outputs[0]
    np.testing.assert_allclose(_series(workdir, "train/loss"), _series(reference, "train/loss"), rtol=2e-4)
    assert _series(workdir, "val/balanced_accuracy") == pytest.approx(_series(reference, "val/balanced_accuracy"))
