"""Disk full: a clear error at start or at save, and the last complete checkpoint survives.

The workdir sits on a small tmpfs (mounting one needs root / CAP_SYS_ADMIN; the test
skips where that is refused) so that writes fail with the real ENOSPC.
"""

import subprocess

import pytest

from labram_jax import train
from tests.integration.test_train import tiny_config


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_at_start_is_a_clear_error(small_disk, eegmat_shards):
    with open(small_disk / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    cfg = tiny_config("finetune", eegmat_shards, **{"optim.total_steps": 2})
    with pytest.raises(train.CheckpointWriteError, match=r"workdir .* is not writable \(No space left on device\)"):
        train.run(cfg, str(small_disk / "run"))


def test_full_disk_at_save_keeps_the_last_checkpoint(small_disk, eegmat_shards):
    workdir = small_disk / "run"
    cfg = tiny_config("finetune", eegmat_shards, **{"optim.total_steps": 6, "checkpoint_every": 2, "log_every": 1})
    with pytest.raises(train.CheckpointWriteError) as err:
        train.run(cfg, str(workdir))
    message = str(err.value)
    print(message)
    assert "No space left on device" in message or "ENOSPC" in message or "space" in message, message
    assert "resumes from the last complete checkpoint (step 1)" in message, message
    # More room, same command: it resumes from the checkpoint the failed save did not touch.
    subprocess.run(["mount", "-o", "remount,size=100m", str(small_disk)], check=True)
    result = train.run(cfg, str(workdir))
    assert result["step"] == 6 and (workdir / "model.npz").exists()
    assert '"step": 6' in (workdir / "metrics.jsonl").read_text()
