"""A DYNAMO model's export (tasks/dynamo/export.py): the encoder as a transformers directory,
one PEFT LoRA directory per task, heads + router beside them; and the way back.

- Parity, on a tiny DynamoModel built here (random encoder weights with noise, random nonzero
  A and B for every adapter, BERT with a pooler and RoBERTa): `BertModel`/`RobertaModel` from
  OUT/encoder + `PeftModel.from_pretrained(OUT/adapters/<task>)` gives our encoder's last hidden
  states with one-hot gates on that task; PEFT's `add_weighted_adapter(..., "cat", [1]*K)` our
  all-ones gates (`merged` routing). Tolerance (float32, CPU): atol = rtol = 1e-5.
- Round trip: export -> load into a fresh model (other adapters, heads, router) -> every tensor
  bit-equal; `load_dynamo_export` rebuilds the same state from the directory alone.
- Mismatched ranks, modules, tasks, scales or encoder: a one-line StokerError, model unchanged.
- End to end on a shortened tiny run: `stoker export-hf RUN OUT` prints one line per directory
  and the export is the run's final model; bad targets exit 2 with one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from stoker.cli import main  # noqa: E402
from stoker.config import EncoderConfig, LoRAConfig  # noqa: E402
from stoker.errors import StokerError  # noqa: E402
from stoker.models.dynamo import DynamoModel  # noqa: E402
from stoker.models.encoder import build_encoder  # noqa: E402
from stoker.tasks.dynamo.export import (  # noqa: E402
    export_dynamo,
    final_model,
    load_dynamo_adapters,
    load_dynamo_export,
)

TOL = dict(atol=1e-5, rtol=1e-5)
V, T, B = 99, 12, 3
TASKS = [("sentiment", "classify", 3), ("qa", "qa", 2), ("summary", "seq2seq", 2)]
ROOT = Path(__file__).parents[3]
TINY = ROOT / "recipes" / "dynamo" / "tiny.yaml"


def noise(model: torch.nn.Module, seed: int, only: tuple[str, ...] | None = None) -> None:
    """Noise on the parameters (all, or those whose name has one of `only`'s substrings)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is not None and not any(s in name for s in only):
                continue
            n = torch.randn(p.shape, generator=g) * 0.2
            p.copy_(1.0 + n if name.endswith(("LayerNorm.weight", "layernorm.weight")) else n)


def make_model(arch: str = "bert", enc_seed: int = 0, seed: int = 1, tasks=TASKS,
               **lora) -> DynamoModel:  # fmt: skip
    """A tiny DynamoModel: encoder drawn from `enc_seed`, adapters/heads/router from `seed`."""
    kw = dict(pad_token_id=1, type_vocab_size=1) if arch == "roberta" else {"use_pooler": True}
    cfg = EncoderConfig(arch=arch, n_layer=2, n_head=4, d_model=32, d_ff=48, vocab_size=V,
                        max_seq_len=40, **kw)  # fmt: skip
    encoder = build_encoder(cfg)
    noise(encoder, enc_seed)
    lcfg = LoRAConfig(**({"r": 4, "alpha": 8.0, "targets": "all-linear"} | lora))
    model = DynamoModel(encoder, tasks, lcfg, router_hidden=16)
    noise(model, seed, only=("lora_", "heads.", "router."))  # nonzero B: a dropped one shows
    return model.eval()


def inputs(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, V, (B, T), generator=g)
    types = torch.zeros(B, T, dtype=torch.long)
    if arch == "bert":
        types[:, T // 2 :] = 1
    return {
        "input_ids": ids,
        "token_type_ids": types,
        "mask": torch.ones(B, T, T, dtype=torch.bool),
    }


def ours(model: DynamoModel, batch: dict, gates: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(last hidden states, pooled output or None) with `gates` (K,) on every row."""
    from stoker.models.lora_mixture import use_gates

    g = gates.expand(B, -1)
    with torch.no_grad():
        hidden = model.encode(batch, g)
        if model.encoder.pooler is None:
            return hidden, None
        with use_gates(model.encoder, g):
            return hidden, model.encoder.pool(hidden)


def hf_base(out: Path):
    return transformers.AutoModel.from_pretrained(out / "encoder", attn_implementation="eager")


def theirs(m, batch: dict) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        o = m(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
    return o.last_hidden_state, o.pooler_output


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, f"tensors differ: {bad[:5]}"


@pytest.fixture(scope="module", params=["bert", "roberta"])
def exported(request, tmp_path_factory) -> tuple[DynamoModel, Path, str]:
    arch = request.param
    model = make_model(arch)
    out = tmp_path_factory.mktemp(f"export-{arch}") / "out"
    written = export_dynamo(model, out)
    assert written == [out / "encoder", *(out / "adapters" / t[0] for t in TASKS), out]
    return model, out, arch


# ----------------------------------------------------------------------------------- parity
def test_peft_adapter_per_task_equals_one_hot_gates(exported):
    model, out, arch = exported
    batch = inputs(arch)
    for k, (name, _, _) in enumerate(TASKS):
        cfg = json.loads((out / "adapters" / name / "adapter_config.json").read_text())
        assert cfg["task_type"] == "FEATURE_EXTRACTION"
        assert "encoder.layer.0.attention.self.query" in cfg["target_modules"]
        assert Path(cfg["base_model_name_or_path"]) == (out / "encoder").resolve()
        pm = peft.PeftModel.from_pretrained(hf_base(out), out / "adapters" / name).eval()
        assert isinstance(pm, peft.PeftModelForFeatureExtraction)
        h, pooled = theirs(pm, batch)
        mine_h, mine_pooled = ours(model, batch, torch.eye(len(TASKS))[k])
        assert_close(h, mine_h, **TOL)
        if mine_pooled is not None:  # BERT here adapts its pooler too
            assert_close(pooled, mine_pooled, **TOL)
        # the adapter matters: without it the output differs
        base_h, _ = ours(model, batch, torch.zeros(len(TASKS)))
        assert (h - base_h).abs().max() > 1e-3


def test_peft_cat_of_all_adapters_equals_merged_gates(exported):
    model, out, arch = exported
    batch = inputs(arch)
    names = [t[0] for t in TASKS]
    pm = peft.PeftModel.from_pretrained(hf_base(out), out / "adapters" / names[0],
                                        adapter_name=names[0])  # fmt: skip
    for name in names[1:]:
        pm.load_adapter(out / "adapters" / name, adapter_name=name)
    pm.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type="cat")
    pm.set_adapter("merged")
    h, _ = theirs(pm.eval(), batch)
    assert_close(h, ours(model, batch, torch.ones(len(names)))[0], **TOL)


def test_rslora_scales_match_peft(tmp_path):
    model = make_model("bert", rslora=True, r=2, alpha=3.0)
    export_dynamo(model, tmp_path / "out")
    batch = inputs("bert")
    pm = peft.PeftModel.from_pretrained(hf_base(tmp_path / "out"), tmp_path / "out/adapters/qa")
    assert_close(theirs(pm.eval(), batch)[0], ours(model, batch, torch.eye(3)[1])[0], **TOL)


# ------------------------------------------------------------------------------- round trip
def test_round_trip_into_a_fresh_model_is_bit_equal(exported):
    model, out, arch = exported
    fresh = make_model(arch, seed=99)  # same encoder, other adapters, heads and router
    assert not torch.equal(fresh.router.net[0].weight, model.router.net[0].weight)
    load_dynamo_adapters(fresh, out)
    assert_same_state(state(fresh), state(model))


def test_adapters_alone_leave_heads_and_router(exported):
    model, out, arch = exported
    fresh = make_model(arch, seed=99)
    before = state(fresh)
    load_dynamo_adapters(fresh, out, heads=False)
    after = state(fresh)
    for k in after:
        same = torch.equal(after[k], before[k])
        assert same == (not k.endswith((".lora_A", ".lora_B"))), k
        if not same:
            assert torch.equal(after[k], model.state_dict()[k])


def test_export_directory_alone_rebuilds_the_model(exported):
    model, out, _ = exported
    rebuilt = load_dynamo_export(out)
    assert_same_state(state(rebuilt), state(model))
    assert rebuilt.task_names == model.task_names and rebuilt.kinds == model.kinds


def test_export_replaces_an_earlier_export_and_keeps_other_dirs(tmp_path):
    model = make_model("bert")
    export_dynamo(model, tmp_path / "out")
    (tmp_path / "out" / "adapters" / "stale").mkdir()
    export_dynamo(model, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "adapters").iterdir()) == sorted(
        t[0] for t in TASKS
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StokerError, match="not an earlier DYNAMO export"):
        export_dynamo(model, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------- errors
def refused(model: DynamoModel, out: Path, match: str) -> None:
    before = state(model)
    with pytest.raises(StokerError, match=match) as e:
        load_dynamo_adapters(model, out)
    assert "\n" not in str(e.value)
    assert_same_state(state(model), before)  # nothing changed


@pytest.fixture(scope="module")
def bert_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bert-export") / "out"
    export_dynamo(make_model("bert"), out)
    return out


def test_mismatched_rank_is_refused(bert_export):
    refused(make_model("bert", r=2), bert_export, "rank 4 .* rank 2")


def test_mismatched_modules_are_refused(bert_export):
    refused(make_model("bert", targets=["q_proj", "v_proj"]), bert_export,
            "names no adapted module")  # fmt: skip
    small = bert_export.parent / "small"
    export_dynamo(make_model("bert", targets=["q_proj", "v_proj"]), small)
    refused(make_model("bert"), small, "has no adapter for module")


def test_mismatched_tasks_are_refused(bert_export):
    renamed = [("sentiment", "classify", 3), ("squad", "qa", 2), ("summary", "seq2seq", 2)]
    refused(make_model("bert", tasks=renamed), bert_export, "holds adapters for tasks")
    refused(make_model("bert", tasks=TASKS[:2]), bert_export, "holds adapters for tasks")
    labels = [("sentiment", "classify", 5), *TASKS[1:]]
    refused(make_model("bert", tasks=labels), bert_export, r"sentiment \(classify, 3 labels\)")


def test_other_scale_or_encoder_is_refused(bert_export):
    refused(make_model("bert", alpha=4.0), bert_export, "lora_alpha 8, use_rslora False")
    refused(make_model("bert", rslora=True), bert_export, "use_rslora False")
    refused(make_model("bert", enc_seed=5), bert_export, "exported with another encoder")


def test_damaged_export_is_refused(bert_export, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bert_export, bad)
    cfg_path = bad / "adapters" / "summary" / "adapter_config.json"  # the last adapter read
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(cfg | {"r": 2}))
    refused(make_model("bert", seed=99), bad, "summary: module .* has rank 2")
    cfg_path.write_text(json.dumps(cfg | {"use_dora": True}))
    refused(make_model("bert", seed=99), bad, "use_dora")
    (bad / "adapters" / "summary" / "adapter_model.safetensors").write_bytes(b"not tensors")
    cfg_path.write_text(json.dumps(cfg))
    refused(make_model("bert", seed=99), bad, "not a readable safetensors file")
    (bad / "dynamo.json").write_text("{")
    refused(make_model("bert", seed=99), bad, "not a readable JSON file")
    refused(make_model("bert"), tmp_path, "has no dynamo.json")


# ------------------------------------------------------------------------------ end to end
def short(data: Path, out: Path) -> list[str]:
    return [f"--data.dir={data}", f"--train.out_dir={out}", "--data.eval_examples=4",
            "--dynamo.phase1.max_steps=2", "--dynamo.phase1.eval_interval=2",
            "--dynamo.phase2.max_steps=2", "--dynamo.phase2.eval_interval=2",
            "--dynamo.phase3.max_steps=2", "--dynamo.phase3.eval_interval=2",
            "--dynamo.generation.max_new_tokens=2", "--train.batch_size=4",
            "--train.micro_batch_size=4", "--train.monitor_interval=0"]  # fmt: skip


@pytest.fixture(scope="module")
def run(dynamo_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dynamo-export-run") / "run"
    assert main(["train", str(TINY), *short(dynamo_data, out)]) == 0
    return out


@pytest.mark.slow
def test_export_hf_of_a_run_is_its_final_model(run, tmp_path, capsys):
    out = tmp_path / "hf"
    capsys.readouterr()
    assert main(["export-hf", str(run), str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    model, phase = final_model(run)
    assert phase == 3 and len(lines) == model.n_adapters + 2
    assert str(out / "encoder") in lines[0] and str(out / "adapters" / "qa") in lines[2]
    assert_same_state(state(load_dynamo_export(out)), state(model))
    k = model.task_names.index("qa")
    batch = inputs("bert") | {"input_ids": torch.randint(1000, 2000, (B, T))}
    pm = peft.PeftModel.from_pretrained(hf_base(out), out / "adapters" / "qa").eval()
    assert_close(theirs(pm, batch)[0], ours(model, batch, torch.eye(model.n_adapters)[k])[0],
                 **TOL)  # fmt: skip


@pytest.mark.slow
def test_export_hf_refusals_are_one_line_exit_2(run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    text = (run / "config.yaml").read_text()  # the same recipe, its out_dir here: no phases
    assert f"out_dir: {run}\n" in text
    (unfinished / "config.yaml").write_text(text.replace(f"out_dir: {run}\n",
                                                         f"out_dir: {unfinished}\n"))  # fmt: skip
    cases = [(run, taken, "not an earlier DYNAMO export"),
             (unfinished, tmp_path / "o1", "has no finished phase 2 or 3")]  # fmt: skip
    for src, dst, message in cases:
        capsys.readouterr()
        assert main(["export-hf", str(src), str(dst)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert (taken / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "o1").exists()
