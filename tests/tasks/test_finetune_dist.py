"""Fine-tuning under torchrun (CPU, gloo): 2 processes give the 1-process run's losses and
gradient norms though the ranks' micro-batches hold different numbers of targets, and a LoRA
run's adapter-only checkpoint resumes under every strategy."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.tasks.conftest import losses
from tests.tasks.test_finetune import grad_norms
from tests.train.test_distributed import _free_port

from stoker.config import load_config
from stoker.train.loop import train

pytestmark = pytest.mark.slow


def torchrun(recipe: Path, args: list[str]) -> subprocess.CompletedProcess:
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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one_and_resume(strategy, ft_recipe, ft_args, tmp_path):
    common = [
        "--train.max_steps=6",
        "--train.eval_interval=0",
        "--train.save_interval=3",
        "--train.micro_batch_size=2",
    ]
    train(load_config(None, ["--recipe=finetune", *ft_args(*common, out=tmp_path / "one")]))
    two = ft_args(*common, f"--dist.strategy={strategy}", out=tmp_path / "two")
    torchrun(ft_recipe, two)
    for step in range(1, 7):
        assert losses(tmp_path / "two")[step] == pytest.approx(
            losses(tmp_path / "one")[step], rel=1e-5
        ), step
        assert grad_norms(tmp_path / "two")[step] == pytest.approx(
            grad_norms(tmp_path / "one")[step], rel=1e-5
        ), step
    mid = tmp_path / "two" / "checkpoints" / "step-00000003"
    result = torchrun(
        ft_recipe,
        ft_args(
            *common, f"--dist.strategy={strategy}", f"--train.resume={mid}", out=tmp_path / "again"
        ),
    )
    assert "resuming from step 3" in result.stdout
    for step in range(4, 7):
        assert losses(tmp_path / "again")[step] == pytest.approx(
            losses(tmp_path / "two")[step], rel=1e-5
        ), step
