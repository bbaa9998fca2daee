"""The multimodal recipe's stages (train/stages.py): phase 1 is `encoder:<modality>` for each
modality (its encoder pretrained as a classifier on its labelled files) then `phase1` (the
aligner over the frozen encoders); phase 2 is `lm` (the small decoder pretrained on the
described conversations) then `phase2` (projectors, missing embeddings and LoRA); each in
`<train.out_dir>/<stage with - for :>/`.

An encoder stage's fingerprint covers its own section, the data settings, its labelled file
and every file that file names (their bytes), and the loop's settings; phase 1 covers both
encoders' fingerprints, the aligner section and the alignment files with theirs; `lm` its
section and the conversation and label files; phase 2 all of them and its own sections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stoker.train.stages import Stage, file_hash, fingerprint, loop_settings

ENCODER = "encoder:"


def _files_hash(path: Path, required: tuple[str, ...]) -> str:
    """The JSONL file's hash and those of the files its rows name (`path`, `image`, `audio`)."""
    from stoker.tasks.multimodal.data import read_rows

    rows = read_rows(path, required)
    named = sorted({r[k] for r in rows for k in ("path", "image", "audio") if r.get(k)})
    return fingerprint(file_hash(path), [(n, file_hash(path.parent / n)) for n in named])


def fingerprints(cfg) -> dict[str, str]:
    from stoker.tasks.multimodal.data import data_path

    mm, out = cfg.multimodal, {}
    data = cfg.data.model_dump(mode="json")
    data.pop("eval_examples")  # how much each evaluation reads, not what trains
    common = {"data": data, **loop_settings(cfg)}
    for m in mm.modalities:
        enc = mm.encoder(m)
        if enc.pretrained:  # its directory's bytes
            out[f"{ENCODER}{m}"] = fingerprint(m, enc.model_dump(mode="json"),
                                               file_hash(Path(enc.path)))  # fmt: skip
            continue
        path = data_path(cfg, cfg.data.images if m == "image" else cfg.data.audio)
        out[f"{ENCODER}{m}"] = fingerprint(common, m, enc.model_dump(mode="json"),
                                           _files_hash(path, ("path", "label", "split")))  # fmt: skip
    align = [_files_hash(data_path(cfg, f), ("image", "audio", "label"))
             for f in (cfg.data.align_train, cfg.data.align_test)]  # fmt: skip
    out["phase1"] = fingerprint(common, [out[f"{ENCODER}{m}"] for m in mm.modalities],
                                mm.aligner.model_dump(mode="json"), align)  # fmt: skip
    labels = [file_hash(data_path(cfg, f)) for f in (cfg.data.images, cfg.data.audio)
              if mm.lm.init_from is None]  # the word LM's pretraining text names them  # fmt: skip
    chats = [_files_hash(data_path(cfg, f), ("messages",))
             for f in (cfg.data.chat_train, cfg.data.chat_test)]  # fmt: skip
    if mm.lm.init_from is not None:  # a pretrained decoder: its directory's bytes
        out["lm"] = fingerprint(mm.lm.model_dump(mode="json"), file_hash(Path(mm.lm.init_from)))
    else:
        out["lm"] = fingerprint(common, mm.lm.model_dump(mode="json"), labels, chats)
    out["phase2"] = fingerprint(common, out["phase1"], out["lm"], chats,
                                mm.phase2.model_dump(mode="json"),
                                cfg.lora.model_dump(mode="json"))  # fmt: skip
    return out


def _stage_cfg(cfg, stage: str, root: Path) -> Any:
    from stoker.config import validate_config

    mm = cfg.multimodal
    if stage.startswith(ENCODER):
        enc = mm.encoder(stage[len(ENCODER) :])
        steps, lr, interval = enc.pretrain_steps, enc.lr, enc.pretrain_steps
    elif stage == "phase1":
        a = mm.aligner
        steps, lr, interval = a.max_steps, a.lr, a.eval_interval
    elif stage == "lm":
        steps, lr, interval = mm.lm.pretrain_steps, mm.lm.lr, mm.lm.pretrain_steps
    else:
        p = mm.phase2
        steps, lr, interval = p.max_steps, p.lr, p.eval_interval
    data = cfg.model_dump(mode="json")
    data["train"] |= {"out_dir": str(root / stage.replace(":", "-")), "max_steps": steps,
                      "eval_interval": min(interval, steps), "resume": "auto"}  # fmt: skip
    data["optim"]["lr"] = lr
    data["multimodal"]["stage"] = stage
    return validate_config(data)


def check_files(cfg) -> None:
    """Read every file the stages will read (kept in memory for them), so that a bad image,
    clip or label stops the run before its first stage trains, not in a later one."""
    from stoker.tasks.multimodal import data as md

    for m in cfg.multimodal.trained_encoders:  # a pretrained encoder needs no labelled files
        for split in ("train", "test"):
            md.labelled(cfg, m, split)
    for split in ("train", "test"):
        md.pairs(cfg, split)
    if 2 in cfg.multimodal.phases:
        from stoker.tasks.multimodal import lm

        for split in ("train", "test"):
            lm.conversations(cfg, split)


def plan(cfg) -> list[Stage]:
    from stoker.errors import StokerError

    if cfg.train.resume not in ("auto", "never"):
        raise StokerError("train.resume=PATH does not apply to a multimodal recipe (each stage "
                          "resumes in its own directory); use auto, or never to retrain all")  # fmt: skip
    root, fps = Path(cfg.train.out_dir), fingerprints(cfg)
    check_files(cfg)
    names = []
    if 1 in cfg.multimodal.phases:
        names += [f"{ENCODER}{m}" for m in cfg.multimodal.trained_encoders] + ["phase1"]
    if 2 in cfg.multimodal.phases:
        names += ["phase2"] if cfg.multimodal.lm.init_from else ["lm", "phase2"]
        if 1 not in cfg.multimodal.phases:  # phase 1 must be there before anything trains
            from stoker.tasks.multimodal.task import stage_checkpoint

            for n in [f"{ENCODER}{m}" for m in cfg.multimodal.trained_encoders] + ["phase1"]:
                stage_checkpoint(cfg, n, "phase 2")
    stages = [Stage(n, _stage_cfg(cfg, n, root), fps[n]) for n in names]
    for s in stages:
        s.fresh = cfg.train.resume == "never"
    return stages
