"""Fine-tuning on the one loop: start from a run's weights, LoRA on a frozen base (checkpoints
hold the adapters, the base is checked by hash), full fine-tuning, exact resume, and the
step's loss normalised by the whole step's target count."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.tasks.conftest import losses
from tests.train.test_loop import sigterm_at

from stoker.api import load_model
from stoker.cli import main
from stoker.config import load_config
from stoker.models.gpt import lm_loss
from stoker.tasks import make_task
from stoker.train import loop
from stoker.train.checkpoint import list_checkpoints, read_meta
from stoker.train.loop import train


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def grad_norms(out: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in rows(out) if "grad_norm" in r}


def first_batch_loss(cfg, model) -> float:
    """The source model's loss on the run's first training batch, computed here."""
    task = make_task(cfg)
    task.open_data()
    batch = task.train_data.batch(0)
    with torch.no_grad():
        if cfg.recipe == "pretrain":
            return float(lm_loss(model(batch[0]), batch[1]))
        return float(lm_loss(model(batch.input_ids), batch.labels))


@pytest.mark.parametrize("recipe", ["finetune", "pretrain"])
def test_init_from_first_step_loss_equals_the_source_on_that_batch(
    recipe, ft_args, finished_run, data_dir, tmp_path
):
    """Full fine-tuning and continued pretraining start from the source's exact weights."""
    if recipe == "finetune":
        args = ft_args("--train.max_steps=1", lora=False)
    else:
        args = [
            f"--train.init_from={finished_run}",
            f"--data.dir={data_dir}",
            f"--train.out_dir={tmp_path / 'cont'}",
            "--train.max_steps=1",
            "--train.batch_size=8",
            "--train.micro_batch_size=4",
            "--train.precision=fp32",
            "--train.eval_interval=0",
        ]
    cfg = load_config(None, [f"--recipe={recipe}", *args])
    train(cfg)
    out = Path(cfg.train.out_dir)
    want = first_batch_loss(make_task(cfg).cfg, load_model(finished_run))
    assert losses(out)[1] == pytest.approx(want, abs=1e-5)
    saved = load_config(out / "config.yaml")  # the source's architecture, resolved
    assert saved.model.model_dump() == load_model(finished_run).config.model_dump()


def test_lora_run_trains_adapters_only_and_saves_them_alone(ft_args, finished_run, tmp_path):
    cfg = load_config(None, ["--recipe=finetune", *ft_args("--train.max_steps=20")])
    train(cfg)
    out = Path(cfg.train.out_dir)
    base = load_model(finished_run).state_dict()
    tuned = load_model(out)
    sd = tuned.state_dict()
    adapters = [k for k in sd if ".lora_" in k]
    assert adapters and all(torch.equal(sd[k], base[k]) for k in base)  # frozen: bitwise
    assert all(sd[k].abs().sum() > 0 for k in adapters if k.endswith("lora_B"))
    start = make_task(cfg).build_model(torch.device("cpu"), None).state_dict()
    assert all(not torch.equal(sd[k], start[k]) for k in adapters)  # every adapter moved
    ckpt = list_checkpoints(out)[-1]
    assert set(load_file(ckpt / "model.safetensors")) == set(adapters)
    assert read_meta(ckpt)["base"]["path"] == str(list_checkpoints(finished_run)[-1].resolve())
    # eval: the supervised loss on the held-out samples
    assert main(["eval", str(out), "--json"]) == 0


def test_lora_step_zero_equals_base_and_merged_export_equals_unmerged(
    ft_args, finished_run, tmp_path
):
    cfg = load_config(None, ["--recipe=finetune", *ft_args("--train.max_steps=4")])
    task = make_task(cfg)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(
            task.build_model(torch.device("cpu"), None).eval()(ids), load_model(finished_run)(ids)
        )
    train(cfg)
    out = Path(cfg.train.out_dir)
    assert main(["export-hf", str(out), str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(tmp_path / "merged")(ids), load_model(out)(ids), atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_finetune_resumes_bitwise_after_sigterm(lora, ft_args, tmp_path, monkeypatch, capsys):
    straight = ft_args(out=tmp_path / "straight", lora=lora)
    train(load_config(None, ["--recipe=finetune", *straight]))
    split = ft_args(out=tmp_path / "split", lora=lora)
    with monkeypatch.context() as m:
        m.setattr(loop, "lr_at", sigterm_at(5, loop.lr_at))
        first = train(load_config(None, ["--recipe=finetune", *split]))
    assert first["stopped"] == "stopped by signal at step 5"
    capsys.readouterr()
    train(load_config(None, ["--recipe=finetune", *split]))
    assert "resuming from step 5 " in capsys.readouterr().out
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    a, b = (
        load_model(tmp_path / "straight").state_dict(),
        load_model(tmp_path / "split").state_dict(),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_step_loss_is_normalised_by_the_whole_steps_target_count(ft_args, tmp_path):
    """Samples with very different numbers of targets: 4 micro-batches of 2 give the same
    loss and gradients as one of 8 (a mean of per-micro-batch means would not)."""
    one = ft_args("--train.max_steps=2", "--train.eval_interval=0", out=tmp_path / "one")
    four = ft_args(
        "--train.max_steps=2",
        "--train.eval_interval=0",
        "--train.micro_batch_size=2",
        out=tmp_path / "four",
    )
    train(load_config(None, ["--recipe=finetune", *one]))
    train(load_config(None, ["--recipe=finetune", *four]))
    for step in (1, 2):
        assert losses(tmp_path / "four")[step] == pytest.approx(
            losses(tmp_path / "one")[step], rel=1e-5
        )
        assert grad_norms(tmp_path / "four")[step] == pytest.approx(
            grad_norms(tmp_path / "one")[step], rel=1e-5
        )
    # the same micro-batches averaged per micro-batch give another loss: the test can fail
    cfg = load_config(None, ["--recipe=finetune", *four])
    task = make_task(cfg)
    task.open_data()
    model = task.build_model(torch.device("cpu"), None)
    parts = [task.train_data.batch(0, 0, 1, m, 4) for m in range(4)]
    assert len({p.n_targets for p in parts}) > 1
    with torch.no_grad():
        mean_of_means = sum(float(lm_loss(model(p.input_ids), p.labels)) for p in parts) / 4
    assert abs(mean_of_means - losses(tmp_path / "four")[1]) > 1e-3


def test_packed_rows_give_each_sample_its_own_loss(ft_args, tmp_path):
    """Packing (document mask + position resets) evaluates exactly like one sample per row."""
    metrics = {}
    for mode in ("pack", "pad", "bucket"):
        cfg = load_config(None, ["--recipe=finetune", *ft_args(f"--data.batching={mode}")])
        task = make_task(cfg)
        task.prepare()
        task.open_data()
        torch.manual_seed(0)
        model = task.build_model(torch.device("cpu"), None)
        with torch.no_grad():  # non-zero adapters, so the check covers them too
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.1)
        metrics[mode] = task.evaluate(model, None, torch.autocast("cpu", enabled=False))
    for mode in ("pack", "bucket"):
        assert metrics[mode]["val_targets"] == metrics["pad"]["val_targets"]
        assert metrics[mode]["val_loss"] == pytest.approx(metrics["pad"]["val_loss"], rel=1e-5)


# ------------------------------------------------------------------------------ bad input
def one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_init_from_a_path_that_is_not_a_model_is_one_line(ft_recipe, ft_args, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    err = one_line_error(
        ["train", str(ft_recipe), *ft_args(f"--train.init_from={tmp_path}/notes")], capsys
    )
    assert "is not a model" in err
    err = one_line_error(
        ["train", str(ft_recipe), *ft_args(f"--train.init_from={tmp_path}/gone")], capsys
    )
    assert "does not exist" in err


def test_model_keys_that_contradict_init_from_are_one_line(ft_recipe, ft_args, capsys):
    err = one_line_error(["train", str(ft_recipe), *ft_args("--model.n_layer=7")], capsys)
    assert "model.n_layer=7" in err and "contradict train.init_from" in err


def test_lora_targets_matching_nothing_list_the_linear_layers(ft_recipe, ft_args, capsys):
    err = one_line_error(["train", str(ft_recipe), *ft_args("--lora.targets=qkv")], capsys)
    assert "q_proj" in err and "down_proj" in err


def test_a_changed_base_is_refused_by_eval_generate_export_and_resume(
    ft_recipe, ft_args, finished_run, tmp_path, capsys
):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(list_checkpoints(finished_run)[-1], base)
    args = ft_args(f"--train.init_from={base}", "--train.max_steps=2")
    assert main(["train", str(ft_recipe), *args]) == 0
    capsys.readouterr()
    out = tmp_path / "ft"
    other = load_file(base / "model.safetensors")
    other = {k: v + 1e-3 for k, v in other.items()}
    from stoker.train.checkpoint import save_model_checkpoint

    shutil.rmtree(base)
    save_model_checkpoint(
        base,
        other,
        read_meta(list_checkpoints(finished_run)[-1])["config"],
        list_checkpoints(finished_run)[-1] / "tokenizer",
    )
    for argv in (
        ["eval", str(out)],
        ["generate", str(out), "--prompt", "x"],
        ["export-hf", str(out), str(tmp_path / "x")],
        ["train", str(ft_recipe), *ft_args(f"--train.init_from={base}", "--train.max_steps=4")],
    ):
        err = one_line_error(argv, capsys)
        assert "restore the original base weights" in err, (argv, err)


def test_early_stopping_watches_any_metric_the_recipe_reports(ft_recipe, ft_args, capsys):
    args = ft_args(
        "--train.early_stopping_metric=val_perplexity",
        "--train.eval_interval=2",
        "--train.early_stopping_patience=1",
        "--optim.lr=0",
    )
    assert main(["train", str(ft_recipe), *args]) == 0  # lr 0: no improvement after eval 1
    assert "early stopping: val_perplexity has not improved for 1 evals" in capsys.readouterr().out
    err = one_line_error(
        ["train", str(ft_recipe), *ft_args("--train.early_stopping_metric=bleu")], capsys
    )
    assert "is not a metric of the finetune recipe; use one of val_loss, val_perplexity" in err


def test_prepare_of_a_finetune_recipe_tokenizes_once(ft_recipe, ft_args, tmp_path):
    args = ft_args(f"--data.dir={tmp_path / 'sft'}")
    assert main(["prepare", str(ft_recipe), *args]) == 0
    meta = tmp_path / "sft" / "meta.json"
    first = meta.stat().st_mtime_ns
    assert json.loads(meta.read_text())["format"] == "stoker-sft"
    assert main(["prepare", str(ft_recipe), *args]) == 0
    assert meta.stat().st_mtime_ns == first  # up to date: a no-op


def test_bf16_lora_run_keeps_the_frozen_base_in_bf16_with_the_autocast_losses(
    ft_args, tmp_path, monkeypatch
):
    """precision bf16 with a frozen base: the base's linears are stored in bf16 (what
    autocast casts them to), so the run's losses, evals and saved adapters equal a run that
    leaves them in fp32 for autocast to cast each step; eval rebuilds it."""
    from stoker.tasks.finetune import FinetuneTask

    runs, stored = ("bf16-base", "fp32-base"), {}
    keep = FinetuneTask.use_precision

    def spy(self, model, precision):
        keep(self, model, precision)
        stored["dtype"] = model.layers[0].self_attn.q_proj.weight.dtype

    fast = ft_args("--train.precision=bf16", out=tmp_path / "bf16-base")
    monkeypatch.setattr(FinetuneTask, "use_precision", spy)
    train(load_config(None, ["--recipe=finetune", *fast]))
    assert stored["dtype"] == torch.bfloat16
    monkeypatch.setattr(FinetuneTask, "use_precision", lambda self, model, precision: None)
    plain = ft_args("--train.precision=bf16", out=tmp_path / "fp32-base")
    train(load_config(None, ["--recipe=finetune", *plain]))
    assert losses(tmp_path / "bf16-base") == losses(tmp_path / "fp32-base")
    evals = [[r["val_loss"] for r in rows(tmp_path / d) if "val_loss" in r] for d in runs]
    assert evals[0] == evals[1] and len(evals[0]) == 2
    saved = [load_file(list_checkpoints(tmp_path / d)[-1] / "model.safetensors") for d in runs]
    assert saved[0].keys() == saved[1].keys()
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    assert main(["eval", str(tmp_path / "bf16-base"), "--json"]) == 0
