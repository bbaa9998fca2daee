"""Saving and restoring the whole training state: weights, optimizer, RNG, loader, counters.

A training checkpoint is a model checkpoint (train/checkpoint.py) plus the optimizer state
(loaded with `weights_only=True`) and `trainer_state.json` (step, every rank's RNG states,
loader state, strategy, early-stopping counters). How weights and optimizer state are laid out
per strategy is `dist_checkpoint.save_model_optimizer`'s business; every layout resumes on a
different number of processes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from stoker.config import RecipeConfig
from stoker.errors import StokerError
from stoker.train import dist_checkpoint as DC
from stoker.train import distributed as D
from stoker.train.checkpoint import (
    CKPT_SUBDIR,
    begin_checkpoint,
    latest_intact,
    prune_checkpoints,
    publish_checkpoint,
    read_meta,
    resolve_checkpoint,
    staging_dir,
    step_dir_name,
    write_checkpoint_extras,
)

IGNORED_MODEL_KEYS = {"preset", "dropout", "init_std"}  # may differ between save and resume


RUN_FILES = (".lock", "config.yaml", "metrics.jsonl", "summary.json")  # what a run writes


def check_out_dir(out: Path) -> None:
    for name in RUN_FILES:
        if (out / name).is_dir():
            raise StokerError(
                f"{out / name} is a directory, where the run writes a file; "
                "remove it or choose another --train.out_dir"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise StokerError(
            f"train.out_dir {out} is not writable ({e.strerror}); choose another --train.out_dir"
        ) from None


def find_resume(resume: str, out: Path, info: D.DistInfo) -> Path | None:
    """The checkpoint to resume from: `auto` = the run's newest intact one (damaged newer ones
    are skipped with a message), `never`, or a path (which must be intact). Rank 0 decides and
    tells the others, so every rank resumes from the same step."""
    if resume == "never":
        return None
    found: list[Path | None] = [None]

    def decide() -> None:  # rank 0 alone verifies (hashes) the files: the others read none
        found[0] = (
            resolve_checkpoint(resume)
            if resume != "auto"
            else latest_intact(out, lambda msg: print(msg, flush=True))
        )

    D.run_on_main(decide, info)
    return D.broadcast_object(found[0], info)


def check_compatible(ckpt: Path, cfg: RecipeConfig) -> None:
    """The checkpoint's model config must equal this run's; the error lists what differs."""
    saved = read_meta(ckpt).get("config", {}).get("model", {})
    now = cfg.model.model_dump(mode="json")
    diff = [
        f"model.{k}: checkpoint {saved.get(k)!r} vs config {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if k not in IGNORED_MODEL_KEYS and saved.get(k) != now.get(k)
    ]
    if diff:
        raise StokerError(
            f"checkpoint {ckpt} does not fit this config ({'; '.join(diff)}); "
            "use the same model section, another train.out_dir, or "
            "--train.resume=never"
        )


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *[float(v) for v in np_state[2:]]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), int(n[2]), int(n[3]), n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_training_state(
    out: Path,
    step: int,
    model,
    opt,
    cfg: RecipeConfig,
    info: D.DistInfo,
    loader,
    counters: dict[str, Any],
    tokenizer_dir: Path | None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Collective: every rank calls it. Weights and optimizer state go into a staging dir
    (`DC.save_model_optimizer`: by rank 0, or by every rank for its shards), then rank 0 adds
    the trainer state and tokenizer, publishes `out/checkpoints/step-N/` with its manifest and
    prunes. `meta`: entries the task adds to stoker.json (e.g. its frozen base). A failure
    on any rank (a full disk) is a StokerError on every rank."""
    final = out / CKPT_SUBDIR / step_dir_name(step)
    rng = [None] * info.world
    if info.enabled:
        dist.all_gather_object(rng, _rng_state())
    else:
        rng = [_rng_state()]
    D.run_on_main(lambda: begin_checkpoint(final), info)
    tmp = staging_dir(final)
    try:
        D.run_everywhere(
            lambda: DC.save_model_optimizer(tmp, model, opt, cfg.dist.strategy, info), info
        )
    except StokerError:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    def publish() -> None:
        trainer_state = {
            "step": step,
            "world": info.world,
            "strategy": cfg.dist.strategy,
            "rng": rng,
            "loader": loader.state_dict(),
            **counters,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
        write_checkpoint_extras(tmp, tokenizer_dir, None)
        publish_checkpoint(
            tmp, final, {"step": step, "config": cfg.model_dump(mode="json"), **(meta or {})}
        )
        prune_checkpoints(out, cfg.train.keep_last, keep=final)

    D.run_on_main(publish, info, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True))
    return final


def load_training_state(
    ckpt: Path, model, opt, cfg: RecipeConfig, info: D.DistInfo, loader
) -> dict[str, Any]:
    """Restore weights, optimizer, RNG and loader from `ckpt`; returns trainer_state.json."""
    check_compatible(ckpt, cfg)
    path = ckpt / "trainer_state.json"
    if not path.is_file():
        raise StokerError(
            f"{ckpt} is a model checkpoint without training state; to start "
            f"from its weights use --train.init_from={ckpt} (and "
            "--train.resume=never), not train.resume"
        )
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StokerError(
            f"{path} is unreadable ({e}); resume from an earlier checkpoint "
            "with --train.resume=PATH"
        ) from None
    saved = state.get("strategy", "ddp")
    if (saved == "fsdp2") != (cfg.dist.strategy == "fsdp2") and not DC.is_portable(ckpt):
        raise StokerError(
            f"{ckpt} was saved with dist.strategy={saved}; resume with the same "
            f"strategy (this run uses {cfg.dist.strategy})"
        )
    DC.load_model_optimizer(ckpt, model, opt, cfg.dist.strategy, info)
    if state.get("world") == info.world:
        _set_rng_state(state["rng"][info.rank])
    loader.load_state_dict(state["loader"])
    state.setdefault("best_val", float("inf"))
    state.setdefault("bad_evals", 0)
    return state


def trim_metrics(out: Path, step: int) -> int:
    """Drop the rows of metrics.jsonl after `step` (written after the checkpoint a run resumes
    from) and any partial last line, so a resumed run has one row per step. Returns how many
    rows were dropped."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step:
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in keep))
        os.replace(tmp, path)
    return dropped


__all__ = [
    "check_out_dir",
    "find_resume",
    "load_training_state",
    "save_training_state",
    "step_dir_name",
    "trim_metrics",
]
