"""The LaBraM models built on the neural transformer: fine-tuning and masked EEG modelling."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from labram_jax.models import config as config_lib
from labram_jax.models import layers


def _patch_valid(x: jax.Array, patch_mask: jax.Array | None) -> jax.Array:
    b, n, a = x.shape[:3]
    if patch_mask is None:
        return jnp.ones((b, n * a), bool)
    return patch_mask.reshape(b, n * a)


class LaBraM(nn.Module):
    """Encoder + mean pooling + ``fc_norm`` + linear head (LABRAM.md 3.4).

    ``num_outputs`` is 1 for binary tasks (one logit) and regression, the class count
    for multi-class tasks, and 0 for an encoder without head (embeddings only).
    """

    cfg: config_lib.TransformerConfig
    num_outputs: int = 1

    def setup(self):
        self.encoder = layers.NeuralTransformer(self.cfg)
        self.fc_norm = layers.layer_norm(name="fc_norm")
        if self.num_outputs:
            self.head = nn.Dense(
                self.num_outputs, name="head",
                kernel_init=layers.logical(lambda *a: layers.trunc_normal()(*a) * 0.001, ("embed", "classes")),
                bias_init=layers.logical(nn.initializers.zeros, ("classes",)))

    def __call__(self, x: jax.Array, channel_ids: jax.Array, patch_mask: jax.Array | None = None,
                 *, train: bool = False) -> jax.Array:
        """x: [B, N, A, 200] (units of 100 uV); channel_ids [B, N] or [N]; patch_mask
        [B, N, A] bool -> [B, num_outputs] float32 logits (or values)."""
        pooled = self.embed(x, channel_ids, patch_mask, train=train)["pooled"]
        return self.head(pooled).astype(jnp.float32)

    def embed(self, x: jax.Array, channel_ids: jax.Array, patch_mask: jax.Array | None = None,
              *, train: bool = False) -> dict[str, jax.Array]:
        """Embeddings of the encoder.

        Returns a dict with ``pooled`` [B, D] (fc_norm of the mean of valid patch
        tokens: the head's input), ``tokens`` [B, 1 + N*A, D] (fc_norm of every token,
        cls first, as the reference's ``return_all_tokens``) and ``patch_valid`` [B, N*A].
        """
        tokens = self.encoder(x, channel_ids, patch_mask, deterministic=not train)
        valid = _patch_valid(x, patch_mask)
        pooled = self.fc_norm(layers.masked_mean(tokens[:, 1:], valid))
        return {"pooled": pooled, "tokens": self.fc_norm(tokens), "patch_valid": valid}


class LaBraMPretrain(nn.Module):
    """The student of masked EEG modelling: encoder with mask token, norm, lm_head."""

    cfg: config_lib.TransformerConfig
    vocab_size: int = 8192
    cls_uses_first_channel: bool = True  # the reference's quirk, for weight parity

    def setup(self):
        self.encoder = layers.NeuralTransformer(self.cfg, use_mask_token=True,
                                                cls_uses_first_channel=self.cls_uses_first_channel)
        self.norm = layers.layer_norm(name="norm", dtype=self.cfg.dtype)
        self.lm_head = layers.dense(self.vocab_size, ("embed", "vocab"), "lm_head", dtype=self.cfg.dtype)

    def __call__(self, x: jax.Array, channel_ids: jax.Array, token_mask: jax.Array,
                 patch_mask: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        """Hidden states of the patch tokens after the final norm.

        x: [B, N, A, 200]; token_mask: [B, N*A] bool, True = masked -> [B, N*A, D].
        """
        tokens = self.encoder(x, channel_ids, patch_mask, token_mask, deterministic=not train)
        return self.norm(tokens[:, 1:])

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> [..., vocab_size] float32 logits over tokenizer codes."""
        return self.lm_head(hidden).astype(jnp.float32)

    def logits_of(self, x: jax.Array, channel_ids: jax.Array, token_mask: jax.Array,
                  patch_mask: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        """Logits [B, N*A, vocab_size] of every patch token (also the init entry point)."""
        return self.logits(self(x, channel_ids, token_mask, patch_mask, train=train))
