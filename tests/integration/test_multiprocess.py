"""Two local processes (jax.distributed on localhost, gloo CPU collectives) = one process."""

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


def _launch(workdir, manifest, devices_per_process, num_processes, extra=()):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
    args = [sys.executable, "-m", "labram_jax.main", "--config=configs/tiny.py:finetune", f"--workdir={workdir}",
            f"--config.data.train={manifest}", f"--config.data.val={manifest}", "--config.optim.total_steps=4",
            "--config.log_every=1", "--config.eval_every=4", "--config.model.drop_path=0.0", *extra]
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
