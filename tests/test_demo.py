"""`make demo` end to end: tiny.yaml as shipped trains on the built-in corpus, val loss falls
far below chance, and `stoker generate` on the run prints text."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_recipe_learns_and_generates(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    cmd = [
        sys.executable,
        "-m",
        "stoker",
        "train",
        str(ROOT / "recipes/pretrain/tiny.yaml"),
        f"--train.out_dir={out}",
        f"--data.dir={data}",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    chance = math.log(2048)  # 7.62 nats: a uniform guess over the 2048-token vocabulary
    assert len(val) == 3 and val[-1] < val[0]
    assert val[-1] < chance - 3.0, val  # margin: at least 3 nats below chance
    g = subprocess.run(
        [
            sys.executable,
            "-m",
            "stoker",
            "generate",
            str(out),
            "--prompt",
            "def ",
            "--max-new-tokens",
            "48",
            "--seed",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("def ") and len(g.stdout.strip()) > 20


@pytest.mark.slow
def test_tiny_recipe_prints_a_short_header_before_the_progress_bar(tmp_path):
    """`make demo`'s first run (the corpus is tokenized too): at most 10 lines before the
    first progress-bar line, naming the recipe file, precision and where the run goes."""
    out, data = tmp_path / "run", tmp_path / "data"
    cmd = [
        *(sys.executable, "-m", "stoker", "train", str(ROOT / "recipes/pretrain/tiny.yaml")),
        *(f"--train.out_dir={out}", f"--data.dir={data}", "--data.max_documents=40"),
        *("--train.max_steps=2", "--train.eval_steps=1"),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # stdout and the bar's stderr in order
    r = subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, env=env
    )
    assert r.returncode == 0, r.stdout[-2000:]
    lines = r.stdout.splitlines()
    first_bar = next(i for i, line in enumerate(lines) if line.startswith("train:"))
    header = "\n".join(lines[:first_bar])
    assert first_bar <= 10, header
    assert str(out) in header and "tiny.yaml" in header and "precision fp32" in header, header
    assert "config.yaml" in header and "parameters" in header, header
    assert "\nmodel:" not in header  # the resolved config is in config.yaml, not printed
