"""Peak table lookups (docs/scaling.md §4): most specific name first, dense bf16, never FP8."""

import pytest

from stoker.errors import StokerError
from stoker.scaling.hardware import known_devices, lookup_device, peak_flops, require_device


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("h20", 148),  # not 296, its FP8 figure
        ("NVIDIA H20", 148),
        ("NVIDIA H200", 989),
        ("NVIDIA H100 80GB HBM3", 989),  # what torch reports for an SXM H100
        ("h100-sxm", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A100-PCIE-40GB", 312),
        ("NVIDIA L4", 121),
        ("NVIDIA L40", 181),
        ("NVIDIA L40S", 362),
        ("NVIDIA RTX A6000", 155),
    ],
)
def test_dense_bf16_peak_by_device_name(name, tflops):
    assert peak_flops(name) == tflops * 1e12


def test_most_specific_entry_wins():
    assert lookup_device("NVIDIA A100-SXM4-80GB").memory_gib == 80
    assert lookup_device("NVIDIA A100-PCIE-40GB").memory_gib == 40
    assert lookup_device("h200").name == "H200" and lookup_device("h20").name == "H20"


def test_t4_has_fp16_but_no_bf16_and_unknown_is_none():
    assert peak_flops("Tesla T4", "bf16") is None
    assert peak_flops("Tesla T4", "fp16") == 65e12
    assert peak_flops("NVIDIA B200") is None
    assert peak_flops("NVIDIA H100 PCIe", "fp32") is None  # no silent fp32 default


def test_unknown_device_error_lists_known_names():
    with pytest.raises(StokerError) as e:
        require_device("b200")
    assert all(name in str(e.value) for name in known_devices())
