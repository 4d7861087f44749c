"""benchmarks.machine: what a benchmark ran on, read from /proc/cpuinfo and XLA_FLAGS."""

import pathlib
import time

import jax.numpy as jnp
import pytest

from benchmarks import machine, train_step

AVX512_CPU = """processor\t: 0
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14
stepping\t: 1
flags\t\t: fpu sse4_2 avx fma avx2 avx512f avx512dq avx512bw
"""
AVX2_CPU = """processor\t: 0
model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz
flags\t\t: fpu sse4_2 avx fma avx2
"""


def test_the_widest_isa_and_the_xla_limit(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(AVX512_CPU)
    m = machine.describe(str(info), env={})
    assert m["cpu"] == "AMD EPYC 9B14" and m["cpu_widest_isa"] == "AVX-512" and m["fma"]
    assert m["cpu_id"] == "family 25 model 17 stepping 1" and "(family 25 model 17 stepping 1)" in machine.summary(m)
    assert m["xla_isa"] == "AVX-512 (no limit set)" and m["torch_isa"] == "default"
    held = machine.describe(str(info), env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                                                         "--xla_cpu_max_isa=avx2", "ATEN_CPU_CAPABILITY": "avx2"})
    assert held["xla_isa"] == "AVX2 (XLA_FLAGS)" and held["torch_isa"] == "avx2"
    assert "XLA uses AVX2 (XLA_FLAGS)" in machine.summary(held)
    info.write_text(AVX2_CPU)
    assert machine.describe(str(info), env={})["cpu_widest_isa"] == "AVX2"
    assert machine.describe(str(info), env={})["cpu_id"] is None  # no family / model lines: no claim


def test_the_cpu_kernels_choice_is_stated(monkeypatch, tmp_path):
    from labram_jax.models import cpu_kernels
    info = tmp_path / "cpuinfo"
    info.write_text(AVX512_CPU)
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    monkeypatch.setattr(cpu_kernels, "avx512_rate_ratio", lambda: 1.98)
    full = machine.describe(str(info), env={})
    assert full["cpu_kernels"] == "used by auto" and full["avx512_units"] == "512-bit"  # products on AVX-512 tiles
    assert "AVX-512 on 512-bit units (1.98x AVX2's FMA rate)" in machine.summary(full)
    assert full["cpu_kernel_code"] == "AVX-512" and "used by auto (AVX-512 code)" in machine.summary(full)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")  # the kernels keep to XLA's cap
    assert machine.describe(str(info), env={})["cpu_kernel_code"] == "AVX2"
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(cpu_kernels, "avx512_rate_ratio", lambda: 1.0)
    split = machine.describe(str(info), env={})
    assert split["cpu_kernels"] == "used by auto" and split["avx512_units"] == "256-bit"
    assert split["cpu_kernel_code"] == "AVX2"
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", lambda: "LABRAM_JAX_CPU_KERNEL=0")
    assert machine.describe(str(info), env={})["cpu_kernels"] == "not used (LABRAM_JAX_CPU_KERNEL=0)"


def test_on_an_accelerator_the_cpu_kernels_are_neither_built_nor_probed(monkeypatch, tmp_path):
    from labram_jax.models import cpu_kernels

    def never(*args):
        raise AssertionError("built or probed on a GPU run")
    info = tmp_path / "cpuinfo"
    info.write_text(AVX512_CPU)
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", never)
    monkeypatch.setattr(cpu_kernels, "avx512_rate_ratio", never)
    monkeypatch.setattr(cpu_kernels, "fma_peak_tflops", never)
    monkeypatch.setattr(machine.jax, "default_backend", lambda: "gpu")
    m = machine.describe(str(info), env={})
    assert m["cpu_kernels"] == "not used (the steps run on gpu)" and m["avx512_units"] is None
    assert m["fma_peak_tflops"] is None and "FMA peak" not in machine.summary(m)
    assert machine.summary(m).endswith("C++ CPU kernels not used (the steps run on gpu)")


def test_an_unreadable_cpuinfo_still_describes_the_machine(tmp_path):
    m = machine.describe(str(tmp_path / "missing"), env={})
    assert m["cpu_widest_isa"] == "unknown" and m["threads"] >= 1 and m["cpu"]


def test_a_matmul_faster_than_the_capped_isa_allows_is_flagged(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(AVX512_CPU + "cpu MHz\t\t: 2596.120\n")
    held = {**machine.describe(str(info), env={"XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}), "threads": 2}
    assert held["cpu_mhz"] == 2596.12
    # 2 cores x 32 FLOP/cycle x 2.1 x 2.596 GHz = 0.349 TFLOP/s at most under AVX2
    assert machine.isa_cap_warning(held, 0.34) is None
    warning = machine.isa_cap_warning(held, 0.45)
    assert "held to AVX2" in warning and "0.450" in warning and "0.349" in warning
    free = {**machine.describe(str(info), env={}), "threads": 2}
    assert machine.isa_cap_warning(free, 0.45) is None  # no cap: nothing to hold
    assert machine.isa_cap_warning({**held, "cpu_mhz": None}, 0.45) is None  # no clock: no claim


def test_the_fma_peak_bounds_a_matmul_and_is_stated(tmp_path):
    from labram_jax.models import cpu_kernels
    if cpu_kernels._load()[0] is None:
        pytest.skip(f"the CPU kernels' library cannot load here: {cpu_kernels._load()[1]}")
    info = tmp_path / "cpuinfo"
    info.write_text(pathlib.Path("/proc/cpuinfo").read_text())
    m = machine.describe(str(info), env={})
    peak = m["fma_peak_tflops"]
    assert f"float32 FMA peak {peak:.3f} TFLOP/s" in machine.summary(m)
    # No matmul on the same cores beats their FMA peak (it also packs, loads and stores); a peak that
    # forgot FLOP per FMA or lanes per vector would sit below XLA's matmul here.
    matmul = train_step.measured_matmul_tflops(jnp.float32, n=1024, repeats=5)
    # A shared VM's speed drifts between the two measurements (the Intel host of sessions 36-39 read its
    # FMA rate at 0.25-0.45 TFLOP/s within minutes), so the better of the peak read before and a peak read
    # again just after (once XLA's threads have gone idle) bounds the matmul, with room for that drift: a
    # peak missing a factor of 2 would put XLA's matmul (72-85 % of the true peak here) at 1.4-1.7x it.
    time.sleep(0.2)
    peak = max(peak, cpu_kernels.fma_rate_tflops(m["threads"]))
    assert matmul <= 1.3 * peak, (matmul, peak)
    # One core: no more than its widest FMA units can do at the highest boost clock.
    one = cpu_kernels.fma_peak_tflops(1)
    widest = m["cpu_widest_isa"].replace("-", "")
    ceiling = machine.FP32_FLOP_PER_CYCLE.get(widest, 64) * machine.BOOST * (m["cpu_mhz"] or 5000) * 1e6 / 1e12
    assert 0.02 * ceiling < one <= ceiling, (one, ceiling)


def test_the_cpu_time_the_hypervisor_stole_is_a_share_of_all_cpu_time(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 20 800 5 0 5 70 0 0\ncpu0 50 0 10 400 2 0 2 35 0 0\n")
    before = machine.cpu_ticks(str(stat))
    assert before == {"total": 1000, "steal": 70}
    stat.write_text("cpu  400 0 40 1300 5 0 5 250 0 0\n")  # 1,000 more ticks, 180 of them stolen
    assert machine.steal_share(before, machine.cpu_ticks(str(stat))) == pytest.approx(0.18)
    assert machine.steal_share(before, before) is None  # no tick passed
    assert machine.cpu_ticks(str(tmp_path / "missing")) is None and machine.steal_share(None, before) is None
    stat.write_text("cpu  1 2 3 4\n")  # a kernel too old to count steal
    assert machine.cpu_ticks(str(stat)) is None


def test_the_machines_speed_now_is_measured():
    now = machine.conditions(1, mib=16)
    assert 0.5 < now["copy_gbs"] < 1000  # GB/s of one core copying 16 MiB
    assert now["fma_tflops"] is None or 0.001 < now["fma_tflops"] < 10
