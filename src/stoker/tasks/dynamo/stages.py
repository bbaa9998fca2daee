"""DYNAMO's stages (train/stages.py): `phase1:<task>` for each task, then `phase2`, `phase3`, in
`<train.out_dir>/phase1-<task>/`, `phase2/`, `phase3/`.

A phase-1 stage's fingerprint covers what its adapter depends on: the encoder, tokenizer and
LoRA settings, the list of tasks (names, kinds, labels: they fix the mixture's layout and the
initial draw), this task's own section and data file, and the loop's settings; changing another
task leaves it alone. Phase 2 covers every phase-1 fingerprint, every task and the router;
phase 3 phase 2's too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stoker.errors import StokerError
from stoker.train.stages import (  # noqa: F401  (finished_checkpoint: re-exported)
    Stage,
    file_hash,
    fingerprint,
    finished_checkpoint,
    loop_settings,
)


def _common(cfg) -> dict[str, Any]:
    """What every stage's result depends on."""
    tasks = [(t.name, t.kind, t.n_labels) for t in cfg.dynamo.tasks]
    return {"encoder": cfg.encoder.model_dump(mode="json"), "init_from": cfg.train.init_from,
            "lora": cfg.lora.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json"),
            "tasks": tasks, **loop_settings(cfg), "pooling": cfg.dynamo.pooling}  # fmt: skip


def _stage_cfg(cfg, stage: str, out: Path, phase) -> Any:
    from stoker.config import validate_config

    data = cfg.model_dump(mode="json")
    metric = None
    if stage.startswith("phase1:"):
        task = cfg.dynamo.task(stage.split(":", 1)[1])
        steps, metric = task.steps or phase.max_steps, task.main_metric
    else:
        steps = phase.max_steps
        metric = "routing_accuracy" if stage == "phase2" else "macro"
    data["train"] |= {
        "out_dir": str(out / stage.replace(":", "-")),
        "max_steps": steps,
        "eval_interval": min(phase.eval_interval, steps),
        "early_stopping_metric": metric if phase.early_stopping_patience else None,
        "early_stopping_patience": phase.early_stopping_patience or 3,
        "resume": "auto",
    }
    data["optim"]["lr"] = phase.lr
    data["dynamo"]["stage"] = stage
    return validate_config(data)


def _task(t) -> dict[str, Any]:
    return t.model_dump(mode="json", exclude={"extra_eval"})  # evaluation only


def fingerprints(cfg) -> dict[str, str]:
    """Every stage's fingerprint (whichever phases this run trains); the same from the
    recipe's config and from any of its stages' configs, whether or not its `encoder`
    section has been read from `train.init_from` yet."""
    from stoker.tasks.dynamo.data import resolve_encoder, task_path

    cfg = resolve_encoder(cfg)
    d, common, out = cfg.dynamo, _common(cfg), {}
    for t in d.tasks:
        path = task_path(cfg, t)
        if not path.exists():
            raise StokerError(f"dynamo task {t.name}: no data at {path}; build the offline set "
                              f"with `python scripts/dynamo_data.py {cfg.data.dir}`")  # fmt: skip
        out[f"phase1:{t.name}"] = fingerprint(common, _task(t), file_hash(path),
                                              d.phase1.model_dump(mode="json"))  # fmt: skip
    everything = [common, [_task(t) for t in d.tasks],
                  [out[f"phase1:{t.name}"] for t in d.tasks], d.router.model_dump(mode="json")]  # fmt: skip
    out["phase2"] = fingerprint(everything, d.phase2.model_dump(mode="json"))
    out["phase3"] = fingerprint(everything, out["phase2"], d.phase3.model_dump(mode="json"),
                                d.generation.model_dump(mode="json"))  # fmt: skip
    return out


def plan(cfg) -> list[Stage]:
    """The stages of `cfg.dynamo.phases`, in order."""
    if cfg.train.resume not in ("auto", "never"):
        raise StokerError("train.resume=PATH does not apply to a DYNAMO recipe (each phase "
                          "resumes in its own directory); use auto, or never to retrain all")  # fmt: skip
    d, root, fps = cfg.dynamo, Path(cfg.train.out_dir), fingerprints(cfg)
    names = [f"phase1:{t.name}" for t in d.tasks] if 1 in d.phases else []
    names += [f"phase{p}" for p in d.phases if p != 1]
    phase = {1: d.phase1, 2: d.phase2, 3: d.phase3}
    stages = [Stage(n, _stage_cfg(cfg, n, root, phase[int(n[5])]), fps[n]) for n in names]
    for s in stages:
        s.fresh = cfg.train.resume == "never"
    return stages
