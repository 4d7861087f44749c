"""The Colab fine-tuning notebook, executed end to end with nbclient (tiny settings, CPU)."""

import json
import os
import pathlib

import nbformat
import pytest

from labram_jax import convert, model_file, train
from tests.integration.test_train import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "finetune_colab.ipynb"


def test_committed_notebook_is_the_generated_one():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_nb", ROOT / "notebooks" / "make_finetune_colab.py")
    make_nb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_nb)
    committed = nbformat.read(NOTEBOOK, as_version=4)
    assert [c.source for c in committed.cells] == [c.source for c in make_nb.build().cells], \
        "run python notebooks/make_finetune_colab.py"


def test_notebook_runs_end_to_end_from_official_weights(eegmat_shards, tmp_path):
    from nbclient import NotebookClient

    tok, pre = tmp_path / "tok", tmp_path / "pre"
    train.run(tiny_config("tokenizer", eegmat_shards, **{"optim.total_steps": 2}), str(tok))
    train.run(tiny_config("pretrain", eegmat_shards, **{"optim.total_steps": 2,
                                                        "pretrain.tokenizer_checkpoint": str(tok)}), str(pre))
    kind, model, variables = model_file.load(str(pre / "model.npz"))
    official = tmp_path / "labram-tiny-official.npz"  # the official state-dict layout (what a .pth holds)
    convert.save_official(str(official), convert.to_official(kind, model, variables))

    workdir = tmp_path / "nb"
    env = {"LABRAM_NB_PRETRAINED": str(official), "LABRAM_NB_SIZE": "tiny", "LABRAM_NB_MODE": "lora",
           "LABRAM_NB_STEPS": "8", "LABRAM_NB_BATCH": "16", "LABRAM_NB_WORKDIR": str(workdir)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nb = nbformat.read(NOTEBOOK, as_version=4)
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "converted" in outputs and "windows" in outputs
    assert (workdir / "pretrained.npz").exists() and (workdir / "finetune" / "model.npz").exists()
    report = json.loads((workdir / "eval.json").read_text())
    assert report["samples"] > 0 and 0.0 <= report["balanced_accuracy"] <= 1.0
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) == 3  # curves, confusion matrix, ROC
    _, tuned, _ = model_file.load(str(workdir / "finetune" / "model.npz"))
    assert tuned.cfg.lora_rank > 0


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    monkeypatch.setenv("LABRAM_JAX_NO_REEXEC", "1")
