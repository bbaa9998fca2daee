"""Uptraining a Mixture-of-Recursions model from a pretrained decoder checkpoint.

The shared blocks start from the pretrained layers they replace, chosen by one of the
initialization strategies of Relaxed Recursive Transformers (Bae et al. 2024, arXiv
2410.20672, §3.1, which Mixture-of-Recursions, Bae et al. 2025 §3, builds on):
- `stepwise`: block i of the B shared blocks takes pretrained layer round(lo + i·(hi−lo)/(B−1))
  of the shared range [lo, hi] (every other layer for R = 2);
- `average`: each shared block is the mean of the pretrained layers tied to it;
- `lower` / `upper`: the first / last B layers of the shared range.
Under middle_* sharing the unique first and last layers copy pretrained layers 0 and N−1.
Embeddings, final norm and LM head are copied; routers keep their random initialization.
"""

from __future__ import annotations

import torch

from stoker.config import ModelConfig
from stoker.errors import StokerError
from stoker.models.mor import MoRDecoder

_IGNORED = {"preset", "dropout", "init_std"}


def source_layers(n_layer: int, plan: list[int], middle: bool, strategy: str) -> list[list[int]]:
    """For every unique block, the pretrained layers it starts from (averaged when several)."""
    U = max(plan) + 1
    shared = list(range(1, U - 1)) if middle else list(range(U))
    lo, hi = (1, n_layer - 2) if middle else (0, n_layer - 1)
    B = len(shared)
    out: dict[int, list[int]] = {0: [0], U - 1: [n_layer - 1]} if middle else {}
    for i, u in enumerate(shared):
        if strategy == "average":
            out[u] = [j for j, uu in enumerate(plan) if uu == u]
        elif strategy == "stepwise":
            out[u] = [round(lo + i * (hi - lo) / (B - 1)) if B > 1 else lo]
        elif strategy == "lower":
            out[u] = [lo + i]
        elif strategy == "upper":
            out[u] = [hi - B + 1 + i]
        else:
            raise StokerError(
                f"unknown mor.init {strategy!r}; known: stepwise, average, lower, upper"
            )
    return [out[u] for u in range(U)]


def _check_source(src: ModelConfig, dst: ModelConfig) -> None:
    a, b = src.model_dump(), dst.model_dump()
    diff = [
        f"model.{k}: checkpoint {a[k]!r} vs recipe {b[k]!r}"
        for k in sorted(a)
        if k not in _IGNORED and a[k] != b[k]
    ]
    if diff:
        raise StokerError(
            f"mor.init_from checkpoint does not fit this recipe's model "
            f"({'; '.join(diff)}); uptraining keeps the decoder's shape"
        )


@torch.no_grad()
def uptrain(
    model: MoRDecoder, state: dict[str, torch.Tensor], src_cfg: ModelConfig, strategy: str
) -> None:
    """Overwrite `model`'s non-router weights from a decoder's state dict (see module doc)."""
    _check_source(src_cfg, model.config)
    own = model.state_dict()
    for name, t in own.items():
        if not name.startswith(("layers.", "routers.", "router_bias")):
            t.copy_(state[name])
    middle = model.mor.sharing.startswith("middle")
    for u, js in enumerate(source_layers(src_cfg.n_layer, model.plan, middle, strategy)):
        for name, t in model.layers[u].state_dict().items():
            t.copy_(torch.stack([state[f"layers.{j}.{name}"] for j in js]).mean(dim=0))
