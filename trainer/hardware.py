"""Which hardware preset a run is costed against, and the peak FLOP/s its MFU is measured against.

`hardware=auto` (the default) is resolved when the run starts, on every rank alike: on a CPU the cpu preset; on
a GPU the conf/hardware preset its name and compute capability map to (A100 40/80GB, H100 SXM/PCIe, H200,
B200), or, for a GPU without one, its memory and a matmul peak measured on it. An explicit preset is kept as
given, except one without a bf16 peak (such as cpu) on a GPU: that is resolved as auto, so MFU on a GPU never
comes from a CPU's peak. The peak is the preset's for the run's precision (fp32 as TF32 only when torch runs
fp32 matmuls on TF32), else measured on the run's device in its dtype.

torch is imported only where a device is looked at: the cost CLI uses this module without it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import CONF_DIR, ConfigError, HardwareConfig

if TYPE_CHECKING:
    import torch

PRESETS_DIR = Path(CONF_DIR) / "hardware"
GiB = 2**30
AUTO_NEEDS_GPU = "hardware=auto needs a GPU to detect; name a preset, e.g. hardware=h100-sxm"
# NVL boards (H100 NVL, H200 NVL) have peaks of their own, which no preset describes.
NO_PRESET = re.compile(r"\bNVL\b", re.IGNORECASE)
# (pattern in torch.cuda.get_device_name(), compute capability, preset); the first match wins. A100 presets are
# told apart by memory. Names seen: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA H200",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-40GB", "NVIDIA B200".
GPU_PRESETS = (
    (re.compile(r"\bH100\b.*\bPCIe\b", re.IGNORECASE), (9, 0), "h100-pcie"),
    (re.compile(r"\bH100\b", re.IGNORECASE), (9, 0), "h100-sxm"),
    (re.compile(r"\bH200\b", re.IGNORECASE), (9, 0), "h200"),
    (re.compile(r"\bA100\b", re.IGNORECASE), (8, 0), "a100"),
    (re.compile(r"\bB200\b", re.IGNORECASE), (10, 0), "b200"),
)
A100_80GB_ABOVE = 60 * GiB  # an 80GB A100 reports ~79 GiB, a 40GB one ~39.4 GiB
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Gpu:
    """What torch says about one GPU."""

    name: str
    memory_bytes: int
    capability: tuple[int, int]


def preset_for_gpu(gpu: Gpu) -> str | None:
    """The conf/hardware preset for this GPU, or None when there is none for it."""
    if NO_PRESET.search(gpu.name):
        return None
    for pattern, capability, preset in GPU_PRESETS:
        if pattern.search(gpu.name):
            if tuple(gpu.capability) != capability:
                return None
            if preset == "a100":
                return "a100-80gb" if gpu.memory_bytes > A100_80GB_ABOVE else "a100-40gb"
            return preset
    return None


def load_preset(name: str) -> HardwareConfig:
    """conf/hardware/<name>.yaml as a validated HardwareConfig."""
    from omegaconf import OmegaConf

    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise ConfigError(f"hardware={name}: no such preset (no {path}); choose one of {choices}")
    values = OmegaConf.to_container(OmegaConf.load(path))
    known = {f.name for f in dataclasses.fields(HardwareConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"hardware.{unknown[0]}: not a hardware field (in {path}); known: {', '.join(sorted(known))}")
    return HardwareConfig(**values)


def with_overrides(preset: HardwareConfig, given: HardwareConfig) -> HardwareConfig:
    """The preset, with the figures the given config sets (nonzero: e.g. hardware.price_per_hour=2.1) over its."""
    overrides = {f.name: getattr(given, f.name) for f in dataclasses.fields(given)
                 if f.name != "name" and getattr(given, f.name)}
    return dataclasses.replace(preset, **overrides)


def detect_gpu(device: torch.device) -> Gpu:
    import torch

    props = torch.cuda.get_device_properties(device)
    return Gpu(torch.cuda.get_device_name(device), int(props.total_memory),
               tuple(torch.cuda.get_device_capability(device)))


def resolve_hardware(hardware: HardwareConfig, device: torch.device) -> tuple[HardwareConfig, str]:
    """The preset the run on `device` is costed against, and one line saying which and why."""
    if device.type != "cuda":
        return _resolve_on_cpu(hardware)
    return resolve_for_gpu(hardware, detect_gpu(device))


def detect_hardware(device: torch.device | None = None) -> HardwareConfig:
    """The preset hardware=auto resolves to on `device` (by default the first GPU, else the CPU)."""
    import torch

    if device is None:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return resolve_hardware(HardwareConfig(), device)[0]


def _resolve_on_cpu(hardware: HardwareConfig) -> tuple[HardwareConfig, str]:
    if hardware.is_auto:
        return (with_overrides(load_preset("cpu"), hardware),
                "hardware=auto on a CPU: the cpu preset")
    if hardware.peak_flops > 0:
        return hardware, f"hardware={hardware.name} as given, though the run is on a CPU"
    return hardware, f"hardware={hardware.name} as given"


def resolve_for_gpu(hardware: HardwareConfig, gpu: Gpu) -> tuple[HardwareConfig, str]:
    """As `resolve_hardware` for a run on this GPU."""
    detected = preset_for_gpu(gpu)
    if not hardware.is_auto and hardware.peak_flops > 0:
        note = "" if detected in (None, hardware.name) else f" (the GPU looks like {detected})"
        return hardware, f"hardware={hardware.name} as given on {gpu.name}{note}"
    why = "hardware=auto" if hardware.is_auto else f"hardware={hardware.name} has no GPU peak, so as auto"
    if detected:
        return with_overrides(load_preset(detected), hardware), f"{why}: {gpu.name} is {detected}"
    unknown = HardwareConfig(name=gpu.name, memory_gb=gpu.memory_bytes / GiB)
    return (with_overrides(unknown, hardware),
            f"{why}: no preset for {gpu.name} (capability {gpu.capability[0]}.{gpu.capability[1]}) in "
            "conf/hardware, so its peak is measured")


def run_peak(hardware: HardwareConfig, device: torch.device, precision: str) -> tuple[float, str]:
    """Peak FLOP/s per device for the run's MFU, and where it comes from: the preset's for `precision`, else
    a matmul peak measured on `device` in that dtype."""
    import torch

    from trainer.cost.reconcile import measured_peak_flops, tf32_matmuls

    tf32 = device.type == "cuda" and precision == "fp32" and tf32_matmuls()
    peak = hardware.peak_for(precision, tf32)
    kind = "tf32" if tf32 else precision
    if peak > 0:
        return peak, f"{hardware.name} ({kind} peak)"
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return measured_peak_flops(device, getattr(torch, DTYPES[precision])), f"{what} (measured {kind} matmul peak)"


def resolve_for_cost_cli(hardware: HardwareConfig) -> HardwareConfig:
    """The preset the cost CLI plans with: as given, or for auto the GPU of this machine (raises without one)."""
    if not hardware.is_auto:
        return hardware
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(AUTO_NEEDS_GPU)
    return resolve_for_gpu(hardware, detect_gpu(torch.device("cuda", 0)))[0]
