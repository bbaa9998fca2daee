"""`train.precision: auto` on each kind of device, without the devices: torch's answer to
"does this GPU do bf16" is faked as a T4 (emulated only) and an A100 (native) give it."""

import pytest
import torch

from stoker.errors import StokerError
from stoker.train.loop import resolve_precision


def fake_gpu(monkeypatch, native: bool) -> None:
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or including_emulation  # every CUDA GPU can emulate bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


def test_auto_is_fp16_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    fake_gpu(monkeypatch, native=False)  # T4, V100: sm_75 / sm_70
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"


def test_auto_is_bf16_on_a_gpu_with_native_bf16(monkeypatch):
    fake_gpu(monkeypatch, native=True)  # A100, H100, RTX 30xx and newer
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_auto_is_fp32_on_cpu_and_named_precisions_are_kept():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(StokerError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", torch.device("cpu"))
