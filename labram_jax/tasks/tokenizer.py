"""Stage 1: VQ-NSP tokenizer training (Fourier reconstruction, EMA codebook, k-means init)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from labram_jax import compile_options, config_schema, input_pipeline, model_file
from labram_jax import metrics as metrics_lib
from labram_jax.models import config as model_config
from labram_jax.models import tokenizer as tokenizer_lib
from labram_jax.tasks import stage as stage_lib


def model_from_config(config: ml_collections.ConfigDict, dtype) -> tokenizer_lib.VQNSP:
    cfg = model_config.tokenizer(config.model.tokenizer_size)
    options = stage_lib.model_options(config)
    cfg = cfg.replace(encoder=cfg.encoder.replace(dtype=dtype, **options), decoder=cfg.decoder.replace(
        dtype=dtype, in_dim=config.tokenizer.code_dim, **options), code_dim=config.tokenizer.code_dim,
        codebook_size=config.model.vocab_size, ema_decay=config.tokenizer.ema_decay,
        kmeans_iters=config.tokenizer.kmeans_iters, commitment_weight=config.tokenizer.commitment_weight,
        dead_code_threshold=config.tokenizer.dead_code_threshold,
        log_amplitude=config.tokenizer.log_amplitude)
    cfg = cfg.replace(**dict(zip(("target_low_hz", "target_high_hz"),
                                 config_schema.parse_target_band(config.tokenizer.target_band_hz))))
    return tokenizer_lib.VQNSP(cfg)


def code_usage(codes: jax.Array, valid: jax.Array, num_codes: int) -> dict[str, jax.Array]:
    """Codes used in a batch and the perplexity of their distribution (valid tokens only)."""
    counts = jax.ops.segment_sum(valid.reshape(-1).astype(jnp.float32), codes.reshape(-1), num_segments=num_codes)
    p = counts / jnp.maximum(counts.sum(), 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"used_codes": (counts > 0).sum().astype(jnp.float32), "perplexity": jnp.exp(entropy)}


def corpus_code_usage(path: str, spec: str, split: str, max_channels: int, max_windows: int,
                      batch_size: int = 64) -> dict[str, float]:
    """How a trained tokenizer uses its codebook on a whole split: the code of every real patch
    (``tokenize``, no codebook update), counted over the split.

    Args:
      path: the tokenizer's workdir or its ``model.npz``.
      spec: a data spec (manifest.json, ...); split: which of its splits to read.
      max_channels, max_windows: the batch grid (at least the largest record's).
    Returns:
      ``patches``, ``used_codes`` (codes given to at least one patch), ``codebook_size`` and
      ``perplexity`` (exp of the entropy of the code distribution: 1 when collapsed onto one
      code, the codebook size when uniform).
    """
    _, model, variables = model_file.load(path, kind="tokenizer")
    variables = {k: v for k, v in variables.items() if k in ("params", "codebook")}
    num_codes = model.cfg.codebook_size
    tokenize = compile_options.jit(lambda v, b: model.apply(v, b["x"], b["channel_ids"],
                                                            stage_lib.effective_patch_mask(b), method=model.tokenize))
    counts = np.zeros((num_codes,), np.int64)
    grid = input_pipeline.Grid(max_channels, max_windows)
    for batch in input_pipeline.eval_batches(spec, grid, batch_size, split):
        batch = {k: batch[k] for k in ("x", "channel_ids", "patch_mask", "valid")}
        codes = np.asarray(tokenize(variables, batch))
        real = np.asarray(stage_lib.effective_patch_mask(batch)).reshape(codes.shape)
        counts += np.bincount(codes[real], minlength=num_codes)
    p = counts[counts > 0] / max(counts.sum(), 1)
    return {"patches": int(counts.sum()), "used_codes": int((counts > 0).sum()), "codebook_size": num_codes,
            "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


def build(config: ml_collections.ConfigDict, dtype) -> stage_lib.Stage:
    model = model_from_config(config, dtype)
    num_codes = model.cfg.codebook_size

    def init(key, batch):
        return model.init(key, batch["x"][:1], batch["channel_ids"][:1], batch["patch_mask"][:1])

    def loss_fn(params, extra, batch, key, frozen):
        del frozen
        mask = stage_lib.effective_patch_mask(batch)
        drop_key, code_key = jax.random.split(key)
        out, updates = model.apply({"params": params, **extra}, batch["x"], batch["channel_ids"], mask,
                                   train=True, update_codebook=True, mutable=["codebook"],
                                   rngs={"dropout": drop_key, "codebook": code_key})
        metrics = {k: out[k] for k in ("loss", "amplitude_loss", "phase_loss", "commitment_loss")}
        metrics.update(code_usage(out["codes"], mask.reshape(mask.shape[0], -1), num_codes))
        return out["loss"], (metrics, {**extra, "codebook": updates["codebook"]})

    def needs_prepare(state) -> bool:
        return float(jax.device_get(state.extra["codebook"]["quantizer"]["initted"])) == 0.0

    def prepare(state, batch, key):
        """k-means on the encoder outputs of the (global) first batch -> the codebook."""
        mask = stage_lib.effective_patch_mask(batch)
        z, valid = model.apply({"params": state.params, **state.extra}, batch["x"], batch["channel_ids"], mask,
                               method=model.kmeans_samples)
        means, counts = tokenizer_lib.kmeans(key, z, valid, num_codes, model.cfg.kmeans_iters)
        codebook = dict(state.extra["codebook"]["quantizer"])
        codebook["embedding"] = means.astype(codebook["embedding"].dtype)
        if model.cfg.dead_code_threshold > 0:  # start the usage EMA from the k-means counts
            codebook["cluster_size"] = counts.astype(codebook["cluster_size"].dtype)
        codebook["initted"] = jnp.ones_like(codebook["initted"])
        return state.replace(extra={**state.extra, "codebook": {"quantizer": codebook}})

    def artefacts(state, workdir):
        """The codebook's usage (EMA of code counts) as a plot."""
        usage = state.extra["codebook"]["quantizer"]["cluster_size"]
        metrics_lib.plot_codebook_usage(usage, os.path.join(workdir, "codebook_usage.png"))

    return stage_lib.Stage(name="tokenizer", model=model, init=init, loss_fn=loss_fn,
                           depth=model.cfg.encoder.depth, prepare=prepare, needs_prepare=needs_prepare,
                           artefacts=artefacts)
