"""`stoker eval RUN` and `stoker predict RUN --text ...` for a DYNAMO run: the trained model of
its last finished phase (3, else 2), rebuilt from the stages' checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from stoker.errors import StokerError


def run_config(path: str | Path):
    """The recipe config of a DYNAMO run dir (its root), or None if `path` is not one."""
    from stoker.config import load_config

    p = Path(path) / "config.yaml"
    if not p.is_file():
        return None
    try:
        head = p.read_text()
    except OSError:
        return None
    if "recipe: dynamo" not in head:
        return None
    cfg = load_config(str(p), [])
    return cfg if cfg.dynamo.stage is None else None


def trained_model(path: str | Path, device: torch.device, phase: int | None = None):
    """(model, stage config, phase) of a DYNAMO run's last finished phase (3, else 2), or of
    `phase`; a one-line error when the run has none with its current config and data."""
    from stoker.tasks.dynamo import data as dd
    from stoker.tasks.dynamo.stages import fingerprints, finished_checkpoint
    from stoker.tasks.dynamo.task import DynamoTask

    cfg = run_config(path)
    if cfg is None:
        raise StokerError(f"{path} is not a DYNAMO run (no config.yaml with recipe: dynamo)")
    fps = fingerprints(cfg)
    for p in (phase,) if phase else (3, 2):
        ckpt = finished_checkpoint(dd.stage_dir(cfg, f"phase{p}"), fps[f"phase{p}"])
        if ckpt is not None:
            break
    else:
        raise StokerError(f"{path} has no finished phase {phase or '2 or 3'} (with this config "
                          "and data); train it first: stoker train RECIPE")  # fmt: skip
    stage_cfg = cfg.model_copy(update={
        "dynamo": cfg.dynamo.model_copy(update={"stage": f"phase{p}"}),
        "train": cfg.train.model_copy(update={"out_dir": str(dd.stage_dir(cfg, f"phase{p}"))}),
    })  # fmt: skip
    return DynamoTask.load_trained(stage_cfg, ckpt, device), stage_cfg, p


def open_run(path: str | Path, device: str = "auto", split: str = "test", phase: int | None = None):
    """(model, task) of a DYNAMO run: the model of its last finished phase (or `phase`) and a
    task whose held-out data is `split` (test: the records no phase ever evaluated on)."""
    from stoker.tasks.dynamo import data as dd
    from stoker.tasks.dynamo.task import DynamoTask
    from stoker.train.distributed import DistInfo, pick_device

    dev = pick_device(device, "--device")
    model, stage_cfg, _ = trained_model(path, dev, phase)
    task = DynamoTask(stage_cfg, DistInfo(device=dev))
    for k in task.task_indices:
        task.val[k] = dd.load_task(stage_cfg, k, task.tokenizer, split)
    return model, task


def eval_command(args) -> int:
    from stoker.tasks.dynamo.evaluate import MODES, evaluation_table, print_table

    model, task = open_run(args.path, getattr(args, "device", "auto"),
                           "test" if args.split == "val" else args.split)  # fmt: skip
    with torch.inference_mode():
        result = evaluation_table(model, task, MODES)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result, MODES)
    return 0


def predict(model, task, text: str, context: str | None = None) -> dict[str, Any]:
    """Route one raw input (a text, or a question with its `context`) and run the chosen
    task: its name, the gates, and the output (label, answer span or generated text)."""
    from stoker.tasks.dynamo.batches import classify_features, collate
    from stoker.tasks.dynamo.evaluate import generate_texts

    tok, cfg = task.tokenizer, task.cfg
    if context is not None:
        enc = tok.encode(text, context, max_length=cfg.data.max_length, truncation="only_second")
        n = int(enc.attention_mask[0].sum())
        seq = enc.sequence_ids[0, :n].tolist()  # 1 on the context: the second segment
        feat = {"input_ids": enc.input_ids[0, :n].tolist(), "token_type_ids":
                enc.token_type_ids[0, :n].tolist(), "task": 0, "source_len": n, "length": n,
                "offsets": [(0, 0) if sid == 1 else None for sid in seq]}  # fmt: skip
    else:
        feat = classify_features(tok, [{"text": text, "label": 0}], 0, cfg.data.max_length)[0]
    batch = collate([feat], tok.pad_id)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    gates = torch.softmax(model.route(batch).float() / cfg.dynamo.router.tau_end, -1)[0]
    k = int(gates.argmax())
    t = cfg.dynamo.tasks[k]
    result = {"task": t.name, "gates": {n.name: round(float(g), 4)
                                        for n, g in zip(cfg.dynamo.tasks, gates, strict=True)}}  # fmt: skip
    batch["task"][:] = k
    out = model(batch, gates=gates[None])["outputs"][k]
    if t.kind == "classify":
        result["output"] = int(out["logits"].argmax(-1))
    elif t.kind == "qa":
        s, e = out["start"][0], out["end"][0]
        ctx = batch["token_type_ids"][0] == 1
        s, e = s.masked_fill(~ctx, -1e4), e.masked_fill(~ctx, -1e4)
        i = int(s.argmax())
        j = i + int(e[i : i + t.max_answer_length].argmax())
        result["output"] = tok.decode(batch["input_ids"][0, i : j + 1].tolist())
    else:
        result["output"] = generate_texts(model, task, k, [{"source": text, "target": ""}],
                                          "soft")[0]  # fmt: skip
    return result


def predict_command(args) -> int:
    model, task = open_run(args.path, args.device)
    with torch.inference_mode():
        result = predict(model, task, args.text, args.context)
    if args.json:
        print(json.dumps(result))
    else:
        gates = "  ".join(f"{n} {g:.3f}" for n, g in result["gates"].items())
        print(f"task: {result['task']}\ngates: {gates}\noutput: {result['output']}")
    return 0
