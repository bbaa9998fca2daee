"""scripts/cluster_train.sh: its one-line argument errors, and a real 2-process launch of the
multimodal recipe on one CPU node (gloo): every stage trains, each stage logs one MLflow run,
and rank 0 alone writes (one checkpoint per save, no staging left behind)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).parents[3]
SCRIPT = ROOT / "scripts" / "cluster_train.sh"
RECIPE = ROOT / "recipes" / "multimodal" / "digits.yaml"


def launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip


@pytest.mark.parametrize("args, message", [
    ([], "usage:"),
    (["nope.yaml", "1", "0", "h", "29500"], "recipe file not found: nope.yaml"),
    ([str(RECIPE), "0", "0", "h", "29500"], "NUM_NODES must be a positive integer"),
    ([str(RECIPE), "2", "2", "h", "29500"], "NODE_RANK must be 0..1, got '2'"),
    ([str(RECIPE), "1", "0", "h", "70000"], "PORT must be 1..65535"),
])  # fmt: skip
def test_bad_arguments_are_one_line_errors(args, message):
    r = launch(*args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1


def test_a_bad_process_count_is_an_error():
    r = launch(str(RECIPE), "1", "0", "h", "1", env={"NPROC_PER_NODE": "x"})
    assert r.returncode == 2 and "NPROC_PER_NODE must be a positive integer, got 'x'" in r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_every_stage_with_one_writer(digits_data, tmp_path):
    out = tmp_path / "run"
    r = launch(str(RECIPE), "1", "0", "127.0.0.1", str(free_port()),
               f"--data.dir={digits_data}", f"--train.out_dir={out}", "--data.eval_examples=20",
               "--multimodal.phases=[1]", "--multimodal.image.pretrain_steps=6",
               "--multimodal.audio.pretrain_steps=6", "--multimodal.aligner.max_steps=6",
               "--multimodal.aligner.eval_interval=6", "--train.batch_size=32",
               "--train.micro_batch_size=16", "--train.save_interval=3",
               "--track.mlflow=true", "--train.monitor_interval=0",
               env={"NPROC_PER_NODE": "2"})  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "node 0 of 1, 2 process(es), rendezvous 127.0.0.1" in r.stderr
    for stage in ("encoder-image", "encoder-audio", "phase1"):
        d = out / stage
        assert json.loads((d / "stage.json").read_text())["done"], stage
        client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("stoker").experiment_id])
        assert len(runs) == 1, stage  # rank 0 only
        saves = sorted(p.name for p in (d / "checkpoints").iterdir())
        assert saves == ["step-00000003", "step-00000006"], saves  # one writer, no staging
        assert not list(d.rglob("*.tmp*")), stage
        state = json.loads((d / "checkpoints" / saves[-1] / "trainer_state.json").read_text())
        assert state["world"] == 2
