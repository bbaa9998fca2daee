"""The training loop: learning, exact resume, accumulation, atomic checkpoints, bad input."""

import inspect
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stoker.cli import main
from stoker.config import load_config
from stoker.errors import StokerError
from stoker.train import loop
from stoker.train.checkpoint import list_checkpoints, load_state_dict_file
from stoker.train.loop import train
from stoker.train.telemetry import Throughput


def losses(out_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_state_dict_file(list_checkpoints(out_dir)[-1] / "model.safetensors")


def assert_same_run(a: Path, b: Path) -> None:
    """Bit for bit: every logged loss and the final weights."""
    assert losses(b) == losses(a)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def sigterm_at(stop_step: int, lr_at):
    """`lr_at` (called by the loop once per step, with the steps done so far) wrapped to send
    this process a real SIGTERM as step `stop_step` starts: the run stops after that step."""

    def wrapped(step, *args, **kwargs):
        if step + 1 == stop_step:
            # the loop's handler, not the default one that would end this process outright
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(step, *args, **kwargs)

    return wrapped


# `stoker` on the command line, with SIGTERM sent at the step given as the first argument
CLI_WITH_SIGTERM = f"""import os, signal, sys
from stoker.cli import main
from stoker.train import loop
{inspect.getsource(sigterm_at)}
loop.lr_at = sigterm_at(int(sys.argv.pop(1)), loop.lr_at)
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def _runs() -> dict[str, Path]:
    return {}


@pytest.fixture
def uninterrupted(make_args, tmp_path_factory, _runs) -> Path:
    """The default 12-step run (eval and save at 6 and 12), trained once for the module."""
    if "default" not in _runs:
        out = tmp_path_factory.mktemp("uninterrupted") / "run"
        train(load_config(None, make_args(out=out)))
        _runs["default"] = out
    return _runs["default"]


def test_loss_falls_and_run_dir_is_complete(make_args, tmp_path):
    summary = train(load_config(None, make_args("--train.max_steps=24")))
    out = tmp_path / "run"
    curve = losses(out)
    assert curve[24] < curve[1] - 0.5, curve
    assert summary["final_val_loss"] is not None and summary["tokens"] == 24 * 8 * 32
    ckpt = list_checkpoints(out)[-1]
    assert ckpt.name == "step-00000024"
    assert {p.name for p in ckpt.iterdir()} >= {
        "stoker.json",
        "model.safetensors",
        "optimizer.pt",
        "trainer_state.json",
        "tokenizer",
    }
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r.get("step") == 5 and "loss" in r)
    assert {"lr", "grad_norm", "tokens_per_second", "mfu", "mfu_basis", "memory_gb"} <= set(row)
    assert "cpu best measured" in row["mfu_basis"] and 0 < row["mfu"] < 1


def test_stoker_eval_reproduces_final_val_loss(make_args, tmp_path, capsys):
    summary = train(load_config(None, make_args()))
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)


def test_accumulation_equals_full_micro_batch(make_args, tmp_path):
    train(load_config(None, make_args(out=tmp_path / "a")))
    train(load_config(None, make_args("--train.micro_batch_size=2", out=tmp_path / "b")))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


def test_resume_from_checkpoint_is_exact_in_process(make_args, tmp_path, uninterrupted):
    mid = uninterrupted / "checkpoints" / "step-00000006"
    train(load_config(None, make_args(f"--train.resume={mid}", out=tmp_path / "resumed")))
    a, b = losses(uninterrupted), losses(tmp_path / "resumed")
    assert sorted(b) == list(range(7, 13))
    assert all(b[s] == a[s] for s in b)
    wa, wb = weights(uninterrupted), weights(tmp_path / "resumed")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# 1: the first step, in warm-up; 3: the first after warm-up; 6: an eval and save step;
# 7: the step after a checkpoint; 11: the last step before the end
@pytest.mark.parametrize("stop_step", [1, 3, 6, 7, 11])
def test_sigterm_mid_run_then_resume_is_bitwise_identical(
    stop_step, make_args, tmp_path, monkeypatch, capsys, uninterrupted
):
    """SIGTERM arrives while step `stop_step` runs: the run finishes that step, saves and
    returns; a second `train()` resumes from there to the uninterrupted run's exact losses
    and weights."""
    args = make_args(out=tmp_path / "split")
    with monkeypatch.context() as m:
        m.setattr(loop, "lr_at", sigterm_at(stop_step, loop.lr_at))
        first = train(load_config(None, args))
    assert first["stopped"] == f"stopped by signal at step {stop_step}"
    assert list_checkpoints(tmp_path / "split")[-1].name == f"step-{stop_step:08d}"
    capsys.readouterr()
    second = train(load_config(None, args))
    assert f"resuming from step {stop_step} " in capsys.readouterr().out
    assert second["stopped"] is None and second["steps"] == 12
    assert_same_run(uninterrupted, tmp_path / "split")


@pytest.mark.slow
def test_cli_sigterm_mid_run_then_resume_is_bitwise_identical(
    make_args, tmp_path, recipe, uninterrupted
):
    """The real CLI in fresh processes: SIGTERM at step 5 exits 0 with a checkpoint, and a
    new `stoker train` resumes to the same losses and weights as the uninterrupted run."""
    wrapper = tmp_path / "stoker_sigterm_at.py"
    wrapper.write_text(CLI_WITH_SIGTERM)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "stoker", "train", str(recipe)]
    split = make_args(out=tmp_path / "split")

    killed = subprocess.run(
        [sys.executable, str(wrapper), "5", "train", str(recipe), *split],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == 0, killed.stdout + killed.stderr
    assert "stopped by signal at step 5" in killed.stdout, killed.stdout
    resumed = subprocess.run([*cli, *split], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from step 5 " in resumed.stdout
    assert_same_run(uninterrupted, tmp_path / "split")


def test_crash_before_rename_keeps_previous_checkpoint(make_args, tmp_path, monkeypatch):
    train(load_config(None, make_args("--train.max_steps=6")))
    out = tmp_path / "run"
    before = list_checkpoints(out)
    assert [p.name for p in before] == ["step-00000006"]
    real_replace = os.replace

    def crash(src, dst):
        if "step-" in str(dst):
            raise KeyboardInterrupt("killed between write and rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, make_args()))
    monkeypatch.setattr(os, "replace", real_replace)
    assert list_checkpoints(out) == before
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    from stoker.api import load_model

    load_model(out)  # the previous checkpoint still loads
    train(load_config(None, make_args()))  # and the run resumes from it
    assert list_checkpoints(out)[-1].name == "step-00000012"


def test_nan_loss_stops_with_checkpoint_and_message(make_args, tmp_path):
    with pytest.raises(StokerError, match=r"at step \d+; saved"):
        train(
            load_config(
                None, make_args("--optim.lr=1e30", "--optim.warmup_steps=0", "--train.grad_clip=0")
            )
        )
    assert list_checkpoints(tmp_path / "run")


def test_nan_policy_skip_continues(make_args, tmp_path):
    summary = train(
        load_config(
            None,
            make_args(
                "--optim.lr=1e30",
                "--optim.warmup_steps=0",
                "--train.grad_clip=0",
                "--train.nan_policy=skip",
                "--train.max_steps=4",
                "--train.eval_interval=0",
            ),
        )
    )
    assert summary["steps"] == 4


def test_mfu_formula_matches_hand_computation(make_args):
    cfg = load_config(None, make_args())
    from stoker.tasks import make_task
    from stoker.train.distributed import DistInfo

    meter = Throughput(make_task(cfg).flops_per_token(), DistInfo(world=2), "fp32")
    meter.peak = 1e12
    n = sum(p.numel() for p in __import__("stoker").build_model(cfg.model).parameters())
    L, H, Q, T = 2, 4, 8, 32
    assert meter.flops_per_token == 6 * n + 12 * L * H * Q * T
    assert meter.mfu(1000.0) == pytest.approx(1000 * (6 * n + 12 * L * H * Q * T) / (2 * 1e12))


# ------------------------------------------------------------------------------ bad input
def _cli_error(args, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_batch_not_divisible(make_args, capsys, tmp_path, recipe):
    err = _cli_error(["train", str(recipe), *make_args("--train.micro_batch_size=3")], capsys)
    assert "not divisible by train.micro_batch_size=3" in err


def test_missing_data_source(make_args, capsys, tmp_path, recipe):
    args = make_args(f"--data.dir={tmp_path / 'fresh'}", f"--data.sources={tmp_path}/none.txt")
    assert "none.txt" in _cli_error(["train", str(recipe), *args], capsys)


def test_shards_vocab_exceeds_model(make_args, capsys, tmp_path, recipe):
    err = _cli_error(["train", str(recipe), *make_args("--model.vocab_size=100")], capsys)
    assert "vocab" in err


def test_unwritable_out_dir(make_args, capsys, tmp_path, recipe):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _cli_error(["train", str(recipe), *make_args(out=blocker / "run")], capsys)
    assert "not writable" in err


def test_resume_from_other_architecture(make_args, capsys, tmp_path, recipe):
    train(load_config(None, make_args("--train.max_steps=6")))
    capsys.readouterr()
    err = _cli_error(["train", str(recipe), *make_args("--model.n_layer=3")], capsys)
    assert "model.n_layer: checkpoint 2 vs config 3" in err


def test_activation_checkpointing_gives_the_same_losses(make_args, tmp_path):
    train(load_config(None, make_args("--train.max_steps=4", out=tmp_path / "a")))
    train(
        load_config(
            None,
            make_args(
                "--train.max_steps=4", "--train.activation_checkpointing=true", out=tmp_path / "b"
            ),
        )
    )
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6)


def test_early_stopping_stops_when_val_loss_stops_improving(make_args, tmp_path):
    # lr 0 after warmup-free start: the model never changes, so val loss never improves
    summary = train(
        load_config(
            None,
            make_args(
                "--optim.lr=0",
                "--optim.warmup_steps=0",
                "--train.max_steps=12",
                "--train.eval_interval=2",
                "--train.early_stopping_metric=val_loss",
                "--train.early_stopping_patience=2",
            ),
        )
    )
    assert summary["steps"] == 6  # evals at 2 (best), 4 and 6 (no improvement twice)
    assert "early stopping" in summary["stopped"]
    assert list_checkpoints(tmp_path / "run")[-1].name == "step-00000006"


def test_loader_workers_do_not_change_the_run(make_args, tmp_path):
    train(
        load_config(
            None, make_args("--train.max_steps=6", "--train.eval_interval=0", out=tmp_path / "a")
        )
    )
    train(
        load_config(
            None,
            make_args(
                "--train.max_steps=6",
                "--train.eval_interval=0",
                "--data.num_workers=2",
                "--data.prefetch_factor=3",
                out=tmp_path / "b",
            ),
        )
    )
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
