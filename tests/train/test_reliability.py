"""No lost work: reproducible runs, verified checkpoints with fallback, a locked run dir,
no leftovers, one metrics row per step after a resume, a full disk as a one-line error."""

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stoker.cli import main
from stoker.config import load_config
from stoker.train.checkpoint import list_checkpoints, load_state_dict_file, prune_checkpoints
from stoker.train.loop import train


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(out) if "loss" in r}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_state_dict_file(list_checkpoints(out)[-1] / "model.safetensors")


def one_line_error(args: list[str], capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def straight(finished_run):
    """A finished 12-step run (checkpoints at 6 and 12) that the tests copy and damage."""
    return finished_run


def test_two_runs_with_the_same_seed_are_bit_identical(make_args, tmp_path, straight):
    train(load_config(None, make_args(out=tmp_path / "again")))
    assert losses(tmp_path / "again") == losses(straight)
    wa, wb = weights(straight), weights(tmp_path / "again")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_cli_runs_choose_reproducible_cpu_math(make_args, tmp_path, recipe):
    runs = []
    for name in ("a", "b"):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "stoker",
                "train",
                str(recipe),
                *make_args("--train.max_steps=4", out=tmp_path / name),
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        runs.append(tmp_path / name)
    assert "deterministic: " in proc.stdout and "WARNING" not in proc.stdout
    assert losses(runs[0]) == losses(runs[1])


# --------------------------------------------------------------- damaged latest checkpoint
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE = {
    "truncated weights": lambda c: _truncate(c / "model.safetensors"),
    "missing optimizer": lambda c: (c / "optimizer.pt").unlink(),
    "garbage optimizer": lambda c: (c / "optimizer.pt").write_bytes(b"\x80garbage" * 64),
    "garbage trainer state": lambda c: (c / "trainer_state.json").write_text("{not json"),
    "incomplete trainer state": lambda c: _truncate(c / "trainer_state.json"),
    "unreadable marker": lambda c: (c / "stoker.json").write_text("{"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_latest_checkpoint_resumes_from_the_previous_one(
    damage, straight, make_args, tmp_path, capsys
):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    DAMAGE[damage](out / "checkpoints" / "step-00000012")
    capsys.readouterr()
    train(load_config(None, make_args("--train.max_steps=12")))
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "skipping damaged checkpoint" in text and "step-00000012" in text, text
    assert "resuming from step 6" in text
    steps = [r["step"] for r in metric_rows(out) if "loss" in r]
    assert steps == list(range(1, 13))  # rows 7..12 of the first run were dropped
    assert losses(out) == losses(straight)
    wa, wb = weights(straight), weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_explicit_resume_from_a_damaged_checkpoint_is_one_line(
    straight, make_args, tmp_path, recipe, capsys
):
    out = tmp_path / "copy"
    shutil.copytree(straight, out)
    ckpt = out / "checkpoints" / "step-00000012"
    _truncate(ckpt / "model.safetensors")
    err = one_line_error(["train", str(recipe), *make_args(f"--train.resume={ckpt}")], capsys)
    assert "model.safetensors" in err and "damaged" in err
    err = one_line_error(["eval", str(ckpt)], capsys)
    assert "model.safetensors" in err


def test_eval_of_a_run_skips_its_damaged_latest_checkpoint(straight, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(straight, out)
    (out / "checkpoints" / "step-00000012" / "optimizer.pt").write_bytes(b"x")
    assert main(["eval", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    assert "skipping damaged checkpoint" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["checkpoint"].endswith("step-00000006")


# ------------------------------------------------------------------------------ leftovers
def test_stale_staging_dirs_are_removed_when_a_run_starts(straight, make_args, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    root = out / "checkpoints"
    for name in (".tmp-step-00000013", ".old-step-00000012", "step-00000099"):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes(b"partial")
    train(load_config(None, make_args("--train.max_steps=12")))
    assert sorted(p.name for p in root.iterdir()) == ["step-00000006", "step-00000012"]


def test_pruning_never_deletes_the_checkpoint_just_written(straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    newest = list_checkpoints(out)[-1]
    prune_checkpoints(out, 1, keep=newest)
    assert list_checkpoints(out) == [newest]
    prune_checkpoints(out, 0, keep=newest)  # keep_last < 1 (refused by the schema) keeps it
    assert list_checkpoints(out) == [newest]


def test_checkpoint_manifest_lists_every_file_with_size_and_hash(straight):
    import hashlib

    ckpt = list_checkpoints(straight)[-1]
    files = json.loads((ckpt / "stoker.json").read_text())["files"]
    on_disk = {
        p.relative_to(ckpt).as_posix()
        for p in ckpt.rglob("*")
        if p.is_file() and p.name != "stoker.json"
    }
    assert set(files) == on_disk and {"model.safetensors", "optimizer.pt"} <= on_disk
    for rel, entry in files.items():
        data = (ckpt / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# ---------------------------------------------------------------------------- run lock
HOLD = """
import sys, time
from stoker.train.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_second_run_in_one_out_dir_is_refused_naming_the_first(make_args, tmp_path, recipe, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        err = one_line_error(["train", str(recipe), *make_args("--train.max_steps=2")], capsys)
        assert f"PID {holder.pid}" in err and "in use by another run" in err
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()  # like kill -9: the lock dies with its holder
        holder.wait()
    assert main(["train", str(recipe), *make_args("--train.max_steps=2")]) == 0
    assert not (out / ".lock").exists()


# ------------------------------------------------------------------------------ full disk
def test_full_disk_during_save_is_one_line_and_keeps_the_previous_checkpoint(
    straight, make_args, tmp_path, recipe, capsys, monkeypatch
):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = list_checkpoints(out)

    def full(obj, path, *a, **k):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch, "save", full)
    err = one_line_error(["train", str(recipe), *make_args("--train.max_steps=18")], capsys)
    assert "No space left on device" in err
    assert list_checkpoints(out) == before
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
