"""Writes notebooks/finetune_colab.ipynb (run: python notebooks/make_finetune_colab.py).

The notebook is generated so that its code stays reviewable as plain Python; the test
tests/integration/test_notebook.py executes the written .ipynb with nbclient.
"""

import pathlib

import nbformat
from nbformat import v4

CELLS = [
    ("md", """# Fine-tune LaBraM on your own EEG (Colab or any Jupyter)

From a folder of labelled recordings to a fine-tuned LaBraM, its evaluation, plots and
embeddings, with `labram_jax`. Runs on a CPU, a GPU or a TPU runtime; on a CPU keep the
model small (`SIZE = "tiny"` or `base` with few steps).

Steps: install -> parameters -> prepare the folder (`data_prep`) -> pretrained weights
(convert official PyTorch weights or load ours) -> fine-tune -> evaluate -> plots ->
embeddings and predictions from Python."""),
    ("md", """## 1. Install
In Colab, set `LABRAM_JAX_SOURCE` to where the package lives (a git URL such as
`git+https://github.com/<you>/labram_jax.git`, or a folder you uploaded). On a TPU runtime
add `jax[tpu]`, on a GPU runtime `jax[cuda12]`."""),
    ("code", """import importlib.util, os, subprocess, sys

SOURCE = os.environ.get("LABRAM_JAX_SOURCE", "")
if importlib.util.find_spec("labram_jax") is None:
    if not SOURCE:
        raise RuntimeError("labram_jax is not installed: set LABRAM_JAX_SOURCE to a git URL or folder of the package")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", SOURCE], check=True)
import jax, labram_jax
print("jax", jax.__version__, "devices:", jax.devices())"""),
    ("md", """## 2. Parameters
Point `DATA_DIR` at your recordings (EDF/BDF, FIF, EEGLAB, BrainVision, GDF, CNT ...).
Labels come from the file names here (`LABELS`: regular expression -> label); `data_prep`
can also read them from annotations or a CSV (`python -m data_prep --help`). Subjects are
found in the file names by `SUBJECT_PATTERN`; `VAL_SUBJECTS` are held out for validation.
`PRETRAINED` is an official checkpoint (`labram-base.pth`), a `model.npz` or workdir of a
`labram_jax` pretraining run, or empty to train from scratch. Every parameter can also be
set through an environment variable of the same name with the prefix `LABRAM_NB_`."""),
    ("code", """import pathlib

def param(name, default):
    return type(default)(os.environ.get(f"LABRAM_NB_{name}", default))

DATA_DIR = param("DATA_DIR", str(pathlib.Path(labram_jax.__file__).parent / "demo_data"))  # bundled EEGMAT excerpts
LABELS = {r"_1_raw\\.fif(\\.gz)?$": "rest", r"_2_raw\\.fif(\\.gz)?$": "arithmetic"}
SUBJECT_PATTERN = r"Subject(\\d+)_"
VAL_SUBJECTS = param("VAL_SUBJECTS", "16,17,18,19")
WINDOW_S = param("WINDOW_S", 5)          # seconds per sample (1..16)
PRETRAINED = param("PRETRAINED", "")     # labram-base.pth, model.npz, a pretraining workdir, or "" (from scratch)
SIZE = param("SIZE", "base")             # must match PRETRAINED: tiny, base, large or huge
MODE = param("MODE", "full")             # full, linear_probe, last_k or lora
STEPS = param("STEPS", 300)
BATCH = param("BATCH", 32)
WORKDIR = pathlib.Path(param("WORKDIR", "/content/labram_run" if "google.colab" in sys.modules else "labram_run"))
WORKDIR.mkdir(parents=True, exist_ok=True)
print(DATA_DIR, "->", WORKDIR)"""),
    ("md", "## 3. Prepare the folder: filtering, notch, 200 Hz, units, channel names, windows, labels"),
    ("code", """from data_prep import __main__ as data_prep

args = [DATA_DIR, "--out", str(WORKDIR / "data"), "--window", str(WINDOW_S), "--label-from", "filename",
        "--subject-pattern", SUBJECT_PATTERN, "--val-subjects", VAL_SUBJECTS]
for pattern, label in LABELS.items():
    args += ["--label-pattern", f"{pattern}={label}"]
assert data_prep.main(args) == 0, "data_prep failed: see the messages above"
MANIFEST = WORKDIR / "data" / "manifest.json"
import json
manifest = json.loads(MANIFEST.read_text())
NUM_CLASSES = len(manifest["labels"]["names"])
print({split: (s["windows"], s["by_label"]) for split, s in manifest["splits"].items()})"""),
    ("md", """## 4. Pretrained weights
Official PyTorch checkpoints are converted once to a `.npz` of Flax variables (no pickle is
executed: `torch.load(weights_only=True)`). Our own pretraining runs are used as they are."""),
    ("code", """from labram_jax import convert, model_file

INIT = ""
if PRETRAINED.endswith(".pth") or (PRETRAINED.endswith(".npz") and "__spec__" not in __import__("numpy").load(PRETRAINED)):
    model, variables = convert.load_official(PRETRAINED, "pretrain")
    INIT = str(WORKDIR / "pretrained.npz")
    model_file.save(INIT, "pretrain", model, variables)
    print("converted", PRETRAINED, "->", INIT)
elif PRETRAINED:
    INIT = PRETRAINED
if INIT:
    kind, model, _ = model_file.load(INIT)
    print(kind, "model: depth", model.cfg.depth, "width", model.cfg.embed_dim)
else:
    print("no pretrained weights: training from scratch")"""),
    ("md", "## 5. Fine-tune"),
    ("code", """from labram_jax_configs import common
from labram_jax import train

config = common.get_config(SIZE, "finetune")
config.data.train = config.data.val = str(MANIFEST)
config.data.batch_size, config.data.max_windows = BATCH, WINDOW_S
config.data.max_channels = max(len(f["channels_kept"]) for f in manifest["files"] if f["channels_kept"])
config.finetune.task = "binary" if NUM_CLASSES == 2 else "multiclass"
config.model.num_outputs = 1 if NUM_CLASSES == 2 else NUM_CLASSES
if NUM_CLASSES > 2:
    config.finetune.best_metric = "cohen_kappa"
config.finetune.mode, config.finetune.init_checkpoint = MODE, INIT
config.finetune.class_weight = "balanced"
config.optim.total_steps, config.optim.warmup_steps = STEPS, max(1, STEPS // 10)
config.optim.lr = 5e-4 if INIT else 1e-3
config.eval_every, config.log_every, config.checkpoint_every = max(1, STEPS // 4), max(1, STEPS // 10), STEPS
result = train.run(config, str(WORKDIR / "finetune"))
{k: round(float(v), 3) for k, v in result.items() if k.startswith("val/")}"""),
    ("md", "## 6. Evaluate (the same numbers as the validation logged during training)"),
    ("code", """from labram_jax import evaluate

assert evaluate.main(["--workdir", str(WORKDIR / "finetune"), "--data", str(MANIFEST), "--checkpoint", "latest",
                      "--out", str(WORKDIR / "eval.json")]) == 0
report = json.loads((WORKDIR / "eval.json").read_text())
assert abs(report["balanced_accuracy"] - result["val/balanced_accuracy"]) < 1e-9
report["confusion_matrix"]"""),
    ("md", "## 7. Plots: training curves, confusion matrix, ROC"),
    ("code", """from IPython.display import Image, display

for png in ("finetune/curves.png", "eval_confusion.png", "eval_roc.png"):
    if (WORKDIR / png).exists():
        display(Image(filename=str(WORKDIR / png), width=480))"""),
    ("md", """## 8. Embeddings and predictions from Python
`api.load` takes the workdir; `embed` and `predict` take an `mne.io.Raw`, `mne.Epochs` or an
array with channel names and sampling rate, and do the preprocessing themselves."""),
    ("code", """import mne
from labram_jax import api

predictor = api.load(str(WORKDIR / "finetune"))
recording = sorted(pathlib.Path(DATA_DIR).glob("*"))[-1]
raw = mne.io.read_raw(recording, preload=True, verbose="error")
emb = predictor.embed(raw)
probs = predictor.predict(raw)
print(recording.name, "windows", emb.windows.shape, "patches", emb.patches.shape, "channels", len(emb.channels))
print("probabilities", probs[:5])
assert emb.windows.shape[0] == probs.shape[0] > 0"""),
]


def build() -> nbformat.NotebookNode:
    nb = v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["colab"] = {"provenance": []}
    nb.cells = [v4.new_markdown_cell(src) if kind == "md" else v4.new_code_cell(src) for kind, src in CELLS]
    return nb


if __name__ == "__main__":
    out = pathlib.Path(__file__).with_name("finetune_colab.ipynb")
    nbformat.write(build(), out)
    print("wrote", out)
