"""The memory planner: sharded sizes, its estimate against XLA's compiled memory analysis on the
8 fake devices, the mesh search, and the CLI."""

import subprocess
import sys

import pytest

from labram_jax_configs import common
from labram_jax import plan, sharding
from tests.conftest import ROOT


def _config(size, stage):
    c = common.get_config(size, stage)
    c.model.dtype = "float32"  # what the CPU compiles
    return c


def test_sharded_bytes_follow_the_rules():
    import jax

    c = _config("base", "finetune")
    stage, _, _, _ = plan.stage_models(c)
    abstract = jax.eval_shape(stage.init, jax.random.key(0), plan.steps.dummy_batch(plan._grid(c)))["params"]
    rules = sharding.rules_from_config()
    total, replicated = plan.sharded_bytes(abstract, plan.Mesh(8, 1, 1), rules)
    assert total == replicated and 5.5e6 * 4 < total < 6.5e6 * 4  # LaBraM-Base: ~5.8 M parameters
    _, fsdp = plan.sharded_bytes(abstract, plan.Mesh(1, 8, 1), rules)
    _, tensor = plan.sharded_bytes(abstract, plan.Mesh(1, 1, 2), rules)
    assert total / 8 < fsdp < total / 4  # embed-sharded matrices dominate; norms and biases stay whole
    assert total / 2 < tensor < total


@pytest.mark.parametrize("size,stage,batch,mesh", [
    ("tiny", "finetune", 16, (8, 1, 1)), ("tiny", "finetune", 16, (2, 2, 2)), ("tiny", "pretrain", 16, (2, 4, 1)),
    ("tiny", "tokenizer", 16, (8, 1, 1)), ("base", "finetune", 32, (2, 4, 1))])
def test_estimate_is_close_to_the_compiled_memory_analysis(size, stage, batch, mesh):
    c = _config(size, stage)
    st, encoders, extra, tokens = plan.stage_models(c)
    row = plan.estimate(c, st, encoders, extra, tokens, plan.Mesh(*mesh), batch)
    compiled = plan.compiled_gib(c, st, plan.Mesh(*mesh), batch)
    assert 0.7 < row["total_gib"] / compiled < 1.35, (row, compiled)


def test_suggest_finds_the_smallest_fitting_mesh():
    c = _config("base", "pretrain")
    st, encoders, extra, tokens = plan.stage_models(c)
    best = plan.suggest(c, st, encoders, extra, tokens, 512, memory_gib=16)
    assert best is not None and best["total_gib"] <= 0.9 * 16
    half = best["devices"] // 2
    assert all(plan.estimate(c, st, encoders, extra, tokens, m, 512)["total_gib"] > 0.9 * 16
               for m in plan.candidate_meshes(half, encoders[0][0].num_heads, 512))
    assert [str(m) for m in plan.candidate_meshes(4, 10, 8)] == ["4x1x1", "2x2x1", "2x1x2", "1x4x1", "1x2x2"]


def test_cli_plans_huge_pretraining_without_devices():
    out = subprocess.run([sys.executable, "-m", "labram_jax.plan", "--config=configs/huge.py:pretrain",
                          "--mesh=8,1,1", "--mesh=16,4,1", "--batch=512", "--device_memory_gb=40", "--suggest"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("pretrain huge") and "bfloat16" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert rows["8x1x1"][-1] == "no" and rows["16x4x1"][-1] == "yes"
    assert "smallest fit" in lines[-1]
