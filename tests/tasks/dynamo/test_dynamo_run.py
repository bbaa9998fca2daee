"""DYNAMO end to end on the real offline data (recipes/dynamo/tiny.yaml, shortened): phases
1 -> 2 -> 3 through the one loop, the stage bookkeeping (skip when unchanged, retrain what
changed, exact resume of an interrupted phase), the invariants the trained run must keep, the
evaluation table, `stoker predict`, and the one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tests.train.test_loop import sigterm_at

from stoker.cli import main
from stoker.train import loop

ROOT = Path(__file__).parents[3]
TINY = ROOT / "recipes" / "dynamo" / "tiny.yaml"
NAMES = ["sentiment", "qa", "summarization", "translation", "code"]


def short(data: Path, out: Path) -> list[str]:
    return [f"--data.dir={data}", f"--train.out_dir={out}", "--data.eval_examples=8",
            "--dynamo.phase1.max_steps=6", "--dynamo.phase1.eval_interval=6",
            "--dynamo.phase2.max_steps=6", "--dynamo.phase2.eval_interval=6",
            "--dynamo.phase3.max_steps=4", "--dynamo.phase3.eval_interval=4",
            "--dynamo.generation.max_new_tokens=4", "--train.batch_size=8",
            "--train.micro_batch_size=4", "--train.monitor_interval=0"]  # fmt: skip


@pytest.fixture(scope="module")
def run(dynamo_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dynamo") / "run"
    args = short(dynamo_data, out)
    assert main(["train", str(TINY), *args]) == 0
    return {"out": out, "args": args, "data": dynamo_data}


def markers(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/stage.json")}


def ckpt_tensors(stage_dir: Path) -> dict[str, torch.Tensor]:
    (ckpt,) = sorted((stage_dir / "checkpoints").iterdir())[-1:]
    return load_file(str(ckpt / "model.safetensors"))


def test_every_phase_finished_in_its_own_directory(run):
    found = markers(run["out"])
    assert set(found) == {f"phase1-{n}" for n in NAMES} | {"phase2", "phase3"}
    assert all(m["done"] for m in found.values())
    assert (run["out"] / "config.yaml").is_file()


def test_phase1_trains_only_its_own_adapter_slice_and_head(run):
    from stoker.config import load_config
    from stoker.models.lora_mixture import mixture_layers
    from stoker.tasks.dynamo.data import build_dynamo

    cfg = load_config(str(TINY), run["args"])
    init = build_dynamo(cfg)
    for k, name in enumerate(NAMES):
        saved = ckpt_tensors(run["out"] / f"phase1-{name}")
        assert {n.split(".")[1] for n in saved if n.startswith("heads.")} == {name}
        moved = 0
        for lname, layer in mixture_layers(init).items():
            for j in range(len(NAMES)):
                rows = slice(sum(layer.ranks[:j]), sum(layer.ranks[: j + 1]))
                a = saved[f"{lname}.lora_A"][rows]
                b = saved[f"{lname}.lora_B"][:, rows]
                if j != k:  # other adapters: bitwise as drawn (zero gradient, no decay)
                    assert torch.equal(a, layer.lora_A[rows]) and torch.equal(
                        b, layer.lora_B[:, rows]
                    )
                else:
                    moved += int(b.abs().sum() > 0)
        assert moved == len(mixture_layers(init)), f"adapter {name}: some lora_B stayed zero"


def test_every_adapter_changes_its_tasks_outputs_and_one_hot_is_phase1(run):
    from stoker.tasks.dynamo.cli import open_run

    model, task = open_run(run["out"], "cpu", "val")
    for k in task.task_indices:
        from stoker.tasks.dynamo.batches import eval_batches

        b = next(eval_batches(task.val[k].val_features, 4, task.tokenizer.pad_id))
        with torch.no_grad():
            one = model(b, gates=F.one_hot(b["task"], 5).float())["outputs"][k]
            zero = model(b, gates=torch.zeros(len(b["task"]), 5))["outputs"][k]
        key = "start" if "start" in one else "logits"
        assert not torch.allclose(one[key], zero[key]), NAMES[k]


def test_rerun_skips_every_finished_phase(run, capsys):
    before = {n: m["fingerprint"] for n, m in markers(run["out"]).items()}
    mtimes = {p: p.stat().st_mtime_ns for p in run["out"].glob("*/checkpoints/*/stoker.json")}
    assert main(["train", str(TINY), *run["args"]]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 7, printed
    assert {n: m["fingerprint"] for n, m in markers(run["out"]).items()} == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_a_pretrained_encoders_stages_agree_on_their_fingerprints(dynamo_data, tmp_path):
    """With `train.init_from`, each stage's task reads the `encoder` section from the
    checkpoint; the fingerprints it checks earlier stages by must be those they were saved
    with (the recipe's, planned before that), or phase 2 refuses a fresh phase 1."""
    from stoker.config_load import load_config
    from stoker.tasks.dynamo.data import resolve_encoder
    from stoker.tasks.dynamo.stages import fingerprints, plan

    cfg = load_config(ROOT / "recipes" / "dynamo" / "minilm.yaml",
                      [f"--data.dir={dynamo_data}", f"--train.out_dir={tmp_path}"])  # fmt: skip
    assert resolve_encoder(cfg).encoder != cfg.encoder  # the case this guards
    planned = fingerprints(cfg)
    for stage in plan(cfg):
        assert stage.fingerprint == planned[stage.name]
        assert fingerprints(resolve_encoder(stage.cfg)) == planned, stage.name


def test_changing_one_task_retrains_that_task_and_the_later_phases_only(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    recipe = tmp_path / "r.yaml"
    text = TINY.read_text().replace("file: sentiment.jsonl, max_examples: 2000",
                                    "file: sentiment.jsonl, max_examples: 1500")  # fmt: skip
    assert text != TINY.read_text()
    recipe.write_text(text)
    args = [a for a in run["args"] if not a.startswith("--train.out_dir")]
    assert main(["train", str(recipe), *args, f"--train.out_dir={out}"]) == 0
    printed = capsys.readouterr().out
    for name in NAMES[1:]:
        assert f"phase1:{name}: finished earlier with the same config and data; skipped" in printed
    for stage in ("phase1:sentiment", "phase2", "phase3"):
        assert f"{stage}: its config, data or an earlier stage changed" in printed, stage


def test_killed_phase2_resumes_exactly(run, tmp_path, monkeypatch):
    def phase2_again(out: Path, stop: int | None) -> dict[str, torch.Tensor]:
        shutil.copytree(run["out"], out)
        shutil.rmtree(out / "phase2")
        shutil.rmtree(out / "phase3")
        args = [a for a in run["args"] if not a.startswith("--train.out_dir")]
        args += [f"--train.out_dir={out}", "--phase=2", "--train.save_interval=2"]
        if stop is not None:
            with monkeypatch.context() as m:
                m.setattr(loop, "lr_at", sigterm_at(stop, loop.lr_at))
                assert main(["train", str(TINY), *args]) == 0
            assert not json.loads((out / "phase2" / "stage.json").read_text())["done"]
        assert main(["train", str(TINY), *args]) == 0
        assert json.loads((out / "phase2" / "stage.json").read_text())["done"]
        return ckpt_tensors(out / "phase2")

    straight = phase2_again(tmp_path / "straight", None)
    resumed = phase2_again(tmp_path / "killed", 3)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_eval_prints_every_task_under_every_routing(run, capsys):
    assert main(["eval", str(run["out"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["tasks"]) == set(NAMES)
    for name, modes in result["tasks"].items():
        assert set(modes) == {"oracle", "soft", "top1", "uniform", "merged", "random", "zero"}
        assert result["metric"][name] in modes["oracle"]
    assert 0 <= result["routing_accuracy"] <= 100
    assert sum(map(sum, result["confusion"])) == 5 * 8
    # qa's extra_eval file: every one of its real SQuAD-style records, scored apart
    real = result["extra"]["qa/qa_real"]
    lines = (run["data"] / "qa_real.jsonl").read_text().splitlines()
    assert real["records"] == len(lines) >= 20
    assert result["metric"]["qa/qa_real"] == "f1" and 0 <= real["oracle"]["f1"] <= 100
    assert main(["eval", str(run["out"])]) == 0
    printed = capsys.readouterr().out
    assert "routing accuracy" in printed
    assert f"({len(lines)} records)" in printed.splitlines()[1 + len(NAMES)]


def test_predict_routes_raw_text(run, capsys):
    assert main(["predict", str(run["out"]), "--text", "a wonderful little film", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] in NAMES
    assert sum(result["gates"].values()) == pytest.approx(1.0, abs=1e-3)
    assert main(["predict", str(run["out"]), "--text", "Who wrote it?", "--context",
                 "The book was written by Jane Austen in 1811."]) == 0  # fmt: skip
    assert "task:" in capsys.readouterr().out


# ------------------------------------------------------------------------------ bad input
def fails(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()  # notes (e.g. left-out records), then the error
    errors = [line for line in lines if line.startswith("stoker: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert all(line.startswith("stoker: ") for line in lines), lines
    return errors[0]


def test_bad_input_is_one_line(run, tmp_path, capsys):
    args = short(run["data"], tmp_path / "x")
    assert "no data at" in fails(["train", str(TINY), *args, f"--data.dir={tmp_path}"], capsys)
    assert "n_adapters=3" in fails(["train", str(TINY), *args, "--dynamo.router.n_adapters=3"],
                                   capsys)  # fmt: skip
    assert "not a stage" in fails(["train", str(TINY), *args, "--dynamo.stage=phase1:nope"],
                                  capsys)  # fmt: skip
    err = fails(["train", str(TINY), *args, "--phase=2"], capsys)
    assert "needs the result of phase1:sentiment" in err
    recipe = tmp_path / "labels.yaml"
    recipe.write_text(TINY.read_text().replace("kind: classify,", "kind: classify, n_labels: 1,"))
    assert "outside 0..0" in fails(["train", str(recipe), *args], capsys)
    assert "not a DYNAMO run" in fails(["predict", str(tmp_path), "--text", "x"], capsys)


def test_qa_answers_not_in_their_context_are_left_out(run, tmp_path, capsys):
    from stoker.config import load_config
    from stoker.tasks.dynamo.data import read_records

    lines = (run["data"] / "qa.jsonl").read_text().splitlines()[:50]
    bad = json.loads(lines[0])
    bad["answers"][0]["answer_start"] += 3
    (tmp_path / "qa.jsonl").write_text("\n".join([json.dumps(bad), *lines[1:]]) + "\n")
    cfg = load_config(str(TINY), [f"--data.dir={tmp_path}"])
    records = read_records(cfg, cfg.dynamo.tasks[1])
    assert len(records) == 49
    assert "left out 1 unusable record(s)" in capsys.readouterr().err
