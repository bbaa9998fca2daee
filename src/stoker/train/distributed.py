"""torch.distributed, applied to a built model from outside (torchtitan's `parallelize` idea).

One process: everything here is a no-op. Under `torchrun` (WORLD_SIZE > 1) the process group
is created with nccl on CUDA and gloo on CPU, and the model is wrapped by strategy:
- `ddp`: DistributedDataParallel; gradients all-reduced on the last micro-step only.
- `zero1`: DDP + ZeroRedundancyOptimizer (Adam state sharded across ranks).
- `fsdp2`: `fully_shard` on every block and the root (parameters, grads and optimizer state
  sharded); so are its checkpoints: every rank writes and reads only its own shards through
  torch.distributed.checkpoint (train/sharded.py). ddp/zero1 checkpoints are full files that
  rank 0 writes and reads, sending each tensor to the ranks that keep it; every layout resumes
  under every strategy and world size (train/dist_checkpoint.py, docs/cluster.md).
Also here: the collectives the loop and the checkpoint code share (`run_on_main`,
`run_everywhere`, `broadcast_object`, `full_state`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stoker.errors import StokerError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world: int = 1
    control: Any = None  # a gloo group for host-side flags (None: the default group is gloo)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(name: str, key: str = "train.device") -> torch.device:
    """`auto`: cuda, else mps, else cpu. A named device must be one this torch sees, else a
    StokerError naming `key`, the setting that chose it (`train.device` or `--device`)."""
    from stoker.config import DEVICE_NAMES, is_device_name

    cli = key.startswith("--")  # a command-line option, or a recipe key set by --key=value
    said = f"{key} {name}" if cli else f"{key}={name}"
    fix = f"use {key} auto or cpu" if cli else f"use --{key}=auto or cpu"
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if not is_device_name(name):
        raise StokerError(f"{said} is not a device; use {DEVICE_NAMES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StokerError(
            f"{said} but torch sees no CUDA device (torch {torch.__version__}); {fix}"
        )
    n = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= n:
        raise StokerError(
            f"{said} but torch sees {n} CUDA device(s), cuda:0 to cuda:{n - 1}; "
            f"pick one of them or {fix}"
        )
    if device.type == "mps" and not has_mps:
        raise StokerError(f"{said} but torch sees no MPS (Apple GPU) device; {fix}")
    return device


def init_distributed(device_name: str, backend: str = "auto") -> DistInfo:
    """Read torchrun's environment; create the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world > 1 else (device.index or 0))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    control = None
    if world > 1 and dist.get_backend() != "gloo":
        # flags the host needs every step (stop signals) go over gloo on CPU tensors, so
        # reading them never waits for the GPU's queue
        control = dist.new_group(backend="gloo")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return DistInfo(rank, world, local_rank, device, local_world, control)


def parallelize(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """Wrap `model` for the strategy (identity in a single process)."""
    if not info.enabled:
        return model
    if strategy in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp2":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(info.device.type, (info.world,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    raise StokerError(f"unknown dist.strategy {strategy!r}; use ddp, zero1 or fsdp2")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def grad_sync(model: nn.Module, enabled: bool):
    """Context for one micro-step: skip the gradient all-reduce unless `enabled`."""
    if hasattr(model, "no_sync") and not enabled:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world
    return t


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any (stop signals). A host-side collective over
    gloo: no GPU synchronization."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=info.control)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str, info: DistInfo
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full model and optimizer state of a replicated (ddp, zero1) or one-process run; the
    optimizer's is meaningful on rank 0 only (ZeRO-1 consolidates its shards there).
    Collective. FSDP2 runs never gather: they save sharded (train/sharded.py)."""
    if strategy == "zero1" and info.enabled:
        optimizer.consolidate_state_dict(to=0)
        opt_state = optimizer.state_dict() if info.is_main else {}
    else:
        opt_state = optimizer.state_dict()
    from stoker.train.checkpoint import saved_part

    raw = unwrap(model)
    return saved_part(raw, raw.state_dict()), opt_state


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank (host-side, over the gloo control group)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=info.control)
    return box[0]


def _failure(e: BaseException) -> str | None:
    """The one-line message of an error every rank should raise, None for a bug."""
    if isinstance(e, StokerError):
        return str(e)
    if isinstance(e, OSError):
        return f"{e.filename or 'a file'}: {e.strerror or e}"
    return None


def run_on_main(fn, info: DistInfo, cleanup=None) -> None:
    """Run `fn()` on rank 0; a StokerError or OSError there is raised as a StokerError on every
    rank (so no rank waits forever in the next collective). `cleanup()` runs on failure."""
    message = None
    if info.is_main:
        try:
            fn()
        except Exception as e:
            message = _failure(e)
            if cleanup is not None:
                cleanup()
            if message is None or not info.enabled:
                if message is None:
                    raise
                raise StokerError(message) from None
    message = broadcast_object(message, info)
    if message:
        raise StokerError(message)


def run_everywhere(fn, info: DistInfo) -> None:
    """Run `fn()` on every rank; if it fails on any rank, every rank raises (see run_on_main)."""
    message = None
    try:
        fn()
    except Exception as e:
        message = _failure(e)
        if message is None or not info.enabled:
            if message is None:
                raise
            raise StokerError(message) from None
    messages = [message]
    if info.enabled:
        messages = [None] * info.world
        dist.all_gather_object(messages, message, group=info.control)
    failed = next((m for m in messages if m), None)
    if failed:
        raise StokerError(failed)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        # A gloo worker thread may still be releasing the last collective's tensors, which
        # takes the GIL; the group's destructor (when DDP/FSDP drop their reference, holding
        # the GIL) joins that thread: a deadlock. A barrier, waited without the GIL, lets it
        # finish first.
        dist.barrier()
        dist.destroy_process_group()
