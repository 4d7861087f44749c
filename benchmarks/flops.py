"""Model FLOPs per training step, counted analytically (the MFU numerator).

Conventions (the usual ones for MFU, as in PaLM's appendix B):
- A matrix product of [m, k] by [k, n] costs 2 m k n FLOPs; a 1-D convolution with
  output length T_out, kernel k, C_in -> C_out costs 2 T_out k C_in C_out.
- Attention: QK^T and softmax(QK^T) V cost 2 L^2 D each per sample (all heads), with
  L the full (padded) sequence: that is what the hardware computes.
- Norms, GELU, softmax, embeddings, the FFT and the optimizer are not counted (a few
  per cent of the matmul FLOPs for these sizes; tests compare with XLA's own count).
- Training costs 3x the forward pass of every trained part (backward = 2 x forward);
  a frozen part (the tokenizer during pretraining) costs its forward pass once, and the
  quantizer's nearest-code search is counted once (argmin has no gradient).
- Pretraining runs the student twice per sample (the masked pass and its symmetric
  complement); the lm_head runs once per token (each token is predicted by the pass that
  hid it).

Shapes: P = channels x windows patch tokens per sample, L = P + 1 with the cls token.
"""

from __future__ import annotations

from labram_jax.models import config as model_config

PATCH = model_config.PATCH_SIZE
CONV_OUT_LENGTH = 25  # 200 samples, stride 8


def patch_embed_flops(cfg: model_config.TransformerConfig, patches: int) -> float:
    """Temporal encoder (3 convs) or the decoder's linear projection, per sample."""
    if cfg.temporal_channels:
        c = cfg.temporal_channels
        conv1 = 2 * CONV_OUT_LENGTH * 15 * 1 * c
        conv23 = 2 * (2 * CONV_OUT_LENGTH * 3 * c * c)
        return float(patches * (conv1 + conv23))
    return float(2 * patches * cfg.in_dim * cfg.embed_dim)


def block_flops(cfg: model_config.TransformerConfig, length: int) -> float:
    """One transformer block over ``length`` tokens, per sample:
    qkv 6LD^2 + scores 2L^2D + values 2L^2D + proj 2LD^2 + MLP 4LDM."""
    d, m, n = cfg.embed_dim, cfg.mlp_dim, length
    return float(8 * n * d * d + 4 * n * n * d + 4 * n * d * m)


def transformer_flops(cfg: model_config.TransformerConfig, patches: int) -> float:
    """Patch embedding + every block of a neural transformer, per sample."""
    return patch_embed_flops(cfg, patches) + cfg.depth * block_flops(cfg, patches + 1)


def task_head_flops(d: int, out: int, tokens: int) -> float:
    """Linear(d, d) -> tanh -> Linear(d, out) on every token."""
    return float(2 * tokens * d * (d + out))


def tokenizer_forward(tcfg: model_config.TokenizerConfig, patches: int) -> dict[str, float]:
    """Forward FLOPs of VQ-NSP per sample, split into the differentiated part and the code search."""
    enc, dec = tcfg.encoder, tcfg.decoder
    encoder = transformer_flops(enc, patches) + task_head_flops(enc.embed_dim, tcfg.code_dim, patches)
    search = float(2 * patches * tcfg.codebook_size * tcfg.code_dim)
    decoder = transformer_flops(dec, patches) + 2 * task_head_flops(dec.embed_dim, PATCH, patches)
    return {"encoder": encoder, "search": search, "decoder": decoder}


def train_step_flops(stage: str, batch: int, patches: int, cfg: model_config.TransformerConfig | None = None,
                     tokenizer: model_config.TokenizerConfig | None = None, vocab: int = 0,
                     num_outputs: int = 1) -> float:
    """Model FLOPs of one training step of ``stage`` for a global batch of ``batch`` samples.

    Args:
      stage: tokenizer, pretrain or finetune.
      patches: channels x windows per sample.
      cfg: the LaBraM encoder (pretrain, finetune); tokenizer: VQ-NSP (tokenizer, pretrain).
      vocab: the codebook size (pretraining's lm_head); num_outputs: the fine-tuning head.
    """
    if stage == "tokenizer":
        parts = tokenizer_forward(tokenizer, patches)
        per_sample = 3 * (parts["encoder"] + parts["decoder"]) + parts["search"]
    elif stage == "pretrain":
        parts = tokenizer_forward(tokenizer, patches)
        frozen = parts["encoder"] + parts["search"]  # targets: encoder + code search, forward only
        student = 2 * transformer_flops(cfg, patches) + 2 * patches * cfg.embed_dim * vocab
        per_sample = 3 * student + frozen
    elif stage == "finetune":
        per_sample = 3 * (transformer_flops(cfg, patches) + 2 * cfg.embed_dim * num_outputs)
    else:
        raise ValueError(f"unknown stage {stage!r}: tokenizer, pretrain or finetune")
    return float(batch * per_sample)


def forward_flops(stage: str, batch: int, patches: int, cfg=None, tokenizer=None, vocab: int = 0,
                  num_outputs: int = 1) -> float:
    """Forward-only FLOPs (what inference costs), per batch: for comparison with XLA's count."""
    if stage == "tokenizer":
        per_sample = sum(tokenizer_forward(tokenizer, patches).values())
    elif stage == "finetune":
        per_sample = transformer_flops(cfg, patches) + 2 * cfg.embed_dim * num_outputs
    else:
        raise ValueError("forward_flops covers tokenizer and finetune")
    return float(batch * per_sample)


# Peak dense throughput per chip (TFLOP/s) for the compute dtype, from vendor datasheets.
PEAK_TFLOPS = {
    ("H100", "bfloat16"): 989.0, ("H100", "float32"): 67.0,  # SXM; fp32 without TF32
    ("H200", "bfloat16"): 989.0, ("H200", "float32"): 67.0,
    ("A100", "bfloat16"): 312.0, ("A100", "float32"): 19.5,
    ("TPU v5p", "bfloat16"): 459.0, ("TPU v5 lite", "bfloat16"): 197.0,
    ("TPU v4", "bfloat16"): 275.0,
}


def known_peak(device_kind: str, dtype: str) -> float | None:
    """The table's peak (TFLOP/s) for a ``jax.Device.device_kind``, or None if unknown."""
    for (name, dt), peak in PEAK_TFLOPS.items():
        if name.lower() in device_kind.lower() and dt == dtype:
            return peak
    return None
