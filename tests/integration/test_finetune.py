"""Fine-tuning variants: init from ours or official weights, frozen modes, tasks, bfloat16."""

import json
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from data_prep import __main__ as data_prep_cli
from labram_jax import convert, evaluate, input_pipeline, metrics, model_file, steps, train
from tests.integration.test_train import ROOT, tiny_config


@pytest.fixture(scope="module")
def pretrained(eegmat_shards, tmp_path_factory):
    tok = tmp_path_factory.mktemp("tok")
    train.run(tiny_config("tokenizer", eegmat_shards, **{"optim.total_steps": 4}), str(tok))
    pre = tmp_path_factory.mktemp("pre")
    train.run(tiny_config("pretrain", eegmat_shards, **{"optim.total_steps": 4,
                                                        "pretrain.tokenizer_checkpoint": str(tok)}), str(pre))
    return pre


def _encoder(path):
    _, _, variables = model_file.load(str(path))
    enc = dict(variables["params"]["encoder"])
    enc.pop("mask_token", None)
    return enc


def _assert_tree_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_linear_probe_from_our_pretrained_model_keeps_the_encoder(eegmat_shards, pretrained, tmp_path):
    cfg = tiny_config("finetune", eegmat_shards, **{
        "optim.total_steps": 4, "data.val": str(eegmat_shards), "eval_every": 2, "finetune.mode": "linear_probe",
        "finetune.init_checkpoint": str(pretrained), "model.num_outputs": 2, "finetune.task": "multiclass",
        "finetune.best_metric": "cohen_kappa"})
    result = train.run(cfg, str(tmp_path))
    _assert_tree_equal(_encoder(tmp_path / "model.npz"), _encoder(pretrained / "model.npz"))
    assert {"val/cohen_kappa", "val/weighted_f1", "val/balanced_accuracy"} <= set(result)
    assert len([p for p in (tmp_path / "checkpoints_best").iterdir() if p.name.isdigit()]) == 1


def test_init_from_an_official_checkpoint(eegmat_shards, pretrained, tmp_path):
    kind, model, variables = model_file.load(str(pretrained / "model.npz"))
    official = tmp_path / "labram-official.npz"
    convert.save_official(str(official), convert.to_official(kind, model, variables))
    cfg = tiny_config("finetune", eegmat_shards, **{
        "optim.total_steps": 2, "finetune.mode": "last_k", "finetune.last_k": 1,
        "finetune.init_checkpoint": str(official), "finetune.init_kind": "official"})
    train.run(cfg, str(tmp_path / "run"))
    got, want = _encoder(tmp_path / "run" / "model.npz"), _encoder(pretrained / "model.npz")
    _assert_tree_equal(got["blocks_0"], want["blocks_0"])  # frozen: only the last block trains
    assert not np.array_equal(got["blocks_1"]["mlp"]["fc1"]["kernel"], want["blocks_1"]["mlp"]["fc1"]["kernel"])


def test_lora_trains_only_adapters_and_head_and_the_export_reloads(eegmat_shards, pretrained, tmp_path):
    cfg = tiny_config("finetune", eegmat_shards, **{
        "optim.total_steps": 4, "data.val": str(eegmat_shards), "eval_every": 4, "finetune.mode": "lora",
        "finetune.lora_rank": 4, "finetune.init_checkpoint": str(pretrained), "finetune.class_weight": "balanced"})
    result = train.run(cfg, str(tmp_path))
    kind, model, variables = model_file.load(str(tmp_path / "model.npz"))
    assert model.cfg.lora_rank == 4
    got, want = _encoder(tmp_path / "model.npz"), _encoder(pretrained / "model.npz")
    flat_got = flax.traverse_util.flatten_dict(got)
    adapters = {k: v for k, v in flat_got.items() if any(n.endswith("_lora") for n in k)}
    assert len(adapters) == 2 * 4 * 2  # a and b of qkv, proj, fc1, fc2 in 2 blocks
    assert all(np.any(v != 0) for k, v in adapters.items() if k[-1] == "lora_b")  # trained away from zero
    _assert_tree_equal({k: v for k, v in flat_got.items() if k not in adapters}, flax.traverse_util.flatten_dict(want))
    # The exported model (adapters kept) reproduces the logged validation metric.
    report = evaluate.main(["--workdir", str(tmp_path), "--data", str(eegmat_shards), "--checkpoint", "latest",
                            "--out", str(tmp_path / "eval.json")])
    assert report == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["balanced_accuracy"] == pytest.approx(result["val/balanced_accuracy"], abs=1e-12)


@pytest.mark.parametrize("mode", ["full", "last_k"])
def test_scanned_blocks_train_like_the_loop(eegmat_shards, pretrained, tmp_path, mode):
    """nn.scan over stacked blocks: the same losses step by step (layer decay, frozen blocks
    included), and a model.npz in the per-block layout."""
    runs = {}
    for scan in (False, True):
        cfg = tiny_config("finetune", eegmat_shards, **{
            "optim.total_steps": 4, "log_every": 1, "model.drop_path": 0.0, "finetune.mode": mode,
            "finetune.last_k": 1, "finetune.init_checkpoint": str(pretrained), "model.scan_blocks": scan})
        train.run(cfg, str(tmp_path / str(scan)))
        runs[scan] = [r["train/loss"] for r in metrics.read_jsonl(str(tmp_path / str(scan) / "metrics.jsonl"))
                      if "train/loss" in r]
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-5)
    loop, scanned = _encoder(tmp_path / "False" / "model.npz"), _encoder(tmp_path / "True" / "model.npz")
    assert set(scanned) == set(loop) and "blocks_1" in scanned
    for a, b in zip(jax.tree_util.tree_leaves(scanned), jax.tree_util.tree_leaves(loop)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5)  # Adam magnifies float noise of tiny grads
    if mode == "last_k":
        _assert_tree_equal(scanned["blocks_0"], _encoder(pretrained / "model.npz")["blocks_0"])


@pytest.mark.parametrize("stage", ["tokenizer", "pretrain"])
def test_scanned_blocks_in_the_other_stages(eegmat_shards, pretrained, tmp_path, stage):
    tokenizer = json.loads((pretrained / "config.json").read_text())["pretrain"]["tokenizer_checkpoint"]
    extra = {"pretrain.tokenizer_checkpoint": tokenizer} if stage == "pretrain" else {}
    cfg = tiny_config(stage, eegmat_shards, **{"optim.total_steps": 2, "model.scan_blocks": True, **extra})
    result = train.run(cfg, str(tmp_path))
    assert np.isfinite(result["loss"])
    kind, model, _ = model_file.load(str(tmp_path / "model.npz"))
    assert kind == stage and not (model.cfg.encoder if stage == "tokenizer" else model.cfg).scan_blocks


def test_size_mismatch_is_a_clear_error(eegmat_shards, pretrained, tmp_path):
    cfg = tiny_config("finetune", eegmat_shards, **{"finetune.init_checkpoint": str(pretrained), "model.size": "base"})
    with pytest.raises(ValueError, match="does not fit"):
        train.run(cfg, str(tmp_path))


def test_bfloat16_compute_tracks_float32(eegmat_shards, tmp_path):
    runs = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_config("finetune", eegmat_shards, **{"optim.total_steps": 3, "log_every": 1,
                                                         "model.dtype": dtype, "model.drop_path": 0.0})
        train.run(cfg, str(tmp_path / dtype))
        rows = metrics.read_jsonl(str(tmp_path / dtype / "metrics.jsonl"))
        runs[dtype] = [r["train/loss"] for r in rows]
    np.testing.assert_allclose(runs["bfloat16"], runs["float32"], rtol=3e-2)


def test_regression(eeg_dir, tmp_path):
    files = [str(p) for p in sorted((eeg_dir / "eegmat").glob("Subject0[0-2]_*.edf"))]
    out = tmp_path / "data"
    assert data_prep_cli.main(files + ["--out", str(out), "--window", "4", "--label-from", "filename",
                                       "--label-pattern", r"_1\.edf$=0.0", "--label-pattern", r"_2\.edf$=1.5",
                                       "--regression", "--subject-pattern", r"Subject(\d+)_", "--val-subjects", "02",
                                       "--quiet"]) == 0
    manifest = out / "manifest.json"
    assert json.loads(manifest.read_text())["labels"]["regression"] is True
    cfg = tiny_config("finetune", manifest, **{"optim.total_steps": 4, "data.val": str(manifest),
                                               "finetune.task": "regression", "finetune.best_metric": "pearson_r"})
    result = train.run(cfg, str(tmp_path / "run"))
    assert np.isfinite(result["loss"]) and {"val/mae", "val/rmse", "val/pearson_r"} <= set(result)


def test_evaluate_is_repeatable_and_matches_training_validation(eegmat_shards, tmp_path):
    from labram_jax import evaluate

    cfg = tiny_config("finetune", eegmat_shards, **{"optim.total_steps": 4, "data.val": str(eegmat_shards),
                                                     "eval_every": 4, "finetune.best_metric": "auroc"})
    train.run(cfg, str(tmp_path))
    logged = {k[4:]: v for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) if r["step"] == 4
              for k, v in r.items() if k.startswith("val/")}
    reports = []
    for i in range(2):
        out = tmp_path / f"eval{i}.json"
        assert evaluate.main(["--workdir", str(tmp_path), "--data", str(eegmat_shards), "--checkpoint", "latest",
                              "--out", str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0] == {**reports[1], "data": reports[0]["data"]}
    for key, value in logged.items():
        assert reports[0][key] == pytest.approx(value, abs=1e-12), key
    assert reports[0]["samples"] == 120 and np.sum(reports[0]["confusion_matrix"]) == 120
    assert (tmp_path / "eval1_confusion.png").exists() and (tmp_path / "eval1_roc.png").exists()
    out = tmp_path / "per_recording.json"
    assert evaluate.main(["--workdir", str(tmp_path), "--data", str(eegmat_shards), "--checkpoint", "best",
                          "--per-recording", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["samples"] == 4  # two validation subjects x two recordings
    for flags, samples in (([], 60), (["--per-recording"], 2)):  # per subject: 60 windows, 2 recordings
        assert evaluate.main(["--workdir", str(tmp_path), "--data", str(eegmat_shards), "--checkpoint", "latest",
                              "--by-subject", "--out", str(out), *flags]) == 0
        subjects = json.loads(out.read_text())["by_subject"]
        assert sorted(name.split("/")[-1] for name in subjects) == ["16", "17"], sorted(subjects)
        assert all(row["samples"] == samples and 0 <= row["balanced_accuracy"] <= 1 for row in subjects.values())
    assert evaluate.main(["--workdir", str(tmp_path / "nope"), "--data", str(eegmat_shards)]) == 2


def test_api_embed_and_predict_match_the_records(eeg_dir, eegmat_shards, tmp_path):
    import mne

    from benchmarks import montage_soundness
    from labram_jax import api, evaluate, export_model, montage

    cfg = tiny_config("finetune", eegmat_shards, **{"optim.total_steps": 2, "data.val": str(eegmat_shards),
                                                     "eval_every": 2})
    train.run(cfg, str(tmp_path))
    model = api.load(str(tmp_path))
    raw = mne.io.read_raw_edf(eeg_dir / "eegmat" / "Subject16_2.edf", preload=True, verbose="error")
    probs = model.predict(raw)
    emb = model.embed(raw)
    assert probs.shape == (15,) and emb.windows.shape == (15, 100) and emb.patches.shape == (15, 19, 4, 100)
    # Batches of 4 (the last of 3 windows padded to 4) give the same answers from one more compiled shape.
    np.testing.assert_allclose(model.predict(raw, batch_size=4), probs, atol=1e-6)
    assert model._logits._cache_size() == 2  # 15 windows padded to 16, and batches of 4
    assert {"EEG A2-A1", "ECG ECG"} == {n for n, _ in emb.dropped}
    # The same windows through data_prep's records and the trained state give the same probabilities.
    restored = steps.restore_for_inference(cfg, str(tmp_path), "latest")
    scores, _, positions = evaluate.predict_split(restored.predict_fn, restored.state, str(eegmat_shards), "val",
                                                  restored.grid, restored.mesh, 8, restored.stage.target)
    recordings = input_pipeline.provenance_at(str(eegmat_shards), "val", positions, "recording")[0]
    mine = scores[[r.endswith("Subject16_2") for r in recordings]]
    np.testing.assert_allclose(probs, mine, atol=1e-5)
    # Arrays (in microvolts here) and Epochs give the same answers.
    picks = mne.pick_types(raw.info, eeg=True)
    np.testing.assert_allclose(model.predict(raw.get_data(picks) * 1e6, [raw.ch_names[i] for i in picks],
                                             raw.info["sfreq"], unit="uV"), probs, atol=1e-5)
    epochs = mne.make_fixed_length_epochs(raw, duration=4.0, preload=True, verbose="error")
    assert model.predict(epochs).shape == (len(epochs),)
    # A path goes through data_prep's reader; a position-only copy of the cap (X1..X19 with the
    # electrodes' positions) is placed back on the same 10-20 sites by position.
    np.testing.assert_allclose(model.predict(eeg_dir / "eegmat" / "Subject16_2.edf"), probs, atol=1e-6)
    copy, origin = montage_soundness.position_only_copy(raw)
    placed = model.embed(copy, montage=montage.Options(method="nearest", targets="1020"))
    assert sorted(placed.channels) == sorted(emb.channels)
    assert all(origin[m["sources"][0]] == m["name"] for m in placed.mapping)
    np.testing.assert_allclose(model.predict(copy, montage=montage.Options(method="nearest", targets="1020")), probs,
                               atol=1e-5)
    # The exported artefact runs with jax and numpy alone and gives the same probabilities.
    assert export_model.main([str(tmp_path), str(tmp_path / "exported"), "--platforms", "cpu", "cuda"]) == 0
    x, rows = model.windows(raw)
    np.save(tmp_path / "windows.npy", x)
    blocker = ("import runpy, sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('labram_jax', 'flax', 'optax', 'orbax', 'grain', 'mne', 'sklearn'):\n"
               "            raise ImportError(f'{name} is not allowed here')\n"
               "sys.meta_path.insert(0, Block())\n"
               f"sys.argv = ['predict.py', {str(tmp_path / 'windows.npy')!r}, {str(tmp_path / 'scores.npy')!r}]\n"
               f"runpy.run_path({str(tmp_path / 'exported' / 'predict.py')!r}, run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "scores.npy"), probs, atol=1e-5)
    spec = json.loads((tmp_path / "exported" / "preprocessing.json").read_text())
    np.testing.assert_array_equal(spec["channel_rows"], rows)
    assert spec["window_s"] == 4 and spec["labels"] == ["rest", "arithmetic"]
    with pytest.raises(ValueError, match="shorter than one"):
        model.predict(raw.copy().crop(0, 2))
    # The montage benchmark finds the held-out recordings, labels and windows in the run's manifest;
    # splines through every electrode onto the 10-20 sites give the named cap's scores.
    placed = montage_soundness.model_on_placed_caps(str(tmp_path), max_files=2, placed={"all 19, interpolate": 1},
                                                    options=montage.Options(targets="1020"))
    assert placed["files"] == 2 and placed["windows"] == 60  # Subject16_1 (rest, 180 s) and _2 (arithmetic, 60 s)
    assert placed["named"] == pytest.approx(placed["all 19, interpolate"], abs=1e-3)
    assert placed["all 19, interpolate"]["same_class_as_named"] == 1.0


def test_hub_folder_round_trips_and_loads_offline_by_repository_id(eeg_dir, eegmat_shards, tmp_path):
    import shutil

    from labram_jax import api, hub

    run = tmp_path / "run"
    cfg = tiny_config("finetune", eegmat_shards, **{"optim.total_steps": 2, "data.val": str(eegmat_shards),
                                                     "eval_every": 2})
    train.run(cfg, str(run))
    folder = tmp_path / "labram-tiny-eegmat"
    hub.save_pretrained(str(run), str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (folder / "README.md").read_text()
    assert "library_name: labram_jax" in card and "4 training subjects" in card and "balanced_accuracy" in card
    assert "temporal encoder with 4 channels" in card  # the tiny config's stem, as the card must say
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644
    recording = eeg_dir / "eegmat" / "Subject16_2.edf"
    want = api.load(str(run)).predict(recording)
    np.testing.assert_array_equal(api.load(str(folder)).predict(recording), want)
    # The weights load in PyTorch bit for bit, and come back the same way.
    torch = pytest.importorskip("torch", reason="the torch round trip needs PyTorch (pip install '.[torch]')")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    _, _, variables = model_file.load(str(run))
    flat = flax.traverse_util.flatten_dict(variables, sep="/")
    assert set(tensors) == set(flat)
    for key, value in flat.items():
        np.testing.assert_array_equal(tensors[key].numpy(), value)
    save_file({k: v.clone() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "labram_jax", "kind": "finetune"})
    np.testing.assert_array_equal(api.load(str(folder)).predict(recording), want)
    assert isinstance(tensors[next(iter(tensors))], torch.Tensor)
    # A Hub repository id resolves through huggingface_hub's cache, offline.
    snapshot = tmp_path / "cache" / "models--someone--labram-tiny" / "snapshots" / "0123abcd"
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    by_id = api.load("someone/labram-tiny", cache_dir=str(tmp_path / "cache"), local_files_only=True)
    np.testing.assert_array_equal(by_id.predict(recording), want)
    with pytest.raises(FileNotFoundError, match="did not give it"):
        api.load("someone/missing", cache_dir=str(tmp_path / "cache"), local_files_only=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        api.load(str(tmp_path / "nothing" / "here" / "x"))


def test_a_model_trained_on_centred_records_gets_centred_input_from_the_api(eeg_dir, eegmat_shards, tmp_path):
    from data_prep import centring
    from labram_jax import api, data_spec, hub, subject_centring

    centred = tmp_path / "centred"
    assert centring.main([str(eegmat_shards), "--out", str(centred), "--quiet"]) == 0
    manifest = str(centred / "manifest.json")
    assert data_spec.subject_centring(manifest) == {"band_hz": [1, 45]}
    assert data_spec.subject_centring(str(eegmat_shards)) is None
    with pytest.raises(ValueError, match="mixes records prepared differently"):
        data_spec.subject_centring(f"{manifest}+{eegmat_shards}")
    with pytest.raises(ValueError, match="but config.data.val .* is not: use records prepared like the training ones"):
        train.run(tiny_config("finetune", manifest, **{"optim.total_steps": 2, "data.val": str(eegmat_shards)}),
                  str(tmp_path / "mixed"))
    cfg = tiny_config("finetune", manifest, **{"optim.total_steps": 2, "data.val": manifest, "eval_every": 2})
    run = tmp_path / "run"
    train.run(cfg, str(run))
    assert model_file.centring_of(str(run)) == {"band_hz": [1, 45]}  # the model file says what input it needs
    model = api.load(str(run))
    rest, task = (eeg_dir / "eegmat" / f"Subject16_{i}.edf" for i in (1, 2))
    with pytest.raises(ValueError, match="subject_reference"):
        model.predict(task)
    reference = model.subject_reference([rest, task])  # the subject's two recordings, no labels
    probs = model.predict(task, reference=reference)
    # data_prep.centring's records of the same windows, through the trained state, score the same
    restored = steps.restore_for_inference(cfg, str(run), "latest")
    scores, _, positions = evaluate.predict_split(restored.predict_fn, restored.state, manifest, "val",
                                                  restored.grid, restored.mesh, 8, restored.stage.target)
    recordings = input_pipeline.provenance_at(manifest, "val", positions, "recording")[0]
    np.testing.assert_allclose(probs, scores[[r.endswith("Subject16_2") for r in recordings]], atol=1e-4)
    assert evaluate.main(["--workdir", str(run), "--data", str(eegmat_shards), "--out", str(tmp_path / "e.json")]) == 2
    # centring by hand on windows of both recordings gives the same; a reference of the task file
    # alone (one condition) gives other scores: it is centred onto that condition
    x = np.concatenate([model.windows(rest)[0], model.windows(task)[0]])
    by_hand = model.predict_windows(model.centre(x, np.zeros(len(x))), model.windows(task)[1])
    np.testing.assert_allclose(by_hand[-len(probs):], probs, atol=1e-5)
    both, alone = (model.windows(task, reference=r)[0] for r in (reference, model.subject_reference(task)))
    assert np.abs(alone - both).mean() > 0.05 * np.abs(both).mean()
    # a Hub folder keeps the requirement
    folder = hub.save_pretrained(str(run), str(tmp_path / "hub"))
    assert api.load(folder).subject_centring == {"band_hz": [1, 45]}
    assert "subject_reference" in (tmp_path / "hub" / "README.md").read_text()
    # the same weights saved as a model of Euclidean-aligned records: the API aligns its input
    kind, module, variables = model_file.load(str(run))
    model_file.save(str(tmp_path / "aligned.npz"), kind, module, variables, {"method": "euclidean", "subjects": 20})
    aligned = api.load(str(tmp_path / "aligned.npz"))
    assert aligned.subject_centring == {"method": "euclidean"}
    with pytest.raises(ValueError, match="Euclidean-aligned"):
        aligned.predict(task)
    with pytest.raises(ValueError, match="this reference is for a spectrum model"):
        aligned.predict(task, reference=model.subject_reference([rest, task]))
    reference = aligned.subject_reference([rest, task])
    assert reference.values["whitening"].shape == (len(reference.rows),) * 2  # the subject's R^-1/2
    windows = aligned.windows(task, reference=reference)[0]
    np.testing.assert_allclose(windows, subject_centring.align_signal(model.windows(task)[0],
                                                                      reference.values["whitening"]))
    by_hand = aligned.predict_windows(aligned.centre(x, np.zeros(len(x))), model.windows(task)[1])
    np.testing.assert_allclose(by_hand[-len(probs):], aligned.predict(task, reference=reference), atol=1e-5)
    hub.save_pretrained(str(tmp_path / "aligned.npz"), str(tmp_path / "hub2"))
    assert "Euclidean-aligned" in (tmp_path / "hub2" / "README.md").read_text()


def test_spatial_filters_learn_at_their_own_rate_on_aligned_records_and_serve_through_the_api(
        eeg_dir, eegmat_aligned_centred, tmp_path):
    # configs/eegmat.py's shape: aligned-then-centred records, model.spatial_mix, optim.lr_scales
    from labram_jax import api

    manifest = str(eegmat_aligned_centred)
    cfg = tiny_config("finetune", manifest, **{
        "optim.total_steps": 3, "optim.warmup_steps": 0, "data.val": manifest, "eval_every": 3,
        "model.patch_embed": "spectrum", "model.spatial_mix": True, "model.head_pooling": "electrode",
        "optim.lr_scales": "spatial_mix=30"})
    run = tmp_path / "run"
    train.run(cfg, str(run))
    kind, module, variables = model_file.load(str(run))
    assert module.cfg.spatial_mix
    table = np.abs(np.asarray(variables["params"]["encoder"]["spatial_mix"]["kernel"])).max()
    # AdamW's first step moves every entry with a gradient by the rate itself, here 30 x lr; without the
    # scale three steps move an entry by at most about 3 x lr
    assert table > 25 * cfg.optim.lr
    model = api.load(str(run))
    rest, task = (eeg_dir / "eegmat" / f"Subject16_{i}.edf" for i in (1, 2))
    probs = model.predict(task, reference=model.subject_reference([rest, task]))
    assert len(probs) > 0 and np.all((probs >= 0) & (probs <= 1))


def test_eegmat_recipe_pretrains_on_4s_windows_and_fine_tunes_that_encoder_on_5s(eeg_dir, eegmat_aligned_centred,
                                                                                 tmp_path):
    # configs/eegmat.py as its docstring runs it, shortened: tokenizer and masked model on aligned-then-centred
    # 4-s windows (19 x 4), fine-tuning of that very encoder on 5-s windows (19 x 5)
    import importlib.util

    from data_prep import centring

    spec = importlib.util.spec_from_file_location("eegmat_cfg", ROOT / "configs" / "eegmat.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    files = [str(p) for p in sorted((eeg_dir / "eegmat").glob("Subject*.edf")) if p.name[7:9] in ("00", "01", "16")]
    assert data_prep_cli.main(files + ["--out", str(tmp_path / "five"), "--window", "5", "--label-from", "filename",
                                       "--label-pattern", r"_1\.edf$=rest", "--label-pattern", r"_2\.edf$=arithmetic",
                                       "--subject-pattern", r"Subject(\d+)_", "--val-subjects", "16", "--quiet"]) == 0
    five = tmp_path / "five_aligned_centred"
    assert centring.main([str(tmp_path / "five" / "manifest.json"), "--out", str(five), "--method",
                          "euclidean+spectrum", "--quiet"]) == 0
    records = {"four": str(eegmat_aligned_centred), "five": str(five / "manifest.json")}
    runs = {stage: tmp_path / stage for stage in ("tokenizer", "pretrain", "finetune")}
    for stage, workdir in runs.items():
        cfg = recipe.get_config(stage)
        assert (cfg.data.max_channels, cfg.data.max_windows) == ((19, 5) if stage == "finetune" else (19, 4))
        assert cfg.model.spatial_mix == (stage == "finetune") and cfg.model.input_norm == "none"
        cfg.data.train = records["five" if stage == "finetune" else "four"]
        cfg.data.batch_size, cfg.optim.total_steps, cfg.optim.warmup_steps = 16, 2, 0
        if stage == "pretrain":
            cfg.pretrain.tokenizer_checkpoint = str(runs["tokenizer"])
        if stage == "finetune":
            cfg.data.val, cfg.eval_every = records["five"], 2
            cfg.finetune.init_checkpoint = str(runs["pretrain"])
            cfg.seed = 1  # its own random initialisation would differ from the pretraining's
        train.run(cfg, str(workdir))
    _, _, pretrained = model_file.load(str(runs["pretrain"]))
    _, _, tuned = model_file.load(str(runs["finetune"]))
    # two fine-tuning steps at lr 1e-4 leave every block within ~1e-3 of the pretrained encoder (a fresh
    # initialisation would differ by the weights' own scale, ~0.02)
    first, second = (flax.traverse_util.flatten_dict(v["params"]["encoder"], sep="/") for v in (pretrained, tuned))
    blocks = [name for name in first if name.startswith("blocks")]
    assert blocks and set(blocks) <= set(second)
    assert max(float(np.abs(np.asarray(first[n]) - np.asarray(second[n])).max()) for n in blocks) < 1e-2


def test_motor_imagery_recipe_fine_tunes_mirrored_trials_of_real_eegmmidb(eeg_dir, tmp_path):
    # configs/motor_imagery.py as its docstring runs it, shortened, on the bundled subject with imagery runs
    # (S001: run 4 trains, run 8 validates; a run stands in for a subject, so each run is aligned and centred
    # on its own): one 4-s window per T1/T2 trial, 64 channels, every one with a left-right mirror
    import importlib.util

    from data_prep import centring
    from labram_jax import channels

    spec = importlib.util.spec_from_file_location("mi_cfg", ROOT / "configs" / "motor_imagery.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    files = [str(eeg_dir / "eegmmidb" / "S001" / f"S001R0{run}.edf") for run in (4, 8)]
    assert data_prep_cli.main(files + [
        "--out", str(tmp_path / "mi"), "--window", "4", "--notch", "60", "--label-from", "annotations",
        "--annotation-labels", "T1=left,T2=right", "--event-windows", "--subject-pattern", r"(S\d{3}R\d\d)",
        "--val-subjects", "S001R08", "--quiet"]) == 0
    records = tmp_path / "mi_aligned_centred"
    assert centring.main([str(tmp_path / "mi" / "manifest.json"), "--out", str(records), "--method",
                          "euclidean+spectrum", "--quiet"]) == 0
    first = next(input_pipeline.iter_records(str(records / "manifest.json"), "train"))
    assert len(first.channel_ids) == 64 and (channels.mirrored_rows()[first.channel_ids] >= 0).all()
    cfg = recipe.get_config("finetune")
    assert (cfg.data.max_channels, cfg.data.max_windows) == (64, 4) and cfg.finetune.mirror_label == "swap"
    cfg.data.train = cfg.data.val = str(records / "manifest.json")
    cfg.data.batch_size, cfg.optim.total_steps, cfg.optim.warmup_steps, cfg.eval_every = 8, 2, 0, 2
    out = train.run(cfg, str(tmp_path / "run"))
    assert 0.0 <= out["val/auroc"] <= 1.0 and np.isfinite(out["loss"])
    kind, module, _ = model_file.load(str(tmp_path / "run"))
    assert kind == "finetune" and module.cfg.spatial_mix and module.cfg.head_pooling == "electrode"

    # test-time mirror averaging (evaluate --mirror swap) against the same model through the API on the
    # same windows, with the electrode ids mirrored there by hand
    from labram_jax import api, baselines

    windows = baselines.load_windows(str(records / "manifest.json"), "val")
    x = windows.x.reshape(len(windows.x), 64, 4, 200)
    predictor = api.load(str(tmp_path / "run"))
    plain = predictor.predict_windows(x, windows.channel_ids)
    mirrored = predictor.predict_windows(x, channels.mirrored_rows()[windows.channel_ids])
    report = tmp_path / "mirror.json"
    assert evaluate.main(["--workdir", str(tmp_path / "run"), "--data", str(records / "manifest.json"),
                          "--checkpoint", "latest", "--mirror", "swap", "--out", str(report)]) == 0
    scored = evaluate.score_run(str(tmp_path / "run"), str(records / "manifest.json"), "val", "latest",
                                mirror="swap")
    np.testing.assert_allclose(scored.scores, (plain + 1 - mirrored) / 2, atol=1e-5)
    np.testing.assert_allclose(predictor.predict_windows(x, windows.channel_ids, mirror="swap"), scored.scores, atol=1e-5)
    # the recipe's validation reports the final model blended with the anchor too (finetune.blend_anchor)
    from labram_jax import anchor_blend
    from labram_jax.tasks import finetune

    anchor = baselines.fit_and_predict(baselines.BASELINES["log_spectrum_lr"],
                                       baselines.load_windows(str(records / "manifest.json"), "train"), windows)
    during = finetune.compute_metrics("binary", anchor_blend.blend(plain, anchor), windows.labels)
    assert out["val/blend_auroc"] == pytest.approx(during["auroc"], abs=1e-4)
    assert out["val/blend_balanced_accuracy"] == pytest.approx(during["balanced_accuracy"], abs=1e-4)
    assert np.abs(scored.scores - plain).max() > 1e-3  # the mirror moved the scores: the check can fail
    assert json.loads(report.read_text())["mirror"] == "swap"

    # blended with the log-spectrum anchor (evaluate --blend-anchor): the mirror-averaged scores and the
    # anchor fitted on the training run's windows, each logit standardised over the windows, summed
    report = tmp_path / "blend.json"
    assert evaluate.main(["--workdir", str(tmp_path / "run"), "--data", str(records / "manifest.json"),
                          "--checkpoint", "latest", "--mirror", "swap", "--blend-anchor", "log_spectrum_lr",
                          "--out", str(report)]) == 0
    by_hand = anchor_blend.blend(scored.scores, anchor)
    blended = json.loads(report.read_text())
    expected = finetune.compute_metrics("binary", by_hand, windows.labels)
    assert blended["auroc"] == pytest.approx(expected["auroc"], abs=1e-6)
    assert blended["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"], abs=1e-6)
    assert blended["alone"]["model"]["auroc"] == pytest.approx(
        finetune.compute_metrics("binary", scored.scores, windows.labels)["auroc"], abs=1e-6)
    assert blended["alone"]["log_spectrum_lr"]["auroc"] == pytest.approx(
        finetune.compute_metrics("binary", anchor, windows.labels)["auroc"], abs=1e-6)
    # the blend is neither model alone: both moved it (each standardised logit weighs 1)
    z_model, z_anchor = anchor_blend.standardised_logits(scored.scores), anchor_blend.standardised_logits(anchor)
    assert np.abs(z_model - z_anchor).max() > 0.1
    # a single split cannot blend: the anchor would score its own training windows
    assert evaluate.main(["--workdir", str(tmp_path / "run"), "--data", str(records / "manifest.json"),
                          "--split", "train", "--checkpoint", "latest", "--blend-anchor", "log_spectrum_lr",
                          "--out", str(tmp_path / "x.json")]) == 2
