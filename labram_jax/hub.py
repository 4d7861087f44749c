"""Models as Hugging Face Hub folders: ``config.json``, ``model.safetensors`` and a model card.

    from labram_jax import hub
    hub.save_pretrained("runs/finetune", "my-labram")      # a workdir, a model.npz, or (model, variables)
    predictor = api.load("my-labram")                       # or api.load("owner/name") from the Hub

``model.safetensors`` holds every variable under its ``/``-joined Flax path (the keys of
``model.npz``), float32 as trained, with ``{"format": "labram_jax", "kind": ...}`` as metadata;
it loads in PyTorch with ``safetensors.torch.load_file`` bit for bit. ``config.json`` holds
the module description (``model_file.spec``) and how the model reads its input (window
length, notch, task, labels, channels). ``README.md`` is the model card: the model, the data
it saw (datasets, subjects, hours, from the training manifest), its validation metrics and
its licence. ``load`` reads such a folder, or downloads one by repository id through
``huggingface_hub`` (``pip install 'labram_jax[hub]'``; the local cache, and
``local_files_only=True`` offline, work as everywhere in the Hub).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping

import flax
import flax.linen as nn
import numpy as np

from safetensors.numpy import load_file, save_file

from labram_jax import data_spec, model_file, subject_centring
from labram_jax.models import stacking

CONFIG, WEIGHTS, CARD = "config.json", "model.safetensors", "README.md"
FORMAT = "labram_jax"


def is_pretrained_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, WEIGHTS)) and \
        os.path.exists(os.path.join(path, CONFIG))


def save_pretrained(source, directory: str, *, kind: str | None = None, license: str = "apache-2.0") -> str:
    """Writes a Hub folder for ``source``: a run's workdir, a ``model.npz``, or a tuple
    ``(module, variables)`` (then ``kind`` is needed). Returns the folder."""
    run = None
    if isinstance(source, tuple):
        module, variables = source
        if kind not in model_file.KINDS:
            raise ValueError(f"save_pretrained of a (module, variables) pair needs kind= one of {model_file.KINDS}")
        centring = None
    else:
        kind, module, variables = model_file.load(str(source))
        centring = model_file.centring_of(str(source))
        run = str(source) if os.path.isdir(str(source)) else None
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    flat = flax.traverse_util.flatten_dict(stacking.unstack_blocks(nn.unbox(flax.core.unfreeze(variables))),
                                           sep="/")
    save_file({k: np.ascontiguousarray(v) for k, v in flat.items()}, str(out / WEIGHTS),
              metadata={"format": FORMAT, "kind": kind})
    os.chmod(out / WEIGHTS, 0o644)  # safetensors writes it readable by its owner only, unlike the rest of the folder
    described = model_file.spec(kind, module)
    if centring:
        described["subject_centring"] = centring
    config = {"format": FORMAT, "model": described, **_run_facts(run)}
    (out / CONFIG).write_text(json.dumps(config, indent=1))
    (out / CARD).write_text(model_card(config, kind, module, flat, license))
    return str(out)


def load_variables(path: str, **download) -> tuple[str, nn.Module, dict, dict]:
    """``(kind, module, variables, config)`` of a Hub folder or repository id (``download``:
    ``huggingface_hub.snapshot_download`` options such as ``cache_dir``, ``revision``,
    ``local_files_only``)."""
    folder = path if os.path.isdir(path) else _download(path, **download)
    if not is_pretrained_dir(folder):
        raise FileNotFoundError(f"{path}: no {CONFIG} and {WEIGHTS} there; save one with hub.save_pretrained")
    config = json.loads(pathlib.Path(folder, CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise model_file.ModelFileError(f"{path} is not a labram_jax model folder (config.json format "
                                        f"{config.get('format')!r})")
    variables: dict = {}
    for key, value in load_file(os.path.join(folder, WEIGHTS)).items():
        node = variables
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    described = config["model"]
    return described["kind"], model_file.module_from_spec(described), variables, config


def _download(repo_id: str, **options) -> str:
    if repo_id.count("/") != 1 or os.path.exists(repo_id):
        raise FileNotFoundError(f"{repo_id} is neither a model folder nor a Hub repository id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"loading {repo_id!r} from the Hugging Face Hub needs huggingface_hub: "
                          "pip install 'labram_jax[hub]'") from None
    try:
        return snapshot_download(repo_id, allow_patterns=[CONFIG, WEIGHTS, CARD], **options)
    except Exception as err:  # noqa: BLE001 - the Hub client raises many types (offline, missing, auth)
        raise FileNotFoundError(f"{repo_id}: not a local folder, and the Hugging Face Hub did not give it "
                                f"({type(err).__name__}: {err})") from err


def _run_facts(workdir: str | None) -> dict:
    """What a run's folder says about the model's input and training: config, manifest, metrics."""
    if workdir is None or not os.path.exists(os.path.join(workdir, "config.json")):
        return {}
    run = json.loads(pathlib.Path(workdir, "config.json").read_text())
    facts = {"stage": run.get("stage"), "window_s": run["data"]["max_windows"],
             "task": run.get("finetune", {}).get("task"), "training_data": run["data"]["train"]}
    datasets = []
    for pattern in data_spec.DataSpec.parse(run["data"]["train"]).manifests:
        for manifest_path in data_spec.expand(pattern):
            manifest = json.loads(pathlib.Path(manifest_path).read_text())
            train = manifest["splits"].get("train", {})
            datasets.append({"dataset": manifest.get("dataset"), "subjects": len(train.get("subjects", [])),
                             "windows": train.get("windows"), "hours": manifest["totals"].get("hours_in"),
                             "labels": manifest.get("labels", {}).get("names", []),
                             "notch_hz": manifest.get("parameters", {}).get("notch")})
    facts["datasets"] = datasets
    metrics_file = pathlib.Path(workdir, "metrics.jsonl")
    if metrics_file.exists():
        rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        validated = [r for r in rows if any(k.startswith("val/") for k in r)]
        if validated:
            facts["validation"] = {"step": validated[-1]["step"],
                                   **{k[4:]: v for k, v in validated[-1].items() if k.startswith("val/")}}
    return facts


def model_card(config: Mapping, kind: str, module: nn.Module, flat: Mapping, license: str) -> str:
    """The README.md of a Hub folder: YAML front matter and what the model is, saw and scored."""
    n = sum(int(np.size(v)) for k, v in flat.items() if k.startswith("params/"))
    lines = ["---", "library_name: labram_jax", f"license: {license}", "tags:", "- eeg", "- labram", "- jax",
             "---", "", f"# LaBraM ({kind})", "",
             f"{model_file.describe(module)}; {n:,} parameters. Load it with "
             "`labram_jax.api.load(<this folder or repository id>)`.", ""]
    if config.get("datasets"):
        lines += ["## Data", ""]
        for d in config["datasets"]:
            lines.append(f"- {d['dataset']}: {d['subjects']} training subjects, {d['windows']} windows, "
                         f"{d['hours']:.2f} h of EEG" + (f", labels {d['labels']}" if d["labels"] else ""))
        lines.append("")
    if config.get("validation"):
        lines += ["## Validation (last step of training)", ""]
        lines += [f"- {k}: {v:.4f}" for k, v in config["validation"].items() if k != "step"]
        lines.append("")
    lines += ["## Input", "", f"- {config.get('window_s', '?')}-s windows of 1-s patches at 200 Hz, units of 100 uV, "
              "channels named by the LaBraM vocabulary (labram_jax.channels)"]
    centring = config["model"].get("subject_centring")
    if centring:
        lines.append(f"- {subject_centring.describe(centring)} (python -m data_prep.centring): give each subject's "
                     "reference, `model.predict(raw, reference=model.subject_reference([...its recordings...]))`")
    return "\n".join(lines + [""])
