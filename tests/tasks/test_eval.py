"""`stoker eval` runs the recipe's own evaluation: the fine-tuning run's held-out loss equals
what training logged; any checkpoint can be evaluated at a chosen --seq-len/--batch-size."""

import json
from pathlib import Path

import pytest
import torch
from tests.tasks.test_finetune import rows

from stoker.api import load_model
from stoker.cli import main
from stoker.config import load_config
from stoker.data.loader import TokenWindows
from stoker.models.gpt import lm_loss
from stoker.train.loop import train


def eval_json(argv, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_of_a_finetune_run_equals_its_logged_val_loss(ft_args, capsys):
    cfg = load_config(None, ["--recipe=finetune", *ft_args()])
    train(cfg)
    out = Path(cfg.train.out_dir)
    logged = [r for r in rows(out) if "val_loss" in r][-1]
    got = eval_json([str(out), "--batches", "2"], capsys)
    assert got["loss"] == pytest.approx(logged["val_loss"], rel=1e-6)
    assert got["tokens"] == logged["val_targets"]
    every = eval_json([str(out)], capsys)  # default: all held-out samples
    assert every["tokens"] >= got["tokens"]


def test_eval_takes_seq_len_and_batch_size(finished_run, data_dir, capsys):
    got = eval_json(
        [str(finished_run), "--seq-len", "16", "--batch-size", "3", "--batches", "2"], capsys
    )
    assert got["tokens"] == 2 * 3 * 16
    cfg = load_config(finished_run / "config.yaml")
    windows = TokenWindows(data_dir, "val", 16, 3, cfg.train.seed + 1)
    model = load_model(finished_run)
    with torch.no_grad():
        want = sum(float(lm_loss(model(x), y)) for x, y in (windows.batch(s) for s in (0, 1))) / 2
    assert got["loss"] == pytest.approx(want, rel=1e-5)


def test_eval_seq_len_beyond_the_model_is_one_line(finished_run, capsys):
    assert main(["eval", str(finished_run), "--seq-len", "4096"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exceeds the model's max_seq_len=32" in err
