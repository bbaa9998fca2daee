"""The CLI contract: help for every subcommand, one-line errors with exit 2."""

import subprocess
import sys

import pytest

from stoker.cli import COMMANDS, main


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help_describes_options(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert COMMANDS[name][1] in out
    assert "--" in out or "positional" in out


def test_unknown_option_is_one_line_exit_2(capsys):
    assert main(["generate", "x", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus" in err and err.count("\n") == 1


def test_config_typo_through_cli(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_stepz: 3\n")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "did you mean train.max_steps?" in err and err.count("\n") == 1


def test_wrong_override_type_through_cli(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("recipe: pretrain\n")
    assert main(["train", str(recipe), "--optim.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr" in err and "'fast'" in err and "number" in err


def test_non_dividing_heads_through_cli(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: gpt2-1.36b\n  n_head: 18\n")
    assert main(["train", str(recipe)]) == 2
    assert "not divisible by model.n_head=18" in capsys.readouterr().err


def test_python_dash_m_stoker_runs_without_traceback():
    r = subprocess.run(
        [sys.executable, "-m", "stoker", "train", "/nonexistent.yaml"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert (
        r.stderr.strip() == "stoker: error: recipe file not found: /nonexistent.yaml "
        "(pass a path to a .yaml recipe)"
    )
