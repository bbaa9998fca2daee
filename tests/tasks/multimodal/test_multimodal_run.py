"""The multimodal recipe end to end on the digits task (recipes/multimodal/digits.yaml,
shortened): the encoder stages, phase 1, the LM and phase 2 through the one loop; frozen
encoders bitwise unchanged by phase 1 (BatchNorm statistics too); checkpoints that hold the
trainable tensors only; exact resume of killed phases 1 and 2; skip/retrain bookkeeping;
one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.train.test_loop import sigterm_at

from stoker.cli import main
from stoker.train import loop

ROOT = Path(__file__).parents[3]
RECIPE = ROOT / "recipes" / "multimodal" / "digits.yaml"


def short(data: Path, out: Path) -> list[str]:
    return [f"--data.dir={data}", f"--train.out_dir={out}",
            "--multimodal.image.pretrain_steps=30", "--multimodal.audio.pretrain_steps=40",
            "--multimodal.aligner.max_steps=40", "--multimodal.aligner.eval_interval=20",
            "--multimodal.lm.pretrain_steps=40", "--multimodal.phase2.max_steps=12",
            "--multimodal.phase2.eval_interval=12", "--data.eval_examples=40",
            "--train.batch_size=32", "--train.micro_batch_size=16",
            "--train.monitor_interval=0"]  # fmt: skip


@pytest.fixture(scope="module")
def run(digits_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("mm") / "run"
    args = short(digits_data, out)
    assert main(["train", str(RECIPE), *args]) == 0
    return {"out": out, "args": args, "data": digits_data}


def last_ckpt(stage_dir: Path) -> Path:
    return sorted((stage_dir / "checkpoints").iterdir())[-1]


def evals(stage_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "val_loss" in r and "step" in r]


def test_encoders_learn_their_labels_and_the_aligner_retrieves(run):
    for stage in ("encoder-image", "encoder-audio", "phase1", "lm", "phase2"):
        assert json.loads((run["out"] / stage / "stage.json").read_text())["done"], stage
    # far above chance (10%) on held-out images and unseen voices, even this short
    assert evals(run["out"] / "encoder-image")[-1]["accuracy"] > 50
    assert evals(run["out"] / "encoder-audio")[-1]["accuracy"] > 30
    last = evals(run["out"] / "phase1")[-1]
    assert last["retrieval"] == min(last["image_to_audio"], last["audio_to_image"]) > 20


def test_phase1_checkpoint_holds_the_aligner_only_and_encoders_stay_frozen(run):
    from stoker.config import load_config
    from stoker.tasks.multimodal.task import MultimodalTask, tensors_hash

    tensors = load_file(str(last_ckpt(run["out"] / "phase1") / "model.safetensors"))
    assert tensors and all(k.startswith("aligner.") for k in tensors), sorted(tensors)[:5]
    meta = json.loads((last_ckpt(run["out"] / "phase1") / "stoker.json").read_text())
    for m in ("image", "audio"):
        enc = load_file(str(last_ckpt(run["out"] / f"encoder-{m}") / "model.safetensors"))
        assert any(k.endswith("running_mean") for k in enc)  # BatchNorm statistics are saved
    cfg = load_config(str(run["out"] / "phase1" / "config.yaml"))
    model = MultimodalTask.load_trained(cfg, last_ckpt(run["out"] / "phase1"), torch.device("cpu"))
    for m, enc in model.encoders.items():
        saved = load_file(str(last_ckpt(run["out"] / f"encoder-{m}") / "model.safetensors"))
        now = enc.state_dict()
        assert all(torch.equal(now[k], saved[k]) for k in saved), m  # bitwise, after phase 1
        assert meta["frozen"][f"encoder:{m}"] == tensors_hash(enc)


def test_rerun_skips_and_a_changed_encoder_retrains_what_depends_on_it(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    args = [a for a in run["args"] if not a.startswith("--train.out_dir")]
    assert main(["train", str(RECIPE), *args, f"--train.out_dir={out}"]) == 0
    assert capsys.readouterr().out.count("skipped") == 5
    args += ["--multimodal.audio.pretrain_steps=41"]
    assert main(["train", str(RECIPE), *args, f"--train.out_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "encoder:image: finished earlier with the same config and data; skipped" in printed
    assert "lm: finished earlier with the same config and data; skipped" in printed
    for stage in ("encoder:audio", "phase1", "phase2"):
        assert f"{stage}: its config, data or an earlier stage changed" in printed, stage


@pytest.mark.parametrize("stage, stop", [("phase1", 15), ("phase2", 5)])
def test_a_killed_phase_resumes_exactly(run, tmp_path, monkeypatch, stage, stop):
    def again(out: Path, stop: int | None) -> dict[str, torch.Tensor]:
        shutil.copytree(run["out"], out)
        shutil.rmtree(out / stage)
        if stage == "phase1":
            shutil.rmtree(out / "phase2")
        args = [a for a in run["args"] if not a.startswith("--train.out_dir")]
        args += [f"--train.out_dir={out}", "--train.save_interval=4"]
        if stop is not None:
            with monkeypatch.context() as m:
                m.setattr(loop, "lr_at", sigterm_at(stop, loop.lr_at))
                assert main(["train", str(RECIPE), *args]) == 0
            assert not json.loads((out / stage / "stage.json").read_text())["done"]
        assert main(["train", str(RECIPE), *args]) == 0
        assert json.loads((out / stage / "stage.json").read_text())["done"]
        return load_file(str(last_ckpt(out / stage) / "model.safetensors"))

    straight = again(tmp_path / "straight", None)
    resumed = again(tmp_path / "killed", stop)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_phase2_checkpoint_holds_no_frozen_tensor_and_reads_the_projected_tokens(run):
    tensors = load_file(str(last_ckpt(run["out"] / "phase2") / "model.safetensors"))
    kinds = {k.split(".")[0] for k in tensors}
    assert kinds == {"projectors", "missing", "lm"}, kinds
    assert all(k.endswith((".lora_A", ".lora_B")) for k in tensors if k.startswith("lm."))
    size = (last_ckpt(run["out"] / "phase2") / "model.safetensors").stat().st_size
    lm_size = (last_ckpt(run["out"] / "lm") / "model.safetensors").stat().st_size
    assert size < lm_size / 2  # no copy of the frozen LM, encoders or aligner
    meta = json.loads((last_ckpt(run["out"] / "phase2") / "stoker.json").read_text())
    assert set(meta["frozen"]) == {"encoder:image", "encoder:audio", "aligner", "lm"}
    row = evals(run["out"] / "phase2")[-1]
    for key in (
        "exact_match",
        "em_image",
        "em_audio",
        "em_same",
        "em_sum",
        "em_image_without_image",
        "em_audio_without_audio",
    ):
        assert 0 <= row[key] <= 100, key


# ------------------------------------------------------------------------------ bad input
def fails(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("stoker: error:"), lines
    return lines[0]


def test_bad_files_are_one_line_errors_naming_the_file(run, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(run["data"], data)
    args = short(data, tmp_path / "x")
    (data / "audio.jsonl").unlink()
    assert "audio.jsonl" in fails(["train", str(RECIPE), *args], capsys)
    shutil.copy(run["data"] / "audio.jsonl", data / "audio.jsonl")
    first = json.loads((data / "images.jsonl").read_text().splitlines()[0])["path"]
    (data / first).write_bytes(b"not a png")
    assert f"cannot read the image {data / first}" in fails(["train", str(RECIPE), *args], capsys)
    shutil.copy(run["data"] / first, data / first)
    err = fails(["train", str(RECIPE), *args, "--data.sample_rate=16000"], capsys)
    assert "sampled at 22050 Hz, data.sample_rate is 16000" in err
    err = fails(["train", str(RECIPE), *args, "--multimodal.phases=[2]"], capsys)
    assert "phase 2 needs the result of encoder:image" in err and "holds no finished run" in err
    err = fails(["train", str(RECIPE), *args, "--multimodal.image.kind=audio_cnn"], capsys)
    assert "multimodal.image.kind=audio_cnn" in err
    assert "not a stage" in fails(["train", str(RECIPE), *args, "--multimodal.stage=phase3"],
                                  capsys)  # fmt: skip
    lines = (data / "chat-train.jsonl").read_text().splitlines()
    bad = json.loads(lines[0])
    bad.pop("image", None), bad.pop("audio", None)
    (data / "chat-train.jsonl").write_text("\n".join([json.dumps(bad), *lines[1:]]) + "\n")
    err = fails(["train", str(RECIPE), *args], capsys)
    assert "chat-train.jsonl line 1: the user turn has <" in err and "but the sample has no" in err


def test_eval_reproduces_each_stages_last_evaluation(run, capsys):
    assert main(["eval", str(run["out"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["encoder:image", "encoder:audio", "phase1", "lm", "phase2"]
    for stage, metrics in result.items():
        logged = evals(run["out"] / stage.replace(":", "-"))[-1]
        for k, v in metrics.items():
            assert v == pytest.approx(logged[k], abs=1e-6), (stage, k)


def test_export_writes_self_describing_files_that_rebuild_the_models(run, tmp_path, capsys):
    from stoker.config import load_config
    from stoker.models.multimodal import load_module
    from stoker.tasks.multimodal.task import MultimodalTask

    out = tmp_path / "export"
    assert main(["export-hf", str(run["out"]), str(out)]) == 0
    cfg = load_config(str(run["out"] / "phase1" / "config.yaml"))
    trained = MultimodalTask.load_trained(cfg, last_ckpt(run["out"] / "phase1"),
                                          torch.device("cpu"))  # fmt: skip
    aligner, about = load_module(out / "aligner.safetensors")
    assert about["encoders"] == {"image": "image_cnn", "audio": "audio_cnn"}
    x = {"image": torch.rand(3, 1, 8, 8), "audio": torch.randn(3, 22050) * 0.1}
    with torch.no_grad():
        want = trained(x)
        feats = {}
        for m in ("image", "audio"):
            enc, _ = load_module(out / f"encoder-{m}.safetensors")
            feats[m] = enc.features(x[m])
        got = aligner(feats)
    for m in want:
        torch.testing.assert_close(got[m], want[m], atol=0, rtol=0)
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    from stoker.errors import StokerError

    with pytest.raises(StokerError, match="cannot read"):
        load_module(tmp_path / "bad.safetensors")
