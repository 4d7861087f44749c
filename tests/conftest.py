"""Test set-up: 8 fake CPU devices and the paths of the shared fixtures."""

import importlib.util
import os
import pathlib
import sys
import types

# Must be set before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny programs: share compilations across runs and processes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "labram_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFERENCE_DIR = pathlib.Path(os.environ.get("LABRAM_REFERENCE_DIR", SHARED / "reference"))
EEG_DIR = SHARED / "eeg"
# The x86 classes the C++ kernels were measured on (BENCHMARKS.md), as (cpu_flags, avx512_rate_ratio):
# AVX2 only; AVX-512 on 256-bit units; AVX-512 on full-width units (the products' AVX-512 tiles).
CPU_CLASSES = [({"avx2", "fma"}, None), ({"avx2", "fma", "avx512f"}, 1.0), ({"avx2", "fma", "avx512f"}, 2.0)]


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


@pytest.fixture(scope="session")
def eegmat_shards(eeg_dir, tmp_path_factory):
    """A small EEGMAT conversion (subjects 00-03 train, 16-17 val; 4-s windows) for training tests."""
    from data_prep import __main__ as data_prep_cli

    out = tmp_path_factory.mktemp("eegmat_shards")
    files = [str(p) for p in sorted((eeg_dir / "eegmat").glob("Subject*.edf"))
             if p.name[7:9] in ("00", "01", "02", "03", "16", "17")]
    code = data_prep_cli.main(files + ["--out", str(out), "--window", "4", "--label-from", "filename",
                                       "--label-pattern", r"_1\.edf$=rest", "--label-pattern", r"_2\.edf$=arithmetic",
                                       "--subject-pattern", r"Subject(\d+)_", "--val-subjects", "16,17", "--quiet"])
    assert code == 0
    return out / "manifest.json"


@pytest.fixture(scope="session")
def eegmat_aligned_centred(eegmat_shards, tmp_path_factory):
    """``eegmat_shards`` Euclidean-aligned, then subject-centred (``data_prep.centring --method
    euclidean+spectrum``, configs/eegmat.py's records): the manifest."""
    from data_prep import centring

    out = tmp_path_factory.mktemp("eegmat_aligned_centred") / "records"
    assert centring.main([str(eegmat_shards), "--out", str(out), "--method", "euclidean+spectrum", "--quiet"]) == 0
    return out / "manifest.json"


@pytest.fixture(scope="session")
def braindecode_models():
    """``braindecode.models`` (the real package from PyPI, pip install '.[braindecode]'), or a
    skip. torchaudio's PyPI wheels are CUDA builds whose extension does not load against the
    CPU torch wheel; braindecode imports torchaudio only for filter layers and audio models,
    never for Labram, so where it cannot load, a stand-in that raises on use takes its place."""
    pytest.importorskip("torch", reason="braindecode needs PyTorch (pip install '.[braindecode]')")
    if importlib.util.find_spec("braindecode") is None:
        pytest.skip("braindecode is not installed (pip install '.[braindecode]')")
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):
        def unavailable(*args, **kwargs):
            raise NotImplementedError("torchaudio cannot load against this torch build")

        stand_in, functional, transforms = (types.ModuleType(n) for n in
                                            ("torchaudio", "torchaudio.functional", "torchaudio.transforms"))
        functional.fftconvolve = functional.filtfilt = functional.lfilter = unavailable
        transforms.Resample = transforms.Spectrogram = type("Unavailable", (), {"__init__": unavailable})
        stand_in.functional, stand_in.transforms = functional, transforms
        for name in [n for n in sys.modules if n.startswith("torchaudio")]:
            del sys.modules[name]
        sys.modules.update({"torchaudio": stand_in, "torchaudio.functional": functional,
                            "torchaudio.transforms": transforms})
    import braindecode.models

    return braindecode.models
