"""SIGTERM during training: a final checkpoint, a clean exit, and an exact resume."""

import os
import pathlib
import signal
import subprocess
import sys
import time

from labram_jax import metrics, train
from tests.integration.test_train import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
STEPS = 300


def _losses(workdir):
    rows = metrics.read_jsonl(str(pathlib.Path(workdir) / "metrics.jsonl"))
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def straight_run_and_command(eegmat_shards, tmp_path, steps, checkpoint_every, name):
    """Runs tiny fine-tuning uninterrupted in-process; returns its workdir and the CLI command
    of the same run in ``tmp_path / name`` (to be interrupted)."""
    overrides = {"optim.total_steps": steps, "log_every": 1, "checkpoint_every": checkpoint_every,
                 "model.drop_path": 0.0}
    straight = tmp_path / "straight"
    train.run(tiny_config("finetune", eegmat_shards, **overrides), str(straight))
    cmd = [sys.executable, "-m", "labram_jax.main", "--config=configs/tiny.py:finetune", f"--workdir={tmp_path / name}",
           f"--config.data.train={eegmat_shards}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    return straight, cmd


def test_sigterm_saves_and_resume_equals_uninterrupted(eegmat_shards, tmp_path):
    straight, cmd = straight_run_and_command(eegmat_shards, tmp_path, STEPS, 100000, "preempted")
    workdir = tmp_path / "preempted"
    log_path = tmp_path / "preempted.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline and "step 10/" not in log_path.read_text():
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    text = log_path.read_text()
    assert "SIGTERM: saving a checkpoint at step" in text
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    # Orbax also keeps its first-step checkpoint; the newest one is the SIGTERM save.
    assert 10 <= max(saved) < STEPS and f"saving a checkpoint at step {max(saved)}" in text
    assert not (workdir / "model.npz").exists()

    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert _losses(workdir) == _losses(straight)  # bitwise, across the interruption
    assert (workdir / "model.npz").exists()


def test_sigint_in_process_saves_and_returns(eegmat_shards, tmp_path, caplog):
    """Ctrl-C (SIGINT) during the loop: a checkpoint at the current step, and a normal return."""
    import threading

    metrics_file = tmp_path / "metrics.jsonl"

    def interrupt():
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics_file.exists() and metrics_file.read_text().count("\n") >= 3):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    cfg = tiny_config("finetune", eegmat_shards, **{"optim.total_steps": 5000, "log_every": 1,
                                                    "checkpoint_every": 100000})
    with caplog.at_level("WARNING", logger="labram_jax"):
        result = train.run(cfg, str(tmp_path))
    assert 3 <= result["step"] < 5000
    assert f"SIGINT: saving a checkpoint at step {result['step']}" in caplog.text
    assert str(result["step"]) in [p.name for p in (tmp_path / "checkpoints").iterdir()]
