"""torch.distributed, applied to a built model from outside (torchtitan's `parallelize` idea).

One process: everything here is a no-op. Under `torchrun` (WORLD_SIZE > 1) the process group
is created with nccl on CUDA and gloo on CPU, and the model is wrapped by strategy:
- `ddp`: DistributedDataParallel; gradients all-reduced on the last micro-step only.
- `zero1`: DDP + ZeroRedundancyOptimizer (Adam state sharded across ranks).
- `fsdp2`: `fully_shard` on every block and the root (parameters, grads and optimizer state
  sharded); checkpoints go through torch.distributed.checkpoint's full-state-dict API, so a
  checkpoint is the same safetensors file whatever the strategy and world size.
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


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str,
               info: DistInfo) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unsharded) model and optimizer state; meaningful on rank 0. Collective."""
    if strategy == "fsdp2" and info.enabled:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(model, options=opts),
                get_optimizer_state_dict(model, optimizer, options=opts))
    if strategy == "zero1" and info.enabled:
        optimizer.consolidate_state_dict(to=0)
        opt_state = optimizer.state_dict() if info.is_main else {}
    else:
        opt_state = optimizer.state_dict()
    return unwrap(model).state_dict(), opt_state


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str,
                    info: DistInfo, model_sd: dict[str, torch.Tensor],
                    opt_sd: dict[str, Any]) -> None:
    """Inverse of `full_state`: every rank passes the full state it loaded from disk."""
    if strategy == "fsdp2" and info.enabled:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_sd, options=opts)
        set_optimizer_state_dict(model, optimizer, opt_sd, options=opts)
        return
    unwrap(model).load_state_dict(model_sd)
    optimizer.load_state_dict(opt_sd)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
