"""Fine-tuning options: class weights from manifests, LoRA adapters, trainable masks."""

import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labram_jax import data_spec
from labram_jax.models import config as model_config
from labram_jax.models import transformer
from labram_jax.tasks import finetune


def _manifest(path, names, by_label):
    path.write_text(json.dumps({"schema_version": 1, "labels": {"names": names},
                                "splits": {"train": {"shards": [], "by_label": by_label}}}))
    return str(path)


def test_balanced_weights_follow_the_mixed_label_frequencies(tmp_path):
    a = _manifest(tmp_path / "a.json", ["rest", "task"], {"rest": 300, "task": 100})
    b = _manifest(tmp_path / "b.json", ["rest", "task"], {"rest": 50, "task": 50})
    names, freq = data_spec.label_frequencies(a)
    assert names == ["rest", "task"]
    np.testing.assert_allclose(freq, [0.75, 0.25])
    np.testing.assert_allclose(finetune.class_weights("balanced", a, 2), [1 / 1.5, 1 / 0.5])
    # Mixed 3:1 by weight: 0.75 * [0.75, 0.25] + 0.25 * [0.5, 0.5].
    np.testing.assert_allclose(data_spec.label_frequencies(f"{a}@3+{b}@1")[1], [0.6875, 0.3125])
    np.testing.assert_allclose(finetune.class_weights("1,4", a, 2), [1.0, 4.0])
    assert finetune.class_weights("none", a, 2) is None


def test_class_weight_errors_say_what_to_do(tmp_path):
    a = _manifest(tmp_path / "a.json", ["rest", "task"], {"rest": 300, "task": 0})
    c = _manifest(tmp_path / "c.json", ["left", "right"], {"left": 1, "right": 1})
    with pytest.raises(ValueError, match="no training windows"):
        finetune.class_weights("balanced", a, 2)
    with pytest.raises(ValueError, match="one label list"):
        data_spec.label_frequencies(f"{a}+{c}")
    with pytest.raises(ValueError, match="num_outputs"):
        finetune.class_weights("balanced", c, 3)
    with pytest.raises(ValueError, match="not one"):
        data_spec.label_frequencies(str(tmp_path / "*.arrayrecord"))
    with pytest.raises(FileNotFoundError, match="run data_prep first"):
        finetune.class_weights("balanced", str(tmp_path / "missing" / "manifest.json"), 2)
    with pytest.raises(ValueError, match="give 2 positive"):
        finetune.class_weights("1,2,3", c, 2)
    with pytest.raises(ValueError, match="balanced or comma"):
        finetune.class_weights("equal", c, 2)


def test_weighted_loss_is_the_weighted_mean():
    batch = {"valid": jnp.array([True, True, True, False]), "label": jnp.array([0, 1, 0, -1])}
    w = finetune.sample_weights(batch, np.array([0.5, 2.0]))
    np.testing.assert_allclose(w, [0.5, 2.0, 0.5, 0.0])
    np.testing.assert_allclose(finetune.sample_weights(batch, None), [1, 1, 1, 0])


def _variables(cfg, x, ids):
    model = transformer.LaBraM(cfg, num_outputs=1)
    return model, model.init(jax.random.key(0), x, ids)


def test_lora_starts_equal_to_the_plain_model_and_adapts_every_projection():
    x = jax.random.normal(jax.random.key(1), (2, 3, 2, 200))
    ids = jnp.array([1, 5, 9])
    plain_model, plain = _variables(model_config.labram("tiny"), x, ids)
    lora_model, lora = _variables(model_config.labram("tiny", lora_rank=4, lora_alpha=8.0), x, ids)
    flat_plain = flax.traverse_util.flatten_dict(nn.unbox(plain)["params"])
    flat_lora = flax.traverse_util.flatten_dict(nn.unbox(lora)["params"])
    adapters = {k for k in flat_lora if any(n.endswith("_lora") for n in k)}
    assert set(flat_lora) - adapters == set(flat_plain)
    assert {k[-2] for k in adapters} == {"qkv_lora", "proj_lora", "fc1_lora", "fc2_lora"}
    assert flat_lora[("encoder", "blocks_0", "attn", "qkv_lora", "lora_b")].shape == (4, 300)
    # Same base weights, B = 0: identical outputs.
    merged = {k: flat_plain.get(k, v) for k, v in flat_lora.items()}
    lora_params = flax.traverse_util.unflatten_dict(merged)
    np.testing.assert_allclose(lora_model.apply({"params": lora_params}, x, ids),
                               plain_model.apply(plain, x, ids), rtol=1e-6, atol=1e-6)
    # A non-zero B changes the output by the low-rank path only.
    key = ("encoder", "blocks_1", "mlp", "fc2_lora", "lora_b")
    b = jax.random.normal(jax.random.key(2), merged[key].shape)  # not constant: fc_norm would remove a shift
    bumped = flax.traverse_util.unflatten_dict({**merged, key: b})
    assert not np.allclose(lora_model.apply({"params": bumped}, x, ids), plain_model.apply(plain, x, ids))


@pytest.mark.parametrize("mode, expect", [
    ("full", {"encoder/blocks_0/attn/qkv", "encoder/blocks_1/attn/qkv", "head/kernel", "encoder/cls_token"}),
    ("linear_probe", {"head/kernel", "fc_norm/scale"}),
    ("last_k", {"encoder/blocks_1/attn/qkv", "head/kernel"}),
    ("lora", {"encoder/blocks_0/attn/qkv_lora/lora_a", "encoder/blocks_1/mlp/fc2_lora/lora_b", "head/kernel"}),
])
def test_trainable_masks(mode, expect):
    cfg = model_config.labram("tiny", lora_rank=2 if mode == "lora" else 0)
    model = transformer.LaBraM(cfg, num_outputs=1)
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2, 1, 200)),
                                                        jnp.array([1, 2]))))["params"]
    mask = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(
        finetune.trainable_mask(shapes, mode, 1, cfg.depth)).items()}
    trained = {k for k, v in mask.items() if v}
    assert expect <= trained
    if mode != "full":
        assert "encoder/blocks_0/attn/qkv" not in trained and "encoder/cls_token" not in trained
    if mode == "lora":
        assert all(k.startswith(("fc_norm", "head")) or "_lora/" in k for k in trained)


def _mix_batch():
    x = jax.random.normal(jax.random.key(3), (6, 2, 3, 200))
    ids = jnp.array([[1, 2]] * 5 + [[1, 7]])  # the last sample has another montage
    mask = jnp.ones((6, 2, 3), bool).at[4, 1, 2].set(False)  # sample 4 has a padding patch
    return {"x": x, "channel_ids": ids, "patch_mask": mask, "label": jnp.array([0, 1, 0, 1, 0, 1]),
            "valid": jnp.array([True, True, True, False, True, True])}  # sample 3 is padding


def test_mixup_mixes_only_partners_of_the_same_grid():
    batch = _mix_batch()
    for seed in range(20):
        mixed, lam, perm = finetune.mixup(batch, jax.random.key(seed), 0.4)
        lam, perm = np.asarray(lam), np.asarray(perm)
        assert sorted(perm) == list(range(6)) and np.all((lam >= 0) & (lam <= 1))
        for i, j in enumerate(perm):
            group = {4: "padded", 5: "other montage"}
            mixable = group.get(i, "plain") == group.get(j, "plain") and j != 3  # sample 3 is padding
            if not mixable:
                assert lam[i] == 1.0
            np.testing.assert_allclose(mixed["x"][i], lam[i] * batch["x"][i] + (1 - lam[i]) * batch["x"][j],
                                       rtol=1e-5, atol=1e-6)
    lams = np.concatenate([np.asarray(finetune.mixup(batch, jax.random.key(s), 0.4)[1]) for s in range(20)])
    assert np.mean(lams < 0.99) > 0.2  # mixing does happen


def test_mixup_loss_mixes_the_two_targets():
    from labram_jax_configs import common

    config = common.get_config("tiny", "finetune")
    config.finetune.mixup_alpha = 0.4
    stage = finetune.build(config, jnp.float32)
    batch = _mix_batch()
    variables = nn.unbox(stage.init(jax.random.key(0), batch))
    params, extra = variables["params"], {}
    key = jax.random.key(5)
    loss, _ = stage.loss_fn(params, extra, batch, key, None)
    # the same loss by hand: the model on the mixed batch, BCE against both targets
    dropout_key, mix_key = jax.random.split(key)
    mixed, lam, perm = finetune.mixup(batch, mix_key, 0.4)
    out = stage.model.apply({"params": params}, mixed["x"], mixed["channel_ids"],
                            mixed["patch_mask"] & mixed["valid"][:, None, None], train=True,
                            rngs={"dropout": dropout_key})[:, 0]
    y = batch["label"].astype(jnp.float32)
    own, other = (np.asarray(jax.vmap(lambda o, t: -(t * jax.nn.log_sigmoid(o) + (1 - t) * jax.nn.log_sigmoid(-o)))(
        out, t)) for t in (y, y[perm]))
    valid = np.asarray(batch["valid"], np.float32)
    expect = (valid * (lam * own + (1 - lam) * valid[perm] * other)).sum() / max(
        (valid * (lam + (1 - lam) * valid[perm])).sum(), 1.0)
    np.testing.assert_allclose(float(loss), expect, rtol=1e-5)


def test_mixup_comes_before_channel_augmentation():
    # Dropping channels first would leave partners with different grids, and mixup would
    # (correctly) refuse to mix them: the loss must equal mixup -> augmentation by hand.
    from labram_jax_configs import common

    config = common.get_config("tiny", "finetune")
    config.finetune.mixup_alpha, config.finetune.channel_drop, config.finetune.channel_gain_std = 0.4, 0.5, 0.2
    stage = finetune.build(config, jnp.float32)
    batch = _mix_batch()
    params = nn.unbox(stage.init(jax.random.key(0), batch))["params"]
    key = jax.random.key(7)
    loss, _ = stage.loss_fn(params, {}, batch, key, None)
    key, mix_key = jax.random.split(key)
    mixed, lam, perm = finetune.mixup(batch, mix_key, 0.4)
    assert np.any(np.asarray(lam) < 0.99)  # this key mixes some pairs
    dropout_key, aug_key = jax.random.split(key)
    augmented = finetune.augment_channels(mixed, aug_key, 0.2, 0.5)
    out = stage.model.apply({"params": params}, augmented["x"], augmented["channel_ids"],
                            augmented["patch_mask"] & augmented["valid"][:, None, None], train=True,
                            rngs={"dropout": dropout_key})[:, 0]
    y = batch["label"].astype(jnp.float32)
    own, other = (np.asarray(-(t * jax.nn.log_sigmoid(out) + (1 - t) * jax.nn.log_sigmoid(-out))) for t in (y, y[perm]))
    valid, lam = np.asarray(batch["valid"], np.float32), np.asarray(lam)
    expect = (valid * (lam * own + (1 - lam) * valid[perm] * other)).sum() / max(
        (valid * (lam + (1 - lam) * valid[perm])).sum(), 1.0)
    np.testing.assert_allclose(float(loss), expect, rtol=1e-5)


def test_channel_augmentation_scales_whole_channels_and_drops_some():
    batch = _mix_batch()
    batch = {**batch, "x": jnp.tile(batch["x"], (1, 4, 1, 1)), "channel_ids": jnp.tile(batch["channel_ids"], (1, 4)),
             "patch_mask": jnp.tile(batch["patch_mask"], (1, 4, 1)).at[0, 7].set(False)}  # sample 0: 7 channels
    x, mask = np.asarray(batch["x"]), np.asarray(batch["patch_mask"])
    dropped = []
    for seed in range(10):
        out = finetune.augment_channels(batch, jax.random.key(seed), gain_std=0.3, drop_rate=0.5)
        ox, om = np.asarray(out["x"]), np.asarray(out["patch_mask"])
        assert np.all(om <= mask) and np.all(om.any((1, 2)))  # only removes; every sample keeps a channel
        kept = om.any(-1)
        assert np.all(ox[~om] == 0)
        for b, c in zip(*np.nonzero(kept)):  # a kept channel is the original times one positive gain
            where = om[b, c]
            ratio = ox[b, c][where] / x[b, c][where]
            assert np.allclose(ratio, ratio.flat[0], rtol=1e-4) and 0.1 < ratio.flat[0] < 10
        assert np.all(om[kept[..., None].repeat(3, -1)] == mask[kept[..., None].repeat(3, -1)])
        dropped.append(1 - kept.sum() / mask.any(-1).sum())
    assert 0.3 < np.mean(dropped) < 0.7
    same = finetune.augment_channels(batch, jax.random.key(0), gain_std=0.0, drop_rate=0.0)
    np.testing.assert_array_equal(np.asarray(same["x"]), x)
    np.testing.assert_array_equal(np.asarray(same["patch_mask"]), mask)


def test_mirrored_rows_swap_left_and_right_electrodes():
    from labram_jax import channels

    rows, row = channels.mirrored_rows(), channels.spatial_row
    pairs = [("C3", "C4"), ("FP1", "FP2"), ("T3", "T4"), ("FP1-F7", "FP2-F8"), ("FTT9h", "FTT10h"), ("O9", "O10")]
    for left, right in pairs:
        assert rows[row(left)] == row(right) and rows[row(right)] == row(left)
    assert rows[row("CZ")] == row("CZ") and rows[0] == 0
    assert rows[row("TTP7h")] == -1  # TTP8h is not in the vocabulary
    defined = rows[rows > 0]
    assert np.array_equal(rows[defined], np.flatnonzero(rows > 0))  # an involution where defined


def test_mirror_presents_samples_under_their_mirror_ids_and_swaps_sides():
    from labram_jax import channels

    row = channels.spatial_row
    ids = jnp.asarray([[row("C3"), row("CZ"), row("C4"), 0],
                       [row("C3"), row("TTP7h"), row("C4"), 0],  # an electrode without a mirror
                       [0, 0, 0, 0]], jnp.int32)  # padding sample
    batch = {"channel_ids": ids, "label": jnp.asarray([0, 1, -1]), "valid": jnp.asarray([True, True, False]),
             "x": jnp.ones((3, 4, 2, 200))}
    out = finetune.mirror(batch, jax.random.key(0), 1.0, swap_label=True)
    assert np.asarray(out["channel_ids"]).tolist() == [[row("C4"), row("CZ"), row("C3"), 0],
                                                       np.asarray(ids[1]).tolist(), [0, 0, 0, 0]]
    assert np.asarray(out["label"]).tolist() == [1, 1, -1] and out["x"] is batch["x"]
    kept = finetune.mirror(batch, jax.random.key(0), 1.0, swap_label=False)
    assert np.asarray(kept["label"]).tolist() == [0, 1, -1]
    flips = [int(np.asarray(finetune.mirror(batch, jax.random.key(s), 0.5, True)["label"])[0]) for s in range(40)]
    assert 10 < sum(flips) < 30  # about half the draws mirror sample 0


def test_mirror_averaging_pairs_each_score_with_its_mirrors_where_a_mirror_exists():
    from labram_jax import channels

    row = channels.spatial_row
    ids = jnp.asarray([[row("C3"), row("CZ"), row("C4")],
                       [row("C3"), row("TTP7h"), row("C4")],  # an electrode without a mirror
                       [row("FZ"), row("CZ"), row("PZ")],  # all midline: its mirror is itself
                       [0, 0, 0]], jnp.int32)  # padding sample
    batch = {"channel_ids": ids, "label": jnp.asarray([0, 1, 1, -1]),
             "valid": jnp.asarray([True, True, True, False]), "x": jnp.ones((4, 3, 2, 200))}
    mirrored, flipped = finetune.mirror_all(batch)
    assert np.asarray(flipped).tolist() == [True, False, False, False]
    assert np.asarray(mirrored["channel_ids"])[0].tolist() == [row("C4"), row("CZ"), row("C3")]
    assert np.asarray(mirrored["label"]).tolist() == [0, 1, 1, -1]  # targets are not touched
    p, p_mirror = jnp.asarray([0.8, 0.3, 0.6, 0.5]), jnp.asarray([0.4, 0.9, 0.1, 0.2])
    np.testing.assert_allclose(finetune.mirror_average("binary", p, p_mirror, flipped, "swap"), [0.7, 0.3, 0.6, 0.5])
    np.testing.assert_allclose(finetune.mirror_average("binary", p, p_mirror, flipped, "keep"), [0.6, 0.3, 0.6, 0.5])
    probs = jnp.asarray([[0.2, 0.8], [0.5, 0.5], [0.1, 0.9], [0.3, 0.7]])
    kept = finetune.mirror_average("multiclass", probs, probs[::-1], flipped, "keep")
    np.testing.assert_allclose(kept, [[0.25, 0.75], [0.5, 0.5], [0.1, 0.9], [0.3, 0.7]])
    with pytest.raises(ValueError, match="use 'keep'"):
        finetune.mirror_average("multiclass", probs, probs, flipped, "swap")
    with pytest.raises(ValueError, match="choose one of"):
        finetune.mirror_average("binary", p, p, flipped, "none")


def test_mirror_label_swap_needs_a_binary_task():
    from labram_jax import config_schema
    from labram_jax_configs import tiny

    cfg = tiny.get_config("finetune")
    cfg.data.train = cfg.data.val = ""
    cfg.finetune.mirror, cfg.finetune.mirror_label = 0.5, "swap"
    cfg.finetune.task, cfg.model.num_outputs = "multiclass", 3
    with pytest.raises(config_schema.ConfigError, match="mirror_label='swap' swaps the two classes"):
        config_schema.validate(cfg, 1)


def test_metrics_by_group_are_the_metrics_of_each_subset():
    from labram_jax import evaluate

    rng = np.random.default_rng(0)
    scores, targets = rng.random(40), rng.integers(0, 2, 40)
    groups = ["a"] * 25 + ["b"] * 15
    report = evaluate.by_group("binary", scores, targets, groups)
    assert sorted(report) == ["a", "b"] and report["b"]["samples"] == 15
    expect = finetune.compute_metrics("binary", scores[25:], targets[25:])
    assert {k: v for k, v in report["b"].items() if k != "samples"} == expect
    assert report["a"]["auroc"] != report["b"]["auroc"]
