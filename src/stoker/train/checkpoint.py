"""Checkpoints: one directory per save, written to a temporary name and renamed (atomic).

Layout of a checkpoint directory:
    stoker.json          {"format": "stoker-checkpoint", "version": 1, "step": N, "config": {...}}
    model.safetensors    weights (tied weights stored once)
    tokenizer/           the tokenizer the model was trained with (see data/tokenizer.py)
    optimizer.pt         optimizer + scheduler state (torch.save; loaded with weights_only=True)
    trainer_state.json   step, RNG states, loader position, ... (written by the trainer)

A run's `out_dir` holds `checkpoints/step-00000030/` directories; the newest complete one is
the run's latest checkpoint. A directory without `stoker.json` is never complete: `stoker.json`
is written last inside the temporary directory, and the rename publishes everything at once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stoker.errors import StokerError

FORMAT = "stoker-checkpoint"
MARKER = "stoker.json"
CKPT_SUBDIR = "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints under a run dir, oldest first."""
    root = Path(out_dir) / CKPT_SUBDIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and is_checkpoint(p)]
    return sorted(found, key=lambda p: p.name)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir's latest checkpoint; StokerError when there is none."""
    p = Path(path)
    if not p.exists():
        raise StokerError(f"no such run or checkpoint: {p}")
    if is_checkpoint(p):
        return p
    found = list_checkpoints(p)
    if not found:
        raise StokerError(f"{p} holds no stoker checkpoint (expected {MARKER} or "
                          f"{CKPT_SUBDIR}/step-*/); train a run first or import one with "
                          "`stoker import-hf`")
    return found[-1]


def read_meta(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / MARKER
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StokerError(f"unreadable checkpoint metadata {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise StokerError(f"{path} is not a stoker checkpoint (format={meta.get('format')!r})")
    return meta


def write_checkpoint(final_dir: str | Path, meta: dict[str, Any],
                     write_files: Callable[[Path], None]) -> Path:
    """Atomically create `final_dir`: `write_files(tmp)` fills a temp dir next to it, then the
    marker is written and the temp dir renamed. An existing `final_dir` is replaced."""
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        write_files(tmp)
        (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "version": 1, **meta}, indent=2))
        _fsync_dir(tmp)
        if final.exists():
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_state_dict(sd: dict[str, torch.Tensor], path: str | Path) -> None:
    """safetensors file of a state dict; a tensor shared under several names (tied embeddings,
    MoR's shared layers) is stored once and its other names recorded as aliases."""
    seen: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in sd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.device.type != "meta" and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    sd = load_file(str(path))
    for name, target in aliases.items():
        sd[name] = sd[target]
    return sd


def save_model_checkpoint(final_dir: str | Path, model: torch.nn.Module | dict, config: dict[str, Any],
                          tokenizer_dir: str | Path | None = None, step: int = 0,
                          extra: Callable[[Path], None] | None = None) -> Path:
    """Weights (a model or its state dict) + config (+ tokenizer, + whatever `extra(tmp)`
    writes), atomically."""
    from stoker.data.tokenizer import copy_tokenizer_files

    def write(tmp: Path) -> None:
        sd = model if isinstance(model, dict) else model.state_dict()
        save_state_dict(sd, tmp / "model.safetensors")
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp / "tokenizer")
        if extra is not None:
            extra(tmp)

    return write_checkpoint(final_dir, {"step": step, "config": config}, write)


def load_weights(model: torch.nn.Module, ckpt: str | Path) -> None:
    path = Path(ckpt) / "model.safetensors"
    if not path.is_file():
        raise StokerError(f"checkpoint {ckpt} has no model.safetensors")
    try:
        model.load_state_dict(load_state_dict_file(path), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise StokerError(f"weights in {path} do not fit the model built from its config: "
                          f"{first}") from None


def prune_checkpoints(out_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (and stale temp dirs)."""
    found = list_checkpoints(out_dir)
    for p in found[: max(0, len(found) - keep_last)]:
        shutil.rmtree(p, ignore_errors=True)
