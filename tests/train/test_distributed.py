"""torchrun on CPU with gloo: 2 processes reproduce 1 process for the same global batch
(ddp, zero1, fsdp2), and sharded-strategy checkpoints resume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from stoker.config import load_config
from stoker.train.loop import train

pytestmark = pytest.mark.slow


def losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("recipe: pretrain\n")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "stoker",
        "train",
        str(recipe),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("strategy", ["ddp", "zero1", "fsdp2"])
def test_two_processes_match_one(strategy, make_args, tmp_path):
    common = [
        "--train.max_steps=8",
        "--train.eval_interval=0",
        "--train.save_interval=4",
        "--train.micro_batch_size=4",
    ]
    train(load_config(None, make_args(*common, out=tmp_path / "single")))
    torchrun(make_args(*common, f"--dist.strategy={strategy}", out=tmp_path / "multi"), tmp_path)
    one, two = losses(tmp_path / "single"), losses(tmp_path / "multi")
    assert sorted(two) == list(range(1, 9))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), (strategy, step)
    if strategy == "ddp":
        return
    # the sharded run's step-4 checkpoint resumes (in 2 processes) to the same losses
    mid = tmp_path / "multi" / "checkpoints" / "step-00000004"
    result = torchrun(
        make_args(
            *common,
            f"--dist.strategy={strategy}",
            f"--train.resume={mid}",
            out=tmp_path / "resumed",
        ),
        tmp_path,
    )
    assert "resuming from step 4" in result.stdout
    resumed = losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(5, 9))
    for step in resumed:
        assert resumed[step] == pytest.approx(two[step], rel=1e-5), (strategy, step)
