"""Optimizer and learning-rate schedules.

AdamW with weight decay on 2-D weights only (matrices and embeddings; norms and biases are
not decayed, as in nanoGPT/GPT-3), fused (one kernel for all parameters) on CPU and CUDA —
on this project's 2-core CPU a fused step takes 12 ms vs 76 ms foreach for bench-llama's
15.7M parameters (docs/log.md) — foreach elsewhere (MPS, old torch). Schedules are pure
functions of the step so resuming needs no scheduler state beyond the step itself.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch

from stoker.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: 2-D parameters decayed, everything else not. Tied weights appear once."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields each shared Parameter once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: torch.nn.Module,
    cfg: OptimConfig,
    device_type: str,
    zero1: bool = False,
    groups: list[dict] | None = None,
) -> torch.optim.Optimizer:
    """AdamW (fused on CPU/CUDA, foreach otherwise) over `groups` (default: `param_groups`;
    a group's `lr_scale` multiplies the schedule's lr); ZeroRedundancyOptimizer when `zero1`."""
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if device_type in ("cuda", "cpu") and fused_adamw_available(device_type):
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    groups = [g for g in groups or param_groups(model, cfg.weight_decay) if g["params"]]
    if not zero1:
        return torch.optim.AdamW(groups, **kwargs)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    kwargs.pop("foreach", None)
    first, *rest = groups
    zero = ZeroRedundancyOptimizer(
        first["params"],
        optimizer_class=torch.optim.AdamW,
        weight_decay=first["weight_decay"],
        **kwargs,
    )
    zero.param_groups[0].update({k: v for k, v in first.items() if k != "params"})
    for group in rest:
        zero.add_param_group(group)
    return zero


@functools.cache
def fused_adamw_available(device_type: str) -> bool:
    """torch >= 2.4 has a fused AdamW for CPU and CUDA."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    try:
        torch.optim.AdamW([torch.zeros(1, device=device_type, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based).

    cosine: linear warmup, cosine decay to lr·min_lr_ratio at max_steps.
    wsd: linear warmup, constant, then linear decay to lr·min_lr_ratio over the last
         `decay_fraction` of the steps (warmup-stable-decay, Hu et al. 2024).
    constant: linear warmup, then constant.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, max_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * max_steps))
    decay_start = max(warmup, max_steps - decay_steps)
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return peak + (floor - peak) * progress
