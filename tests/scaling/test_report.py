"""`stoker count` and `stoker plan` through the CLI: numbers, JSON keys, every error path."""

import json
import subprocess
import sys

import pytest

from stoker.cli import main
from stoker.scaling.laws import BESIROGLU


def run_json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_count_preset_json(capsys):
    r = run_json(capsys, "count", "--preset", "llama-1.36b")
    assert r["params_total"] == 1_294_159_104
    assert r["params_non_embedding"] == 1_294_159_104 - 2 * 32000 * 2304
    assert r["flops_per_token"]["palm"] == pytest.approx(8.784e9, abs=0.0005e9)
    assert r["flops_per_token"]["torchtitan"] == pytest.approx(8.342e9, abs=0.0005e9)
    ddp = r["memory"]["per_strategy"]["ddp"]
    assert ddp["weights"] + ddp["grads"] + ddp["optimizer"] == 16 * 1_294_159_104
    assert r["memory"]["per_strategy"]["zero1"]["optimizer"] == 8 * 1_294_159_104 / 8


def test_count_recipe_text_and_options(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: gpt2-1.36b\ntrain:\n  micro_batch_size: 4\n")
    assert main(["count", str(recipe), "--num-gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "1,404,968,832" in out and "micro-batch 4 × 2048" in out and "2 GPUs" in out
    r = run_json(capsys, "count", str(recipe), "--seq-len", "1024", "--micro-batch-size", "1")
    assert r["seq_len"] == 1024 and r["memory"]["micro_batch_size"] == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["count"], "give a recipe YAML or --preset"),
        (["count", "r.yaml", "--preset", "tiny-llama"], "not both"),
        (["count", "--preset", "llama-9b"], "unknown preset 'llama-9b'; known: tiny-llama"),
        (["count", "missing.yaml"], "recipe file not found"),
        (["count", "--preset", "gpt2-124m", "--seq-len", "2048"], "exceeds model.max_seq_len"),
        (["plan", "--preset", "llama-1.36b", "--gpu", "b200"], "unknown GPU 'b200'; known: T4"),
        (["plan", "--preset", "llama-1.36b", "--hours", "10"], "--hours needs --gpu"),
        (["plan", "--preset", "llama-1.36b", "--mfu", "1.5"], "--mfu must be in (0, 1]"),
        (["plan", "--preset", "llama-1.36b", "--gpu", "t4"], "T4 has fp16 only"),
        (["plan", "--preset", "llama-1.36b", "--tokens", "lots"], "not a number"),
        (["plan", "--preset", "llama-1.36b", "--tokens", "1B", "--hours", "3"], "not allowed"),
        (["plan", "--preset", "llama-1.36b", "--law", "1,2"], "E,A,B,alpha,beta"),
        (["plan", "--preset", "llama-1.36b", "--fit", "nowhere"], "no metrics.jsonl"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_plan_llama_on_4_h20_matches_reference_section_3(capsys):
    r = run_json(
        capsys,
        "plan",
        "--preset",
        "llama-1.36b",
        "--gpu",
        "h20",
        "--num-gpus",
        "4",
        "--mfu",
        "0.35",
        "--tokens",
        "84.72B",
        "--price-per-gpu-hour",
        "2",
    )
    assert r["tokens_per_second"] == pytest.approx(23.6e3, rel=0.005)  # not 50k (FP8 peak)
    assert r["peak_flops"] == 148e12
    assert r["hours"] == pytest.approx(84.72e9 / r["tokens_per_second"] / 3600)
    assert r["cost"] == pytest.approx(r["hours"] * 4 * 2)
    assert r["budget_flops"] == pytest.approx(6.58e20, rel=0.002)  # not 1.36e21
    assert r["loss_hoffmann"] == pytest.approx(2.3721, abs=1e-4)
    assert r["loss_besiroglu"] == pytest.approx(2.3535, abs=1e-4)
    opt = r["compute_optimal"]["besiroglu"]
    assert 6 * opt["params"] * opt["tokens"] == pytest.approx(r["budget_flops"])
    assert "MassiveText" in r["law_caveat"]


def test_plan_budget_hours_and_default_tokens_agree(capsys):
    base = ["plan", "--preset", "llama-1.36b", "--gpu", "h100", "--num-gpus", "8"]
    r = run_json(capsys, *base, "--hours", "10")
    assert r["tokens"] == pytest.approx(r["tokens_per_second"] * 36000)
    assert r["tokens_per_second"] == pytest.approx(8 * 989e12 * 0.35 / 8.784e9, rel=1e-3)
    by_budget = run_json(capsys, *base, "--budget-flops", str(r["budget_flops"]))
    assert by_budget["hours"] == pytest.approx(10)
    default = run_json(capsys, "plan", "--preset", "llama-1.36b")
    assert default["tokens_per_param"] == pytest.approx(20) and default["hours"] is None
    assert default["law_in_fitted_range"] is True


def test_plan_text_says_where_numbers_come_from(capsys):
    assert (
        main(
            [
                "plan",
                "--preset",
                "llama-1.36b",
                "--gpu",
                "h20",
                "--num-gpus",
                "4",
                "--target-loss",
                "2.5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for text in (
        "23,588 tokens/s",
        "MFU 0.35 (assumed",
        "docs/scaling.md §4",
        "MassiveText",
        "compute-optimal",
        "to reach loss 2.5",
    ):
        assert text in out, text


def test_plan_recipe_tokens_and_fitted_law(tmp_path, capsys, write_run):
    runs = []
    for i, layers in enumerate((1, 2, 4, 8)):
        write_run(tmp_path / f"r{i}", layers, BESIROGLU, steps=(50, 100, 200, 400, 800, 1600))
        runs.append(str(tmp_path / f"r{i}"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model:\n  preset: smollm2-135m\ntrain:\n  max_steps: 1000\n  batch_size: 16\n"
    )
    r = run_json(capsys, "plan", str(recipe), "--fit", *runs, "--law", "2,400,400,0.3,0.3")
    assert r["tokens"] == 1000 * 16 * 2048 and "recipe" in r["tokens_basis"]
    assert r["law_in_fitted_range"] is False  # 33M tokens: far below Hoffmann's 5B
    assert r["loss_fitted"] == pytest.approx(r["loss_besiroglu"], rel=0.01)
    assert r["fit"]["points"] == 24 and r["fit"]["runs"][0]["loss_key"] == "val_loss"
    assert r["loss_custom"] == pytest.approx(2 + 400 / 134_515_008**0.3 + 400 / r["tokens"] ** 0.3)


def test_count_and_plan_do_not_import_torch():
    code = (
        "import sys, io, contextlib\n"
        "from stoker.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['count', '--preset', 'llama-1.36b']) == 0\n"
        "    assert main(['plan', '--preset', 'llama-1.36b', '--gpu', 'h20']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpu", "h100", "--hours", "nan"], "--hours must be positive finite numbers"),
        (["--gpu", "h100", "--hours", "inf"], "--hours must be positive finite numbers"),
        (["--tokens", "1e999"], "--hours must be positive finite numbers"),
        (["--budget-flops", "1e999"], "--hours must be positive finite numbers"),
        (["--price-per-gpu-hour", "nan"], "--target-loss must be finite numbers >= 0"),
        (["--price-per-gpu-hour", "-1"], "--target-loss must be finite numbers >= 0"),
        (["--target-loss", "nan"], "--target-loss must be finite numbers >= 0"),
        (["--target-loss", "inf"], "--target-loss must be finite numbers >= 0"),
        (["--num-gpus", str(2**1100)], "--num-gpus must be in [1, 2**63)"),
        (["--seq-len", str(10**400)], "--num-gpus must be in [1, 2**63)"),
    ],
)
def test_plan_refuses_non_finite_and_overflowing_numbers(argv, message, capsys):
    """Found by tests/test_fuzz.py: these printed nan/inf as the plan, or raised a TypeError
    (an overflowing --num-gpus made the throughput inf and the hours 0)."""
    assert main(["plan", "--preset", "llama-1.36b", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
