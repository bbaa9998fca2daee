"""Saving and restoring the whole training state: weights, optimizer, RNG, loader, counters.

A training checkpoint is a model checkpoint (train/checkpoint.py) plus `optimizer.pt`
(loaded with `weights_only=True`) and `trainer_state.json` (step, every rank's RNG states,
loader state, strategy, early-stopping counters). Weights and optimizer state are stored
unsharded whatever the strategy, so a run can resume on a different number of processes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from stoker.config import RecipeConfig
from stoker.errors import StokerError
from stoker.train import distributed as D
from stoker.train.checkpoint import (
    CKPT_SUBDIR,
    list_checkpoints,
    load_state_dict_file,
    prune_checkpoints,
    read_meta,
    resolve_checkpoint,
    save_model_checkpoint,
    step_dir_name,
)

IGNORED_MODEL_KEYS = {"preset", "dropout", "init_std"}  # may differ between save and resume


def check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise StokerError(f"train.out_dir {out} is not writable ({e.strerror}); "
                          "choose another --train.out_dir") from None


def find_resume(resume: str, out: Path, cfg: RecipeConfig) -> Path | None:
    """The checkpoint to resume from: `auto` = the run's latest (if any), `never`, or a path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_checkpoints(out)
        return found[-1] if found else None
    return resolve_checkpoint(resume)


def check_compatible(ckpt: Path, cfg: RecipeConfig) -> None:
    """The checkpoint's model config must equal this run's; the error lists what differs."""
    saved = read_meta(ckpt).get("config", {}).get("model", {})
    now = cfg.model.model_dump(mode="json")
    diff = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {now.get(k)!r}"
            for k in sorted(set(saved) | set(now))
            if k not in IGNORED_MODEL_KEYS and saved.get(k) != now.get(k)]
    if diff:
        raise StokerError(f"checkpoint {ckpt} does not fit this config ({'; '.join(diff)}); "
                          "use the same model section, another train.out_dir, or "
                          "--train.resume=never")


def _rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *[float(v) for v in np_state[2:]]],
             "torch": torch.get_rng_state().tolist()}
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


def save_training_state(out: Path, step: int, model, opt, cfg: RecipeConfig, info: D.DistInfo,
                        loader, counters: dict[str, Any], data_dir: str) -> None:
    """Collective: every rank calls it; rank 0 writes `out/checkpoints/step-N/` atomically."""
    model_sd, opt_sd = D.full_state(model, opt, cfg.dist.strategy, info)
    rng = [None] * info.world
    if info.enabled:
        dist.all_gather_object(rng, _rng_state())
    else:
        rng = [_rng_state()]
    if info.is_main:
        trainer_state = {"step": step, "world": info.world, "strategy": cfg.dist.strategy,
                         "rng": rng, "loader": loader.state_dict(), **counters}

        def write(tmp: Path) -> None:
            torch.save(opt_sd, tmp / "optimizer.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))

        save_model_checkpoint(out / CKPT_SUBDIR / step_dir_name(step), model_sd,
                              cfg.model_dump(mode="json"), Path(data_dir) / "tokenizer", step,
                              extra=write)
        prune_checkpoints(out, cfg.train.keep_last)
    D.barrier(info)


def load_training_state(ckpt: Path, model, opt, cfg: RecipeConfig, info: D.DistInfo,
                        loader) -> dict[str, Any]:
    """Restore weights, optimizer, RNG and loader from `ckpt`; returns trainer_state.json."""
    check_compatible(ckpt, cfg)
    path = ckpt / "trainer_state.json"
    if not path.is_file():
        raise StokerError(f"{ckpt} is a model checkpoint without training state; to start "
                          "from its weights use it as an init, not train.resume")
    state = json.loads(path.read_text())
    if state.get("strategy", "ddp") == "fsdp2" and cfg.dist.strategy != "fsdp2" or \
            cfg.dist.strategy == "fsdp2" and state.get("strategy", "ddp") != "fsdp2":
        raise StokerError(f"{ckpt} was saved with dist.strategy={state.get('strategy')}; resume "
                          f"with the same strategy (this run uses {cfg.dist.strategy})")
    model_sd = load_state_dict_file(ckpt / "model.safetensors")
    opt_sd = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    D.load_full_state(model, opt, cfg.dist.strategy, info, model_sd, opt_sd)
    if state.get("world") == info.world:
        _set_rng_state(state["rng"][info.rank])
    loader.load_state_dict(state["loader"])
    state.setdefault("best_val", float("inf"))
    state.setdefault("bad_evals", 0)
    return state


__all__ = ["check_out_dir", "find_resume", "load_training_state", "save_training_state",
           "step_dir_name"]
