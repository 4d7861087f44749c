"""Building blocks of every LaBraM model (LABRAM.md section 3).

Shapes: B batch, N channels, A windows (1-s patches), P = N * A patch tokens,
L = 1 + P tokens (cls first, then channel-major patches), D width, H heads.
Every parameter carries logical axis names; `labram_jax.sharding` maps them to
mesh axes. Padding is described by a validity mask over patches and never changes
a real token's output: it is excluded from GroupNorm statistics and attention.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from labram_jax.models import attention
from labram_jax.models import config as config_lib
from labram_jax.models import linear, normalization

LN_EPS = 1e-6  # every LayerNorm of LaBraM (also q/k norms)
GN_EPS = 1e-5  # GroupNorm of the temporal encoder
GN_GROUPS = 4
INIT_STD = 0.02


def logical(init, axes: tuple[str | None, ...]):
    """An initializer annotated with logical axis names."""
    return nn.with_logical_partitioning(init, axes)


def trunc_normal(std: float = INIT_STD):
    return nn.initializers.truncated_normal(std)


def layer_norm(axis_name: str = "norm", name: str | None = None, dtype=jnp.float32,
               implementation: str = "auto") -> normalization.LayerNorm:
    """LaBraM's LayerNorm (eps 1e-6) with parameters along logical axis ``axis_name``;
    ``implementation``: ``TransformerConfig.layer_norm`` (labram_jax.models.normalization)."""
    return normalization.LayerNorm(epsilon=LN_EPS, dtype=dtype, implementation=implementation, name=name,
                                   scale_init=logical(nn.initializers.ones, (axis_name,)),
                                   bias_init=logical(nn.initializers.zeros, (axis_name,)))


def layer_norm_weights(axis_name: str, name: str) -> normalization.LayerNormWeights:
    """The parameters of :func:`layer_norm` alone (for ``attention.on_projection``)."""
    return normalization.LayerNormWeights(scale_init=logical(nn.initializers.ones, (axis_name,)),
                                          bias_init=logical(nn.initializers.zeros, (axis_name,)), name=name)


def _dense_init(axes: tuple[str | None, str | None], std: float) -> dict:
    """A linear layer's initialisers: truncated normal (std) kernel with logical axes ``axes``, zero bias."""
    return {"kernel_init": logical(trunc_normal(std), axes), "bias_init": logical(nn.initializers.zeros, (axes[1],))}


def dense(features: int, axes: tuple[str | None, str | None], name: str, *, std: float = INIT_STD,
          dtype=jnp.float32, use_bias: bool = True, implementation: str = "xla") -> linear.Dense:
    """A linear layer (``flax.linen.Dense``'s parameters) with logical axes ``axes`` on its kernel;
    ``implementation``: ``TransformerConfig.linear`` (labram_jax.models.linear)."""
    return linear.Dense(features, use_bias=use_bias, dtype=dtype, name=name, implementation=implementation,
                        **_dense_init(axes, std))


def dense_weights(features: int, axes: tuple[str | None, str | None], name: str, *,
                  std: float = INIT_STD) -> linear.DenseWeights:
    """The parameters of :func:`dense` (kernel and bias) alone, for :func:`linear.gelu_mlp`."""
    return linear.DenseWeights(features, name=name, **_dense_init(axes, std))


def scaled_output(kernel: jax.Array, bias: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A linear layer's kernel [in, out] and bias [out] whose output is scaled column by column by
    scale [out] (a block's layer scale): ``x @ (kernel * scale) + bias * scale`` is ``(x @ kernel +
    bias) * scale`` up to rounding (parity holds to ~1e-7), without the product's [B, L, out] output
    multiplied forward and again backward, or scale's gradient summed over it: that gradient comes
    from the [in, out] kernel's and the bias's instead (on XLA:CPU the sum alone cost ~0.2 ms a
    branch, 24 a fine-tuning step)."""
    return kernel * scale, bias * scale


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, ``x * Phi(x) = x/2 * (1 + erf(x / sqrt 2))`` (the tanh approximation fails
    parity). Written with erf: ``nn.gelu(approximate=False)`` uses erfc, 4x slower on XLA:CPU."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


def masked_group_norm(x: jax.Array, valid: jax.Array, num_groups: int, eps: float = GN_EPS) -> jax.Array:
    """GroupNorm whose statistics span all valid patches of a sample (no affine).

    Each channel is summed over patches x T first (a reduction over the leading axes of
    [B, P * T, C], contiguous in C), then the channels of a group are added: the same sums as
    reducing [B, P, T, G, C/G] over (P, T, C/G) at once, ~4x faster on XLA:CPU (a reduction
    whose kept axis G lies between reduced ones ran element by element) and in a more
    accurate order (BENCHMARKS.md "Session 32").

    Args:
      x: [B, P, T, C] conv features of every patch.
      valid: [B, P] bool, True for real patches.
      num_groups: groups over C.
    Returns:
      [B, P, T, C], normalised with mean and biased variance per (sample, group)
      over the valid patches x T x C/groups, in float32.
    """
    b, p, t, c = x.shape
    per_group = c // num_groups
    rows = x.astype(jnp.float32).reshape(b, p * t, c)
    w = jnp.broadcast_to(valid.astype(jnp.float32)[:, :, None], (b, p, t)).reshape(b, p * t, 1)
    count = jnp.maximum(valid.sum(axis=1).astype(jnp.float32) * t * per_group, 1.0)[:, None]  # [B, 1]

    def group_mean(values):  # [B, P * T, C] -> [B, 1, C]: each channel its group's mean over valid rows
        sums = (values * w).sum(axis=1).reshape(b, num_groups, per_group).sum(axis=-1)  # [B, G]
        return jnp.repeat(sums / count, per_group, axis=1)[:, None, :]

    centred = rows - group_mean(rows)
    var = group_mean(jnp.square(centred))
    return (centred * jax.lax.rsqrt(var + eps)).reshape(b, p, t, c)


def _uniform_fan_in(fan_in: int):
    """PyTorch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TemporalEncoder(nn.Module):
    """Three 1-D convolutions over each 200-sample patch (LABRAM.md 3.1).

    conv1 k15 s8 p7 -> GroupNorm(groups, 4 in the reference) -> GELU, then twice conv k3 p1 ->
    GroupNorm -> GELU.
    """

    channels: int
    dtype: jnp.dtype = jnp.float32
    groups: int = GN_GROUPS

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        """x: [B, P, 200] float, units of 100 uV; valid: [B, P] bool -> [B, P, 25*C]."""
        b, p, t = x.shape
        h = x.reshape(b * p, t, 1)
        c_in = 1
        for i, (kernel, stride, pad) in enumerate(((15, 8, 7), (3, 1, 1), (3, 1, 1)), start=1):
            fan_in = kernel * c_in
            h = nn.Conv(self.channels, (kernel,), strides=(stride,), padding=[(pad, pad)],
                        dtype=self.dtype, name=f"conv{i}",
                        kernel_init=logical(_uniform_fan_in(fan_in), ("conv_width", "conv_in", "conv_out")),
                        bias_init=logical(_uniform_fan_in(fan_in), ("conv_out",)))(h)
            h = h.reshape(b, p, -1, self.channels)
            h = masked_group_norm(h, valid, self.groups)
            scale = self.param(f"norm{i}_scale", logical(nn.initializers.ones, ("conv_out",)), (self.channels,))
            bias = self.param(f"norm{i}_bias", logical(nn.initializers.zeros, ("conv_out",)), (self.channels,))
            h = gelu(h * scale + bias).astype(self.dtype)
            h = h.reshape(b * p, -1, self.channels)
            c_in = self.channels
        # Flatten time-major: feature = t * C + c.
        return h.reshape(b, p, -1)


SPECTRUM_HZ = (1, 45)  # bins of the log-spectrum patch embedding: 1..45 Hz (1-Hz bins of a 1-s patch)
SPECTRUM_EPS = 1e-4  # added to |FFT| before the log (units of 100 uV x samples)


class SpectrumEncoder(nn.Module):
    """Log-amplitude spectrum of each patch, projected to the token width (not in the reference).

    Each 200-sample patch gives ``|rfft|`` at 1-Hz steps; bins ``SPECTRUM_HZ`` (1..45 Hz) go
    through ``log(. + SPECTRUM_EPS)`` and one Linear layer. No normalisation: the absolute
    band powers reach the transformer (the temporal encoder's GroupNorms divide them out). On
    EEGMAT this is what lets the model separate rest from mental arithmetic across subjects
    (BENCHMARKS.md); official weights need the temporal encoder.
    """

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, P, 200] float, units of 100 uV -> [B, P, features] (each patch on its own)."""
        lo, hi = SPECTRUM_HZ
        amplitude = jnp.abs(jnp.fft.rfft(x.astype(jnp.float32), axis=-1))[..., lo:hi + 1]  # [B, P, 45]
        log_amplitude = jnp.log(amplitude + SPECTRUM_EPS)
        # LeCun-normal weights (std 1/sqrt(45)), not the 0.02 of the transformer's Linears: the
        # spectrum, rather than the channel and time embeddings, dominates the initial tokens.
        return nn.Dense(self.features, dtype=self.dtype, name="proj",
                        kernel_init=logical(nn.initializers.lecun_normal(), ("freq", "embed")),
                        bias_init=logical(nn.initializers.zeros, ("embed",)))(log_amplitude.astype(self.dtype))


class SpatialMix(nn.Module):
    """Learned spatial filters ahead of the patch embedding (not in the reference).

    Each electrode's signal becomes itself plus a learned combination of the sample's other
    electrodes: ``x_i + sum_j W[id_i, id_j] x_j``, with ``W`` [rows, rows] indexed by spatial-table
    row (electrode name), so any montage, and a batch of mixed montages, reads the same table.
    ``W`` starts at zero (the identity: the model begins as without it) and can learn what CSP's
    filters do: combine electrodes linearly before a patch's power is taken (the spectrum stem
    takes each electrode's log amplitude first, which loses the cross-electrode covariance).
    """

    num_rows: int

    @nn.compact
    def __call__(self, x: jax.Array, channel_ids: jax.Array, patch_mask: jax.Array) -> jax.Array:
        """x: [B, N, A, T] signal; channel_ids: [B, N] spatial rows; patch_mask: [B, N, A] bool ->
        [B, N, A, T] float32 mixed signal; padding patches are neither read nor changed."""
        table = self.param("kernel", logical(nn.initializers.zeros, ("spatial", None)), (self.num_rows, self.num_rows))
        rows = jnp.take(table, channel_ids, axis=0)  # [B, N, rows]
        weights = jnp.take_along_axis(rows, channel_ids[:, None, :], axis=2)  # [B, N, N]: W[id_i, id_j]
        real = patch_mask[..., None]
        x = x.astype(jnp.float32)
        mixed = x + jnp.einsum("bij,bjat->biat", weights, jnp.where(real, x, 0.0))
        return jnp.where(real, mixed, x)


class LoRA(nn.Module):
    """A low-rank update ``(alpha / r) * x A B`` added to a frozen projection (Hu et al., 2022).

    ``lora_a`` [d_in, r] starts like PyTorch's Linear init, ``lora_b`` [r, d_out] at zero,
    so an adapted model starts equal to the pretrained one. Adapters are small and replicated.
    """

    features: int
    rank: int
    alpha: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., d_in] -> [..., features]."""
        a = self.param("lora_a", logical(_uniform_fan_in(x.shape[-1]), ("lora_in", "lora")), (x.shape[-1], self.rank))
        b = self.param("lora_b", logical(nn.initializers.zeros, ("lora", "lora_out")), (self.rank, self.features))
        h = jnp.einsum("...i,ir->...r", x, a.astype(self.dtype))
        return jnp.einsum("...r,ro->...o", h, b.astype(self.dtype)) * jnp.asarray(self.alpha / self.rank, self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def split_heads(qkv: jax.Array, heads: int, token_major: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v [B, H, L, K] (or [B, L, H, K] with ``token_major``: slices, no transpose) from the
    fused projection qkv [B, L, 3 * H * K].

    Its gradient is one transpose (or concatenation) of the three gradients back to [B, L, 3 * H * K].
    Autodiff of the slices pads each gradient to the stacked shape and adds the three: three
    writes and reads of [3, B, H, L, K] per block before the transpose (BENCHMARKS.md)."""
    b, length, width = qkv.shape
    split = qkv.reshape(b, length, 3, heads, width // (3 * heads))
    if token_major:
        return split[:, :, 0], split[:, :, 1], split[:, :, 2]
    return tuple(split.transpose(2, 0, 3, 1, 4))


def _split_heads_fwd(qkv, heads, token_major):
    return split_heads(qkv, heads, token_major), None


def _split_heads_bwd(heads, token_major, _, grads):
    if token_major:  # [B, L, H, K] each
        b, length = grads[0].shape[:2]
        return (jnp.stack(grads, axis=2).reshape(b, length, -1),)
    d_qkv = jnp.stack(grads)  # [3, B, H, L, K]
    _, b, _, length, _ = d_qkv.shape
    return (d_qkv.transpose(1, 3, 0, 2, 4).reshape(b, length, -1),)


split_heads.defvjp(_split_heads_fwd, _split_heads_bwd)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and optional q/k LayerNorm."""

    cfg: config_lib.TransformerConfig
    block_index: int | jax.Array  # 1-based, for the output-projection init scaling (traced under nn.scan)

    @nn.compact
    def __call__(self, x: jax.Array, key_valid: jax.Array, scale: jax.Array | None = None,
                 residual: jax.Array | None = None) -> jax.Array:
        """x: [B, L, D]; key_valid: [B, L] bool (padding keys are ignored); scale [D] or None (the block's
        layer scale); residual [B, L, D] or None -> [B, L, D] (times scale, added to residual)."""
        cfg = self.cfg
        h, hd, d = cfg.num_heads, cfg.head_dim, cfg.embed_dim
        w_qkv = self.param("qkv", logical(trunc_normal(), ("embed", "qkv", "heads", "kv")), (d, 3, h, hd))
        # One [B*L, D] x [D, 3D] product, then q, k, v split into heads: [3, B, H, L, hd]. A
        # heads-major einsum straight from x was slower on XLA:CPU (its backward transposes the
        # 5-D gradient inside the product; BENCHMARKS.md "What each optimisation bought").
        qkv_bias = None
        if cfg.qkv_bias:  # the tokenizer: learned q and v biases, k's fixed at zero (the reference's F.linear bias)
            q_bias = self.param("q_bias", logical(nn.initializers.zeros, ("heads", "kv")), (h, hd))
            v_bias = self.param("v_bias", logical(nn.initializers.zeros, ("heads", "kv")), (h, hd))
            qkv_bias = jnp.stack([q_bias, jnp.zeros_like(q_bias), v_bias]).reshape(3 * d).astype(cfg.dtype)
        qkv = linear.linear(x, w_qkv.reshape(d, 3 * d).astype(cfg.dtype), qkv_bias, implementation=cfg.linear)
        if cfg.lora_rank:
            qkv = qkv + LoRA(3 * d, cfg.lora_rank, cfg.lora_alpha, cfg.dtype, name="qkv_lora")(x)
        # The C++ attention reads and writes [B, L, H, hd] (the projections' layout); the others
        # compute heads-major [B, H, L, hd].
        token_major = attention.resolve(cfg.attention, qkv.reshape(*qkv.shape[:2], 3, h, hd)) == "cpu_kernel"
        if qkv_in_kernel(cfg, token_major):
            merged = self._on_projection(qkv.reshape(*qkv.shape[:2], 3, h, hd), key_valid).reshape(*x.shape[:2], d)
            return self._project(merged, scale, residual)
        q, k, v = split_heads(qkv, h, token_major)
        if cfg.qk_norm:
            q = layer_norm("kv", name="q_norm", dtype=cfg.dtype, implementation=cfg.layer_norm)(q)
            k = layer_norm("kv", name="k_norm", dtype=cfg.dtype, implementation=cfg.layer_norm)(k)
        if token_major:
            merged = attention.token_major(q, k, v, key_valid).reshape(*x.shape[:2], d)  # [B, L, H*hd]
        else:
            q = nn.with_logical_constraint(q, ("act_batch", "act_heads", "act_length", "act_kv"))
            out = attention.dot_product_attention(q, k, v, key_valid, cfg.attention)
            merged = out.transpose(0, 2, 1, 3).reshape(*x.shape[:2], d)  # [B, L, H*hd]
        return self._project(merged, scale, residual)

    def _on_projection(self, qkv: jax.Array, key_valid: jax.Array) -> jax.Array:
        """The attention on qkv [B, L, 3, H, hd] itself (``attention.on_projection``: the q/k norms applied
        inside the C++ kernel, the same parameters; without them q, k, v as they are) -> [B, L, H, hd]."""
        cfg = self.cfg
        if not cfg.qk_norm:
            return attention.on_projection(qkv, key_valid, None, None, normalize_q=False, normalize_k=False,
                                           eps=LN_EPS)
        h, hd = cfg.num_heads, cfg.head_dim
        ones, zeros = jnp.ones((h, hd), jnp.float32), jnp.zeros((h, hd), jnp.float32)
        gamma, beta = [ones, ones, ones], [zeros, zeros, zeros]
        for s, name in ((0, "q_norm"), (1, "k_norm")):
            scale, bias = layer_norm_weights("kv", name)(hd)
            gamma[s], beta[s] = jnp.broadcast_to(scale, (h, hd)), jnp.broadcast_to(bias, (h, hd))
        return attention.on_projection(qkv, key_valid, jnp.stack(gamma), jnp.stack(beta).astype(jnp.float32),
                                       normalize_q=True, normalize_k=True, eps=LN_EPS)

    def _project(self, merged: jax.Array, scale: jax.Array | None, residual: jax.Array | None) -> jax.Array:
        """The output projection: merged heads [B, L, H * hd] -> [B, L, D] (times scale [D], if any;
        added to residual [B, L, D], if any: by the product itself where it is the branch's last step)."""
        cfg = self.cfg
        d = cfg.embed_dim
        std = INIT_STD / jnp.sqrt(2.0 * self.block_index)
        w_out = self.param("proj", logical(trunc_normal(std), ("heads", "kv", "embed")), (cfg.num_heads, cfg.head_dim, d))
        b_out = self.param("proj_bias", logical(nn.initializers.zeros, ("embed",)), (d,))
        kernel, bias = w_out.reshape(d, d), b_out
        folded = scale is not None and not cfg.lora_rank
        if folded:
            kernel, bias = scaled_output(kernel, bias, scale)
        last = not cfg.lora_rank  # the product is the branch's last step (the layer scale folded into it)
        y = linear.linear(merged, kernel.astype(cfg.dtype), bias.astype(cfg.dtype), cfg.linear,
                          residual if last else None)
        if last:
            return y
        return _after_adapter(y, LoRA(d, cfg.lora_rank, cfg.lora_alpha, cfg.dtype, name="proj_lora")(merged), scale,
                              residual)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (parameters ``fc1`` and ``fc2`` as ``flax.linen.Dense``'s), with
    optional LoRA adapters on both; one :func:`linear.gelu_mlp` where ``cfg.mlp`` says (:func:`mlp_fused`)."""

    cfg: config_lib.TransformerConfig
    block_index: int

    @nn.compact
    def __call__(self, x: jax.Array, scale: jax.Array | None = None, residual: jax.Array | None = None) -> jax.Array:
        """x [B, L, D], scale [D] or None (the block's layer scale), residual [B, L, D] or None -> [B, L, D]
        (times scale, added to residual: by fc2's product itself where it is the branch's last step)."""
        cfg = self.cfg
        std = INIT_STD / jnp.sqrt(2.0 * self.block_index)
        kernel_1, bias_1 = dense_weights(cfg.mlp_dim, ("embed", "mlp"), "fc1")(x.shape[-1])
        kernel_2, bias_2 = dense_weights(cfg.embed_dim, ("mlp", "embed"), "fc2", std=std)(cfg.mlp_dim)
        folded = scale is not None and not cfg.lora_rank
        if folded:
            kernel_2, bias_2 = scaled_output(kernel_2, bias_2, scale)
        operands = tuple(a.astype(cfg.dtype) for a in (x, kernel_1, bias_1, kernel_2, bias_2))
        if mlp_fused(cfg, *operands, *([] if residual is None else [residual])):
            return linear.gelu_mlp(*operands, residual)
        h = linear.linear(*operands[:3], cfg.linear)
        if cfg.lora_rank:
            h = h + LoRA(cfg.mlp_dim, cfg.lora_rank, cfg.lora_alpha, cfg.dtype, name="fc1_lora")(x)
        h = nn.with_logical_constraint(gelu(h), ("act_batch", "act_length", "act_mlp"))
        last = not cfg.lora_rank  # fc2 is the branch's last step (the layer scale folded into it)
        y = linear.linear(h, *operands[3:], cfg.linear, residual if last else None)
        if last:
            return y
        return _after_adapter(y, LoRA(cfg.embed_dim, cfg.lora_rank, cfg.lora_alpha, cfg.dtype, name="fc2_lora")(h),
                              scale, residual)


def _after_adapter(y: jax.Array, adapted: jax.Array, scale: jax.Array | None, residual: jax.Array | None) -> jax.Array:
    """A branch's output where a LoRA adapter follows its last product y [B, L, D]: (y + adapted) times the layer
    scale [D] (if any), added to residual [B, L, D] (if any)."""
    y = y + adapted
    y = y if scale is None else y * scale.astype(y.dtype)
    return y if residual is None else residual + y


def mlp_fused(cfg: config_lib.TransformerConfig, *operands: jax.Array) -> bool:
    """Whether :class:`Mlp` runs as one :func:`linear.gelu_mlp` on these operands: ``cfg.mlp`` fused,
    or auto where the linear layers resolve to ``cpu_kernel`` and there is no LoRA; a ValueError
    saying why where fused cannot run."""
    products = linear.resolve(cfg.linear, *operands)
    can = cfg.lora_rank == 0 and products == "cpu_kernel"
    if cfg.mlp == "fused" and not can:
        raise ValueError("mlp='fused' runs on the C++ product kernel without LoRA: it needs the linear layers on "
                         f"cpu_kernel (linear={cfg.linear!r} runs them on {products!r} here) and lora_rank=0 (here "
                         f"{cfg.lora_rank}); use mlp='layers'")
    return can and cfg.mlp != "layers"


def qkv_in_kernel(cfg: config_lib.TransformerConfig, kernel_attention: bool) -> bool:
    """Whether :class:`Attention` hands the fused qkv projection to the C++ attention itself
    (``attention.on_projection``): ``cfg.qkv`` in_kernel, or auto where the attention runs on
    ``cpu_kernel`` (``kernel_attention``); a ValueError saying why where in_kernel cannot run."""
    if cfg.qkv == "in_kernel" and not kernel_attention:
        raise ValueError("qkv='in_kernel' needs the attention on the C++ kernel (attention='cpu_kernel', or auto "
                         f"where it runs; here attention={cfg.attention!r} does not run on it); use qkv='sliced'")
    return kernel_attention and cfg.qkv != "sliced"


def drop_path(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Stochastic depth: zero whole samples of a residual branch with probability `rate`."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Block(nn.Module):
    """Pre-norm transformer block with optional layer scale and stochastic depth."""

    cfg: config_lib.TransformerConfig
    block_index: int | jax.Array  # 1-based (a traced scalar under nn.scan)
    drop_path_rate: float | jax.Array = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, key_valid: jax.Array, deterministic: bool = True,
                 layer: jax.Array | None = None) -> jax.Array:
        """x [B, L, D], key_valid [B, L] bool -> [B, L, D]. Under ``nn.scan`` ``layer`` is the
        block's traced 0-based index; it sets the init scale and stochastic-depth rate."""
        cfg = self.cfg
        index, rate = self.block_index, self.drop_path_rate
        if layer is not None:
            index, rate = layer + 1, drop_path_rate(cfg, layer)
        norm = functools.partial(layer_norm, dtype=cfg.dtype, implementation=cfg.layer_norm)
        branches = (
            lambda y, scale, add: Attention(cfg, index, name="attn")(norm(name="norm1")(y), key_valid, scale, add),
            lambda y, scale, add: Mlp(cfg, index, name="mlp")(norm(name="norm2")(y), scale, add),
        )
        dropping = not deterministic and cfg.drop_path_rate > 0.0  # the block's own rate may be 0 (the first)
        for i, branch in enumerate(branches, start=1):
            gamma = None  # the layer scale, applied by the branch's last linear layer (scaled_output)
            if cfg.layer_scale_init is not None:
                gamma = self.param(f"gamma_{i}", logical(nn.initializers.constant(cfg.layer_scale_init), ("norm",)),
                                   (cfg.embed_dim,))
            if dropping:
                x = x + drop_path(branch(x, gamma, None), rate, self.make_rng("dropout"))
            else:  # x + branch(x), the addition made by the branch's last product as it writes its output
                x = branch(x, gamma, x)
            x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        return x


def drop_path_rate(cfg: config_lib.TransformerConfig, layer: int | jax.Array) -> float | jax.Array:
    """Stochastic-depth rate of block ``layer`` (0-based): linear from 0 to ``cfg.drop_path_rate``."""
    return cfg.drop_path_rate * layer / max(cfg.depth - 1, 1)


def normalize_channels(x: jax.Array, patch_mask: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Per-sample, per-channel standardisation of the signal over its real patches.

    x: [B, N, A, T] signal; patch_mask: [B, N, A] bool. Returns float32 [B, N, A, T] with
    zero mean and unit variance along (A, T) of every channel's real patches, and zeros on
    padding patches. eps (in the squared units of x) keeps flat channels at zero.
    """
    w = patch_mask.astype(jnp.float32)[..., None]
    x = x.astype(jnp.float32) * w
    count = jnp.maximum(w.sum(axis=(2, 3), keepdims=True) * x.shape[-1], 1.0)
    mean = x.sum(axis=(2, 3), keepdims=True) / count
    var = (jnp.square(x - mean) * w).sum(axis=(2, 3), keepdims=True) / count
    return (x - mean) * jax.lax.rsqrt(var + eps) * w


def electrode_rows(per_channel: jax.Array, present: jax.Array, channel_ids: jax.Array, rows: int) -> jax.Array:
    """Channels' vectors placed in their electrodes' spatial-table rows.

    per_channel [B, N, D], present [B, N] bool, channel_ids [B, N] int rows (1..rows-1) ->
    [B, rows, D] float32: row ``channel_ids[b, n]`` holds ``per_channel[b, n]`` where the
    channel is present; rows of absent electrodes (and padding channels) are zeros. The result
    does not depend on the order of the channels.
    """
    slots = jax.nn.one_hot(channel_ids, rows, dtype=jnp.float32) * present.astype(jnp.float32)[..., None]
    return jnp.einsum("bnr,bnd->brd", slots, per_channel.astype(jnp.float32))


def masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean over axis 1 of x [B, P, D] using only valid [B, P] entries -> [B, D]."""
    w = valid.astype(jnp.float32)[..., None]
    return (x.astype(jnp.float32) * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
