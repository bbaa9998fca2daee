"""benchmarks/bench_dynamo.py (LoRA mixture in an encoder, stoker vs transformers + PEFT): a
`--quick` run (tiny encoder, 1 timed step per cell) passes its correctness check (hidden states
and adapter gradients within 1e-4 of PEFT's), prints the table and writes JSON with every row,
and ratios that follow from the rows; the summary's arithmetic on made-up cells. Timings are
never asserted."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dynamo.py"
LABELS = ["stoker mixture", "stoker single adapter", "peft set_adapter/task", "peft adapter_names"]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_dynamo", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_run_passes_the_check_and_reports_every_row(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "dynamo.json"
    cmd = [sys.executable, str(BENCH), "--quick", "--threads", "1", "--dtypes", "fp32"]
    r = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check fp32: PASSED" in r.stdout
    assert any(line.startswith("fp32  stoker mixture ") for line in r.stdout.splitlines())
    summary = json.loads(out.read_text())
    assert summary["check_passed"] and summary["check"]["passed"]
    diffs = summary["check"]["diffs"]
    assert diffs["peft_subbatch"] <= 1e-4 and diffs["grad_relative"] <= 1e-4
    assert diffs["single_vs_gate0"] <= 1e-4
    assert len(summary["check"]["per_example"]) == 10  # --quick: B=10
    assert sorted(summary["cells"]) == ["mixture/fp32", "peft/fp32", "single/fp32"]
    (row,) = summary["rows"]
    tps = row["tokens_per_s"]
    assert sorted(tps) == sorted(LABELS)
    for label in LABELS[:3]:
        assert all(v > 0 and math.isfinite(v) for v in tps[label].values()), label
    mix, peft, single = tps["stoker mixture"], tps["peft set_adapter/task"], tps[LABELS[1]]
    assert row["mixture_vs_peft"]["train"] == mix["train"] / peft["train"]
    assert row["overhead_pct"]["infer"] == 100 * (single["infer"] / mix["infer"] - 1)
    cells = summary["cells"]
    assert cells["mixture/fp32"]["trainable"] == cells["peft/fp32"]["trainable"]
    assert cells["mixture/fp32"]["trainable"] == 5 * cells["single/fp32"]["trainable"] > 0
    if "peft_adapter_names" in diffs:  # PEFT's mixed-batch inference worked: a timed row
        assert diffs["peft_adapter_names"] <= 1e-4 and tps["peft adapter_names"]["infer"] > 0


def test_summary_ratios_and_the_failed_adapter_names_row():
    bench = load_bench()

    def cell(train, infer, mixed=None):
        modes = {"train": train, "infer": infer} | ({"mixed": mixed} if mixed else {})
        return {
            "modes": {k: {"tokens_per_s": v, "tokens_per_cpu_s": v / 2} for k, v in modes.items()},
            "trainable": 8,
        }

    runs = {
        "mixture/fp32": [cell(300.0, 900.0), cell(100.0, 1100.0), cell(200.0, 1000.0)],
        "single/fp32": [cell(220.0, 1100.0)],
        "peft/fp32": [cell(100.0, 400.0)],  # no adapter_names timing
    }
    check = {"passed": True, "diffs": {}}
    summary = bench.summarize(runs, {"dtypes": ["fp32"]}, check)
    (row,) = summary["rows"]
    assert row["tokens_per_s"]["stoker mixture"]["train"] == 200.0  # median of 3 runs
    assert row["mixture_vs_peft"] == {
        "train": 2.0,
        "train_cpu": 2.0,
        "infer": 2.5,
        "infer_cpu": 2.5,
    }
    assert row["overhead_pct"]["train"] == pytest.approx(10.0)
    assert row["overhead_pct"]["infer"] == pytest.approx(10.0)
    assert row["tokens_per_s"]["peft adapter_names"]["infer"] is None
    assert row["mixture_vs_adapter_names"]["infer"] is None
    assert summary["check_passed"]
