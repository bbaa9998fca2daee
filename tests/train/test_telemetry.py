"""The CPU MFU denominator: the best matmul rate measured on this machine, kept on disk."""

import json

import torch

from stoker.train import telemetry


def test_cpu_peak_keeps_the_best_measurement(monkeypatch, tmp_path):
    monkeypatch.setenv("STOKER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(telemetry, "_CPU_PEAK", {})
    now = telemetry.measured_matmul_flops(torch.float32, n=256, repeats=2)
    table = json.loads((tmp_path / "cpu_matmul_peak.json").read_text())
    key = telemetry._machine_key(torch.float32, 256)
    assert table[key] == now > 0
    # an earlier, quieter measurement on this machine wins over a slower one now
    table[key] = now * 100
    (tmp_path / "cpu_matmul_peak.json").write_text(json.dumps(table))
    monkeypatch.setattr(telemetry, "_CPU_PEAK", {})
    assert telemetry.measured_matmul_flops(torch.float32, n=256, repeats=2) == now * 100


def test_cpu_peak_survives_a_corrupt_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("STOKER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(telemetry, "_CPU_PEAK", {})
    (tmp_path / "cpu_matmul_peak.json").write_text("{not json")
    assert telemetry.measured_matmul_flops(torch.float32, n=128, repeats=1) > 0
