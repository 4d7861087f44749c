"""The neural transformer (LABRAM.md 3.1-3.3) and the LaBraM models built on it: fine-tuning
and masked EEG modelling. Its layers live in ``layers.py``; the tokenizer (``tokenizer.py``)
uses it as encoder and decoder."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from labram_jax.models import config as config_lib
from labram_jax.models import layers, linear_cross_entropy


class NeuralTransformer(nn.Module):
    """Patch embedding + cls/spatial/time embeddings + transformer blocks.

    Used as the LaBraM encoder (temporal encoder on raw patches) and as the tokenizer
    decoder (``cfg.temporal_channels == 0``: a 1x1 projection of code vectors).
    Returns all tokens before any final norm.
    """

    cfg: config_lib.TransformerConfig
    use_mask_token: bool = False
    # Pretraining quirk of the reference (LABRAM.md 3.2): the cls token gets the
    # spatial row of the first input channel instead of row 0.
    cls_uses_first_channel: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, channel_ids: jax.Array, patch_mask: jax.Array | None = None,
                 token_mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        """Encodes patches into tokens.

        Args:
          x: [B, N, A, 200] float32 signal in units of 100 uV, or [B, N, A, in_dim]
            code vectors for the decoder.
          channel_ids: [B, N] or [N] int spatial-table rows (1..128) of the channels.
          patch_mask: [B, N, A] bool, True for real patches; None means all real.
          token_mask: [B, N*A] bool, True where the patch is replaced by the mask
            token (masked EEG modelling); requires ``use_mask_token``.
          deterministic: False enables stochastic depth (needs a 'dropout' rng).
        Returns:
          [B, 1 + N*A, D]: cls token then channel-major patch tokens.
        """
        cfg = self.cfg
        b, n, a = x.shape[:3]
        if a > cfg.num_time_rows:
            raise ValueError(f"input has {a} windows but the time-embedding table has "
                             f"{cfg.num_time_rows} rows: split samples into at most "
                             f"{cfg.num_time_rows} s")
        channel_ids = jnp.broadcast_to(jnp.asarray(channel_ids, jnp.int32), (b, n))
        if patch_mask is None:
            patch_mask = jnp.ones((b, n, a), bool)
        valid = patch_mask.reshape(b, n * a)

        if cfg.temporal_channels:
            if cfg.input_norm == "channel":
                x = layers.normalize_channels(x, patch_mask)
            if cfg.spatial_mix:
                x = layers.SpatialMix(cfg.num_spatial_rows, name="spatial_mix")(x, channel_ids, patch_mask)
            patches = x.reshape(b, n * a, x.shape[-1]).astype(cfg.dtype)
            if cfg.patch_embed == "spectrum":
                h = layers.SpectrumEncoder(cfg.embed_dim, cfg.dtype, name="patch_embed")(patches)
            else:
                h = layers.TemporalEncoder(cfg.temporal_channels, cfg.dtype, cfg.temporal_groups, name="patch_embed")(
                    patches, valid)
        else:
            h = layers.dense(cfg.embed_dim, ("code", "embed"), "patch_embed", dtype=cfg.dtype,
                             implementation=cfg.linear)(x.reshape(b, n * a, x.shape[-1]).astype(cfg.dtype))
        self.sow("intermediates", "patch_embed_out", h)

        if self.use_mask_token:
            mask_token = self.param("mask_token", layers.logical(layers.trunc_normal(), ("embed",)),
                                    (cfg.embed_dim,))
            if token_mask is not None:
                w = token_mask.astype(h.dtype)[..., None]
                h = h * (1 - w) + mask_token.astype(h.dtype) * w
        elif token_mask is not None:
            raise ValueError("token_mask given to a transformer built without use_mask_token")

        cls_token = self.param("cls_token", layers.logical(layers.trunc_normal(), ("embed",)), (cfg.embed_dim,))
        spatial = self.param("spatial_embed", layers.logical(layers.trunc_normal(), ("spatial", "embed")),
                             (cfg.num_spatial_rows, cfg.embed_dim))
        time = self.param("time_embed", layers.logical(layers.trunc_normal(), ("time", "embed")),
                          (cfg.num_time_rows, cfg.embed_dim))
        channel_emb = jnp.take(spatial, channel_ids, axis=0)  # [B, N, D]
        cls_row = channel_emb[:, 0] if self.cls_uses_first_channel else jnp.broadcast_to(spatial[0], (b, cfg.embed_dim))
        patches = h + channel_emb.repeat(a, axis=1).astype(h.dtype)
        patches = patches + jnp.tile(time[:a], (n, 1)).astype(h.dtype)
        tokens = jnp.concatenate([(cls_token + cls_row)[:, None].astype(h.dtype), patches], axis=1)
        tokens = nn.with_logical_constraint(tokens, ("act_batch", "act_length", "act_embed"))
        key_valid = jnp.concatenate([jnp.ones((b, 1), bool), valid], axis=1)

        if cfg.scan_blocks:
            def step(block, carry, layer):  # block `layer` (traced) of the stack
                return block(carry, key_valid, deterministic, layer), None

            body = nn.remat(step, prevent_cse=False) if cfg.remat == "block" else step
            scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                              length=cfg.depth, metadata_params={nn.PARTITION_NAME: "layers"})
            tokens, _ = scanned(layers.Block(cfg, 0, name="blocks"), tokens, jnp.arange(cfg.depth))
            return tokens
        block_cls = nn.remat(layers.Block, static_argnums=(3,)) if cfg.remat == "block" else layers.Block
        for i in range(cfg.depth):
            if i == 0:
                self.sow("intermediates", "block0_in", tokens)
            block = block_cls(cfg, i + 1, layers.drop_path_rate(cfg, i), name=f"blocks_{i}")
            tokens = block(tokens, key_valid, deterministic)
            if i == 0:
                self.sow("intermediates", "block0_out", tokens)
        return tokens



def _patch_valid(x: jax.Array, patch_mask: jax.Array | None) -> jax.Array:
    b, n, a = x.shape[:3]
    if patch_mask is None:
        return jnp.ones((b, n * a), bool)
    return patch_mask.reshape(b, n * a)


class LaBraM(nn.Module):
    """Encoder + mean pooling + ``fc_norm`` + linear head (LABRAM.md 3.4); with
    ``cfg.head_pooling="electrode"`` the head reads each electrode's pooled, ``fc_norm``-ed
    tokens in its spatial-table row instead (``layers.electrode_rows``).

    ``num_outputs`` is 1 for binary tasks (one logit) and regression, the class count
    for multi-class tasks, and 0 for an encoder without head (embeddings only).
    """

    cfg: config_lib.TransformerConfig
    num_outputs: int = 1

    def setup(self):
        self.encoder = NeuralTransformer(self.cfg)
        self.fc_norm = layers.layer_norm(name="fc_norm", implementation=self.cfg.layer_norm)
        if self.num_outputs:
            head_in = "embed" if self.cfg.head_pooling == "mean" else "electrodes"
            self.head = nn.Dense(
                self.num_outputs, name="head",
                kernel_init=layers.logical(lambda *a: layers.trunc_normal()(*a) * 0.001, (head_in, "classes")),
                bias_init=layers.logical(nn.initializers.zeros, ("classes",)))

    def __call__(self, x: jax.Array, channel_ids: jax.Array, patch_mask: jax.Array | None = None,
                 *, train: bool = False) -> jax.Array:
        """x: [B, N, A, 200] (units of 100 uV); channel_ids [B, N] or [N]; patch_mask
        [B, N, A] bool -> [B, num_outputs] float32 logits (or values); without a head
        (``num_outputs`` 0) the pooled embedding [B, D]."""
        out = self.embed(x, channel_ids, patch_mask, train=train)
        if not self.num_outputs:
            return out["pooled"].astype(jnp.float32)
        return self.head(out.get("electrodes", out["pooled"])).astype(jnp.float32)

    def embed(self, x: jax.Array, channel_ids: jax.Array, patch_mask: jax.Array | None = None,
              *, train: bool = False) -> dict[str, jax.Array]:
        """Embeddings of the encoder.

        Returns a dict with ``pooled`` [B, D] (fc_norm of the mean of valid patch
        tokens: the head's input), ``tokens`` [B, 1 + N*A, D] (fc_norm of every token,
        cls first, as the reference's ``return_all_tokens``) and ``patch_valid`` [B, N*A];
        with ``head_pooling="electrode"`` also ``electrodes`` [B, num_spatial_rows * D], the
        head's input then (fc_norm of each electrode's mean token, in its spatial row).
        """
        tokens = self.encoder(x, channel_ids, patch_mask, deterministic=not train)
        valid = _patch_valid(x, patch_mask)
        pooled = self.fc_norm(layers.masked_mean(tokens[:, 1:], valid))
        out = {"pooled": pooled, "tokens": self.fc_norm(tokens), "patch_valid": valid}
        if self.cfg.head_pooling == "electrode":
            b, n, a = x.shape[:3]
            ids = jnp.broadcast_to(jnp.asarray(channel_ids, jnp.int32), (b, n))
            per_channel = layers.masked_mean(tokens[:, 1:].reshape(b * n, a, -1), valid.reshape(b * n, a))
            slots = layers.electrode_rows(self.fc_norm(per_channel).reshape(b, n, -1),
                                          valid.reshape(b, n, a).any(-1), ids, self.cfg.num_spatial_rows)
            out["electrodes"] = slots.reshape(b, -1)
        return out


class LaBraMPretrain(nn.Module):
    """The student of masked EEG modelling: encoder with mask token, norm, lm_head."""

    cfg: config_lib.TransformerConfig
    vocab_size: int = 8192
    cls_uses_first_channel: bool = True  # the reference's quirk, for weight parity

    def setup(self):
        self.encoder = NeuralTransformer(self.cfg, use_mask_token=True,
                                         cls_uses_first_channel=self.cls_uses_first_channel)
        self.norm = layers.layer_norm(name="norm", dtype=self.cfg.dtype, implementation=self.cfg.layer_norm)
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

    def code_cross_entropy(self, hidden: jax.Array, codes: jax.Array, weights: jax.Array,
                           chunks: int = 4) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The lm_head's weighted cross-entropy against tokenizer codes, without keeping the
        [B, T, vocab_size] logits (:func:`labram_jax.models.linear_cross_entropy.linear_cross_entropy`:
        ``chunks`` pieces, 0 = all logits at once).

        hidden: [B, T, D]; codes: [B, T] int; weights: [B, T] ->
        (sum(weights * ce) with a gradient, ce [B, T] float32, correct [B, T] bool).
        """
        head = self.lm_head.variables["params"]
        return linear_cross_entropy.linear_cross_entropy(hidden.astype(self.cfg.dtype), head["kernel"], head["bias"],
                                                         codes, weights, chunks, self.cfg.linear)

    def logits_of(self, x: jax.Array, channel_ids: jax.Array, token_mask: jax.Array,
                  patch_mask: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        """Logits [B, N*A, vocab_size] of every patch token (also the init entry point)."""
        return self.logits(self(x, channel_ids, token_mask, patch_mask, train=train))
