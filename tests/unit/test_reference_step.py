"""benchmarks.reference_step and train_step --reference: the original's steps timed in the same run.

The original code is not in CI (it is fetched from GitHub); a stand-in checkout with the same
entry points and call signatures checks the plumbing: the subprocess, the instruction-set
environment, the JSON and the ratio.
"""

import gc
import pathlib
import statistics
import sys
import textwrap

import pytest

from benchmarks import train_step

FAKE_MODELS = '''
import torch

class _Tokenizer(torch.nn.Module):
    def __init__(self, n_code, code_dim):
        super().__init__()
        self.proj = torch.nn.Linear(200, code_dim)
        self.codebook = torch.nn.Parameter(torch.randn(n_code, code_dim))
        self.quantize = torch.nn.Module()
        self.quantize.embedding = torch.nn.Module()
        self.quantize.embedding.register_buffer("initted", torch.zeros(1))

    def forward(self, x, input_chans=None):
        assert x.ndim == 3 and x.shape[-1] % 200 == 0 and len(input_chans) == x.shape[1] + 1
        z = self.proj(x.reshape(x.shape[0], -1, 200))
        return ((z @ self.codebook.T) ** 2).mean(), {}

    def get_codebook_indices(self, x, input_chans=None):
        assert x.ndim == 4 and not torch.is_grad_enabled()
        return (self.proj(x.flatten(1, 2)) @ self.codebook.T).argmax(-1)

def vqnsp_encoder_base_decoder_3x200x12(n_code=8192, code_dim=32, **kwargs):
    return _Tokenizer(n_code, code_dim)
'''
FAKE_PRETRAIN = '''
import torch

class _Masked(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.head = torch.nn.Linear(200, vocab_size)

    def forward(self, x, input_chans, bool_masked_pos):
        t = self.head(x.flatten(1, 2))
        return t[bool_masked_pos], t[~bool_masked_pos]

def labram_base_patch200_1600_8k_vocab(vocab_size=8192, **kwargs):
    assert kwargs["use_abs_pos_emb"] and kwargs["init_values"] == 0.1
    return _Masked(vocab_size)
'''
FAKE_FINETUNE = '''
import torch

class _Classifier(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.head = torch.nn.Linear(23 * 10 * 200, num_classes)

    def forward(self, x, input_chans=None):
        return self.head(x.flatten(1))

def labram_base_patch200_200(num_classes=1000, **kwargs):
    assert num_classes == 1 and kwargs["qkv_bias"] is False and kwargs["drop_path_rate"] == 0.1
    return _Classifier(num_classes)
'''


@pytest.fixture
def fake_reference(tmp_path):
    ref = tmp_path / "LaBraM"
    ref.mkdir()
    (ref / "modeling_vqnsp.py").write_text(textwrap.dedent(FAKE_MODELS))
    (ref / "modeling_pretrain.py").write_text(textwrap.dedent(FAKE_PRETRAIN))
    (ref / "modeling_finetune.py").write_text(textwrap.dedent(FAKE_FINETUNE))
    (ref / "norm_ema_quantizer.py").write_text("")
    return ref


def cli(*extra):
    return train_step.parse_args(["--sizes", "base", "--dtype", "float32", *extra])


def test_the_reference_is_held_to_the_instruction_set_xla_is_held_to():
    held = train_step.reference_env({}, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=AVX2"})
    assert (held["ATEN_CPU_CAPABILITY"], held["MKL_ENABLE_INSTRUCTIONS"], held["ONEDNN_MAX_CPU_ISA"]) == \
        ("avx2", "AVX2", "AVX2")
    assert "ATEN_CPU_CAPABILITY" not in train_step.reference_env({}, {"XLA_FLAGS": ""})
    assert "ATEN_CPU_CAPABILITY" not in train_step.reference_env({}, {"XLA_FLAGS": "--xla_cpu_max_isa=AVX512"})
    assert train_step.reference_env({}, {"XLA_FLAGS": "--xla_cpu_max_isa=AVX"})["ATEN_CPU_CAPABILITY"] == "default"
    mine = train_step.reference_env({}, {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2", "ATEN_CPU_CAPABILITY": "default"})
    assert mine["ATEN_CPU_CAPABILITY"] == "default"  # what the user set wins


def test_only_base_float32_at_the_reference_shapes_compare():
    assert train_step.comparable("pretrain", "base", cli())
    assert not train_step.comparable("pretrain", "tiny", cli())
    assert not train_step.comparable("pretrain", "base", cli("--dtype", "bfloat16"))
    assert not train_step.comparable("finetune", "base", cli("--channels", "23", "--windows", "4"))
    assert train_step.comparable("finetune", "base", cli("--channels", "23", "--windows", "10"))


def test_rounds_need_the_reference_and_are_counted():
    with pytest.raises(SystemExit):
        train_step.parse_args(["--rounds", "3"])
    with pytest.raises(SystemExit):
        train_step.parse_args(["--reference", "x", "--rounds", "0"])
    assert train_step.parse_args(["--reference", "x", "--rounds", "3"]).rounds == 3


def _timm_modules():
    return [m for m in sys.modules if m == "timm" or m.startswith("timm.")]


@pytest.fixture
def without_timm():
    """sys.modules as if timm would not import; every timm entry as it was afterwards."""
    saved = {m: sys.modules.pop(m) for m in _timm_modules()}
    sys.modules["timm"] = None
    yield
    for m in _timm_modules():
        del sys.modules[m]
    sys.modules.update(saved)


def test_timm_helpers_drop_whole_samples_and_keep_the_mean(without_timm):
    torch = pytest.importorskip("torch", reason="the reference harness needs torch")
    from benchmarks import reference_step
    assert reference_step.install_timm_helpers() == "helpers"
    layers = sys.modules["timm.models.layers"]
    x = torch.ones(4000, 3, 5)
    out = layers.drop_path(x, 0.25, training=True)
    per_sample = out.reshape(4000, -1)
    values = per_sample.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.75)
    assert bool((per_sample == per_sample[:, :1]).all())  # a whole sample is kept or dropped
    assert abs(float(out.mean()) - 1.0) < 0.05
    assert layers.drop_path(x, 0.25, training=False) is x
    assert layers.to_2tuple(3) == (3, 3) and sys.modules["timm.models.registry"].register_model(len) is len
    t = layers.trunc_normal_(torch.empty(10000), std=0.02)
    assert float(t.abs().max()) <= 2.0 and abs(float(t.std()) - 0.02) < 0.002


def test_masking_masks_the_reference_count_per_sample():
    torch = pytest.importorskip("torch", reason="the reference harness needs torch")
    from benchmarks import reference_step
    mask = reference_step.random_masking(5, 184, 0.5, torch)
    assert mask.shape == (5, 184) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [92] * 5 and len({tuple(m.tolist()) for m in mask}) == 5


def test_train_step_times_the_reference_next_to_ours_in_alternating_rounds(fake_reference, monkeypatch):
    pytest.importorskip("torch", reason="the reference harness needs torch")
    pytest.importorskip("einops", reason="the reference's model files import einops")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    args = cli("--reference", str(fake_reference), "--rounds", "3", "--batch", "2", "--steps", "2", "--warmup", "1")
    order = []
    real_run = train_step.run_reference

    def logged_run(*a, **k):
        order.append("reference")
        return real_run(*a, **k)
    monkeypatch.setattr(train_step, "run_reference", logged_run)
    ours = iter([[0.5, 0.7], [0.2, 0.2], [1.0, 3.0]])

    def run_ours():
        order.append("ours")
        return next(ours)
    times, rounds = train_step.rounds_with_reference("finetune", run_ours, args, {})
    assert order == ["ours", "reference", "reference", "ours", "ours", "reference"]
    assert times == [0.5, 0.7, 0.2, 0.2, 1.0, 3.0]
    assert [r["order"] for r in rounds] == ["ours first", "reference first", "ours first"]
    for r, mine in zip(rounds, (0.6, 0.2, 2.0)):
        ref = r["reference"]
        assert ref["rows"][0]["stage"] == "finetune" and ref["rows"][0]["steps"] == 2
        assert ref["rows"][0]["batch"] == 2 and ref["rows"][0]["samples_per_s"] > 0
        assert ref["env"]["ATEN_CPU_CAPABILITY"] == "avx2" and ref["timm"]
        assert r["step_s_median"] == pytest.approx(mine)
        assert r["ratio"] == pytest.approx(ref["rows"][0]["step_s_median"] / mine)
        for at in (r["conditions"], r["reference_conditions"]):  # the machine's speed before each side ran
            assert at["copy_gbs"] > 0.1 and (at["fma_tflops"] is None or at["fma_tflops"] > 0.001)
        if pathlib.Path("/proc/stat").exists():  # and what the hypervisor took while it ran, a share
            assert 0 <= r["reference_conditions"]["steal"] <= 1
            assert r["conditions"]["steal"] is None or 0 <= r["conditions"]["steal"] <= 1
    row = {"stage": "finetune", "size": "base", "batch": 2}
    train_step.add_reference(row, rounds)
    ratios = sorted(r["ratio"] for r in rounds)
    assert row["vs_reference"] == pytest.approx(ratios[1]) and row["vs_reference_range"] == [ratios[0], ratios[2]]
    assert len(row["reference_rounds"]) == 3 and "reference" not in row["reference_rounds"][0]
    ref_medians = sorted(r["reference_step_s_median"] for r in rounds)
    assert row["reference_samples_per_s"] == pytest.approx(2 / ref_medians[1])
    summary = train_step.reference_summary([row, {"stage": "pretrain", "size": "tiny"}])
    assert summary["torch_isa"] in ("AVX2", "DEFAULT") and [r["stage"] for r in summary["rows"]] == ["finetune"]
    assert train_step.reference_summary([{"stage": "pretrain"}]) is None


def test_the_references_steps_run_with_the_set_ups_objects_frozen(monkeypatch):
    # The same collector policy as our side (benchmarks.train_step), given back afterwards.
    pytest.importorskip("torch", reason="the reference harness needs torch")
    from benchmarks import reference_step
    seen = []

    def step(x):
        seen.append(gc.get_freeze_count())
        return 0.5
    monkeypatch.setattr(reference_step, "build_step", lambda *a, **k: (step, [None]))
    before = gc.get_freeze_count()
    row = reference_step.bench("finetune", {}, 2, steps=3, warmup=1)
    assert row["steps"] == 3 and row["loss"] == 0.5
    assert len(seen) == 4 and min(seen) > before and gc.get_freeze_count() == before


def test_a_checkout_without_the_model_files_is_refused(tmp_path):
    pytest.importorskip("torch", reason="the reference harness needs torch")
    from benchmarks import reference_step
    with pytest.raises(SystemExit, match="missing modeling_vqnsp.py.*935963004/LaBraM"):
        reference_step.import_reference(str(tmp_path))


def test_profile_gives_the_reference_operators_per_step(fake_reference, tmp_path):
    pytest.importorskip("torch", reason="the reference harness needs torch")
    pytest.importorskip("einops", reason="the reference's model files import einops")
    import json
    import subprocess
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.reference_step", "--reference", str(fake_reference),
                           "--stages", "pretrain", "--batch", "2", "--steps", "3", "--warmup", "1", "--profile",
                           "--top", "5", "--json", str(out)], capture_output=True, text=True, check=True)
    assert proc.stdout == ""  # the subprocess protocol of --reference (a JSON line) is for timing only
    row = json.loads(out.read_text())["rows"][0]
    assert row["stage"] == "pretrain" and row["steps"] == 3 and row["profiled_step_s"] > 0
    ops = {op["name"]: op for op in row["ops"]}
    assert ops["aten::argmax"]["calls_per_step"] == 1.0  # the frozen tokenizer's codes, once a step
    times = [op["self_ms_per_step"] for op in row["ops"]]
    assert times == sorted(times, reverse=True) and min(times) > 0
    assert row["self_ms_per_step_total"] == pytest.approx(sum(times))
    table = [line.split() for line in proc.stderr.splitlines() if line.startswith("  ") and "ms/step" not in line]
    assert len(row["ops"]) > 5 and len(table) == 5 and table[0][0] == row["ops"][0]["name"][:48].split()[0]


@pytest.mark.parametrize("flag", ["--steps", "--top"])
def test_steps_and_top_below_one_are_refused(flag, capsys):
    from benchmarks import reference_step
    with pytest.raises(SystemExit):
        reference_step.main(["--reference", "x", "--profile", flag, "0"])
    assert "--steps and --top must be at least 1" in capsys.readouterr().err


def test_amp_runs_the_scaled_step_and_needs_a_gpu_run(fake_reference, monkeypatch, capsys):
    torch = pytest.importorskip("torch", reason="the reference harness needs torch")
    from benchmarks import reference_step
    with pytest.raises(SystemExit):
        reference_step.main(["--reference", str(fake_reference), "--amp"])
    assert "--amp is the original's GPU recipe: add --device cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: this torch .* sees no CUDA GPU"):
            reference_step.main(["--reference", str(fake_reference), "--device", "cuda"])
    # The scaler's path (scale, unscale, clip or norm, step, update), here under the CPU's autocast.
    calls = []

    class LoggedScaler(torch.amp.GradScaler):
        def scale(self, loss):
            calls.append(("scale", loss.dtype))
            return super().scale(loss)

        def unscale_(self, opt):
            calls.append("unscale")
            return super().unscale_(opt)

        def update(self, *a):
            calls.append("update")
            return super().update(*a)
    monkeypatch.setattr(torch.amp, "GradScaler", LoggedScaler)
    modules = reference_step.import_reference(str(fake_reference))
    for stage in ("pretrain", "finetune"):
        calls.clear()
        step, batches = reference_step.build_step(stage, modules, 2, torch, "cpu", amp=True)
        losses = [step(batches[i % len(batches)]) for i in range(2)]
        assert all(loss == loss and abs(loss) < float("inf") for loss in losses)
        assert calls == [("scale", torch.float32), "unscale", "update"] * 2  # the loss leaves autocast in fp32
    step, batches = reference_step.build_step("finetune", modules, 2, torch, "cpu", amp=False)
    calls.clear()
    step(batches[0])
    assert calls == []


def test_train_step_interleaves_blocks_of_steps_with_a_served_reference(fake_reference, monkeypatch, capsys):
    pytest.importorskip("torch", reason="the reference harness needs torch")
    pytest.importorskip("einops", reason="the reference's model files import einops")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    args = cli("--reference", str(fake_reference), "--interleave", "2", "--batch", "2", "--steps", "5",
               "--warmup", "1")
    calls = []

    def run_ours(n):
        calls.append(n)
        return [0.01 * (len(calls) + i) for i in range(n)]
    times, blocks = train_step.blocks_with_reference("finetune", run_ours, args, {"threads": 1})
    assert calls == [1, 2, 2]  # the warm-up once, then 5 // 2 blocks of 2 steps
    assert times == pytest.approx([0.02, 0.03, 0.03, 0.04])
    assert [b["order"] for b in blocks] == ["ours first", "reference first"]
    for b, mine in zip(blocks, (0.025, 0.035)):
        ref = b["reference"]
        assert len(ref["rows"][0]["step_s"]) == 2 and ref["env"]["ATEN_CPU_CAPABILITY"] == "avx2" and ref["timm"]
        assert b["step_s_median"] == pytest.approx(mine)
        assert b["ratio"] == pytest.approx(ref["rows"][0]["step_s_median"] / mine)
        assert b["conditions"]["copy_gbs"] > 0 and b["reference_conditions"]["copy_gbs"] > 0
    row = {"stage": "finetune", "size": "base", "batch": 2}
    train_step.add_reference(row, blocks)  # the same record as rounds give
    assert row["vs_reference"] == pytest.approx(statistics.median(b["ratio"] for b in blocks))
    assert "block 2/2 (reference first)" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # --interleave needs the reference, no --rounds, and K <= --steps
        cli("--interleave", "2")
    with pytest.raises(SystemExit):
        cli("--reference", str(fake_reference), "--interleave", "30", "--steps", "20")
