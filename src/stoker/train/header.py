"""The few lines a run prints before its progress bar (main rank only).

What a user needs to see at a glance: which recipe, on what, in which precision, where it is
written, how big the model is and what data it reads. The whole resolved config is not
printed: it is in `out_dir/config.yaml`, and the first line says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn


def start_line(recipe: str, source: str | None, device: str, world: int, out: Path) -> str:
    """`stoker: training pretrain (tiny.yaml) on cpu × 1 → runs/tiny (config: …)`."""
    name = f"{recipe} ({Path(source).name})" if source else recipe
    return (
        f"stoker: training {name} on {device} × {world}, writing {out} "
        f"(full config: {out / 'config.yaml'})"
    )


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def model_data_line(model: nn.Module, data_dir: str, meta: dict[str, Any] | None) -> str:
    """Parameter count (and the trainable part when it differs); the data dir and its size."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    size = f"{_count(total)} parameters"
    if trainable != total:
        size += f" ({_count(trainable)} trainable)"
    amount = data_amount(meta or {})
    return f"stoker: model {size}; data {data_dir}" + (f": {amount}" if amount else "")


def data_amount(meta: dict[str, Any]) -> str:
    """The train split's size from a task's `prepare` metadata: shards (tokens, documents),
    SFT arrays (samples, tokens), or a task's own counts (examples per file)."""
    train = (meta.get("splits") or {}).get("train")
    if isinstance(train, dict):
        parts = [
            f"{train[k]:,} {label}"
            for k, label in (("tokens", "tokens"), ("documents", "docs"), ("samples", "samples"))
            if isinstance(train.get(k), int)
        ]
        return "train " + ", ".join(parts) if parts else ""
    counts = {
        k: v.get("records") if isinstance(v, dict) else v
        for k, v in meta.items()
        if not isinstance(v, bool)
    }
    return ", ".join(f"{k} {v:,}" for k, v in counts.items() if isinstance(v, int))


def settings_line(
    precision: str, repro: str, loading: dict[str, Any], reason: str | None = None
) -> str:
    """Resolved precision (with why, when `auto` chose it), determinism and data-loading
    settings, in one line."""
    workers = loading["num_workers"]
    prefetch = f", prefetch {loading['prefetch_factor']} per worker" if workers else ""
    scaler = " + GradScaler" if precision == "fp16" else ""
    why = f" (auto: {reason})" if reason else ""
    return (
        f"stoker: precision {precision}{scaler}{why}; deterministic: {repro}; data loading: "
        f"{workers} worker(s), pin_memory {loading['pin_memory']}{prefetch}"
    )
