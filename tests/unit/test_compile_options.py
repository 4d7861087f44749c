"""labram_jax.compile_options: the XLA options every jit of the project gets, and their fallbacks."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import train_step
from labram_jax import compile_options


@pytest.fixture
def fresh(monkeypatch):
    """compiler_options() recomputed under this test's environment, and again after it."""
    monkeypatch.delenv("LABRAM_JAX_XLA_OPTIONS", raising=False)
    compile_options.compiler_options.cache_clear()
    yield monkeypatch
    compile_options.compiler_options.cache_clear()


def attention_like(a, b):
    return jax.nn.softmax(a @ b, axis=-1) @ b


def test_the_cpu_options_are_taken_and_change_the_compiled_program(fresh):
    options = compile_options.compiler_options()
    if not options:
        pytest.skip("this jaxlib takes none of compile_options.CPU_OPTIONS (its XLA does not know them)")
    assert options == compile_options.CPU_OPTIONS
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 64)), jnp.float32)
    tuned = compile_options.jit(attention_like).lower(x, x).compile()
    with compile_options.xla_defaults():
        default = compile_options.jit(attention_like).lower(x, x).compile()
    assert tuned.as_text() != default.as_text()  # YNNPACK gets the products only
    np.testing.assert_allclose(np.asarray(tuned(x, x)), np.asarray(default(x, x)), rtol=1e-5, atol=1e-5)
    assert compile_options.jit(attention_like).lower(x, x).compile().as_text() == tuned.as_text()  # block undone


def test_off_switch_and_xla_flags_win(fresh):
    fresh.setenv("LABRAM_JAX_XLA_OPTIONS", "0")
    assert compile_options.compiler_options() == {}
    compile_options.compiler_options.cache_clear()
    fresh.delenv("LABRAM_JAX_XLA_OPTIONS")
    name = next(iter(compile_options.CPU_OPTIONS))
    fresh.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 --{name}=LIBRARY_FUSION_TYPE_DOT")
    assert name not in compile_options.compiler_options()


def test_an_option_this_jaxlib_does_not_know_is_dropped_not_raised(fresh, caplog):
    fresh.setattr(compile_options, "CPU_OPTIONS", {"xla_cpu_option_from_another_release": "1"})
    with caplog.at_level("INFO"):
        assert compile_options.compiler_options() == {}
    assert "not taken by this jaxlib" in caplog.text
    x = jnp.ones((4, 4), jnp.float32)
    np.testing.assert_allclose(np.asarray(compile_options.jit(attention_like)(x, x)), np.asarray(attention_like(x, x)))


def _library_reductions(hlo: str) -> list[str]:
    """The fused computations XLA handed to YNNPACK that reduce (the batch sums of a gradient)."""
    called = set(re.findall(r'calls=(%[\w.-]+)[^\n]*"kind":"__ynn_fusion"', hlo))
    bodies = re.findall(r"^(%[\w.-]+) \([^\n]*\{\n(.*?)\n\}", hlo, flags=re.S | re.M)
    return [name for name, body in bodies if name in called and " reduce(" in body]


@pytest.mark.parametrize("stage", ["tokenizer", "pretrain", "finetune"])
def test_every_stages_training_step_compiles_with_the_options(fresh, stage):
    # The tokenizer's step once kept XLA's defaults, under which YNNPACK took the batch sums of its
    # position tables' gradients at ~2 ms each (a loop fusion: 0.05 ms; BENCHMARKS.md, session 34).
    if not compile_options.compiler_options():
        pytest.skip("this jaxlib takes none of compile_options.CPU_OPTIONS (its XLA does not know them)")
    args = train_step.parse_args(["--channels", "3", "--windows", "2", "--batch", "2", "--mesh", "1", "1", "1",
                                  "--devices", "1", "--steps", "1", "--warmup", "0"])
    tuned = train_step.prepare(stage, "tiny", args).compiled.as_text()
    with compile_options.xla_defaults():
        default = train_step.prepare(stage, "tiny", args).compiled.as_text()
    assert tuned != default  # the step was compiled with the options
    assert _library_reductions(tuned) == []
    if stage == "tokenizer":
        assert _library_reductions(default), "XLA's defaults no longer hand reductions to YNNPACK: revisit this test"
