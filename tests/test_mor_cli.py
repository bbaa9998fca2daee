"""Mixture-of-Recursions from the command line: train, generate, eval (with the routing
agreement report) and count on MoR recipes; export-hf refuses MoR checkpoints."""

import json
from pathlib import Path

import pytest

from stoker.cli import main
from stoker.config import load_config

RECIPES = sorted(Path("recipes/mor").glob("*.yaml"))
TINY = [  # a 4-layer middle_cycle model (layer 0, one block applied twice, layer 3)
    "--model.n_layer=4",
    "--model.d_model=32",
    "--model.n_head=4",
    "--model.n_kv_head=2",
    "--model.d_ff=64",
    "--model.vocab_size=320",
    "--model.max_seq_len=32",
    "--data.sources=python-stdlib",
    "--data.max_documents=40",
    "--data.tokenizer.vocab_size=320",
    "--train.batch_size=8",
    "--train.micro_batch_size=4",
    "--train.max_steps=16",
    "--train.log_interval=1",
    "--train.eval_interval=16",
    "--train.eval_steps=2",
    "--train.save_interval=16",
    "--train.precision=fp32",
    "--optim.warmup_steps=2",
    "--optim.lr=1e-2",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from stoker.data.prepare import prepare

    d = tmp_path_factory.mktemp("mor-shards")
    prepare(load_config("recipes/mor/tiny-expert-rec2.yaml", [*TINY, f"--data.dir={d}"]))
    return d


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_mor_recipe_loads_and_counts(recipe, capsys):
    assert main(["count", str(recipe), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    cfg = load_config(recipe)
    assert cfg.mor is not None and r["mor"]["recursions"] == cfg.mor.recursions


def test_count_reports_reference_parameters(capsys):
    assert main(["count", "recipes/mor/smollm-360m-rec2-middle-cycle.yaml"]) == 0
    out = capsys.readouterr().out
    assert "167,150,400" in out and "17 unique (32 applied)" in out
    assert "non-embedding 167.15M vs vanilla 314.64M" in out


def test_train_generate_eval_on_an_expert_choice_recipe(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    args = [*TINY, f"--data.dir={data_dir}", f"--train.out_dir={out}"]
    assert main(["train", "recipes/mor/tiny-expert-rec2.yaml", *args]) == 0
    logged = [r for r in rows(out) if "loss" in r]
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.5  # it learns
    last = logged[-1]
    assert last["mor_sel_r1"] == pytest.approx(0.5) and 0 < last["mor_gate_r1"] < 0.1
    assert {"mor_aux_bce", "mor_agree_r1", "mor_dead"} <= set(last)
    capsys.readouterr()

    assert (
        main(
            [
                "generate",
                str(out),
                "--prompt",
                "def ",
                "--max-new-tokens",
                "6",
                "--temperature",
                "0",
                "--no-stream",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("def ")

    assert main(["eval", str(out), "--batches", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["routing"]
    assert 0 <= r["depth_agreement"] <= 1 and 0 <= r["mor_agree_r1"] <= 1
    assert r["loss_topk"] > 0 and r["loss_threshold"] > 0
    assert main(["eval", str(out), "--batches", "1"]) == 0
    assert "per-token depth agreement" in capsys.readouterr().out

    assert main(["export-hf", str(out), str(tmp_path / "hf")]) == 2
    assert "Mixture-of-Recursions" in capsys.readouterr().err


def test_train_token_choice_recipe_and_resume(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    args = [
        *TINY,
        f"--data.dir={data_dir}",
        f"--train.out_dir={out}",
        "--mor.recursions=2",
        "--train.max_steps=4",
        "--train.save_interval=2",
    ]
    assert main(["train", "recipes/mor/tiny-token-rec3.yaml", *args]) == 0
    assert (
        main(["train", "recipes/mor/tiny-token-rec3.yaml", *args, "--train.max_steps=6"]) == 0
    )  # resumes from step 4
    logged = [r for r in rows(out) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert {"mor_balance", "mor_z", "mor_gate", "mor_sel_r1"} <= set(logged[-1])
