"""Recipe schema: overrides with type coercion, clear errors for typos and wrong types."""

import pytest

from stoker.config import RecipeConfig, dump_config, load_config, parse_overrides
from stoker.errors import StokerError


def test_overrides_coerce_types():
    cfg = load_config(
        None,
        [
            "--train.max_steps=30",
            "--optim.lr=3e-4",
            "--train.compile=true",
            "--optim.betas=[0.9, 0.99]",
            "--data.sources",
            "a.txt",
        ],
    )
    assert cfg.train.max_steps == 30 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == 3e-4
    assert cfg.train.compile is True
    assert cfg.optim.betas == (0.9, 0.99)
    assert cfg.data.sources == ["a.txt"]


def test_yaml_recipe_and_override_precedence(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model:\n  preset: tiny-gpt2\n  n_layer: 3\noptim:\n  lr: 1e-3\n")
    cfg = load_config(p, ["--model.d_model=128"])
    assert cfg.model.arch == "gpt2" and cfg.model.n_layer == 3 and cfg.model.d_model == 128
    assert cfg.optim.lr == 1e-3  # YAML reads "1e-3" as a string; the schema makes it a float


def test_dump_roundtrip(tmp_path):
    cfg = load_config(None, ["--model.preset=tiny-llama", "--train.max_steps=7"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_unknown_key_suggests_nearest():
    with pytest.raises(StokerError, match=r"train\.max_stepz.*did you mean train\.max_steps"):
        load_config(None, ["--train.max_stepz=3"])


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(StokerError, match=r"train\.max_steps.*'abc'.*integer"):
        load_config(None, ["--train.max_steps=abc"])


def test_int_or_auto_keys_name_both_choices_without_union_tags():
    with pytest.raises(StokerError) as err:
        load_config(None, ["--data.num_workers=lots"])
    msg = str(err.value)
    assert msg.startswith("invalid value for data.num_workers: 'lots' (")
    assert "integer" in msg and "'auto'" in msg
    assert load_config(None, ["--data.num_workers=3"]).data.num_workers == 3
    assert load_config(None, []).data.num_workers == "auto"


def test_non_dividing_heads_rejected_with_alternatives():
    with pytest.raises(StokerError, match=r"2432 is not divisible by model.n_head=18.*19"):
        load_config(None, ["--model.preset=gpt2-1.36b", "--model.n_head=18"])


def test_unknown_preset_lists_known():
    with pytest.raises(StokerError, match="unknown preset.*llama-1.36b"):
        load_config(None, ["--model.preset=llama-7b"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(StokerError, match="recipe file not found"):
        load_config(tmp_path / "nope.yaml")


def test_override_without_value():
    with pytest.raises(StokerError, match="has no value"):
        parse_overrides(["--train.max_steps"])


def test_defaults_validate():
    RecipeConfig()
