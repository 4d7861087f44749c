"""No pickle for data, checkpoints or configs: a scan of the package sources."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("labram_jax", "data_prep", "configs", "benchmarks") for p in (ROOT / d).rglob("*.py")]


def test_sources_were_found():
    assert len(SOURCES) > 30


def test_no_pickle_loads_or_dumps():
    banned = re.compile(r"pickle\.(loads?|dumps?|Unpickler|Pickler)\b|\b(cloudpickle|dill|joblib)\b|"
                        r"allow_pickle\s*=\s*True|jnp?\.save\(|\.to_pickle\(|read_pickle\(")
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in SOURCES
            for i, line in enumerate(p.read_text().splitlines(), 1) if banned.search(line)]
    assert hits == []


def test_torch_load_is_weights_only_and_np_load_refuses_pickles():
    for p in SOURCES:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if "torch.load(" in line and not line.lstrip().startswith(("#", '"', "source")):
                assert "weights_only=True" in line, f"{p}:{i}"
            if re.search(r"\bnp\.load\(", line):
                assert "allow_pickle=False" in line, f"{p}:{i}: {line.strip()}"
