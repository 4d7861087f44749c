"""VQ-NSP, the neural tokenizer (LABRAM.md section 4).

The codebook lives in its own non-trainable variable collection ``codebook``:
``embedding`` [K, d] unit vectors, ``cluster_size`` [K] (EMA of code usage) and
``initted`` [] (1.0 once k-means has initialised it). Training updates it
functionally: ``model.apply(variables, ..., update_codebook=True, mutable=["codebook"])``.
The math lives in the pure functions below, which tests call directly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from labram_jax.models import config as config_lib
from labram_jax.models import cpu_matmul, layers, linear
from labram_jax.models import transformer

CODEBOOK = "codebook"


def l2norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / max(||x||, 1e-12) along ``axis`` (torch.nn.functional.normalize)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


def masked_zscore(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Z-scores x [B, ...] per sample over its valid entries with the unbiased std.

    ``valid`` broadcasts against x (e.g. [B, N, A, 1]); no epsilon, as the reference.
    """
    w = jnp.broadcast_to(valid, x.shape).astype(jnp.float32)
    axes = tuple(range(1, x.ndim))
    n = w.sum(axis=axes, keepdims=True)
    mean = (x * w).sum(axis=axes, keepdims=True) / jnp.maximum(n, 1.0)
    var = (jnp.square(x - mean) * w).sum(axis=axes, keepdims=True) / jnp.maximum(n - 1.0, 1.0)
    return (x - mean) / jnp.sqrt(var)


LOG_AMPLITUDE_FLOOR = 0.01  # |X| floor of the log-amplitude target (units of 100 uV x samples)


_TAN_PI_8 = 0.41421356237309503
_ATAN_POLY = (8.05374449538e-2, -1.38776856032e-1, 1.99777106478e-1, -3.33329491539e-1)  # Cephes' atanf


def atan2(y: jax.Array, x: jax.Array) -> jax.Array:
    """``atan2(y, x)`` in [-pi, pi] of float32 arrays, in vectorisable arithmetic.

    XLA:CPU calls libm once per element for ``jnp.arctan2`` (3.5 ms for the tokenizer's
    [8, 184, 200] phases); this is ~17x faster with the same accuracy (max error 2.6e-7 rad
    against float64, libm's 2.3e-7): the ratio of the smaller to the larger magnitude, reduced
    to [0, tan(pi/8)] by atan(t) = pi/4 + atan((t - 1) / (t + 1)), Cephes' single-precision
    polynomial, then the octant and quadrant from the magnitudes and sign bits. Signed zeros
    follow IEEE (``atan2(+0, -1) = pi``, ``atan2(-0, -1) = -pi``, ``atan2(0, -0) = pi``); NaN in
    either gives NaN. Both infinite gives NaN (IEEE: odd multiples of pi/4); a spectrum of finite
    data has neither.
    """
    a, b = jnp.abs(y), jnp.abs(x)
    small, large = jnp.minimum(a, b), jnp.maximum(a, b)
    t = jnp.where(large > 0, small / jnp.where(large > 0, large, 1.0), 0.0)  # [0, 1]
    reduced = t > _TAN_PI_8
    u = jnp.where(reduced, (t - 1.0) / (t + 1.0), t)
    z = u * u
    c3, c2, c1, c0 = _ATAN_POLY
    angle = (((c3 * z + c2) * z + c1) * z + c0) * z * u + u
    angle = jnp.where(reduced, angle + jnp.float32(jnp.pi / 4), angle)
    angle = jnp.where(a > b, jnp.float32(jnp.pi / 2) - angle, angle)
    angle = jnp.where(jnp.signbit(x), jnp.float32(jnp.pi) - angle, angle)
    angle = jnp.where(jnp.signbit(y), -angle, angle)
    return jnp.where(jnp.isnan(x) | jnp.isnan(y), jnp.nan, angle)


def dft_phase(spectrum: jax.Array) -> jax.Array:
    """``angle`` of the full DFT of real signals along the last axis, with the purely real
    bins (DC, and Nyquist for an even length) taken as exactly real.

    Their imaginary part is zero in exact arithmetic, but JAX's FFT leaves rounding noise
    of either sign there (~1e-7), so a negative bin's angle would flip between +pi and -pi;
    the reference's torch FFT gives exact zeros, hence +pi. Zeroing those imaginary parts
    gives +pi, as the reference does.

    Args:
      spectrum: [..., T] complex, ``fft`` of a real signal.
    Returns:
      [..., T] float32 phase in (-pi, pi].
    """
    length = spectrum.shape[-1]
    real_bins = jnp.zeros((length,), bool).at[0].set(True)
    if length % 2 == 0:
        real_bins = real_bins.at[length // 2].set(True)
    imag = jnp.where(real_bins, 0.0, jnp.imag(spectrum))
    return atan2(imag, jnp.real(spectrum))


def band_bins(low_hz: int = 0, high_hz: int = 100, length: int = 200) -> jax.Array:
    """[length] bool: the bins of a 1-s, ``length``-point DFT at 1 Hz per bin whose frequency
    lies in [low_hz, high_hz], in both halves (bin k and its mirror length - k). (0, 100): all."""
    k = jnp.arange(length)
    hz = jnp.minimum(k, length - k)
    return (hz >= low_hz) & (hz <= high_hz)


def fourier_targets(x: jax.Array, patch_mask: jax.Array | None = None,
                    log_amplitude: bool = False, bins: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Amplitude and phase targets of each patch's full 200-point DFT.

    Args:
      x: [B, N, A, T] float, units of 100 uV.
      patch_mask: [B, N, A] bool of real patches (None: all).
      log_amplitude: amplitude target log(|X| + 0.01) instead of |X| (not in the reference:
        a log spectrum weighs relative changes in every band alike, where |X| is dominated
        by the largest low-frequency bins).
      bins: [T] bool, the bins the targets are z-scored over (:func:`band_bins`; None: all, the
        reference). Records band-limited by subject centring are exactly zero outside their
        band: z-scored over every bin, the target is then ~98 % the same in-band/out-of-band step
        for every patch, and a decoder predicts it without reading any code.
    Returns:
      (amplitude, phase), each [B, N, A, T] float32, z-scored per sample over all
      valid channels x windows x ``bins`` (other bins hold values to be ignored: score with
      ``masked_mse(..., bins)``). Phase is ``atan2(imag, real)`` in (-pi, pi]
      (:func:`dft_phase`): a negative DC or Nyquist bin gets +pi, never -pi.
    """
    spectrum = jnp.fft.fft(x.astype(jnp.float32), axis=-1)
    amplitude = jnp.abs(spectrum)
    if log_amplitude:
        amplitude = jnp.log(amplitude + LOG_AMPLITUDE_FLOOR)
    phase = dft_phase(spectrum)
    valid = jnp.ones(x.shape[:3], bool) if patch_mask is None else patch_mask
    valid = valid[..., None]
    if bins is not None:
        valid = valid & bins
    return masked_zscore(amplitude, valid), masked_zscore(phase, valid)


def masked_mse(pred: jax.Array, target: jax.Array, valid: jax.Array, features: jax.Array | None = None) -> jax.Array:
    """Mean squared error over valid rows (and ``features``): pred, target [B, P, F]; valid [B, P];
    features [F] bool (None: all) -> []."""
    w = valid.astype(jnp.float32)[..., None]
    if features is not None:
        w = w * features.astype(jnp.float32)
    w = jnp.broadcast_to(w, pred.shape)
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)) * w
    return err.sum() / jnp.maximum(w.sum(), 1.0)


def squared_distances(z: jax.Array, codebook: jax.Array, implementation: str = "xla") -> jax.Array:
    """|z|^2 + |w|^2 - 2 z.w, as the reference computes it: z [M, d], codebook [K, d] -> [M, K];
    the product by ``implementation`` (labram_jax.models.linear: xla, cpu_kernel or auto)."""
    implementation = linear.resolve(implementation, z, codebook)
    return (jnp.sum(jnp.square(z), axis=1, keepdims=True) + jnp.sum(jnp.square(codebook), axis=1)
            - 2.0 * linear.matmul_transposed(z, codebook, implementation))


def nearest_codes(z: jax.Array, codebook: jax.Array, implementation: str = "xla") -> jax.Array:
    """Each row's nearest code, ``argmin`` of :func:`squared_distances` over the codebook: z [M, d],
    codebook [K, d] -> [M] int32 (no gradient). On ``cpu_kernel`` one C++ call that never writes
    the [M, K] distances out (``cpu_matmul.nearest``; BENCHMARKS.md, "Session 24")."""
    z, codebook = jax.lax.stop_gradient(z), jax.lax.stop_gradient(codebook)
    if linear.resolve(implementation, z, codebook) == "cpu_kernel":
        return cpu_matmul.nearest(z, codebook)[0]
    return jnp.argmin(squared_distances(z, codebook, "xla"), axis=1).astype(jnp.int32)


def code_statistics(z: jax.Array, codes: jax.Array, valid: jax.Array, num_codes: int) -> tuple[jax.Array, jax.Array]:
    """Per-code counts [K] and sums of z [K, d] over valid rows (z [M, d], codes [M]).

    Under data parallelism z and codes are global arrays, so these sums already
    span every device: the update below equals the single-device update.
    """
    w = valid.astype(z.dtype)
    counts = jax.ops.segment_sum(w, codes, num_segments=num_codes)
    sums = jax.ops.segment_sum(z * w[:, None], codes, num_segments=num_codes)
    return counts, sums


def ema_update(codebook: jax.Array, cluster_size: jax.Array, counts: jax.Array, sums: jax.Array,
               decay: float) -> tuple[jax.Array, jax.Array]:
    """One EMA step of the normalised codebook (the reference's NormEMAVectorQuantizer).

    Args:
      codebook: [K, d] unit vectors; cluster_size: [K] EMA of counts.
      counts: [K] assignments in this batch; sums: [K, d] sums of assigned z.
    Returns:
      (new codebook [K, d], new cluster_size [K]). A used code moves towards the
      normalised mean of its vectors, ``l2norm(decay * w + (1 - decay) * mean)``;
      an unused code keeps its weight (renormalised).
    """
    new_size = cluster_size * decay + counts * (1.0 - decay)
    unused = counts == 0
    mean = l2norm(sums / jnp.where(unused, 1.0, counts)[:, None])
    mean = jnp.where(unused[:, None], codebook, mean)
    return l2norm(codebook * decay + mean * (1.0 - decay)), new_size


def restart_dead_codes(key: jax.Array, codebook: jax.Array, cluster_size: jax.Array, z: jax.Array,
                       valid: jax.Array, threshold: float) -> tuple[jax.Array, jax.Array]:
    """Moves codes whose usage EMA fell below ``threshold`` onto random encoder outputs.

    Not in the reference (whose codebooks collapse on small data); off unless asked.
    Args: codebook [K, d]; cluster_size [K] EMA of per-batch counts; z [M, d] unit vectors;
    valid [M] bool. Returns (codebook, cluster_size); a restarted code gets usage ``threshold``
    so that it is not restarted again at once.
    """
    k, m = codebook.shape[0], z.shape[0]
    dead = cluster_size < threshold
    priority = jnp.where(valid, jax.random.uniform(key, (m,)), -1.0)
    order = jnp.argsort(-priority)  # valid rows first, in random order
    picks = order[jnp.arange(k) % jnp.maximum(valid.sum(), 1)]
    return (jnp.where(dead[:, None], z[picks], codebook),
            jnp.where(dead, jnp.asarray(threshold, cluster_size.dtype), cluster_size))


def _nearest_by_cosine(samples: jax.Array, means: jax.Array, chunk: int) -> jax.Array:
    """argmax_k samples . means_k, in chunks of rows to bound memory -> [M] int32."""
    m = samples.shape[0]
    pad = (-m) % chunk
    padded = jnp.pad(samples, ((0, pad), (0, 0))).reshape(-1, chunk, samples.shape[1])
    best = jax.lax.map(lambda s: jnp.argmax(s @ means.T, axis=1).astype(jnp.int32), padded)
    return best.reshape(-1)[:m]


def kmeans(key: jax.Array, samples: jax.Array, valid: jax.Array, num_clusters: int, num_iters: int = 10,
           chunk: int = 4096) -> tuple[jax.Array, jax.Array]:
    """Cosine k-means with normalised means (the reference's codebook initialisation).

    Initial means are distinct valid samples drawn at random (with replacement when
    there are fewer valid samples than clusters); an empty cluster keeps its mean.

    Args:
      key: PRNG key; samples: [M, d] unit vectors; valid: [M] bool.
    Returns:
      (means [K, d], counts [K] float32 of the last assignment).
    """
    m = samples.shape[0]
    key_order, key_fill = jax.random.split(key)
    priority = jnp.where(valid, jax.random.uniform(key_order, (m,)), -1.0)
    order = jnp.argsort(-priority)  # valid samples first, in random order
    n_valid = jnp.maximum(valid.sum(), 1)
    slots = jnp.arange(num_clusters)
    fill = order[jax.random.randint(key_fill, (num_clusters,), 0, n_valid)]
    chosen = jnp.where(slots < n_valid, order[slots % m], fill)
    means = samples[chosen]

    def step(_, carry):
        means, _ = carry
        codes = _nearest_by_cosine(samples, means, min(chunk, m))
        counts, sums = code_statistics(samples, codes, valid, num_clusters)
        new = l2norm(sums / jnp.maximum(counts, 1.0)[:, None])
        return jnp.where((counts == 0)[:, None], means, new), counts

    return jax.lax.fori_loop(0, num_iters, step, (means, jnp.zeros((num_clusters,), samples.dtype)))


def _random_unit_codebook(key, shape, dtype=jnp.float32):
    return l2norm(jax.random.normal(key, shape, dtype))


class TaskHead(nn.Module):
    """Linear(D, D) -> tanh -> Linear(D, out), in float32; ``implementation``: the linear layers'
    (``TransformerConfig.linear``)."""

    hidden: int
    out: int
    out_axis: str
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = layers.dense(self.hidden, ("embed", "mlp"), "dense_0", implementation=self.implementation)(
            x.astype(jnp.float32))
        return layers.dense(self.out, ("mlp", self.out_axis), "dense_1", implementation=self.implementation)(
            jnp.tanh(x))


class Quantizer(nn.Module):
    """L2-normalised nearest-code quantizer with an EMA codebook."""

    codebook_size: int
    code_dim: int
    decay: float = 0.99
    dead_code_threshold: float = 0.0  # > 0: restart codes whose usage EMA is below this (needs a 'codebook' rng)
    implementation: str = "xla"  # of the distances' product (TransformerConfig.linear)

    def setup(self):
        self.embedding = self.variable(CODEBOOK, "embedding", layers.logical(_random_unit_codebook, ("vocab", "code")),
                                       self.make_rng("params") if self.is_initializing() else None,
                                       (self.codebook_size, self.code_dim))
        self.cluster_size = self.variable(CODEBOOK, "cluster_size", layers.logical(jnp.zeros, ("vocab",)),
                                          (self.codebook_size,))
        self.initted = self.variable(CODEBOOK, "initted", lambda: jnp.zeros((), jnp.float32))

    def __call__(self, z: jax.Array, valid: jax.Array, update: bool = False):
        """Quantises unit vectors.

        Args:
          z: [B, P, d] L2-normalised float32; valid: [B, P] bool.
          update: apply one EMA step to the codebook (needs mutable=['codebook']).
        Returns:
          (z_q [B, P, d] straight-through, codes [B, P] int32, commitment loss []).
        """
        codebook = self.embedding.value
        b, p, d = z.shape
        flat = z.reshape(b * p, d)
        codes = nearest_codes(flat, codebook, self.implementation)
        z_q = jnp.take(codebook, codes, axis=0).reshape(b, p, d)
        if update and not self.is_initializing():
            counts, sums = code_statistics(jax.lax.stop_gradient(flat), codes, valid.reshape(-1), self.codebook_size)
            new_codebook, new_size = ema_update(codebook, self.cluster_size.value, counts, sums, self.decay)
            if self.dead_code_threshold > 0:
                new_codebook, new_size = restart_dead_codes(
                    self.make_rng("codebook"), new_codebook, new_size, jax.lax.stop_gradient(flat),
                    valid.reshape(-1), self.dead_code_threshold)
            self.embedding.value, self.cluster_size.value = new_codebook, new_size
        commitment = masked_mse(jax.lax.stop_gradient(z_q), z, valid)
        z_q = z + jax.lax.stop_gradient(z_q - z)
        return z_q, codes.reshape(b, p), commitment


class VQNSP(nn.Module):
    """Encoder -> task layer -> quantizer -> decoder -> amplitude and phase heads."""

    cfg: config_lib.TokenizerConfig

    def setup(self):
        cfg = self.cfg
        self.encoder = transformer.NeuralTransformer(cfg.encoder)
        self.encoder_norm = layers.layer_norm(name="encoder_norm", implementation=cfg.encoder.layer_norm)
        self.encode_task_layer = TaskHead(cfg.encoder.embed_dim, cfg.code_dim, "code", cfg.encoder.linear)
        self.quantizer = Quantizer(cfg.codebook_size, cfg.code_dim, cfg.ema_decay, cfg.dead_code_threshold,
                                   cfg.encoder.linear)
        self.decoder = transformer.NeuralTransformer(cfg.decoder)
        self.decoder_norm = layers.layer_norm(name="decoder_norm", implementation=cfg.decoder.layer_norm)
        self.amplitude_head = TaskHead(cfg.decoder.embed_dim, config_lib.PATCH_SIZE, "freq", cfg.decoder.linear)
        self.phase_head = TaskHead(cfg.decoder.embed_dim, config_lib.PATCH_SIZE, "freq", cfg.decoder.linear)

    def encode(self, x: jax.Array, channel_ids: jax.Array, patch_mask: jax.Array | None = None,
               *, train: bool = False) -> jax.Array:
        """x [B, N, A, 200] -> z [B, N*A, code_dim] float32, L2-normalised (pre-quantizer)."""
        tokens = self.encoder(x, channel_ids, patch_mask, deterministic=not train)
        patch_tokens = self.encoder_norm(tokens[:, 1:])
        self.sow("intermediates", "encoder_patch_tokens", patch_tokens)
        features = self.encode_task_layer(patch_tokens)
        self.sow("intermediates", "to_quantizer", features)
        return l2norm(features)

    def tokenize(self, x: jax.Array, channel_ids: jax.Array, patch_mask: jax.Array | None = None) -> jax.Array:
        """Code indices [B, N*A] int32 (channel-major) of every patch; padding gets codes too."""
        b, n, a = x.shape[:3]
        valid = jnp.ones((b, n * a), bool) if patch_mask is None else patch_mask.reshape(b, n * a)
        _, codes, _ = self.quantizer(self.encode(x, channel_ids, patch_mask), valid)
        return codes

    def decode(self, z_q: jax.Array, channel_ids: jax.Array, patch_mask: jax.Array | None, shape,
               *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """z_q [B, N*A, d] -> (amplitude, phase) predictions, each [B, N*A, 200]."""
        b, n, a = shape
        tokens = self.decoder(z_q.reshape(b, n, a, -1), channel_ids, patch_mask, deterministic=not train)
        features = self.decoder_norm(tokens[:, 1:])
        return self.amplitude_head(features), self.phase_head(features)

    def kmeans_samples(self, x: jax.Array, channel_ids: jax.Array, patch_mask: jax.Array | None = None):
        """Encoder outputs to initialise the codebook from: ([M, d] unit vectors, [M] valid)."""
        z = self.encode(x, channel_ids, patch_mask)
        b, p, d = z.shape
        valid = jnp.ones((b, p), bool) if patch_mask is None else patch_mask.reshape(b, p)
        return z.reshape(b * p, d), valid.reshape(-1)

    def __call__(self, x: jax.Array, channel_ids: jax.Array, patch_mask: jax.Array | None = None,
                 *, train: bool = False, update_codebook: bool = False) -> dict[str, jax.Array]:
        """The full forward pass and loss.

        Args:
          x: [B, N, A, 200] float32, units of 100 uV; channel_ids [B, N] or [N];
          patch_mask: [B, N, A] bool (None: all real).
          update_codebook: one EMA step on the codebook (training).
        Returns a dict: ``loss`` (amplitude + phase + commitment), ``amplitude_loss`` and
        ``phase_loss`` (over the bins of ``cfg.target_low_hz``-``target_high_hz`` Hz),
        ``commitment_loss``, ``codes`` [B, N*A] int32, ``quantized`` [B, N*A, d],
        ``rec_amplitude`` and ``rec_phase`` [B, N*A, 200].
        """
        b, n, a = x.shape[:3]
        valid = jnp.ones((b, n * a), bool) if patch_mask is None else patch_mask.reshape(b, n * a)
        bins = band_bins(self.cfg.target_low_hz, self.cfg.target_high_hz, x.shape[-1])
        amp_target, phase_target = fourier_targets(x, patch_mask, self.cfg.log_amplitude, bins)
        z = self.encode(x, channel_ids, patch_mask, train=train)
        z_q, codes, commitment = self.quantizer(z, valid, update=update_codebook)
        rec_amp, rec_phase = self.decode(z_q, channel_ids, patch_mask, (b, n, a), train=train)
        amp_loss = masked_mse(rec_amp, amp_target.reshape(b, n * a, -1), valid, bins)
        phase_loss = masked_mse(rec_phase, phase_target.reshape(b, n * a, -1), valid, bins)
        return {
            "loss": amp_loss + phase_loss + self.cfg.commitment_weight * commitment,
            "amplitude_loss": amp_loss,
            "phase_loss": phase_loss,
            "commitment_loss": commitment,
            "codes": codes,
            "quantized": z_q,
            "rec_amplitude": rec_amp,
            "rec_phase": rec_phase,
        }
