"""Dense peak throughput and memory of named accelerators, for MFU and planning.

The table (docs/scaling.md §4): dense (no 2:4 sparsity) tensor-core TFLOPS from the vendors'
datasheets, bf16, or fp16 where the device has no bf16 (T4). FP8 columns are deliberately
absent: an earlier guide read H20's FP8 figure (296) as bf16 and promised twice the possible
throughput. Memory is the datasheet capacity ("80 GB" HBM is 80 GiB).

Lookup is by the name `torch.cuda.get_device_name()` returns or a user types ("h100",
"NVIDIA H100 PCIe", "a100-sxm4-80gb"): the name is split into lowercase words and the entry
whose words are all present and which has the most words wins (most specific first), so
"H100 PCIe" is not read as "H100", nor "H200" as "H20". An unknown device has no peak: MFU is
then not reported, never computed against a silent default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from stoker.errors import StokerError


@dataclass(frozen=True)
class Device:
    """One accelerator: dense peak TFLOPS per dtype (None: no such tensor-core path)."""

    name: str
    words: tuple[str, ...]  # all must appear in the device name
    bf16: float | None
    fp16: float | None
    memory_gib: float  # capacity as marketed (HBM/GDDR GB are GiB)


DEVICES: tuple[Device, ...] = (
    Device("T4", ("t4",), None, 65, 16),
    Device("L4", ("l4",), 121, 121, 24),
    Device("L40", ("l40",), 181, 181, 48),
    Device("L40S", ("l40s",), 362, 362, 48),
    Device("A100 40GB", ("a100",), 312, 312, 40),
    Device("A100 80GB", ("a100", "80gb"), 312, 312, 80),
    Device("RTX A6000", ("a6000",), 155, 155, 48),
    Device("H100 SXM", ("h100",), 989, 989, 80),
    Device("H100 PCIe", ("h100", "pcie"), 756, 756, 80),
    Device("H100 NVL", ("h100", "nvl"), 835, 835, 94),
    Device("H200", ("h200",), 989, 989, 141),
    Device("H20", ("h20",), 148, 148, 96),
)
DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16"}


def lookup_device(device_name: str) -> Device | None:
    """The most specific table entry whose words all occur in `device_name`, else None."""
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    matches = [d for d in DEVICES if set(d.words) <= words]
    return max(matches, key=lambda d: len(d.words)) if matches else None


def known_devices() -> list[str]:
    return [d.name for d in DEVICES]


def require_device(device_name: str) -> Device:
    """`lookup_device`, or a StokerError that lists the known names."""
    device = lookup_device(device_name)
    if device is None:
        raise StokerError(
            f"unknown GPU {device_name!r}; known: {', '.join(known_devices())} "
            "(names match by words, e.g. h100, 'h100 pcie', a100-80gb)"
        )
    return device


def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """Dense peak FLOP/s of `device_name` in `dtype` (bf16 or fp16), or None when the device
    is unknown or has no such figure (T4 in bf16; any fp32)."""
    device = lookup_device(device_name)
    key = DTYPES.get(dtype.lower())
    if device is None or key is None:
        return None
    tflops = getattr(device, key)
    return None if tflops is None else tflops * 1e12
