"""Parameter tables for `stoker validate`'s init check: trainable tensors grouped by what
they are (LoRA factors, projectors, missing-modality embeddings, heads, the rest)."""

from __future__ import annotations

import torch.nn as nn


def group_of(name: str) -> str:
    if name.endswith((".lora_A", ".lora_B")) or ".lora_" in name:
        return "lora"
    return name.split(".")[0]


def groups_table(params: dict[str, nn.Parameter]) -> str:
    """'; lora 2,162,688, projectors 8,397,824' (empty when one group holds everything)."""
    sums: dict[str, int] = {}
    for name, p in params.items():
        g = group_of(name)
        sums[g] = sums.get(g, 0) + p.numel()
    if len(sums) < 2:
        return ""
    return "; " + ", ".join(f"{g} {n:,}" for g, n in sorted(sums.items(), key=lambda kv: -kv[1]))
