"""The project's own model file, ``model.npz``: Flax variables plus the module's description.

One ``.npz`` (no pickle): every variable under its ``/``-joined path, and ``__spec__``, a
JSON description from which the module is rebuilt (kind, TransformerConfig / TokenizerConfig
fields, outputs or vocabulary) and, for a model trained on subject-centred records, the
``subject_centring`` its inputs need (:func:`centring_of`). Blocks are stored per block whatever the training layout
(``models/stacking.py``). Every stage writes one at its end; fine-tuning, pretraining, the
API and the converter read it. :func:`resolve` turns "a workdir or a model file" into the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import flax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from labram_jax import subject_centring as centring_lib
from labram_jax.models import config as config_lib
from labram_jax.models import stacking
from labram_jax.models import tokenizer as tokenizer_lib
from labram_jax.models import transformer

KINDS = ("finetune", "pretrain", "tokenizer")
FILENAME = "model.npz"
# Tensors of an official checkpoint that its forward pass never uses travel in this collection
# (keys are the official dotted names), so a round trip loses nothing.
UNUSED = "reference_unused"


class ModelFileError(ValueError):
    """A file that is not a labram_jax model file (or not the kind asked for)."""


def resolve(path: str, what: str = "model") -> str:
    """``path`` itself, or ``path/model.npz`` for a run's workdir. Raises FileNotFoundError
    saying what to do when there is no such file (``what`` names it in the message)."""
    file = os.path.join(path, FILENAME) if os.path.isdir(path) else path
    if not os.path.exists(file):
        finished = " (a run writes model.npz when it finishes: let it finish first)" if os.path.isdir(path) else ""
        raise FileNotFoundError(f"{what} {file} does not exist{finished}")
    return file


def spec(kind: str, model: nn.Module) -> dict:
    """A JSON-able description from which :func:`module_from_spec` rebuilds the module."""
    def as_dict(cfg):
        out = dataclasses.asdict(cfg)
        out["dtype"] = jnp.dtype(cfg.dtype).name
        out["scan_blocks"] = False  # files hold the per-block layout (save unstacks)
        return out

    cfg = model.cfg
    if kind == "tokenizer":
        described = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        described["encoder"], described["decoder"] = as_dict(cfg.encoder), as_dict(cfg.decoder)
        return {"kind": kind, "config": described}
    extra = {"num_outputs": model.num_outputs} if kind == "finetune" else {"vocab_size": model.vocab_size}
    return {"kind": kind, "config": as_dict(cfg), **extra}


def module_from_spec(described: Mapping) -> nn.Module:
    def transformer_cfg(d):
        return config_lib.TransformerConfig(**{**d, "dtype": jnp.dtype(d["dtype"])})

    kind, cfg = described["kind"], dict(described["config"])
    if kind == "finetune":
        return transformer.LaBraM(transformer_cfg(cfg), num_outputs=described["num_outputs"])
    if kind == "pretrain":
        return transformer.LaBraMPretrain(transformer_cfg(cfg), vocab_size=described["vocab_size"])
    cfg["encoder"], cfg["decoder"] = transformer_cfg(cfg["encoder"]), transformer_cfg(cfg["decoder"])
    return tokenizer_lib.VQNSP(config_lib.TokenizerConfig(**cfg))


def save(path: str, kind: str, model: nn.Module, variables: Mapping, subject_centring: dict | None = None) -> None:
    """Writes Flax variables and the module spec to one ``.npz`` (no pickle), blocks per block
    (a model trained with ``scan_blocks`` is stored as if trained without). ``subject_centring``:
    the manifests' setting (``subject_centring.canonical``: ``{"band_hz": [lo, hi]}``,
    ``{"method": ...}``) when the model was trained on subject-centred records, so that whoever
    loads it centres its inputs the same way."""
    if kind not in KINDS:
        raise ValueError(f"model kind {kind!r}: one of {KINDS}")
    variables = stacking.unstack_blocks(nn.unbox(flax.core.unfreeze(variables)))
    flat = flax.traverse_util.flatten_dict(variables, sep="/")
    arrays = {k: np.asarray(v) for k, v in flat.items()}
    described = spec(kind, model)
    if subject_centring:
        described["subject_centring"] = centring_lib.canonical(subject_centring)
    arrays["__spec__"] = np.asarray(json.dumps(described))
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load(path: str, kind: str | None = None) -> tuple[str, nn.Module, dict]:
    """Reads a model file (or a workdir's): ``(kind, module, variables)``; with ``kind``, the
    file must hold that kind of model."""
    path = resolve(path)
    with np.load(path, allow_pickle=False) as data:
        if "__spec__" not in data.files:
            raise ModelFileError(f"{path} is not a labram_jax model file (no __spec__ entry); official "
                                 "checkpoints are read with labram_jax.convert.load_official()")
        described = json.loads(str(data["__spec__"]))
        flat = {k: data[k] for k in data.files if k != "__spec__"}
    if kind is not None and described["kind"] != kind:
        raise ModelFileError(f"{path} holds a {described['kind']} model, not a {kind}")
    variables: dict = {}
    for key, value in flat.items():
        collection, _, rest = key.partition("/")
        if collection == UNUSED:  # official names contain dots, never slashes
            variables.setdefault(UNUSED, {})[rest] = value
        else:
            node = variables
            *parents, leaf = key.split("/")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return described["kind"], module_from_spec(described), variables


def centring_of(path: str) -> dict | None:
    """The centring setting (``subject_centring.canonical``: ``{"band_hz": [lo, hi]}``, ``{"method": ...}``) when the
    model in ``path`` (a file or workdir) was trained on subject-centred records
    (``python -m data_prep.centring``), else None."""
    with np.load(resolve(path), allow_pickle=False) as data:
        if "__spec__" not in data.files:
            return None
        return json.loads(str(data["__spec__"])).get("subject_centring")


def describe(model: nn.Module) -> str:
    """One line: the model's sizes."""
    cfg = model.cfg
    if isinstance(cfg, config_lib.TokenizerConfig):
        return (f"tokenizer: encoder depth {cfg.encoder.depth}, decoder depth {cfg.decoder.depth}, "
                f"width {cfg.encoder.embed_dim}, codebook {cfg.codebook_size} x {cfg.code_dim}")
    extra = f", {model.num_outputs} outputs" if hasattr(model, "num_outputs") else f", vocab {model.vocab_size}"
    stem = ("patches embedded by their log spectrum" if cfg.patch_embed == "spectrum"
            else f"temporal encoder with {cfg.temporal_channels} channels")
    norm = ", each channel standardised" if cfg.input_norm == "channel" else ""
    mix = ", learned spatial filters first" if cfg.spatial_mix else ""
    return f"depth {cfg.depth}, width {cfg.embed_dim}, {cfg.num_heads} heads, {stem}{norm}{mix}{extra}"
