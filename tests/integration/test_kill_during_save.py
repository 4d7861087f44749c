"""SIGKILL in the middle of checkpoint saves: the next start always finds a valid checkpoint.

A child process saves a ~48 MB state with our Checkpointer every step (the state's
values equal its step, so a restore proves which save it came from) and is killed
at a random moment once saves are running. After each kill, the newest committed
checkpoint must restore and hold exactly its step's values; Orbax's uncommitted
temporary directories must be ignored.
"""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from labram_jax import checkpointing, metrics
from tests.integration.test_preemption import straight_run_and_command

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAVER = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from labram_jax import checkpointing
    ckpt = checkpointing.Checkpointer(sys.argv[1], every=1, keep=2)
    step = (ckpt.latest_step() or 0) + 1
    while True:
        state = {"w": jnp.full((3, 1000, 1000), float(step)), "b": jnp.full((1000,), step, jnp.int32)}
        ckpt.save(step, state, {"step": step}, {"note": "kill test"})
        print("saving", step, flush=True)
        step += 1
""")


def _abstract():
    return {"w": jax.ShapeDtypeStruct((3, 1000, 1000), np.float32), "b": jax.ShapeDtypeStruct((1000,), np.int32)}


def _committed(directory):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def test_sigkill_during_saves_leaves_a_valid_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    directory = tmp_path / "ckpt"
    rng = np.random.default_rng(0)
    trials, with_partial, restored_steps = 10, 0, []
    for trial in range(trials):
        log = tmp_path / f"saver{trial}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, str(script), str(directory)], cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
            before = len(_committed(directory))
            deadline = time.time() + 120
            while time.time() < deadline and log.read_text().count("saving") < 2 and proc.poll() is None:
                time.sleep(0.05)
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(float(rng.uniform(0.0, 1.0)))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        partial = [p.name for p in directory.iterdir() if not p.name.isdigit()]
        with_partial += bool(partial)
        steps = _committed(directory)
        assert steps and len(steps) >= min(before, 1)
        ckpt = checkpointing.Checkpointer(str(directory), every=1, keep=2)
        try:
            latest = ckpt.latest_step()
            assert latest == max(steps)
            state, data = ckpt.restore(latest, _abstract())
        finally:
            ckpt.close()
        assert data["step"] == latest
        assert np.all(np.asarray(state["w"]) == latest) and np.all(np.asarray(state["b"]) == latest)
        restored_steps.append(latest)
    print(f"{trials} kills: restored steps {restored_steps}; a partial save was on disk after {with_partial}")
    assert restored_steps == sorted(restored_steps)


@pytest.mark.slow
def test_sigkill_during_training_saves_then_resume(eegmat_shards, tmp_path):
    """Training saving every step, killed at random moments 10 times; each restart resumes
    from a valid checkpoint and the run ends with the same losses as an uninterrupted one."""
    straight, cmd = straight_run_and_command(eegmat_shards, tmp_path, 60, 1, "killed")
    workdir = tmp_path / "killed"
    rng = np.random.default_rng(1)
    resumed_from = []
    for trial in range(10):
        log = tmp_path / f"train{trial}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
            deadline = time.time() + 300
            while time.time() < deadline and "samples/s" not in log.read_text() and proc.poll() is None:
                time.sleep(0.05)
            time.sleep(float(rng.uniform(0.0, 1.5)))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        text = log.read_text()
        if "resumed from" in text:
            resumed_from.append(int(text.split("resumed from")[1].split("/checkpoints/")[1].split()[0]))
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print("resumed from steps", resumed_from)
    assert len(resumed_from) >= 8
    kept = {r["step"]: r["train/loss"] for r in metrics.read_jsonl(str(workdir / "metrics.jsonl"))
            if "train/loss" in r}
    reference = {r["step"]: r["train/loss"] for r in metrics.read_jsonl(str(straight / "metrics.jsonl"))
                 if "train/loss" in r}
    assert kept == reference
