"""`stoker validate --quick` on the shipped language-model recipes (pretrain, MoR, fine-tune):
every check passes on the tiny ones, config and init on every one, and the CLI reports."""

import json
from pathlib import Path

import pytest

from stoker.cli import main
from stoker.validate import run_validation

ROOT = Path(__file__).parents[2]
LM_RECIPES = sorted(
    str(p.relative_to(ROOT))
    for kind in ("pretrain", "mor", "finetune")
    for p in (ROOT / "recipes" / kind).glob("*.yaml")
)


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["recipes/pretrain/tiny.yaml",
                                    "recipes/mor/tiny-expert-rec2.yaml",
                                    "recipes/finetune/tiny-lora.yaml"])  # fmt: skip
def test_every_check_passes_on_the_tiny_recipes(recipe):
    results, _ = run_validation(recipe, [], True, None)
    assert [r.check for r in results] == ["config", "init", "data", "freezing", "forward", "step",
                                          "checkpoint", "tracking", "short_run"]  # fmt: skip
    bad = [(r.check, r.detail) for r in results if r.status != "PASS"]
    assert not bad, bad


@pytest.mark.parametrize("recipe", LM_RECIPES)
def test_config_init_and_data_pass_on_every_shipped_lm_recipe(recipe):
    results, said = run_validation(recipe, [], True, ["init", "data"])
    bad = [(r.check, r.detail) for r in results if r.status != "PASS"]
    assert not bad, bad
    if "1.36b" in recipe or "360m" in recipe:  # GPU recipes: their corpus is the user's
        assert any("python-stdlib" in s for s in said)


def test_cli_writes_json_and_exits_1_on_a_fail(tmp_path, capsys):
    out = tmp_path / "v.json"
    assert main(["validate", "recipes/finetune/tiny-lora.yaml", "--quick", "--only", "init",
                 "--json", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["passed"] and [c["check"] for c in report["checks"]] == ["config", "init"]
    assert "trainable" in report["checks"][1]["detail"]
    assert any("init_from" in s for s in report["stand_ins"])
    capsys.readouterr()
    code = main(["validate", "recipes/finetune/tiny-lora.yaml", "--quick", "--only", "init",
                 "--lora.targets=[no_such_proj]"])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 1
    fail = [line for line in text.splitlines() if line.startswith("  ") and " FAIL " in line]
    assert len(fail) == 1 and "no_such_proj" in fail[0], text


def test_a_missing_data_dir_fails_config_and_skips_the_rest(capsys):
    code = main(["validate", "recipes/dynamo/tiny.yaml", "--quick", "--data.dir=/nonexistent/dy"])
    text = capsys.readouterr().out
    assert code == 1
    assert "config" in text and "/nonexistent/dy" in text
    assert "SKIP" in text and "Traceback" not in text


def test_only_names_a_check(capsys):
    assert main(["validate", "recipes/pretrain/tiny.yaml", "--only", "nope"]) == 2
    assert "no such check" in capsys.readouterr().err


def test_init_reproduces_the_qwen_multimodal_counts_on_the_meta_device():
    from stoker.config import load_config
    from stoker.validate.params import full_shape_table

    cfg = load_config(Path(__file__).parent / "multimodal-qwen2.5-0.5b-shapes.yaml")
    table = full_shape_table(cfg, "phase2")
    assert "projectors 8,397,824" in table and "lora 2,162,688" in table, table
    # + 2 x 4 x 896 learned missing-modality embeddings; the decoder is Qwen2.5-0.5B's 494.0M
    assert "missing 7,168" in table and "10,567,680 trainable" in table, table
    assert full_shape_table(cfg, "lm").startswith("494,032,768 parameters")


def test_quick_init_shows_the_recipe_shapes_next_to_the_tiny_ones():
    results, _ = run_validation("recipes/pretrain/gpt2-124m.yaml", [], True, ["init"])
    init = results[1].detail
    assert "at the recipe's shapes (meta device): 124,439,808 parameters" in init, init
