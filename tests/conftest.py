"""Test set-up: 8 fake CPU devices and the paths of the shared fixtures."""

import os
import pathlib

# Must be set before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFERENCE_DIR = pathlib.Path(os.environ.get("LABRAM_REFERENCE_DIR", SHARED / "reference"))
EEG_DIR = SHARED / "eeg"


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference directory {REFERENCE_DIR} not found: set LABRAM_REFERENCE_DIR")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def eeg_dir() -> pathlib.Path:
    if not EEG_DIR.is_dir():
        pytest.fail(f"{EEG_DIR} not found: the shared recordings must sit at ../shared/eeg")
    return EEG_DIR
