"""Checkpoint weights and optimizer state under every strategy and world size, collectively.

`save_model_optimizer` writes a checkpoint's tensors: under fsdp2 on several processes every
rank writes its own shards (train/sharded.py, nothing gathered); otherwise rank 0 writes full
files (`model.safetensors`, `optimizer.pt`; ZeRO-1 consolidates its optimizer state there
first). `load_model_optimizer` reads either layout under any strategy and world size into the
model's and optimizer's own tensors, resharding or sending each tensor to the ranks that keep
it (docs/cluster.md). Damaged or unwritable files are one-line StokerErrors on every rank.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from stoker.errors import StokerError
from stoker.train.distributed import (
    DistInfo,
    broadcast_object,
    full_state,
    run_on_main,
    unwrap,
)


def _write_failed(path, e: BaseException) -> StokerError:
    why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    return StokerError(
        f"could not write checkpoint file {path} ({why}); the previous "
        "checkpoints are intact — free disk space or choose another "
        "train.out_dir"
    )


def save_model_optimizer(
    tmp, model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str, info: DistInfo
) -> None:
    """Collective: write a checkpoint's weights and optimizer state into the staging dir `tmp`.
    fsdp2 on several processes: every rank writes its own shards (`dcp/`, see
    train/sharded.py; nothing is gathered). Otherwise rank 0 writes `model.safetensors` and
    `optimizer.pt` (ZeRO-1 first consolidates the optimizer state on rank 0)."""
    from safetensors import SafetensorError

    from stoker.train.checkpoint import save_state_dict

    if strategy == "fsdp2" and info.enabled:
        from stoker.train.sharded import SHARDED_DIR, save_sharded

        try:
            save_sharded(tmp, model, optimizer, info)
        except (OSError, RuntimeError) as e:
            raise _write_failed(getattr(e, "filename", None) or tmp / SHARDED_DIR, e) from None
        return
    model_sd, opt_sd = full_state(model, optimizer, strategy, info)
    if not info.is_main:
        return
    for name, write in (
        ("model.safetensors", lambda p: save_state_dict(model_sd, p)),
        ("optimizer.pt", lambda p: torch.save(opt_sd, p)),
    ):
        try:
            write(tmp / name)
        except (OSError, RuntimeError, SafetensorError) as e:
            raise _write_failed(tmp / name, e) from None


def is_portable(ckpt) -> bool:
    """Whether a checkpoint's optimizer state loads under any strategy: both layouts do (see
    load_model_optimizer)."""
    return True


def load_model_optimizer(
    ckpt, model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str, info: DistInfo
) -> None:
    """Collective inverse of `save_model_optimizer`, under any strategy and world size, into
    the model's and optimizer's own (already allocated) tensors:
    - sharded checkpoint, fsdp2 or one process: DCP, each rank reads only the chunks that
      overlap its shards (resharding when the world size changed);
    - full checkpoint, fsdp2 on several processes: rank 0 reads the files, torch's
      state-dict API broadcasts each tensor and every rank keeps its shard;
    - ddp / zero1: rank 0 reads (a sharded checkpoint: consolidated on rank 0) and sends each
      tensor to the ranks that keep it: a broadcast, or under ZeRO-1 only to the owner of that
      parameter's optimizer state. The other ranks open no checkpoint file.
    Damaged files are StokerErrors on every rank."""
    from stoker.train.sharded import is_sharded, load_sharded

    sharded = is_sharded(ckpt)
    if sharded and (strategy == "fsdp2" or not info.enabled):
        try:
            load_sharded(ckpt, model, optimizer, info)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise _unreadable(ckpt / "dcp", e) from None
    elif strategy == "fsdp2" and info.enabled:
        _load_full_into_shards(ckpt, model, optimizer, info)
    else:
        _send_weights(ckpt, model, info)
        _send_optimizer_state(
            ckpt, model, optimizer, strategy == "zero1" and info.enabled, info, sharded
        )


def _unreadable(path, e: BaseException) -> StokerError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return StokerError(
        f"{path} is unreadable ({first[:200]}); resume from an earlier "
        "checkpoint with --train.resume=PATH"
    )


def _read_optimizer_file(ckpt) -> dict[str, Any]:
    """optimizer.pt, memory-mapped (tensors are paged in as they are sent, not copied)."""
    import pickle

    path = ckpt / "optimizer.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise _unreadable(path, e) from None


def _param_names(model: nn.Module, optimizer) -> list[str]:
    """The parameter name of each optimizer index (param_groups order, as state_dict counts)."""
    names = {}
    for name, p in unwrap(model).named_parameters():
        names.setdefault(id(p), name)
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _send_weights(ckpt, model: nn.Module, info: DistInfo) -> None:
    """Rank 0 copies the checkpoint's weights into its model (one tensor at a time); each
    tensor is then broadcast in place into the other ranks' parameters."""
    from stoker.train.checkpoint import load_weights
    from stoker.train.sharded import alias_names

    raw = unwrap(model)
    run_on_main(lambda: load_weights(raw, ckpt), info)
    if info.enabled:
        from stoker.train.checkpoint import saved_part

        aliases = alias_names(raw)  # tied: the same memory, sent once
        for name, t in saved_part(raw, raw.state_dict()).items():
            if name not in aliases:
                dist.broadcast(t, src=0)


def _rekey(sd: dict[str, Any], names: list[str], by_name: bool, path) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter index (as `optimizer.state_dict()` is) or by
    parameter name (FSDP2's full state dicts, also the optimizer.pt of earlier FSDP2 runs), from
    either; `names`: each index's parameter name."""
    index = {n: i for i, n in enumerate(names)}

    def key(k):
        if by_name:
            return names[k] if isinstance(k, int) else k
        return index[k] if isinstance(k, str) else k

    try:
        return {
            "state": {key(k): v for k, v in sd["state"].items()},
            "param_groups": [
                {**g, "params": [key(p) for p in g["params"]]} for g in sd["param_groups"]
            ],
        }
    except (KeyError, IndexError, TypeError) as e:
        raise StokerError(
            f"{path} does not fit this model's optimizer (no parameter {e}); "
            "resume from a checkpoint of this model"
        ) from None


def _full_optimizer_state(ckpt, model: nn.Module, optimizer, sharded: bool) -> dict[str, Any]:
    """Rank 0: the whole optimizer state dict, keyed by index as `optimizer.state_dict()` is
    (a sharded checkpoint's is consolidated here; host memory: all of it)."""
    names = _param_names(model, optimizer)
    if not sharded:
        return _rekey(_read_optimizer_file(ckpt), names, False, ckpt / "optimizer.pt")
    from stoker.train.sharded import SHARDED_DIR, read_sharded, read_sidecar

    state: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for key, t in read_sharded(ckpt, "optim").items():
            param, _, name = key.rpartition(".")  # "<parameter name>.<state name>"
            state.setdefault(param, {})[name] = t
    except (OSError, RuntimeError) as e:
        raise _unreadable(ckpt / SHARDED_DIR, e) from None
    groups = read_sidecar(ckpt, optimizer.param_groups)["param_groups"]
    return _rekey({"state": state, "param_groups": groups}, names, False, ckpt / SHARDED_DIR)


def _send_optimizer_state(
    ckpt, model: nn.Module, optimizer, zero1: bool, info: DistInfo, sharded: bool
) -> None:
    """Rank 0 reads the optimizer state; every other rank receives, straight into device
    memory, the tensors it keeps (all of them under DDP, its own partition's under ZeRO-1)."""
    box: dict[str, Any] = {}
    run_on_main(lambda: box.update(sd=_full_optimizer_state(ckpt, model, optimizer, sharded)), info)
    full = box.get("sd")
    # the structure, with each tensor of more than one element replaced by (shape, dtype)
    skeleton = (
        None
        if full is None
        else {
            "param_groups": full["param_groups"],
            "state": {i: {k: _describe(v) for k, v in s.items()} for i, s in full["state"].items()},
        }
    )
    skeleton = broadcast_object(skeleton, info)
    owner = _owners(optimizer, info) if zero1 else None
    state: dict[int, dict[str, Any]] = {}
    for i, entries in skeleton["state"].items():
        mine = owner is None or owner[i] == info.rank
        kept = {}
        for k, v in entries.items():
            if not isinstance(v, _Sent):
                kept[k] = v
                continue
            t = _transfer(
                full["state"][i][k] if info.is_main else None,
                v,
                None if owner is None else owner[i],
                info,
                mine,
            )
            if t is not None:
                kept[k] = t
        if mine:
            state[i] = kept
    optimizer.load_state_dict({"state": state, "param_groups": skeleton["param_groups"]})


class _Sent(NamedTuple):
    """Stands for a tensor in the optimizer state's skeleton: it is sent on its own."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _describe(v: Any) -> Any:
    """(shape, dtype) of a tensor that is sent on its own; small values travel as they are
    (a 0-dim "step" is copied, so nothing keeps the memory-mapped file alive)."""
    if isinstance(v, torch.Tensor):
        return _Sent(tuple(v.shape), v.dtype) if v.dim() > 0 else v.clone()
    return v


def _transfer(
    t: torch.Tensor | None, spec: _Sent, owner: int | None, info: DistInfo, mine: bool
) -> torch.Tensor | None:
    """One state tensor from rank 0 (`t` there) to every rank (`owner` None: a broadcast) or
    to `owner` only; the ranks that keep it get it on their device."""
    if info.is_main and (owner is None or owner == 0):
        buf = t.to(info.device, copy=True)
    elif mine:
        buf = torch.empty(spec.shape, dtype=spec.dtype, device=info.device)
    else:
        buf = None
    if info.enabled and owner is None:
        dist.broadcast(buf, src=0)
    elif info.enabled and owner != 0:
        if info.is_main:
            dist.send(t.to(info.device), dst=owner)
        elif mine:
            dist.recv(buf, src=0)
    return buf


def _owners(optimizer, info: DistInfo) -> dict[int, int]:
    """ZeRO-1: the rank holding each optimizer index's state (its local optimizer's params)."""
    local = {id(p) for group in optimizer.optim.param_groups for p in group["params"]}
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    mine = [i for i, p in enumerate(flat) if id(p) in local]
    every = [None] * info.world
    dist.all_gather_object(every, mine, group=info.control)
    return {i: rank for rank, indices in enumerate(every) for i in indices}


def _load_full_into_shards(ckpt, model: nn.Module, optimizer, info: DistInfo) -> None:
    """A full checkpoint under FSDP2 on several processes: rank 0 reads the files (host memory:
    the full state, on rank 0 only); `broadcast_from_rank0` sends each tensor and every rank
    keeps its shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from stoker.train.checkpoint import load_state_dict_file

    names = _param_names(model, optimizer)
    box: dict[str, Any] = {"model": {}, "optim": {}}

    def read() -> None:
        box["model"] = load_state_dict_file(ckpt / "model.safetensors")
        box["optim"] = _rekey(_read_optimizer_file(ckpt), names, True, ckpt / "optimizer.pt")

    run_on_main(read, info)
    from stoker.train.checkpoint import saved_names

    opts = StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True, strict=saved_names(unwrap(model)) is None
    )
    set_model_state_dict(model, box["model"], options=opts)
    set_optimizer_state_dict(model, optimizer, box["optim"], options=opts)
