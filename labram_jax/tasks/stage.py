"""What every training stage provides to ``train.run``, and the train state."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from labram_jax.models import config as model_config


@flax.struct.dataclass
class TrainState:
    """The whole mutable state of a run (one pytree, created sharded, checkpointed whole).

    ``extra`` holds non-trainable variable collections (the tokenizer's EMA codebook).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any


# loss_fn(params, extra, batch, key, frozen) -> (loss, (metrics, new_extra))
LossFn = Callable[..., tuple[jax.Array, tuple[dict, Any]]]


@dataclasses.dataclass
class Stage:
    """One stage: its model, how to initialise it, its loss, and optional hooks.

    Attributes:
      name: tokenizer, pretrain or finetune.
      model: the Flax module.
      init: ``init(key, batch) -> variables`` (boxed, with logical axis names).
      loss_fn: see LossFn; ``frozen`` carries constant inputs (the pretraining tokenizer).
      depth: encoder depth, for layer-wise lr decay.
      frozen: constant pytree passed to every step (None if unused).
      prepare: optional ``prepare(state, batch, key) -> state`` run once before the first
        step when ``needs_prepare(state)`` (the tokenizer's k-means initialisation).
      predict: optional ``predict(params, extra, batch) -> [b, ...]`` for evaluation.
      target: the batch field predictions are scored against (``label`` or ``value``).
      metrics: ``metrics(scores, targets) -> {name: float}`` of a split's predictions.
      best_metric: the metric the best checkpoint maximises (None: no best checkpoint).
      trainable: optional ``trainable(params) -> tree of bools`` (frozen parts get no update).
      artefacts: optional ``artefacts(state, workdir)`` writing end-of-run files (plots);
        called on process 0 with host copies of the state.
    """

    name: str
    model: nn.Module
    init: Callable[[jax.Array, dict], dict]
    loss_fn: LossFn
    depth: int
    frozen: Any = None
    prepare: Callable | None = None
    needs_prepare: Callable[[TrainState], bool] | None = None
    predict: Callable | None = None
    target: str = "label"
    metrics: Callable[[np.ndarray, np.ndarray], dict] | None = None
    best_metric: str | None = None
    trainable: Callable | None = None
    artefacts: Callable[[TrainState, str], None] | None = None


def model_options(config) -> dict:
    """TransformerConfig fields that come from ``config.model`` (memory, speed and input scaling)."""
    return {"remat": config.model.remat, "attention": config.model.attention, "layer_norm": config.model.layer_norm,
            "linear": config.model.linear, "mlp": config.model.mlp, "qkv": config.model.qkv,
            "scan_blocks": config.model.scan_blocks, "head_pooling": config.model.head_pooling,
            **{k: config.model[k] for k in model_config.REFERENCE_INPUTS}}


def effective_patch_mask(batch: dict) -> jax.Array:
    """[b, C, W] real patches of real samples (padding samples of eval batches excluded)."""
    return batch["patch_mask"] & batch["valid"][:, None, None]


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(values * weights) / sum(weights) over all entries (0 when every weight is 0)."""
    weights = weights.astype(jnp.float32)
    return (values.astype(jnp.float32) * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def split_variables(variables: dict) -> tuple[Any, dict]:
    """(params, the other collections) of a variables dict, unboxed."""
    variables = nn.unbox(variables)
    params = variables["params"]
    extra = {k: v for k, v in variables.items() if k not in ("params", "intermediates")}
    return params, extra
