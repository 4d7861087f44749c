"""braindecode's Labram both ways, against the real braindecode from PyPI: a randomly
initialised (and perturbed) braindecode model and our imported copy give the same outputs on
the same input and channels, and our export loads in braindecode with the same outputs."""

import numpy as np
import pytest

from labram_jax import channels, convert

NAMES = "FP1 FP2 F3 F4 F7 F8 T3 T4 C3 C4 T5 T6 P3 P4 O1 O2 FZ CZ PZ".split()


def _braindecode(models, n_outputs, n_times=800, **options):
    import torch

    torch.manual_seed(n_outputs)
    model = models.Labram(n_times=n_times, n_outputs=n_outputs, n_chans=len(NAMES), sfreq=200, num_layers=2,
                          **{"use_mean_pooling": True, **options}).eval()
    with torch.no_grad():  # every tensor moved off its initial value: a wrong mapping cannot pass
        for value in model.state_dict().values():
            value.add_(0.1 * torch.randn_like(value))
    return model


def _outputs(bd_model, x):
    import torch

    with torch.no_grad():
        return bd_model(torch.from_numpy(x), ch_names=NAMES).numpy()


@pytest.mark.parametrize("n_outputs", [1, 3])
def test_import_and_export_match_braindecode(braindecode_models, n_outputs):
    import torch

    bd = _braindecode(braindecode_models, n_outputs)
    x = (0.5 * np.random.default_rng(0).standard_normal((2, len(NAMES), 800))).astype(np.float32)
    ref = _outputs(bd, x)
    model, variables = convert.from_braindecode(bd.state_dict())
    assert model.num_outputs == n_outputs and model.cfg.num_time_rows == 5  # 800 samples: 4 patches + 1 row
    ours = np.asarray(model.apply(variables, x.reshape(2, len(NAMES), 4, 200), channels.map_channels(NAMES).rows))
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    print(f"braindecode -> labram_jax ({n_outputs} outputs): max abs difference {np.abs(ours - ref).max():.2e}")
    back = _braindecode(braindecode_models, n_outputs)
    back.load_state_dict({k: torch.from_numpy(v) for k, v in convert.to_braindecode(model, variables, 800).items()},
                         strict=True)
    exported = _outputs(back, x)
    np.testing.assert_allclose(exported, ref, atol=1e-4)
    print(f"labram_jax -> braindecode ({n_outputs} outputs): max abs difference {np.abs(exported - ref).max():.2e}")


def test_a_headless_encoder_imports_for_embeddings(braindecode_models):
    bd = _braindecode(braindecode_models, 0)
    model, variables = convert.from_braindecode(bd.state_dict())
    assert model.num_outputs == 0
    x = (0.5 * np.random.default_rng(1).standard_normal((1, len(NAMES), 800))).astype(np.float32)
    ours = model.apply(variables, x.reshape(1, len(NAMES), 4, 200), channels.map_channels(NAMES).rows,
                       method=model.embed)["pooled"]
    np.testing.assert_allclose(np.asarray(ours), _outputs(bd, x), atol=1e-4)  # Identity head: pooled features


def test_what_does_not_convert_is_refused_with_the_reason(braindecode_models):
    with pytest.raises(convert.ConversionError, match="use_mean_pooling=True"):
        convert.from_braindecode(_braindecode(braindecode_models, 1, use_mean_pooling=False).state_dict())
    with pytest.raises(convert.ConversionError, match="qkv_bias=False"):
        convert.from_braindecode(_braindecode(braindecode_models, 1, qkv_bias=True).state_dict())
    bd = _braindecode(braindecode_models, 1)
    model, variables = convert.from_braindecode(bd.state_dict())
    with pytest.raises(convert.ConversionError, match="n_times <= 800"):
        convert.to_braindecode(model, variables, 1600)  # 9 time rows needed, the model has 5
