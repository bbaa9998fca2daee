"""LoRA adapters across formats: a stoker LoRA run exported as a PEFT directory loads in
`peft` with our logits; a PEFT adapter imported back gives them too; an adapter exported
against another base is refused; an r = 8 run's checkpoint is a few percent of its base."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from stoker.api import load_model
from stoker.cli import main
from stoker.config import ModelConfig, RecipeConfig
from stoker.models.gpt import build_model
from stoker.train.checkpoint import list_checkpoints, save_model_checkpoint

IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture
def lora_run(ft_recipe, ft_args, finished_run, tmp_path) -> Path:
    """A 4-step q/v LoRA run on an HF export of the tiny base (PEFT needs an HF base)."""
    hf_base = tmp_path / "hf-base"
    assert main(["export-hf", str(finished_run), str(hf_base)]) == 0
    args = ft_args(
        f"--train.init_from={hf_base}", "--train.max_steps=4", "--lora.targets=q_proj,v_proj"
    )
    assert main(["train", str(ft_recipe), *args]) == 0
    return tmp_path / "ft"


def test_peft_loads_our_adapter_and_we_load_it_back(lora_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours = load_model(lora_run).eval()
    assert main(["export-hf", str(lora_run), str(tmp_path / "peft"), "--adapter"]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]
    assert Path(base) == (tmp_path / "hf-base").resolve()
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "peft")
    with torch.no_grad():
        want = ours(IDS)
        torch.testing.assert_close(hf.eval()(IDS).logits, want, atol=1e-5, rtol=1e-5)
    assert main(["import-hf", str(tmp_path / "peft"), str(tmp_path / "back")]) == 0
    assert "LoRA adapter on" in capsys.readouterr().out
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "back")(IDS), want, atol=1e-5, rtol=1e-5)


def test_an_adapter_exported_against_another_base_is_refused(lora_run, tmp_path, capsys):
    assert main(["export-hf", str(lora_run), str(tmp_path / "peft"), "--adapter"]) == 0
    other = tmp_path / "other-base"
    shutil.copytree(tmp_path / "hf-base", other)
    from safetensors.torch import load_file, save_file

    sd = {k: v * 1.01 for k, v in load_file(other / "model.safetensors").items()}
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    assert (
        main(["import-hf", str(tmp_path / "peft"), str(tmp_path / "x"), "--base", str(other)]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exported against a base whose weights hash" in err


def test_export_adapter_of_a_run_without_lora_is_one_line(finished_run, tmp_path, capsys):
    assert main(["export-hf", str(finished_run), str(tmp_path / "a"), "--adapter"]) == 2
    assert "is not a LoRA fine-tuning run" in capsys.readouterr().err


def test_r8_checkpoint_is_under_5_percent_of_the_base(ft_recipe, ft_args, finished_run, tmp_path):
    """A base wide enough that adapters are small beside it (d 512): checkpoint dir vs base
    weights, optimizer state and tokenizer included."""
    cfg = ModelConfig(
        preset="tiny-llama",
        n_layer=2,
        d_model=512,
        n_head=8,
        n_kv_head=2,
        d_ff=1536,
        vocab_size=320,
        max_seq_len=32,
    )
    tok = list_checkpoints(finished_run)[-1] / "tokenizer"
    base = save_model_checkpoint(
        tmp_path / "wide", build_model(cfg), RecipeConfig(model=cfg).model_dump(mode="json"), tok
    )
    args = ft_args(
        f"--train.init_from={base}",
        "--train.max_steps=2",
        "--lora.r=8",
        "--lora.alpha=16",
        "--lora.targets=q_proj,v_proj",
        "--train.eval_interval=0",
    )
    assert main(["train", str(ft_recipe), *args]) == 0
    ckpt = list_checkpoints(tmp_path / "ft")[-1]
    share = dir_bytes(ckpt) / (base / "model.safetensors").stat().st_size
    assert share < 0.05, share


def test_count_of_a_lora_recipe_reports_the_adapters_as_trainable(ft_recipe, ft_args, capsys):
    """r·(in + out) per adapted linear, by hand: the tiny base (2 layers, d 32, 4 heads /
    2 kv heads of 8, d_ff 64), r = 4 on every linear but the LM head."""
    recipe = ft_recipe.parent / "lora.yaml"
    overrides = dict(a.removeprefix("--").split("=", 1) for a in ft_args())
    lines = [
        "recipe: finetune",
        f"train: {{init_from: {overrides['train.init_from']}}}",
        "lora: {r: 4, targets: all-linear}",
    ]
    recipe.write_text("\n".join(lines) + "\n")
    assert main(["count", str(recipe), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    C, Q, KV, F = 32, 32, 16, 64  # d_model, q out, k/v out, d_ff
    per_layer = 4 * ((C + Q) + 2 * (C + KV) + (Q + C) + 2 * (C + F) + (F + C))
    assert got["params_trainable"] == 2 * per_layer
