"""Configs: every size x stage loads, carries the recipe, and rejects unknown fields."""

import importlib.util
import pathlib

import pytest

from labram_jax_configs import common
from labram_jax.models import config as model_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"


def _load(size):
    spec = importlib.util.spec_from_file_location(f"cfg_{size}", CONFIG_DIR / f"{size}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("size", ["tiny", "base", "large", "huge"])
@pytest.mark.parametrize("stage", common.STAGES)
def test_every_size_and_stage(size, stage):
    cfg = _load(size).get_config(stage)
    assert cfg.stage == stage and cfg.model.size == size
    assert model_config.labram(cfg.model.size).depth == {"tiny": 2, "base": 12, "large": 24, "huge": 48}[size]
    recipe = common.RECIPES[stage]
    assert cfg.optim.b2 == recipe["b2"] and cfg.optim.weight_decay == recipe["weight_decay"]
    with pytest.raises(AttributeError):
        cfg.optim.learning_rate = 1.0  # misspelled field: rejected


def test_finetune_recipe_by_size():
    assert _load("base").get_config("finetune").optim.layer_decay == 0.65
    huge = _load("huge").get_config("finetune")
    assert (huge.optim.layer_decay, huge.model.drop_path, huge.optim.epochs) == (0.8, 0.2, 30)


def test_unknown_stage_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown stage"):
        _load("base").get_config("pretraining")


def test_eegmat_stages_validate_and_share_the_patch_embedding(eegmat_shards, tmp_path):
    # Every stage of the EEGMAT recipe must run, and embed patches the same way, or the
    # fine-tuning would refuse the pretrained encoder (model_config.REFERENCE_INPUTS).
    from labram_jax import config_schema
    from labram_jax.tasks import finetune

    configs = {}
    for stage in common.STAGES:
        c = _load("eegmat").get_config(stage)
        c.data.train = str(eegmat_shards)
        if stage == "pretrain":
            (tmp_path / "model.npz").touch()  # the tokenizer run, given on the command line
            c.pretrain.tokenizer_checkpoint = str(tmp_path)
        if stage == "finetune":
            c.data.val = str(eegmat_shards)
        config_schema.validate(c, 1)
        configs[stage] = c
    for field in model_config.REFERENCE_INPUTS:
        if field in finetune.ADDABLE_INPUTS:  # pretrained without, fine-tuned with (the table starts at zero)
            pretrained, tuned = finetune.ADDABLE_INPUTS[field]
            assert [c.model[field] for c in configs.values()] == [pretrained, pretrained, tuned], field
        else:
            assert len({c.model[field] for c in configs.values()}) == 1, field


def test_resume_conflicts_name_changed_model_settings_and_read_missing_ones_as_defaults():
    import json

    from labram_jax import config_schema

    cfg = _load("tiny").get_config("pretrain")
    saved = json.loads(cfg.to_json_best_effort())
    assert config_schema.resume_conflicts(saved, cfg) == []
    # a run saved before head_pooling existed ran the default: resuming it is the same model
    del saved["model"]["head_pooling"]
    assert config_schema.resume_conflicts(saved, cfg) == []
    cfg.model.head_pooling = "electrode"
    assert config_schema.resume_conflicts(saved, cfg) == ["model.head_pooling: 'mean' -> 'electrode'"]
    cfg.model.head_pooling, cfg.model.dtype = "mean", "bfloat16"  # a runtime setting: free to change
    saved["model"]["input_norm"] = "channel"
    assert config_schema.resume_conflicts(saved, cfg) == ["model.input_norm: 'channel' -> 'none'"]


def test_tokenizer_target_band_is_parsed_and_a_bad_band_is_refused():
    from labram_jax import config_schema

    assert config_schema.parse_target_band("") == (0, 100)
    assert config_schema.parse_target_band("1-45") == (1, 45)
    for bad in ("45-1", "1-120", "alpha", "8"):
        with pytest.raises(ValueError, match="LOW-HIGH"):
            config_schema.parse_target_band(bad)


# The motor-imagery CV rows of BENCHMARKS.md ("Motor imagery by subject-wise cross-validation"): the
# harness's settings, spelled as there ($L $M $F for fine-tuning, $B for the tokenizer).
MI_ROW_OVERRIDES = [f"finetune:{s}" for s in (
    "optim.lr=1e-3", "optim.layer_decay=1.0", "optim.total_steps=900", "optim.warmup_steps=90", "eval_every=300",
    "finetune.mirror=0.5", "finetune.mirror_label=swap", "model.head_pooling=electrode", "model.input_norm=none",
    "model.spatial_mix=true")] + ["tokenizer:tokenizer.target_band_hz=1-45"] + [
    f"{stage}:model.spatial_mix=true" for stage in ("tokenizer", "pretrain")]  # configs/eegmat.py's until session 12


@pytest.mark.parametrize("stage", common.STAGES)
def test_motor_imagery_recipe_is_the_cross_validated_row(stage):
    # configs/motor_imagery.py ships what the MI CV measured: every model, optimiser and stage setting equals
    # the harness's row (its pretraining: the corpus stages as benchmarks.transfer.pretrain builds them)
    from benchmarks import transfer

    shipped = _load("motor_imagery").get_config(stage)
    row = (transfer.stage_config("mmidb_mi", stage, "spectrum", 0) if stage == "finetune"
           else transfer.pretrain_config("mmidb", stage, "spectrum", 0))
    transfer.apply_overrides(row, MI_ROW_OVERRIDES)
    for section in ("model", "optim", stage, "data"):
        ours, theirs = shipped[section].to_dict(), row[section].to_dict()
        if section == "data":  # the paths differ; the grid and batch are the recipe
            ours, theirs = ({k: d[k] for k in ("max_channels", "max_windows", "batch_size")} for d in (ours, theirs))
        if section == "finetune":  # validation only (no weight changes): the harness blends finished runs instead
            assert ours.pop("blend_anchor") == "log_spectrum_lr" and theirs.pop("blend_anchor") == ""
        assert ours == theirs, section
    assert shipped.seed == row.seed and shipped.eval_every == (300 if stage == "finetune" else row.eval_every)
    assert shipped.data.train.startswith("data/") and (stage != "finetune" or shipped.data.val == shipped.data.train)
