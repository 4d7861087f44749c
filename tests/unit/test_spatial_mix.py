"""model.spatial_mix: learned spatial filters, indexed by electrode, ahead of the patch embedding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labram_jax import model_file, optim
from labram_jax.models import config as model_config
from labram_jax.models import layers
from labram_jax.models import transformer
from labram_jax.tasks import finetune

IDS = jnp.array([[1, 5, 9]])


def _table(rows: int = 129, seed: int = 0) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed), (rows, rows))) * 0.3


def test_each_electrode_gets_itself_plus_the_weighted_others_by_name():
    x = jax.random.normal(jax.random.key(1), (1, 3, 2, 200))
    mask = jnp.ones((1, 3, 2), bool)
    table = _table()
    out = np.asarray(layers.SpatialMix(129).apply({"params": {"kernel": table}}, x, IDS, mask))
    w = table[np.ix_([1, 5, 9], [1, 5, 9])]
    np.testing.assert_allclose(out, np.asarray(x) + np.einsum("ij,bjat->biat", w, np.asarray(x)), atol=1e-5)
    # the same electrodes in another order: the same signals, reordered (the table is keyed by name)
    order = np.array([2, 0, 1])
    shuffled = layers.SpatialMix(129).apply({"params": {"kernel": table}}, x[:, order], IDS[:, order], mask)
    np.testing.assert_allclose(np.asarray(shuffled), out[:, order], atol=1e-5)


def test_padding_patches_are_neither_read_nor_changed():
    x = jax.random.normal(jax.random.key(2), (1, 3, 2, 200))
    mask = jnp.ones((1, 3, 2), bool).at[0, 2, 1].set(False)
    mix = layers.SpatialMix(129)
    params = {"params": {"kernel": _table(seed=3)}}
    out = np.asarray(mix.apply(params, x, IDS, mask))
    noisy = np.asarray(mix.apply(params, x.at[0, 2, 1].set(1e3), IDS, mask))
    np.testing.assert_allclose(out[:, :, 0], noisy[:, :, 0], atol=1e-4)  # real patches: padding not read
    np.testing.assert_allclose(out[:, :2, 1], noisy[:, :2, 1], atol=1e-4)
    np.testing.assert_array_equal(noisy[0, 2, 1], 1e3)  # the padding patch itself is left alone


def test_it_starts_as_the_identity_and_learns():
    # zero-initialised: the model with the mix computes what the model without it does, and the
    # loss has a gradient on the table from the first step
    x = jax.random.normal(jax.random.key(4), (2, 3, 2, 200))
    ids = jnp.broadcast_to(IDS, (2, 3))
    model = transformer.LaBraM(model_config.labram("tiny", patch_embed="spectrum", spatial_mix=True), num_outputs=1)
    plain = transformer.LaBraM(model_config.labram("tiny", patch_embed="spectrum"), num_outputs=1)
    params = nn.unbox(model.init(jax.random.key(0), x, ids))["params"]
    assert params["encoder"]["spatial_mix"]["kernel"].shape == (129, 129)
    assert not np.any(params["encoder"]["spatial_mix"]["kernel"])
    without = {**params, "encoder": {k: v for k, v in params["encoder"].items() if k != "spatial_mix"}}
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, x, ids)),
                                  np.asarray(plain.apply({"params": without}, x, ids)))
    grad = jax.grad(lambda p: model.apply({"params": p}, x, ids).sum())(params)
    g = np.array(grad["encoder"]["spatial_mix"]["kernel"])
    rows = np.array([1, 5, 9])
    assert np.abs(g[np.ix_(rows, rows)]).min() > 0  # every pair of present electrodes learns
    g[np.ix_(rows, rows)] = 0
    assert not np.any(g)  # electrodes absent from the batch do not move


def test_the_table_learns_at_the_head_rate_and_is_decayed():
    x = jnp.zeros((1, 3, 2, 200))
    model = transformer.LaBraM(model_config.labram("tiny", patch_embed="spectrum", spatial_mix=True), num_outputs=1)
    params = nn.unbox(model.init(jax.random.key(0), x, IDS))["params"]
    scales = optim.layer_decay_scales(params, depth=model.cfg.depth, decay=0.3)
    assert scales["encoder"]["spatial_mix"]["kernel"] == pytest.approx(1.0)
    assert scales["encoder"]["patch_embed"]["proj"]["kernel"] == pytest.approx(0.3 ** (model.cfg.depth + 1))
    assert optim.weight_decay_mask(params)["encoder"]["spatial_mix"]["kernel"]


def test_an_encoder_with_the_mix_is_stored_and_refused_where_it_does_not_fit(tmp_path):
    x = jax.random.normal(jax.random.key(3), (2, 3, 4, 200))
    cfg = model_config.labram("tiny", patch_embed="spectrum", spatial_mix=True)
    model = transformer.LaBraMPretrain(cfg, vocab_size=16)
    variables = nn.unbox(model.init(jax.random.key(0), x, IDS[0], jnp.zeros((2, 12), bool),
                                    method=transformer.LaBraMPretrain.logits_of))
    path = str(tmp_path / "model.npz")
    model_file.save(path, "pretrain", model, variables)
    loaded = model_file.load(path)[1]
    assert loaded.cfg.spatial_mix and "learned spatial filters" in model_file.describe(loaded)
    encoder = finetune.load_encoder(path, "ours", patch_embed="spectrum", spatial_mix=True)
    assert encoder["spatial_mix"]["kernel"].shape == (129, 129)
    with pytest.raises(ValueError, match="spatial_mix=True"):
        finetune.load_encoder(path, "ours", patch_embed="spectrum")


def test_filters_can_be_added_to_an_encoder_pretrained_without_them_and_start_at_the_identity(tmp_path):
    # fine-tuning with spatial filters from an encoder without them: every pretrained weight is taken and
    # the table starts at zero, so the model begins as the encoder (the identity, tested above); an encoder
    # pretrained *with* the table still refuses a model without it (above), and other inputs must match
    x = jax.random.normal(jax.random.key(3), (2, 3, 4, 200))
    plain = model_config.labram("tiny", patch_embed="spectrum")
    pretrain = transformer.LaBraMPretrain(plain, vocab_size=16)
    variables = nn.unbox(pretrain.init(jax.random.key(0), x, IDS[0], jnp.zeros((2, 12), bool),
                                       method=transformer.LaBraMPretrain.logits_of))
    path = str(tmp_path / "model.npz")
    model_file.save(path, "pretrain", pretrain, variables)
    encoder = finetune.load_encoder(path, "ours", patch_embed="spectrum", spatial_mix=True)
    assert "spatial_mix" not in encoder
    with_mix = transformer.LaBraM(plain.replace(spatial_mix=True), num_outputs=1)
    fresh = with_mix.init(jax.random.key(1), x, jnp.broadcast_to(IDS, (2, 3)))
    merged = nn.unbox(finetune._with_encoder(fresh, encoder))["params"]["encoder"]
    assert not np.any(merged["spatial_mix"]["kernel"])
    taken = jax.tree_util.tree_map(np.asarray, {k: v for k, v in merged.items() if k != "spatial_mix"})
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, taken, encoder))
    with pytest.raises(ValueError, match="set --config.model.patch_embed=spectrum"):
        finetune.load_encoder(path, "ours", spatial_mix=True)
