"""Checkpoints: one directory per save, written to a staging name and renamed (atomic).

Layout of a checkpoint directory:
    stoker.json          {"format": "stoker-checkpoint", "version": 1, "step": N, "config": {...},
                          "files": {relative path: {"size": bytes, "sha256": hex}}}
    model.safetensors    weights (tied weights stored once)
    tokenizer/           the tokenizer the model was trained with (see data/tokenizer.py)
    optimizer.pt         optimizer + scheduler state (torch.save; loaded with weights_only=True)
    trainer_state.json   step, RNG states, loader position, ... (written by the trainer)

A run's `out_dir` holds `checkpoints/step-00000030/` directories; the newest *intact* one is
the run's latest checkpoint. A directory without `stoker.json` is never complete: the marker is
written last inside the staging directory (`.tmp-step-…`), and the rename publishes everything
at once. The marker's manifest (every file's size and SHA-256) is checked before a checkpoint
is used, so a truncated or altered file is found before anything is loaded from it; a damaged
newest checkpoint is skipped with a message naming the file (`latest_intact`). Staging
directories left by a killed save are removed when a run starts and whenever checkpoints are
pruned.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from stoker.errors import StokerError

FORMAT = "stoker-checkpoint"
MARKER = "stoker.json"
CKPT_SUBDIR = "checkpoints"
STAGING_PREFIXES = (".tmp-step-", ".old-step-", ".tmp-")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete (published) checkpoints under a run dir, oldest first; not yet verified."""
    root = Path(out_dir) / CKPT_SUBDIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and is_checkpoint(p)]
    return sorted(found, key=lambda p: p.name)


# ------------------------------------------------------------------------------ manifest
def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, Any]) -> str:
    """SHA-256 over named tensors (names, shapes and float32 bytes, in name order): what a
    checkpoint records of the frozen weights it was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def build_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file under `directory` (the marker excluded)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MARKER)
    return {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in files
    }


def checkpoint_problem(ckpt: str | Path) -> str | None:
    """Why `ckpt` cannot be used (a missing, truncated or altered file, an unreadable marker),
    or None when every file matches the manifest. Checkpoints written before manifests
    existed are only checked for the marker and the weights file."""
    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{MARKER} is unreadable ({e})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return f"{MARKER} is not stoker checkpoint metadata"
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        return f"{MARKER} has no model config"
    files = meta.get("files")
    if files is not None and not (
        isinstance(files, dict) and all(isinstance(v, dict) for v in files.values())
    ):
        return f"{MARKER} has a malformed file manifest"
    if files is None:  # written before manifests
        weights = ckpt / "model.safetensors"
        return (
            None
            if weights.is_file() or (ckpt / "model").is_dir()
            else "model.safetensors is missing"
        )
    for rel, want in files.items():
        path = ckpt / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"{rel} is {size} bytes, the manifest says {want.get('size')} (truncated?)"
        try:
            digest = file_sha256(path)
        except OSError as e:
            return f"{rel} is unreadable ({e.strerror})"
        if digest != want.get("sha256"):
            return f"{rel} does not match its SHA-256 in {MARKER} (altered or corrupt)"
    return None


def verify_checkpoint(ckpt: str | Path) -> Path:
    """`ckpt` if intact, else a StokerError naming the damaged file."""
    problem = checkpoint_problem(ckpt)
    if problem:
        raise StokerError(
            f"checkpoint {ckpt} is damaged: {problem}; resume from an earlier "
            "checkpoint (--train.resume=PATH) or start over"
        )
    return Path(ckpt)


def latest_intact(out_dir: str | Path, report: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint of a run whose files match their manifest; each newer damaged one
    is skipped and reported (`report`, default: a line on stderr)."""
    report = report or (lambda msg: print(msg, file=sys.stderr, flush=True))
    for ckpt in reversed(list_checkpoints(out_dir)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        report(f"stoker: skipping damaged checkpoint {ckpt}: {problem}")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir (verified), or a run dir's newest intact checkpoint."""
    p = Path(path)
    if not p.exists():
        raise StokerError(f"no such run or checkpoint: {p}")
    if is_checkpoint(p):
        return verify_checkpoint(p)
    found = list_checkpoints(p)
    if not found:
        raise StokerError(
            f"{p} holds no stoker checkpoint (expected {MARKER} or "
            f"{CKPT_SUBDIR}/step-*/); train a run first or import one with "
            "`stoker import-hf`"
        )
    ckpt = latest_intact(p)
    if ckpt is None:
        raise StokerError(
            f"every checkpoint under {p / CKPT_SUBDIR} is damaged (see above); "
            "train again with --train.resume=never"
        )
    return ckpt


def read_meta(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / MARKER
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StokerError(f"unreadable checkpoint metadata {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StokerError(f"{path} is not a stoker checkpoint metadata file")
    if not isinstance(meta.get("config"), dict) or not isinstance(
        meta["config"].get("model"), dict
    ):
        raise StokerError(f"{path} has no model config; use another checkpoint")
    return meta


# -------------------------------------------------------------------------------- writing
def staging_dir(final_dir: str | Path) -> Path:
    """The directory a checkpoint is written into before `publish_checkpoint` renames it:
    a fixed name next to the final one, so every rank of a sharded save finds it."""
    final = Path(final_dir)
    return final.with_name(f".tmp-{final.name}")


def begin_checkpoint(final_dir: str | Path) -> Path:
    """Create an empty staging dir for `final_dir` (a leftover of a killed save is removed)."""
    tmp = staging_dir(final_dir)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish_checkpoint(tmp: Path, final_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write the marker (with the manifest of everything in `tmp`), fsync, rename to
    `final_dir` (replacing an existing one). On any failure the staging dir is removed."""
    final = Path(final_dir)
    try:
        marker = {"format": FORMAT, "version": 1, **meta, "files": build_manifest(tmp)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        for p in tmp.rglob("*"):
            if p.is_file():
                _fsync_file(p)
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
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise StokerError(
                f"could not write checkpoint {final} ({e.strerror or e}); "
                "nothing was replaced — free disk space or choose another "
                "train.out_dir"
            ) from None
        raise
    return final


def write_checkpoint(
    final_dir: str | Path, meta: dict[str, Any], write_files: Callable[[Path], None]
) -> Path:
    """Atomically create `final_dir` in one process: `write_files(tmp)` fills the staging dir,
    then `publish_checkpoint`. An OSError while writing (disk full, read-only) is a
    StokerError and leaves no staging dir behind."""
    tmp = begin_checkpoint(final_dir)
    try:
        write_files(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or "No space left" in str(e):
            why = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
            raise StokerError(
                f"could not write checkpoint {final_dir} ({why}); the previous "
                "checkpoints are intact — free disk space or choose another "
                "train.out_dir"
            ) from None
        raise
    return publish_checkpoint(tmp, final_dir, meta)


def _fsync_file(path: Path) -> None:
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


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)


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


def load_state_dict_file(
    path: str | Path, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """A safetensors state dict (aliases restored); a damaged file is a StokerError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StokerError(
            f"{path} is not a readable safetensors file ({first}); use another "
            "checkpoint or re-create it"
        ) from None
    for name, target in aliases.items():
        sd[name] = sd[target]
    return sd


def save_model_checkpoint(
    final_dir: str | Path,
    model: torch.nn.Module | dict,
    config: dict[str, Any],
    tokenizer_dir: str | Path | None = None,
    step: int = 0,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Weights (a model or its state dict) + config (+ tokenizer, + whatever `extra(tmp)`
    writes), atomically."""

    def write(tmp: Path) -> None:
        sd = model if isinstance(model, dict) else model.state_dict()
        save_state_dict(sd, tmp / "model.safetensors")
        write_checkpoint_extras(tmp, tokenizer_dir, extra)

    return write_checkpoint(final_dir, {"step": step, "config": config}, write)


def write_checkpoint_extras(
    tmp: Path, tokenizer_dir: str | Path | None, extra: Callable[[Path], None] | None
) -> None:
    from stoker.data.tokenizer import copy_tokenizer_files

    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, tmp / "tokenizer")
    if extra is not None:
        extra(tmp)


TRAINABLE_ONLY = "_stoker_saves_trainable_only"


def save_trainable_only(model: torch.nn.Module) -> None:
    """Mark a model whose checkpoints hold its trainable tensors only (adapters, heads): the
    frozen rest comes from its base, recorded in the checkpoint's metadata."""
    setattr(model, TRAINABLE_ONLY, True)


def saved_names(model: torch.nn.Module) -> set[str] | None:
    """The state-dict names a checkpoint of `model` holds; None: all of them."""
    if not getattr(model, TRAINABLE_ONLY, False):
        return None
    return {n for n, p in model.named_parameters() if p.requires_grad}


def saved_part(model: torch.nn.Module, sd: dict[str, Any]) -> dict[str, Any]:
    """The entries of `sd` (the model's state dict) that its checkpoints hold."""
    names = saved_names(model)
    return sd if names is None else {k: v for k, v in sd.items() if k in names}


def load_weights(model: torch.nn.Module, ckpt: str | Path) -> None:
    """Copy a checkpoint's weights into `model` (built from its config; e.g. on the meta device
    and then `sharded.materialize`d), one tensor at a time: from model.safetensors, or
    consolidated in this process from the model's chunks of a sharded checkpoint."""
    from safetensors import SafetensorError, safe_open

    from stoker.train.sharded import is_sharded, load_sharded_weights

    if is_sharded(ckpt):
        return load_sharded_weights(model, ckpt)
    path = Path(ckpt) / "model.safetensors"
    if not path.is_file():
        raise StokerError(f"checkpoint {ckpt} has no model.safetensors")
    targets = saved_part(model, model.state_dict())
    unfit = f"weights in {path} do not fit the model built from its config"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
            stored = list(f.keys())  # noqa: SIM118 (safe_open has no iter)
            missing = sorted(set(targets) - set(stored) - set(aliases))
            unexpected = sorted((set(stored) | set(aliases)) - set(targets))
            if missing or unexpected:
                raise StokerError(f"{unfit}: missing {missing[:3]}, unexpected {unexpected[:3]}")
            for name in stored:
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(targets[name].shape):
                    raise StokerError(
                        f"{unfit}: {name} is {shape} there, "
                        f"{tuple(targets[name].shape)} in the model"
                    )
            with torch.no_grad():
                for name in stored:
                    targets[name].copy_(f.get_tensor(name))
                for name, source in aliases.items():  # a model that does not share them
                    if targets[name].data_ptr() != targets[source].data_ptr():
                        targets[name].copy_(targets[source])
    except StokerError:
        raise
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StokerError(
            f"{path} is not a readable safetensors file ({first}); use another "
            "checkpoint or re-create it"
        ) from None


def remove_staging_dirs(out_dir: str | Path) -> list[Path]:
    """Delete what killed saves left under `out_dir/checkpoints` (`.tmp-step-*`, `.old-*`)."""
    root = Path(out_dir) / CKPT_SUBDIR
    if not root.is_dir():
        return []
    stale = [
        p
        for p in root.iterdir()
        if p.name.startswith(STAGING_PREFIXES)
        or p.name.startswith("step-")
        and p.is_dir()
        and not is_checkpoint(p)
    ]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def prune_checkpoints(out_dir: str | Path, keep_last: int, keep: Path | None = None) -> None:
    """Delete all but the newest `keep_last` (≥ 1) complete checkpoints, never `keep` (the one
    just written), and any staging dirs other than in-progress ones."""
    found = [p for p in list_checkpoints(out_dir) if keep is None or p != Path(keep)]
    keep_others = max(0, max(1, keep_last) - (1 if keep is not None else 0))
    for p in found[: max(0, len(found) - keep_others)]:
        shutil.rmtree(p, ignore_errors=True)
    remove_staging_dirs(out_dir)
