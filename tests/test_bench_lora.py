"""benchmarks/bench_lora.py (LoRA step, stoker vs transformers + PEFT): a `--quick` run (tiny
shape, 1 timed step per cell) prints the table and writes JSON with all four cells, finite
step-1 losses that agree and ratios that follow from the cells; the loss check can fail.
Timings are never asserted."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lora.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_lora", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_reports_four_cells_whose_step1_losses_agree(tmp_path):
    out = tmp_path / "lora.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--threads", "1", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for dtype in ("fp32", "bf16"):
        assert f"check {dtype}: step-1 losses agree" in r.stdout
        assert any(line.startswith(f"{dtype} ") for line in r.stdout.splitlines())
    summary = json.loads(out.read_text())
    assert sorted(summary["cells"]) == ["peft/bf16", "peft/fp32", "stoker/bf16", "stoker/fp32"]
    assert summary["losses_agree"]
    for row in summary["rows"]:
        s, p = row["stoker"], row["peer"]
        assert len(s["losses"]) == len(p["losses"]) == 2  # 1 warmup + 1 timed step
        assert all(math.isfinite(v) for v in s["losses"] + p["losses"])
        assert row["loss_diff"] == abs(s["losses"][0] - p["losses"][0]) <= 1e-4
        assert s["trainable"] == p["trainable"] > 0
        assert row["speed_ratio"] == s["tokens_per_s"] / p["tokens_per_s"]
        assert row["memory_ratio"] == s["peak_mib"] / p["peak_mib"]
        assert s["peak_mib"] > 0 and p["peak_mib"] > 0


def test_summary_flags_step1_losses_that_disagree():
    bench = load_bench()
    cell = dict(
        tokens_per_s=100.0,
        tokens_per_cpu_s=50.0,
        peak_mib=50.0,
        before_mib=20.0,
        libraries_mib=10.0,
        trainable=8,
        losses=[2.0, 1.5],
    )
    runs = {
        "stoker/fp32": [cell],
        "peft/fp32": [{**cell, "tokens_per_s": 50.0, "peak_mib": 100.0}],
        "stoker/bf16": [cell],
        "peft/bf16": [{**cell, "losses": [2.1, 1.5]}],  # 0.1 apart: beyond bf16's 2e-2
    }
    summary = bench.summarize(runs, {"dtypes": ["fp32", "bf16"]})
    fp32, bf16 = summary["rows"]
    assert fp32["losses_agree"] and not bf16["losses_agree"] and not summary["losses_agree"]
    assert (fp32["speed_ratio"], fp32["memory_ratio"]) == (2.0, 0.5)
    assert fp32["net_memory_ratio"] == 40.0 / 90.0
