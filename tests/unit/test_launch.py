"""Launch scripts: dry-run output and shell syntax."""

import os
import pathlib
import shlex
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
    scripts = sorted(str(p) for p in (ROOT / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))
    assert len(scripts) >= 5
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _dry(*args, env=None) -> list[list[str]]:
    """The dry-run commands of a launcher, each split back into its arguments."""
    out = subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}).stdout
    return [shlex.split(line) for line in out.strip().splitlines() if not line.startswith("#")]


TRAIN = ["--config=configs/huge.py:pretrain", "--workdir=gs://b/runs/huge", "--config.data.train=gs://b/s/*/manifest.json"]


def _option(cmd: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(name + "="))


def test_tpu_vm_dry_run_prints_create_copy_install_run():
    lines = _dry("launch/tpu_vm.sh", "--dry-run", "--name", "lab", "--zone", "us-east5-a", "--type", "v5p-64", "--spot",
                 "--", *TRAIN)
    assert len(lines) == 5
    create, archive, scp, install, run = lines
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "lab"]
    assert "--accelerator-type=v5p-64" in create and "--version=v2-alpha-tpuv5" in create and "--spot" in create
    assert archive[0] == "git" and "archive" in archive and archive[-1] == "HEAD"
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert "--worker=all" in install and "pip install" in _option(install, "--command")
    assert "'jax[tpu]'" in _option(install, "--command")
    remote = shlex.split(_option(run, "--command"))
    assert "--worker=all" in run and remote[:2] == ["cd", "~/labram_jax"]
    assert remote[remote.index("-m") + 1] == "labram_jax.main" and remote[-3:] == TRAIN  # quoted once, intact


def test_tpu_vm_requires_its_options():
    result = subprocess.run(["bash", "launch/tpu_vm.sh", "--dry-run", "--name", "x"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_xpk_dry_run_tpu_and_gpu():
    (tpu,) = _dry("launch/xpk.sh", "--dry-run", "--cluster", "c1", "--workload", "huge", "--tpu-type", "v5p-64",
                  "--num-slices", "2", "--", *TRAIN)
    assert tpu[:3] == ["xpk", "workload", "create"] and "--tpu-type=v5p-64" in tpu and "--num-slices=2" in tpu
    assert _option(tpu, "--script-dir") == str(ROOT)
    inner = shlex.split(shlex.split(_option(tpu, "--command"))[2])
    assert "jax[tpu]" in inner and inner[-3:] == TRAIN and "labram_jax.main" in inner
    (gpu,) = _dry("launch/xpk.sh", "--dry-run", "--cluster", "c1", "--workload", "huge", "--device-type",
                  "h100-80gb-8", "--num-nodes", "2", "--", *TRAIN)
    assert "--device-type=h100-80gb-8" in gpu and "--num-nodes=2" in gpu
    assert "jax[cuda12]" in shlex.split(shlex.split(_option(gpu, "--command"))[2])


def test_slurm_dry_run_per_gpu_and_per_node():
    (per_gpu,) = _dry("launch/slurm_gpu.sbatch", "--dry-run", *TRAIN)
    assert per_gpu == ["srun", "--kill-on-bad-exit=1", "python", "-m", "labram_jax.main", *TRAIN]
    (per_node,) = _dry("launch/slurm_gpu.sbatch", "--dry-run", *TRAIN,
                       env={"LABRAM_PROCESS_PER": "node", "SLURM_GPUS_ON_NODE": "4"})
    assert per_node[-1] == "--local_device_ids=0,1,2,3"


def test_env_sh_takes_the_glibc_tunables_from_host_memory(tmp_path):
    """launch/env.sh sets what labram_jax.main would (host_memory), keeps a tunable the user set,
    and falls back to huge pages alone where labram_jax cannot be imported."""
    import sys

    from labram_jax import host_memory

    real, broken = tmp_path / "real", tmp_path / "broken"
    real.mkdir()
    broken.mkdir()
    (real / "python3").symlink_to(sys.executable)
    (broken / "python3").write_text("#!/bin/sh\nexit 1\n")  # as if labram_jax were not installed
    (broken / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = str(ROOT)

    def sourced(tunables: str | None, python_dir: pathlib.Path) -> str:
        run_env = dict(env, PATH=f"{python_dir}{os.pathsep}{env['PATH']}")
        if tunables:
            run_env["GLIBC_TUNABLES"] = tunables
        env_sh = ROOT / "launch" / "env.sh"
        script = f"cd {tmp_path} && source {env_sh} && source {env_sh} && echo \"$GLIBC_TUNABLES\""
        return subprocess.run(["bash", "-c", script], env=run_env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert sourced(None, real) == host_memory.environment_with_hugepages({})["GLIBC_TUNABLES"]  # twice: no repeats
    mine = sourced("glibc.malloc.arena_max=4", real).split(":")
    assert mine[0] == "glibc.malloc.arena_max=4" and "glibc.malloc.arena_max=1" not in mine
    assert "glibc.malloc.hugetlb=1" in mine
    assert sourced("glibc.malloc.arena_max=4", broken) == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
