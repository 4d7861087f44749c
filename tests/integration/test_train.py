"""The trainer on 8 fake CPU devices: mesh equivalence, resume, mesh change, learning."""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from labram_jax import metrics, model_file, sharding, train

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(stage, manifest, **overrides):
    spec = importlib.util.spec_from_file_location("tiny_cfg", ROOT / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(stage)
    cfg.data.train = str(manifest)
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = getattr(node, p)
        setattr(node, leaf, value)
    return cfg


def losses(workdir, key="train/loss"):
    rows = metrics.read_jsonl(str(pathlib.Path(workdir) / "metrics.jsonl"))
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.fixture(scope="module")
def tokenizer_dir(eegmat_shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tokenizer")
    train.run(tiny_config("tokenizer", eegmat_shards, **{"optim.total_steps": 10}), str(workdir))
    return workdir


def stage_overrides(stage, eegmat_shards, tokenizer_dir):
    if stage == "pretrain":
        return {"pretrain.tokenizer_checkpoint": str(tokenizer_dir)}
    if stage == "finetune":
        return {"data.val": str(eegmat_shards), "model.drop_path": 0.0}
    return {}


@pytest.mark.parametrize("stage", ["tokenizer", "pretrain", "finetune"])
def test_meshes_give_the_single_device_trajectory(stage, eegmat_shards, tokenizer_dir, tmp_path):
    extra = {"optim.total_steps": 4, "log_every": 1, "eval_every": 100, **stage_overrides(stage, eegmat_shards,
                                                                                            tokenizer_dir)}
    single = tmp_path / "single"
    train.run(tiny_config(stage, eegmat_shards, **{"mesh.data": 1, **extra}), str(single), devices=jax.devices()[:1])
    reference = losses(single)
    assert len(reference) == 4
    for shape in ((8, 1, 1), (2, 4, 1), (2, 2, 2)):
        workdir = tmp_path / "x".join(map(str, shape))
        cfg = tiny_config(stage, eegmat_shards, **{"mesh.data": shape[0], "mesh.fsdp": shape[1],
                                                   "mesh.tensor": shape[2], **extra})
        train.run(cfg, str(workdir))
        got = losses(workdir)
        np.testing.assert_allclose([got[s] for s in sorted(got)], [reference[s] for s in sorted(reference)],
                                   rtol=2e-4, err_msg=f"{stage} on mesh {shape}")


def test_large_parameters_are_sharded_on_fsdp(eegmat_shards, tokenizer_dir):
    import flax.linen as nn
    from labram_jax.tasks import pretrain

    cfg = tiny_config("pretrain", eegmat_shards, **{"pretrain.tokenizer_checkpoint": str(tokenizer_dir)})
    stage = pretrain.build(cfg, np.float32)
    dummy = {k: v[None] for k, v in train.input_pipeline.Grid(19, 4).empty().items()}
    abstract = jax.eval_shape(stage.init, jax.random.key(0), dummy)
    mesh = sharding.make_mesh((2, 4, 1))
    shardings = sharding.logical_shardings(abstract, mesh, sharding.rules_from_config())
    rows = sharding.parameter_table(abstract["params"], shardings["params"])
    big = [r for r in rows if len(r[1]) >= 2 and np.prod(r[1]) >= 1000]
    assert big and all("fsdp" in tuple(r[3]) for r in big), [(r[0], r[3]) for r in big if "fsdp" not in tuple(r[3])]
    sharding.check_large_params_sharded(rows, mesh, threshold=1000)
    replicated = [(n, s, names, jax.sharding.PartitionSpec()) for n, s, names, _ in rows]
    with pytest.raises(ValueError, match="replicated"):
        sharding.check_large_params_sharded(replicated, mesh, threshold=1000)
    del nn


@pytest.mark.parametrize("stage", ["tokenizer", "finetune"])
def test_resume_equals_uninterrupted(stage, eegmat_shards, tokenizer_dir, tmp_path):
    extra = {"optim.total_steps": 8, "log_every": 1, "checkpoint_every": 4, "eval_every": 100,
             **stage_overrides(stage, eegmat_shards, tokenizer_dir)}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.run(tiny_config(stage, eegmat_shards, **extra), str(straight))
    first = train.run(tiny_config(stage, eegmat_shards, **extra, stop_after=4), str(resumed))
    assert first["step"] == 4 and not (resumed / "model.npz").exists()
    # a resume with another model setting is refused, and the run's config.json kept
    other = "channel" if json.loads((resumed / "config.json").read_text())["model"]["input_norm"] == "none" else "none"
    with pytest.raises(ValueError, match=f"model.input_norm: .* -> '{other}'"):
        train.run(tiny_config(stage, eegmat_shards, **extra, **{"model.input_norm": other}), str(resumed))
    assert json.loads((resumed / "config.json").read_text())["model"]["input_norm"] != other
    train.run(tiny_config(stage, eegmat_shards, **extra), str(resumed))
    assert losses(resumed) == losses(straight)  # bitwise on CPU
    _, _, a = model_file.load(str(straight / "model.npz"))
    _, _, b = model_file.load(str(resumed / "model.npz"))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_restore_onto_a_different_mesh(eegmat_shards, tokenizer_dir, tmp_path):
    extra = {"optim.total_steps": 8, "log_every": 1, "checkpoint_every": 4,
             **stage_overrides("pretrain", eegmat_shards, tokenizer_dir)}
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    train.run(tiny_config("pretrain", eegmat_shards, **extra), str(straight))
    train.run(tiny_config("pretrain", eegmat_shards, **extra, stop_after=4, **{"mesh.data": 8}), str(moved))
    train.run(tiny_config("pretrain", eegmat_shards, **extra, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}),
              str(moved))
    a, b = losses(straight), losses(moved)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    np.testing.assert_allclose([b[s] for s in range(1, 9)], [a[s] for s in range(1, 9)], rtol=2e-4)


@pytest.mark.parametrize("stage, steps", [("tokenizer", 200), ("pretrain", 200)])
def test_loss_goes_down_on_real_eeg(stage, steps, eegmat_shards, tokenizer_dir, tmp_path):
    cfg = tiny_config(stage, eegmat_shards, **{"optim.total_steps": steps, "optim.warmup_steps": 20,
                                                "log_every": 10, "checkpoint_every": 1000,
                                                **stage_overrides(stage, eegmat_shards, tokenizer_dir)})
    train.run(cfg, str(tmp_path))
    curve = losses(tmp_path)
    start = np.mean([curve[s] for s in sorted(curve)[:2]])
    end = np.mean([curve[s] for s in sorted(curve)[-3:]])
    print(f"{stage}: loss {start:.4f} -> {end:.4f} over {steps} steps")
    assert end < 0.9 * start
    assert (tmp_path / "curves.png").stat().st_size > 1000
    if stage == "tokenizer":
        assert (tmp_path / "codebook_usage.png").stat().st_size > 1000


def test_band_limited_tokenizer_targets_carry_what_centred_records_hold(eegmat_aligned_centred, tmp_path):
    # Subject-centred records are zero outside 1-45 Hz: z-scored over every DFT bin, the log-amplitude target
    # is nearly the same step for every patch (a decoder reads it without a code); over the band it is not.
    import jax.numpy as jnp

    from labram_jax import input_pipeline
    from labram_jax.models import tokenizer as tokenizer_lib
    from labram_jax.tasks import stage as stage_lib

    manifest = str(eegmat_aligned_centred)
    batch = next(iter(input_pipeline.eval_batches(manifest, input_pipeline.Grid(19, 4), 32, "train")))
    real = np.asarray(stage_lib.effective_patch_mask(batch))

    def left_after_the_mean_target(bins):  # the share of the target a code-blind decoder cannot predict
        amp, _ = tokenizer_lib.fourier_targets(jnp.asarray(batch["x"]), jnp.asarray(real), True, bins)
        amp = np.asarray(amp)[real][:, np.ones(200, bool) if bins is None else np.asarray(bins)]
        return ((amp - amp.mean(0)) ** 2).mean() / (amp ** 2).mean()

    assert left_after_the_mean_target(None) < 0.05
    assert left_after_the_mean_target(tokenizer_lib.band_bins(1, 45)) > 0.5
    cfg = tiny_config("tokenizer", manifest, **{"optim.total_steps": 3, "optim.warmup_steps": 0,
                                                 "model.patch_embed": "spectrum", "model.input_norm": "none",
                                                 "tokenizer.log_amplitude": True, "tokenizer.target_band_hz": "1-45"})
    train.run(cfg, str(tmp_path / "run"))
    _, model, _ = model_file.load(str(tmp_path / "run"), kind="tokenizer")
    assert (model.cfg.target_low_hz, model.cfg.target_high_hz) == (1, 45)
    logged = losses(tmp_path / "run", "train/amplitude_loss")
    assert logged and all(np.isfinite(v) for v in logged.values())


def test_the_loop_runs_with_the_set_up_frozen_out_of_full_collections(eegmat_shards, tmp_path, monkeypatch):
    # gc.freeze() before the loop: a full collection during the steps does not scan the set-up's objects
    import gc

    frozen_while_writing = []
    write = metrics.MetricWriter.write
    monkeypatch.setattr(metrics.MetricWriter, "write",
                        lambda self, *a, **k: (frozen_while_writing.append(gc.get_freeze_count()), write(self, *a, **k))[1])
    before = gc.get_freeze_count()
    train.run(tiny_config("finetune", eegmat_shards, **{"optim.total_steps": 2, "log_every": 1}), str(tmp_path))
    assert frozen_while_writing and min(frozen_while_writing) > before + 10_000  # the set-up, frozen in the loop
    assert gc.get_freeze_count() == before  # and given back to the collector afterwards
