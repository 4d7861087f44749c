"""Launch scripts: dry-run output and shell syntax."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_local_multiprocess_dry_run():
    out = subprocess.run(["bash", "launch/local_multiprocess.sh", "--dry-run", "3", "--config=configs/tiny.py:pretrain",
                          "--workdir=/tmp/w"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert f"--process_id={i}" in line and "--num_processes=3" in line and "labram_jax.main" in line


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    scripts = sorted(str(p) for p in (ROOT / "launch").glob("*.sh"))
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
