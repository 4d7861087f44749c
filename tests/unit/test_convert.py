"""Official state dicts <-> Flax variables: exact round trips and clear errors."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labram_jax import convert, model_file
from labram_jax.models import config as config_lib
from labram_jax.models import tokenizer as tokenizer_lib
from labram_jax.models import transformer

KIND_BY_PREFIX = {"labram_finetune": "finetune", "labram_pretrain": "pretrain", "vqnsp": "tokenizer"}


def _reference_files(reference_dir):
    return [(p, kind) for prefix, kind in KIND_BY_PREFIX.items() for p in sorted(reference_dir.glob(f"{prefix}*.npz"))]


def _assert_same_state_dict(ours, ref):
    assert sorted(ours) == sorted(ref)
    for key in ref:
        np.testing.assert_array_equal(np.asarray(ours[key]).reshape(np.shape(ref[key])), ref[key], err_msg=key)
        assert np.shape(ours[key]) == np.shape(ref[key]), key


def test_npz_round_trip_is_exact(reference_dir):
    for path, kind in _reference_files(reference_dir):
        sd = convert.read_state_dict(path)
        model, variables = convert.load_official(path, kind)
        _assert_same_state_dict(convert.to_official(kind, model, variables), sd)


def test_inferred_sizes(reference_dir):
    model, _ = convert.load_official(reference_dir / "labram_finetune_shared.npz", "finetune")
    assert (model.cfg.depth, model.cfg.embed_dim, model.cfg.num_heads, model.cfg.temporal_channels,
            model.num_outputs) == (3, 200, 10, 8, 6)
    model, _ = convert.load_official(reference_dir / "vqnsp_shared.npz", "tokenizer")
    assert (model.cfg.encoder.depth, model.cfg.decoder.depth, model.cfg.code_dim, model.cfg.codebook_size) == (2, 1, 64, 8192)


def _tiny(kind):
    x, ch = jnp.zeros((1, 2, 2, 200)), jnp.array([1, 2])
    if kind == "finetune":
        model = transformer.LaBraM(config_lib.labram("tiny"), num_outputs=4)
        return model, model.init(jax.random.key(0), x, ch)
    if kind == "pretrain":
        model = transformer.LaBraMPretrain(config_lib.labram("tiny"), vocab_size=32)
        return model, model.init(jax.random.key(0), x, ch, jnp.zeros((1, 4), bool), method=model.logits_of)
    model = tokenizer_lib.VQNSP(config_lib.tokenizer("tiny"))
    return model, model.init(jax.random.key(0), x, ch)


@pytest.mark.parametrize("kind", convert.KINDS)
def test_our_models_export_and_import_back(kind):
    """Sizes other than the fixtures' (tiny: 4 heads of 25, 256 x 16 codebook) are inferred."""
    model, variables = _tiny(kind)
    variables = nn.unbox(variables)
    sd = convert.to_official(kind, model, variables)
    model2, variables2 = convert.load_official(sd, kind)
    assert model2.cfg == model.cfg
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(
            {k: v for k, v in variables2.items() if k != convert.UNUSED})):
        np.testing.assert_array_equal(a, b)


def test_pth_round_trip_and_cli(reference_dir, tmp_path):
    torch = pytest.importorskip("torch")
    path = reference_dir / "labram_pretrain_shared.npz"
    sd = convert.read_state_dict(path)
    pth = tmp_path / "labram-base.pth"
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 3}, pth)
    model, variables = convert.load_official(pth, "pretrain")
    _assert_same_state_dict(convert.to_official("pretrain", model, variables), sd)
    # CLI: import to our variables file, export back to .pth, compare.
    ours, back = tmp_path / "ours.npz", tmp_path / "back.pth"
    assert convert.main(["import", str(pth), "--kind", "pretrain", "--out", str(ours)]) == 0
    assert convert.main(["export", str(ours), "--out", str(back)]) == 0
    _assert_same_state_dict(convert.read_state_dict(back), sd)
    kind, model2, variables2 = model_file.load(str(ours))
    assert kind == "pretrain" and model2.cfg == model.cfg


class _Evil:
    def __reduce__(self):
        return (print, ("this would run arbitrary code",))


def test_pickled_objects_are_refused(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 200)}, "extra": _Evil()}, path)
    with pytest.raises(convert.ConversionError, match="unpickling of arbitrary Python objects"):
        convert.load_official(path, "finetune")


def test_bad_keys_are_all_listed(reference_dir):
    sd = convert.read_state_dict(reference_dir / "labram_finetune_shared.npz")
    sd = dict(sd)
    del sd["blocks.1.mlp.fc1.bias"]
    sd["blocks.0.attn.proj.bias"] = np.zeros((7,), np.float32)
    sd["surprise.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(convert.ConversionError) as err:
        convert.load_official(sd, "finetune")
    message = str(err.value)
    assert "missing: blocks.1.mlp.fc1.bias" in message
    assert "mis-shaped: blocks.0.attn.proj.bias" in message
    assert "unknown: surprise.weight" in message
    assert "depth 3, width 200" in message


def test_missing_file_and_wrong_kind(tmp_path):
    with pytest.raises(FileNotFoundError):
        convert.load_official(tmp_path / "nope.pth", "finetune")
    with pytest.raises(ValueError, match="unknown kind"):
        convert.load_official({}, "classifier")
    assert convert.main(["inspect", str(tmp_path / "nope.npz"), "--kind", "finetune"]) == 1
