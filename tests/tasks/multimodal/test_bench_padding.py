"""benchmarks/bench_mm_padding.py: a one-step run checks that both paddings give the same
first loss, then prints both throughputs and their ratio. Timings are never asserted."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_mm_padding.py"


def test_one_step_run_prints_both_paddings_and_the_ratio(digits_data, tmp_path):
    out = tmp_path / "pad.json"
    cmd = [sys.executable, str(BENCH), "--data", str(digits_data), "--steps", "1",
           "--repeats", "1", "--threads", "1", "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check: first-step losses agree" in r.stdout and "dynamic / static:" in r.stdout
    summary = json.loads(out.read_text())
    med = summary["median"]
    assert summary["ratio"] == med["dynamic"] / med["static"]
    assert summary["runs"]["static"][0]["width"] == 48
