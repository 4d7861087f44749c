"""Frozen model configurations and the size presets of LABRAM.md section 3.5."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

PATCH_SIZE = 200  # samples per patch: 1 s at 200 Hz
NUM_TIME_ROWS = 16  # time-embedding table rows: at most 16 windows per sample
REMAT_POLICIES = ("none", "block")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "explicit", "cpu_kernel")  # labram_jax.models.attention
LAYER_NORM_IMPLEMENTATIONS = ("auto", "xla", "cpu_kernel")  # labram_jax.models.normalization
LINEAR_IMPLEMENTATIONS = ("auto", "xla", "cpu_kernel")  # labram_jax.models.linear
MLP_IMPLEMENTATIONS = ("auto", "fused", "layers")  # layers.Mlp: linear.gelu_mlp, or two linear layers
QKV_INPUTS = ("auto", "in_kernel", "sliced")  # layers.Attention: attention.on_projection, or q, k, v sliced out
INPUT_NORMS = ("none", "channel")  # layers.normalize_channels
PATCH_EMBEDS = ("temporal", "spectrum")  # layers.TemporalEncoder (the paper), layers.SpectrumEncoder
HEAD_POOLINGS = ("mean", "electrode")  # what the fine-tuning head reads: layers.masked_mean, layers.electrode_rows
DTYPES = ("float32", "bfloat16")  # computation dtypes (parameters stay float32)
# How a transformer reads its signal: TransformerConfig fields an encoder must share with any
# model that reuses it, and their values in the reference (and its official weights).
REFERENCE_INPUTS = {"input_norm": "none", "temporal_groups": 4, "patch_embed": "temporal", "spatial_mix": False}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """One neural transformer (LaBraM encoder, tokenizer encoder or decoder).

    Attributes:
      embed_dim: token width D; ``25 * temporal_channels`` for the temporal encoder.
      depth: number of transformer blocks.
      num_heads: attention heads; head_dim = D / num_heads.
      mlp_ratio: MLP hidden width / D.
      temporal_channels: C_out of the temporal encoder (0 for the tokenizer decoder,
        whose patches are code vectors projected by a 1x1 projection of ``in_dim``).
      in_dim: input feature size per patch for the 1x1 projection (decoder only).
      qk_norm: LayerNorm over head_dim on q and k (LaBraM yes, tokenizer no).
      qkv_bias: learned bias on q and v (tokenizer); LaBraM has none.
      layer_scale_init: initial value of gamma_1/gamma_2, or None for no layer scale.
      drop_path_rate: stochastic-depth rate of the last block (linear from 0).
      num_spatial_rows: rows of the spatial table (129: cls + 128 channels).
      num_time_rows: rows of the time table (16).
      dtype: computation dtype (parameters stay float32).
      remat: ``none``, or ``block``: recompute each block's activations in the backward
        pass instead of keeping them (less memory, about a third more compute).
      attention: implementation of the attention core (labram_jax.models.attention):
        auto, xla, cudnn, explicit or cpu_kernel (a C++ forward pass for AVX2 CPUs, compiled on
        first use); all compute the same function.
      layer_norm: implementation of every LayerNorm (labram_jax.models.normalization): auto,
        xla or cpu_kernel (C++ for AVX2 CPUs, built with the attention's); the same function.
      linear: implementation of the blocks' linear layers (qkv, proj, fc1, fc2; a code-input
        model's patch embedding; the tokenizer's task heads take their side's;
        labram_jax.models.linear): auto, xla or cpu_kernel (a C++ product kernel for AVX2 CPUs,
        built with the attention's); the same function.
      mlp: how each block's MLP runs: fused (one ``linear.gelu_mlp``: GELU applied as fc1's
        product is written by the C++ kernel; needs linear on cpu_kernel and no LoRA), layers
        (two linear layers and XLA's GELU) or auto (fused where it can run); the same function.
      qkv: how the C++ attention kernel gets q, k and v: in_kernel (it reads the fused qkv
        projection itself and applies the q/k LayerNorm: no slices, copies or concatenated
        gradients; needs attention on cpu_kernel),
        sliced (q, k, v sliced out and transformed by their own layers) or auto (in_kernel where
        it can run); the same function.
      lora_rank: > 0 adds LoRA adapters of this rank to qkv, proj, fc1 and fc2 of every
        block (parameter-efficient fine-tuning); 0: none (the plain model).
      lora_alpha: the adapters' scale is lora_alpha / lora_rank.
      scan_blocks: run the blocks with ``nn.scan`` over parameters stacked on a leading
        ``layers`` axis (``blocks/...`` [depth, ...] instead of ``blocks_0 ... blocks_{depth-1}``):
        one block is compiled instead of ``depth`` (Huge compiles several times faster).
        The same function; files always store the per-block layout (models/stacking.py).
      input_norm: ``none`` (the paper: the signal as given, in units of 100 uV), or ``channel``:
        each channel of each sample scaled to zero mean and unit variance over its real patches
        before the temporal encoder (removes per-recording and per-electrode amplitude; not in
        the reference, so official weights expect ``none``).
      temporal_groups: GroupNorm groups of the temporal encoder (the reference: 4). Each group
        is normalised over the whole sample, so with 4 groups the overall power of each group
        of filters (how much of the sample is in each band) is divided out; 1 keeps the power
        ratios between the filters. Changes no parameter shape.
      patch_embed: how a transformer with ``temporal_channels`` embeds each 200-sample patch:
        ``temporal`` (the paper's temporal encoder, LABRAM.md 3.1) or ``spectrum`` (log
        amplitudes of the patch's 1-45 Hz FFT bins through one Linear layer; not in the
        reference, so official weights need ``temporal``). With ``spectrum``,
        ``temporal_groups`` is unused and ``temporal_channels`` only fixes D = 25 * C.
      spatial_mix: learned spatial filters ahead of the patch embedding (``layers.SpatialMix``:
        each electrode plus a learned, zero-initialised combination of the others, indexed by
        electrode name); not in the reference: a fine-tuned model may add it to an encoder
        pretrained without (official weights too), where it starts as the identity. Its table learns at
        the head's rate under layer decay (``optim.layer_id``).
      head_pooling: what a fine-tuning head reads: ``mean`` (the paper: every patch token
        averaged, [D]) or ``electrode`` (each electrode's tokens averaged over its patches, put
        in that electrode's row of the spatial table, [num_spatial_rows * D]; absent electrodes
        are zeros, so any montage fits, and the head sees where a signal is, which the mean over
        channels averages away). Encoders and official weights do not depend on it.
    """

    embed_dim: int = 200
    depth: int = 12
    num_heads: int = 10
    mlp_ratio: float = 4.0
    temporal_channels: int = 8
    in_dim: int = 0
    qk_norm: bool = True
    qkv_bias: bool = False
    layer_scale_init: float | None = 0.1
    drop_path_rate: float = 0.0
    num_spatial_rows: int = 129
    num_time_rows: int = NUM_TIME_ROWS
    dtype: Any = jnp.float32
    remat: str = "none"
    attention: str = "auto"
    layer_norm: str = "auto"
    linear: str = "auto"
    mlp: str = "auto"
    qkv: str = "auto"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    scan_blocks: bool = False
    input_norm: str = "none"
    temporal_groups: int = 4
    patch_embed: str = "temporal"
    spatial_mix: bool = False
    head_pooling: str = "mean"

    def __post_init__(self):
        if self.temporal_channels and (self.temporal_groups < 1 or self.temporal_channels % self.temporal_groups):
            raise ValueError(f"temporal_groups={self.temporal_groups} must divide temporal_channels="
                             f"{self.temporal_channels}: use 4 (the paper) or 1")
        if self.patch_embed not in PATCH_EMBEDS:
            raise ValueError(f"patch_embed={self.patch_embed!r}: choose one of {PATCH_EMBEDS}")
        if self.head_pooling not in HEAD_POOLINGS:
            raise ValueError(f"head_pooling={self.head_pooling!r}: choose one of {HEAD_POOLINGS}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm={self.input_norm!r}: choose one of {INPUT_NORMS}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}: choose one of {ATTENTION_IMPLEMENTATIONS}")
        if self.layer_norm not in LAYER_NORM_IMPLEMENTATIONS:
            raise ValueError(f"layer_norm={self.layer_norm!r}: choose one of {LAYER_NORM_IMPLEMENTATIONS}")
        if self.linear not in LINEAR_IMPLEMENTATIONS:
            raise ValueError(f"linear={self.linear!r}: choose one of {LINEAR_IMPLEMENTATIONS}")
        if self.mlp not in MLP_IMPLEMENTATIONS:
            raise ValueError(f"mlp={self.mlp!r}: choose one of {MLP_IMPLEMENTATIONS}")
        if self.qkv not in QKV_INPUTS:
            raise ValueError(f"qkv={self.qkv!r}: choose one of {QKV_INPUTS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: choose one of {REMAT_POLICIES}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 0")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.temporal_channels:
            if self.temporal_channels % 4:
                raise ValueError(f"temporal_channels {self.temporal_channels} must be a multiple "
                                 "of 4 (GroupNorm has 4 groups)")
            if self.embed_dim != 25 * self.temporal_channels:
                raise ValueError(f"embed_dim {self.embed_dim} must equal 25 * temporal_channels "
                                 f"({25 * self.temporal_channels})")
        elif self.in_dim <= 0:
            raise ValueError("a transformer without a temporal encoder needs in_dim > 0")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def non_reference_inputs(self) -> dict[str, Any]:
        """The ``REFERENCE_INPUTS`` fields set otherwise than in the reference, with their values."""
        return {k: getattr(self, k) for k, v in REFERENCE_INPUTS.items() if getattr(self, k) != v}

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """VQ-NSP: encoder, quantizer and decoder (LABRAM.md section 4)."""

    encoder: TransformerConfig
    decoder: TransformerConfig
    codebook_size: int = 8192
    code_dim: int = 64
    ema_decay: float = 0.99
    commitment_weight: float = 1.0
    kmeans_iters: int = 10
    dead_code_threshold: float = 0.0  # not in the reference: restart codes used less than this (EMA count)
    log_amplitude: bool = False  # not in the reference: the amplitude target is log(|X| + 0.01)
    # not in the reference: amplitude and phase targets only on the 1-Hz DFT bins in [low, high] Hz (both
    # halves of the spectrum); (0, 100) is every bin, the reference
    target_low_hz: int = 0
    target_high_hz: int = 100

    def replace(self, **changes) -> "TokenizerConfig":
        return dataclasses.replace(self, **changes)


def _labram(embed_dim, depth, heads, layer_scale, drop_path) -> TransformerConfig:
    return TransformerConfig(embed_dim=embed_dim, depth=depth, num_heads=heads,
                             temporal_channels=embed_dim // 25, layer_scale_init=layer_scale,
                             drop_path_rate=drop_path)


# LaBraM sizes (LABRAM.md 3.5); layer scale per the paper, drop path for fine-tuning.
LABRAM_PRESETS: dict[str, TransformerConfig] = {
    "tiny": _labram(100, 2, 4, 0.1, 0.0),
    "base": _labram(200, 12, 10, 0.1, 0.1),
    "large": _labram(400, 24, 16, 1e-5, 0.1),
    "huge": _labram(800, 48, 16, 1e-6, 0.2),
}


def labram(size: str, **overrides) -> TransformerConfig:
    """The LaBraM encoder preset ``size`` (tiny, base, large, huge) with overrides."""
    if size not in LABRAM_PRESETS:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(LABRAM_PRESETS)}")
    return LABRAM_PRESETS[size].replace(**overrides)


def tokenizer(size: str = "base", **overrides) -> TokenizerConfig:
    """The VQ-NSP preset: Base-width encoder (12 blocks) and 3-block decoder.

    ``tiny`` shrinks everything for tests. ``overrides`` apply to the TokenizerConfig.
    """
    if size == "tiny":
        enc = TransformerConfig(embed_dim=100, depth=2, num_heads=4, temporal_channels=4,
                                qk_norm=False, qkv_bias=True, layer_scale_init=None)
        codes, code_dim = 256, 16
    elif size == "base":
        enc = TransformerConfig(embed_dim=200, depth=12, num_heads=10, temporal_channels=8,
                                qk_norm=False, qkv_bias=True, layer_scale_init=None)
        codes, code_dim = 8192, 64
    else:
        raise ValueError(f"unknown tokenizer size {size!r}; choose 'base' or 'tiny'")
    code_dim = overrides.get("code_dim", code_dim)
    dec = enc.replace(depth=3 if size == "base" else 1, temporal_channels=0, in_dim=code_dim)
    return TokenizerConfig(encoder=enc, decoder=dec, codebook_size=codes,
                           code_dim=code_dim).replace(**overrides)
