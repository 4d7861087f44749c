"""Stage 2: masked EEG modelling with symmetric masking against a frozen tokenizer."""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from labram_jax import config_schema, input_pipeline, model_file
from labram_jax.models import config as model_config
from labram_jax.models import transformer
from labram_jax.tasks import stage as stage_lib
from labram_jax.tasks import tokenizer as tokenizer_task


def sample_mask(key: jax.Array, valid: jax.Array, ratio: float = 0.5) -> jax.Array:
    """Per sample, masks exactly ``L - floor(L * ratio)`` of its ``L`` valid tokens, uniformly.

    Args:
      key: PRNG key; valid: [b, P] bool real tokens; ratio: the mask ratio.
    Returns:
      [b, P] bool, True = masked; never True on padding.
    """
    scores = jnp.where(valid, jax.random.uniform(key, valid.shape), 2.0)
    ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
    n_valid = valid.sum(axis=1)
    n_masked = n_valid - jnp.floor(n_valid * ratio).astype(n_valid.dtype)
    return (ranks < n_masked[:, None]) & valid


def load_tokenizer(path: str):
    """The frozen tokenizer: a ``model.npz`` written by the tokenizer stage (or its workdir)."""
    try:
        path = model_file.resolve(path, "the tokenizer")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"pretraining needs a trained tokenizer: {err}. Train one with "
                                "--config=configs/<size>.py:tokenizer and set "
                                "--config.pretrain.tokenizer_checkpoint=<that workdir>") from None
    _, model, variables = model_file.load(path, kind="tokenizer")
    return model, {k: v for k, v in variables.items() if k in ("params", "codebook")}


def random_tokenizer(config: ml_collections.ConfigDict, dtype, abstract: bool = False):
    """A VQ-NSP of ``config.model.tokenizer_size`` with random weights, as (model, variables):
    a stand-in for the trained tokenizer where only shapes or speed matter (benchmarks, the
    memory planner). ``abstract``: ShapeDtypeStructs instead of arrays."""
    tok_config = config_schema.defaults(config.model.size, "tokenizer")
    for field in ("tokenizer_size", "vocab_size", "remat", "attention", "layer_norm", "linear", "mlp", "qkv"):
        tok_config.model[field] = config.model[field]
    model = tokenizer_task.model_from_config(tok_config, dtype)
    empty = input_pipeline.Grid(config.data.max_channels, config.data.max_windows).empty()
    args = (empty["x"][None], empty["channel_ids"][None], empty["patch_mask"][None])
    init = lambda: model.init(jax.random.key(1), *args)  # noqa: E731
    variables = nn.unbox(jax.eval_shape(init) if abstract else init())
    return model, {k: v for k, v in variables.items() if k in ("params", "codebook")}


def build(config: ml_collections.ConfigDict, dtype, tokenizer=None) -> stage_lib.Stage:
    """The pretraining stage; ``tokenizer`` = (model, variables) replaces loading
    ``config.pretrain.tokenizer_checkpoint`` (benchmarks use a random one)."""
    tok_model, tok_vars = tokenizer or load_tokenizer(config.pretrain.tokenizer_checkpoint)
    vocab = tok_model.cfg.codebook_size
    cfg = model_config.labram(config.model.size, drop_path_rate=config.model.drop_path, dtype=dtype,
                              **stage_lib.model_options(config))
    model = transformer.LaBraMPretrain(cfg, vocab_size=vocab, cls_uses_first_channel=config.model.cls_quirk)
    ratio, chunks = config.pretrain.mask_ratio, config.pretrain.loss_chunks

    def init(key, batch):
        b = batch["x"][:1]
        n_tokens = b.shape[1] * b.shape[2]
        return model.init(key, b, batch["channel_ids"][:1], jnp.zeros((1, n_tokens), bool), batch["patch_mask"][:1],
                          method=model.logits_of)

    def loss_fn(params, extra, batch, key, frozen):
        del extra
        mask_key, drop_key = jax.random.split(key)
        patch_mask = stage_lib.effective_patch_mask(batch)
        b = patch_mask.shape[0]
        valid = patch_mask.reshape(b, -1)
        targets = jax.lax.stop_gradient(tok_model.apply(frozen, batch["x"], batch["channel_ids"], patch_mask,
                                                        method=tok_model.tokenize))
        masked = sample_mask(mask_key, valid, ratio)
        complement = valid & ~masked
        # Both passes in one batch: the masked pass and its symmetric complement.
        hidden = model.apply({"params": params}, jnp.concatenate([batch["x"]] * 2),
                             jnp.concatenate([batch["channel_ids"]] * 2), jnp.concatenate([masked, complement]),
                             jnp.concatenate([patch_mask] * 2), train=True, rngs={"dropout": drop_key})
        # Each token is predicted by the pass in which it was hidden; one lm_head over all.
        hidden = jnp.where(masked[..., None], hidden[:b], hidden[b:])
        # loss = mean ce over the masked tokens + mean ce over the complement's, as one weighted sum.
        weights = masked / jnp.maximum(masked.sum(), 1) + complement / jnp.maximum(complement.sum(), 1)
        loss, ce, correct = model.apply({"params": params}, hidden, targets, weights, chunks,
                                        method=model.code_cross_entropy)
        loss_1, loss_2 = stage_lib.weighted_mean(ce, masked), stage_lib.weighted_mean(ce, complement)
        metrics = {"loss": loss, "loss_masked": loss_1, "loss_symmetric": loss_2,
                   "accuracy_masked": stage_lib.weighted_mean(correct, masked),
                   "accuracy_symmetric": stage_lib.weighted_mean(correct, complement)}
        return loss, (metrics, {})

    return stage_lib.Stage(name="pretrain", model=model, init=init, loss_fn=loss_fn, depth=cfg.depth,
                           frozen=tok_vars)
