"""The tokenizer's pure functions: Fourier targets, EMA codebook update, k-means."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from labram_jax.models import tokenizer as tk


def test_fourier_targets_match_numpy():
    rng = np.random.default_rng(0)
    # Positive DC and Nyquist bins: a negative purely real bin's phase (+-pi) hangs on
    # the sign of rounding noise, which no two FFTs share (LABRAM.md section 4).
    x = (rng.normal(size=(2, 3, 4, 200)) + 1.0 + 0.5 * (-1.0) ** np.arange(200)).astype(np.float32)
    amp, phase = tk.fourier_targets(x)
    spec = np.fft.fft(x.astype(np.float64), axis=-1)
    for ours, ref in ((amp, np.abs(spec)), (phase, np.angle(spec))):
        ref = (ref - ref.mean(axis=(1, 2, 3), keepdims=True)) / ref.std(axis=(1, 2, 3), ddof=1, keepdims=True)
        np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_log_amplitude_target_is_the_zscored_log_spectrum():
    rng = np.random.default_rng(1)
    x = (0.2 * rng.normal(size=(2, 3, 4, 200))).astype(np.float32)
    amp, phase = tk.fourier_targets(x, log_amplitude=True)
    ref = np.log(np.abs(np.fft.fft(x.astype(np.float64), axis=-1)) + tk.LOG_AMPLITUDE_FLOOR)
    ref = (ref - ref.mean(axis=(1, 2, 3), keepdims=True)) / ref.std(axis=(1, 2, 3), ddof=1, keepdims=True)
    np.testing.assert_allclose(amp, ref, atol=2e-4)
    np.testing.assert_array_equal(phase, tk.fourier_targets(x)[1])  # the phase target is unchanged


def test_band_targets_are_zscored_and_scored_on_the_band_bins_only():
    bins = np.asarray(tk.band_bins(1, 45))
    assert bins.sum() == 90 and bins[1] and bins[45] and bins[199] and bins[155]
    assert not (bins[0] or bins[46] or bins[100] or bins[154])
    assert np.asarray(tk.band_bins()).all()  # (0, 100): every bin, the reference
    rng = np.random.default_rng(2)
    x = (0.2 * rng.normal(size=(2, 3, 4, 200))).astype(np.float32)
    amp, _ = tk.fourier_targets(x, log_amplitude=True, bins=jnp.asarray(bins))
    ref = np.log(np.abs(np.fft.fft(x.astype(np.float64), axis=-1)) + tk.LOG_AMPLITUDE_FLOOR)[..., bins]
    ref = (ref - ref.mean(axis=(1, 2, 3), keepdims=True)) / ref.std(axis=(1, 2, 3), ddof=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(amp)[..., bins], ref, atol=2e-4)
    # the loss reads the band only: predictions outside it change nothing
    target = jnp.asarray(amp).reshape(2, 12, 200)
    valid = jnp.ones((2, 12), bool)
    pred = target + 0.5 * jnp.asarray(~bins, jnp.float32)
    assert float(tk.masked_mse(pred, target, valid, jnp.asarray(bins))) == 0.0
    assert float(tk.masked_mse(pred + 0.1, target, valid, jnp.asarray(bins))) == pytest.approx(0.01, rel=1e-4)
    assert float(tk.masked_mse(pred, target, valid)) == pytest.approx(0.25 * 110 / 200, rel=1e-5)


def test_atan2_matches_float64_over_every_octant_magnitude_and_signed_zero():
    rng = np.random.default_rng(5)
    shape = (64, 1000)
    y, x = (rng.standard_normal(shape) * np.exp(rng.uniform(-30, 30, shape)) for _ in range(2))
    y, x = y.astype(np.float32), x.astype(np.float32)
    got = np.asarray(tk.atan2(jnp.asarray(y), jnp.asarray(x)))
    want = np.arctan2(y.astype(np.float64), x.astype(np.float64))
    assert got.dtype == np.float32 and np.abs(got - want).max() < 4e-7
    assert np.abs(np.asarray(jnp.arctan2(y, x)) - want).max() < 4e-7  # libm's, for scale
    # signed zeros as IEEE, the purely real DFT bins among them; NaN in either; one infinity
    ys = np.array([0.0, -0.0, 0.0, -0.0, 0.0, -0.0, 1.0, -1.0, np.nan, 1.0, np.inf, 2.0], np.float32)
    xs = np.array([-5.0, -5.0, 5.0, 5.0, -0.0, -0.0, 0.0, -0.0, 1.0, np.nan, 3.0, -np.inf], np.float32)
    np.testing.assert_array_equal(np.asarray(tk.atan2(jnp.asarray(ys), jnp.asarray(xs))), np.arctan2(ys, xs))
    assert np.signbit(np.asarray(tk.atan2(jnp.float32(-0.0), jnp.float32(1.0))))


def test_negative_real_bin_has_phase_plus_pi():
    x = -np.ones((1, 1, 1, 200), np.float32)  # DC bin = -200 + 0j
    phase = tk.dft_phase(jnp.fft.fft(x, axis=-1))
    assert float(phase[0, 0, 0, 0]) == np.float32(np.pi)


def _reference_phase(x: np.ndarray) -> np.ndarray:
    """LABRAM.md 4 in float64: angle of the full DFT, the DC and Nyquist bins exactly real
    (as torch's FFT gives them), z-scored per sample with the unbiased std."""
    spectrum = np.fft.fft(x.astype(np.float64), axis=-1)
    spectrum[..., 0] = spectrum[..., 0].real
    spectrum[..., 100] = spectrum[..., 100].real
    phase = np.angle(spectrum)
    return (phase - phase.mean(axis=(1, 2, 3), keepdims=True)) / phase.std(axis=(1, 2, 3), ddof=1, keepdims=True)


def test_phase_target_on_random_input_matches_the_reference_rule():
    # Plain random input, about half of the DC and Nyquist bins negative: JAX's FFT leaves
    # rounding noise of either sign in their imaginary parts, which used to turn ~1 in 5 of
    # the negative ones into -pi where the reference gives +pi.
    x = np.random.default_rng(7).normal(size=(2, 23, 8, 200)).astype(np.float32)
    spectrum = jnp.fft.fft(x, axis=-1)
    real_bins = np.asarray(spectrum)[..., [0, 100]]
    assert (real_bins.real < 0).sum() > 100 and np.any(real_bins.imag != 0)  # the case the fix is for
    _, phase = tk.fourier_targets(x)
    raw = np.asarray(tk.dft_phase(spectrum))[..., [0, 100]]
    np.testing.assert_array_equal(raw, np.where(real_bins.real < 0, np.float32(np.pi), 0.0))
    np.testing.assert_allclose(phase, _reference_phase(x), atol=1e-4)


def test_phase_target_matches_torch_on_random_input():
    torch = pytest.importorskip("torch", reason="torch is the reference's FFT (pip install '.[torch]')")
    x = np.random.default_rng(8).normal(size=(2, 23, 8, 200)).astype(np.float32)
    ref = torch.angle(torch.fft.fft(torch.from_numpy(x), dim=-1)).double()
    ref = ((ref - ref.mean(dim=(1, 2, 3), keepdim=True)) / ref.std(dim=(1, 2, 3), keepdim=True)).numpy()
    _, phase = tk.fourier_targets(x)
    np.testing.assert_allclose(phase, ref, atol=1e-4)


def _numpy_ema(codebook, z, codes, decay):
    k = codebook.shape[0]
    onehot = np.eye(k)[codes]
    counts = onehot.sum(0)
    sums = z.T @ onehot
    mean = (sums / np.where(counts == 0, 1, counts)).T
    mean = mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    mean = np.where((counts == 0)[:, None], codebook, mean)
    new = decay * codebook + (1 - decay) * mean
    return new / np.linalg.norm(new, axis=1, keepdims=True)


def _unit(rng, shape):
    v = rng.normal(size=shape)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def test_ema_update_matches_one_hot_formula():
    rng = np.random.default_rng(1)
    codebook, z = _unit(rng, (16, 8)), _unit(rng, (40, 8))
    codes = np.argmax(z @ codebook.T, axis=1)
    counts, sums = tk.code_statistics(jnp.asarray(z), jnp.asarray(codes), jnp.ones(40, bool), 16)
    new, size = tk.ema_update(jnp.asarray(codebook), jnp.zeros(16), counts, sums, 0.99)
    np.testing.assert_allclose(new, _numpy_ema(codebook, z, codes, 0.99), atol=1e-6)
    np.testing.assert_allclose(size, 0.01 * np.bincount(codes, minlength=16), atol=1e-6)
    unused = np.setdiff1d(np.arange(16), codes)
    assert unused.size and np.allclose(new[unused], codebook[unused], atol=1e-6)


def test_ema_update_under_data_parallelism_equals_single_device():
    rng = np.random.default_rng(2)
    codebook, z = _unit(rng, (64, 8)), _unit(rng, (8 * 30, 8))
    valid = rng.random(8 * 30) < 0.8
    codes = np.argmax(z @ codebook.T, axis=1)

    def step(z, codes, valid):
        counts, sums = tk.code_statistics(z, codes, valid, 64)
        return tk.ema_update(jnp.asarray(codebook), jnp.zeros(64), counts, sums, 0.99)

    single = jax.jit(step)(z, codes, valid)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = NamedSharding(mesh, P("data"))
    args = [jax.device_put(a, shard) for a in (z, codes, valid)]
    assert len(args[0].sharding.device_set) == 8
    sharded = jax.jit(step)(*args)
    for a, b in zip(single, sharded):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_kmeans_recovers_separated_clusters_and_ignores_padding():
    rng = np.random.default_rng(3)
    centres = _unit(rng, (4, 16))
    samples = np.concatenate([_unit(rng, (50, 16)) * 0.05 + c for c in centres])
    samples = samples / np.linalg.norm(samples, axis=1, keepdims=True)
    garbage = _unit(rng, (30, 16))
    all_samples = np.concatenate([samples, garbage]).astype(np.float32)
    valid = np.arange(len(all_samples)) < len(samples)
    means, counts = tk.kmeans(jax.random.key(0), jnp.asarray(all_samples), jnp.asarray(valid), 4, 10)
    assert float(counts.sum()) == len(samples)  # padding never counted
    similarity = np.asarray(means) @ centres.T
    assert np.all(similarity.max(axis=0) > 0.99)  # every centre found
    np.testing.assert_allclose(np.linalg.norm(means, axis=1), 1.0, atol=1e-5)


def test_kmeans_with_fewer_samples_than_clusters():
    rng = np.random.default_rng(4)
    samples = jnp.asarray(_unit(rng, (5, 8)))
    means, counts = tk.kmeans(jax.random.key(1), samples, jnp.ones(5, bool), 12, 3)
    assert means.shape == (12, 8) and float(counts.sum()) == 5
    # Every mean is (the normalised mean of) real samples, never padding or NaN.
    assert np.all(np.isfinite(means))
    assert np.all((np.asarray(means) @ np.asarray(samples).T).max(axis=1) > 0.5)


def test_restart_dead_codes_moves_only_dead_codes_onto_valid_samples():
    rng = np.random.default_rng(5)
    codebook, z = _unit(rng, (8, 4)), _unit(rng, (20, 4))
    valid = np.arange(20) < 12
    size = np.array([5.0, 0.1, 3.0, 0.0, 2.0, 0.5, 9.0, 1.5], np.float32)
    new, new_size = tk.restart_dead_codes(jax.random.key(0), jnp.asarray(codebook), jnp.asarray(size),
                                          jnp.asarray(z), jnp.asarray(valid), 1.0)
    dead = size < 1.0
    np.testing.assert_array_equal(np.asarray(new)[~dead], codebook[~dead])
    for row in np.asarray(new)[dead]:  # each restarted code is one of the valid samples
        assert np.min(np.abs(z[valid] - row).sum(axis=1)) < 1e-6
    assert len({tuple(r) for r in np.asarray(new)[dead]}) == dead.sum()  # distinct picks
    np.testing.assert_array_equal(np.asarray(new_size)[dead], 1.0)
