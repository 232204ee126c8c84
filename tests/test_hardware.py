"""hardware=auto: GPU names to presets, the CPU path, explicit presets, the peak MFU is measured against."""

from __future__ import annotations

import json

import pytest
import torch

from trainer import hardware as hw
from trainer.config import ConfigError, HardwareConfig, compose_config
from trainer.cost import reconcile
from trainer.cost.__main__ import main as cost_main

GiB = 2**30
CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("name", "memory_gib", "capability", "preset"),
    [
        ("NVIDIA H100 80GB HBM3", 79.1, (9, 0), "h100-sxm"),
        ("NVIDIA H100 SXM5 80GB", 79.1, (9, 0), "h100-sxm"),
        ("NVIDIA H100 PCIe", 79.1, (9, 0), "h100-pcie"),
        ("NVIDIA H200", 139.8, (9, 0), "h200"),
        ("NVIDIA A100-SXM4-80GB", 79.2, (8, 0), "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", 39.4, (8, 0), "a100-40gb"),
        ("NVIDIA A100 80GB PCIe", 79.2, (8, 0), "a100-80gb"),
        ("NVIDIA A100-PCIE-40GB", 39.4, (8, 0), "a100-40gb"),
        ("NVIDIA B200", 178.4, (10, 0), "b200"),
        # No preset: other peaks (NVL boards, Grace superchips, other parts) or a capability that does not fit.
        ("NVIDIA H100 NVL", 93.1, (9, 0), None),
        ("NVIDIA H200 NVL", 139.8, (9, 0), None),
        ("NVIDIA GH200 480GB", 94.5, (9, 0), None),
        ("NVIDIA GB200", 184.0, (10, 0), None),
        ("NVIDIA GeForce RTX 4090", 23.6, (8, 9), None),
        ("NVIDIA L40S", 44.4, (8, 9), None),
        ("NVIDIA A100-SXM4-80GB", 79.2, (9, 0), None),
    ],
)
def test_gpu_names_map_to_presets(name, memory_gib, capability, preset):
    assert hw.preset_for_gpu(hw.Gpu(name, int(memory_gib * GiB), capability)) == preset


def test_every_preset_the_mapping_names_exists_with_its_peaks():
    for name in ("a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "b200"):
        preset = hw.load_preset(name)
        assert preset.name == name
        assert preset.peak_flops > preset.peak_flops_tf32 > preset.peak_flops_fp32 > 0
        assert preset.memory_gb > 0 and preset.price_per_hour > 0
    assert hw.load_preset("h100-pcie").peak_for("bf16") == 756e12


def test_an_unknown_preset_name_is_a_config_error():
    with pytest.raises(ConfigError, match="hardware=v100: no such preset"):
        hw.load_preset("v100")


def test_auto_is_the_default_and_the_cpu_preset_on_a_cpu():
    config = compose_config(["train.run_dir=runs/t"])
    assert config.hardware.is_auto
    resolved, why = hw.resolve_hardware(config.hardware, CPU)
    assert resolved.name == "cpu" and resolved.peak_flops == 0
    assert why == "hardware=auto on a CPU: the cpu preset"


def test_auto_keeps_the_fields_set_on_the_command_line():
    given = HardwareConfig(name="auto", price_per_hour=9.0)
    resolved, _ = hw.resolve_for_gpu(given, hw.Gpu("NVIDIA H200", 140 * GiB, (9, 0)))
    assert (resolved.name, resolved.price_per_hour, resolved.memory_gb) == ("h200", 9.0, 141)


def test_auto_on_a_known_gpu_is_its_preset():
    resolved, why = hw.resolve_for_gpu(HardwareConfig(), hw.Gpu("NVIDIA A100-SXM4-40GB", int(39.4 * GiB), (8, 0)))
    assert resolved == hw.load_preset("a100-40gb")
    assert why == "hardware=auto: NVIDIA A100-SXM4-40GB is a100-40gb"


def test_auto_on_an_unknown_gpu_says_so_and_keeps_its_memory():
    resolved, why = hw.resolve_for_gpu(HardwareConfig(), hw.Gpu("NVIDIA L40S", 48 * GiB, (8, 9)))
    assert resolved.name == "NVIDIA L40S" and resolved.memory_gb == 48 and resolved.peak_flops == 0
    assert "no preset for NVIDIA L40S (capability 8.9)" in why and "its peak is measured" in why


def test_an_explicit_gpu_preset_is_kept_as_given():
    given = hw.load_preset("a100-80gb")
    resolved, why = hw.resolve_for_gpu(given, hw.Gpu("NVIDIA H100 80GB HBM3", 79 * GiB, (9, 0)))
    assert resolved is given and "(the GPU looks like h100-sxm)" in why
    assert hw.resolve_hardware(given, CPU)[0] is given


def test_the_cpu_preset_on_a_gpu_is_resolved_as_auto():
    resolved, why = hw.resolve_for_gpu(hw.load_preset("cpu"), hw.Gpu("NVIDIA H100 PCIe", 79 * GiB, (9, 0)))
    assert resolved.name == "h100-pcie" and why.startswith("hardware=cpu has no GPU peak")


def test_an_explicit_cpu_preset_on_a_cpu_is_kept():
    cpu = hw.load_preset("cpu")
    assert hw.resolve_hardware(cpu, CPU) == (cpu, "hardware=cpu as given")


@pytest.mark.parametrize(
    ("precision", "tf32", "peak"),
    [("bf16", False, 989e12), ("fp16", False, 989e12), ("fp32", False, 67e12), ("fp32", True, 494e12)],
)
def test_the_peak_is_the_presets_for_the_runs_precision(precision, tf32, peak, monkeypatch):
    monkeypatch.setattr(reconcile, "tf32_matmuls", lambda: tf32)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    kind = "tf32" if tf32 else precision
    assert hw.run_peak(hw.load_preset("h100-sxm"), CUDA, precision) == (peak, f"h100-sxm ({kind} peak)")


def test_torch_runs_fp32_matmuls_in_full_fp32_by_default():
    assert not reconcile.tf32_matmuls()


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device torch reports as an unknown GPU; its matmul peak, as measured, recorded per device."""
    measured = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: type("P", (), {"total_memory": 48 * GiB}))

    def measure(device, dtype):
        measured.append((device.type, dtype))
        return 181e12 if device.type == "cuda" else 1e11

    monkeypatch.setattr(reconcile, "measured_peak_flops", measure)
    return measured


@pytest.mark.parametrize("given", ["auto", "cpu"])
def test_mfu_on_a_gpu_is_never_against_the_cpus_peak(given, fake_gpu):
    preset = HardwareConfig() if given == "auto" else hw.load_preset("cpu")
    resolved, _ = hw.resolve_hardware(preset, CUDA)
    peak, source = hw.run_peak(resolved, CUDA, "bf16")
    assert (peak, source) == (181e12, "NVIDIA L40S (measured bf16 matmul peak)")
    assert fake_gpu == [("cuda", torch.bfloat16)]


def test_a_cpu_run_measures_the_cpu_in_its_dtype(fake_gpu):
    resolved, _ = hw.resolve_hardware(HardwareConfig(), CPU)
    assert hw.run_peak(resolved, CPU, "fp32") == (1e11, "CPU (measured fp32 matmul peak)")
    assert fake_gpu == [("cpu", torch.float32)]


def test_the_cost_cli_plans_for_the_gpu_it_finds(fake_gpu, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert cost_main(["plan", "model=gpt3-1.3b", "gpus=8", "tokens=1e9"]) == 0
    assert "on 8 x b200" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["plan", "gpus=8", "tokens=1e9"], ["estimate"]])
def test_the_cost_cli_without_a_gpu_asks_for_a_preset(command, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cost_main([*command, "hardware=auto"]) == 2
    assert capsys.readouterr().err.strip() == (
        "trainer.cost: config error: hardware=auto needs a GPU to detect; name a preset, e.g. hardware=h100-sxm")


def test_the_matmul_probe_measures_bf16_on_the_cpu():
    assert reconcile.measure_matmul_peak(CPU, torch.bfloat16, size=64, seconds=0.01, trials=1) > 1e6


def test_the_cost_cli_estimates_an_unknown_gpu_in_bf16_against_its_memory(fake_gpu, capsys):
    assert cost_main(["estimate", "model=gpt3-350m", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["hardware"]["name"] == "NVIDIA L40S" and report["layout"]["precision"] == "bf16"
    assert report["memory"]["budget"] == 48 and report["step_times"] is None


def test_measured_peaks_are_cached_per_gpu_dtype_and_tf32(tmp_path, monkeypatch):
    monkeypatch.setattr(reconcile, "CACHE", tmp_path / "peaks.json")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    monkeypatch.setattr(reconcile, "measure_matmul_peak", lambda device, dtype: {torch.bfloat16: 3e14}.get(dtype, 9e13))
    assert reconcile.measured_peak_flops(CUDA, torch.bfloat16) == 3e14
    assert reconcile.measured_peak_flops(CUDA, torch.float32) == 9e13
    monkeypatch.setattr(reconcile, "tf32_matmuls", lambda: True)
    monkeypatch.setattr(reconcile, "measure_matmul_peak", lambda device, dtype: 1.8e14)
    assert reconcile.measured_peak_flops(CUDA, torch.float32) == 1.8e14
    monkeypatch.setattr(reconcile, "measure_matmul_peak", lambda device, dtype: pytest.fail("measured twice"))
    assert reconcile.measured_peak_flops(CUDA, torch.bfloat16) == 3e14
    assert sorted(json.loads((tmp_path / "peaks.json").read_text())) == [
        "v3|cuda|NVIDIA L40S|torch.bfloat16", "v3|cuda|NVIDIA L40S|torch.float32", "v3|cuda|NVIDIA L40S|torch.float32|tf32"]


def test_detect_hardware_is_what_auto_resolves_to_here(fake_gpu, monkeypatch):
    assert hw.detect_hardware().name == "NVIDIA L40S"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert hw.detect_hardware() == hw.load_preset("h200")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hw.detect_hardware().name == "cpu"


def test_a_preset_with_an_unknown_field_names_it(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("name: mine\npeak_tflops: 100\n")
    monkeypatch.setattr(hw, "PRESETS_DIR", tmp_path)
    with pytest.raises(ConfigError, match="hardware.peak_tflops: not a hardware field"):
        hw.load_preset("mine")
