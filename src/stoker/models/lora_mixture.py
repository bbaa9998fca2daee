"""A mixture of LoRA adapters inside one linear layer, mixed per example by external gates:
what the dynamo recipe's router drives (DESIGN.md: "a learned router that mixes adapters per
input"; cf. LoRAHub, Huang et al. 2023, arXiv 2307.13269, and MoLE, Wu et al. 2024, arXiv
2404.13628, which mix LoRAs with learned weights).

`LoRAMixtureLinear` holds E adapters of ranks r_1 … r_E over one frozen base layer as one
concatenated pair, A_cat (Σr, in) and B_cat (out, Σr), and computes

    y = W x + b + B_cat (g ⊙ z),   z = A_cat dropout(x),   g = gate_e · s_e on adapter e's rows,

one low-rank product for all adapters, exactly Σ_e gate_e · s_e · B_e A_e x, and
differentiable in the gates. Gates (B, E) are set on the model before the forward with
`set_gates` (or `use_gates`): the same for every layer, per layer as (B, L, E), or as a dict
layer → (B, E); a layer is the first integer in a module's name (`layers.<i>.`), for MoR the
unique shared block. A forward without gates is an error, never a silent base-model forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from stoker.config import LoRAConfig
from stoker.errors import StokerError
from stoker.models.lora import (
    LoRALayer,
    freeze_all_but_lora,
    layer_index,
    lora_scale,
    replace_linears,
    select_linears,
)

Gates = torch.Tensor | dict[int, torch.Tensor]


class LoRAMixtureLinear(LoRALayer):
    """E LoRA adapters over one frozen linear layer, mixed per example by `gates` (B, E)."""

    def __init__(
        self,
        base: nn.Linear,
        ranks: Sequence[int],
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        layer: int | None = None,
    ):
        super().__init__(base, sum(ranks), dropout)
        self.ranks, self.alpha, self.rslora, self.layer = list(ranks), alpha, rslora, layer
        E, dev = len(self.ranks), base.weight.device
        sizes = torch.tensor(self.ranks, device=dev)
        scales = torch.tensor([lora_scale(r, alpha, rslora) for r in self.ranks], device=dev)
        # which adapter each of the Σr rank rows belongs to, and that adapter's scale s_e
        self.register_buffer(
            "owner", torch.arange(E, device=dev).repeat_interleave(sizes), persistent=False
        )  # (Σr,)
        self.register_buffer("row_scale", scales.repeat_interleave(sizes), persistent=False)
        self.gates: torch.Tensor | None = None  # (B, E), set by `set_gates`

    @property
    def n_adapters(self) -> int:
        return len(self.ranks)

    def adapter(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of adapter e's A_e (r_e, in) and B_e (out, r_e)."""
        start = sum(self.ranks[:e])
        rows = slice(start, start + self.ranks[e])
        return self.lora_A[rows], self.lora_B[:, rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        y = F.linear(x, self.weight, self.bias)  # (B, ..., out)
        g = self.gates
        if g is None:
            raise StokerError(
                "LoRA mixture layers need gates: call set_gates(model, gates) (B, E) before "
                "the forward, or use `with use_gates(model, gates):`"
            )
        if g.shape[0] != B:
            raise StokerError(f"gates are for {g.shape[0]} examples, the batch has {B}")
        w = g.to(x.dtype)[:, self.owner] * self.row_scale.to(x.dtype)  # (B, Σr): gate_e · s_e
        w = w.view(B, *([1] * (x.dim() - 2)), -1)  # (B, 1, Σr) for x (B, T, in)
        z = F.linear(self.lora_dropout(x), self.lora_A)  # (B, T, Σr)
        return y + F.linear(z * w, self.lora_B)  # (B, T, out); exactly y where gates are 0

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, ranks={self.ranks}, "
            f"alpha={self.alpha}, rslora={self.rslora}, layer={self.layer}"
        )


def apply_lora_mixture(
    model: nn.Module, ranks: Sequence[int], cfg: LoRAConfig | None = None
) -> list[str]:
    """Wrap the linears `cfg.targets` selects in `LoRAMixtureLinear`s with adapters of
    `ranks` (alpha, dropout, rslora from `cfg`), freeze every other parameter; the names."""
    cfg = cfg or LoRAConfig()
    ranks = list(ranks)
    if not ranks or any(not isinstance(r, int) or r < 1 for r in ranks):
        raise StokerError(f"a LoRA mixture needs one or more positive ranks, got {ranks}")
    if cfg.ranks:
        raise StokerError(
            "lora.ranks (per-layer ranks) does not combine with a mixture's per-adapter "
            "ranks; leave lora.ranks unset"
        )
    names = select_linears(model, cfg.targets)
    replace_linears(
        model,
        names,
        lambda n, lin: LoRAMixtureLinear(
            lin, ranks, cfg.alpha, cfg.dropout, cfg.rslora, layer_index(n)
        ),
    )
    freeze_all_but_lora(model)
    return names


def mixture_layers(model: nn.Module) -> dict[str, LoRAMixtureLinear]:
    """Every mixture layer by (first) name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAMixtureLinear)}


def _gates_for(name: str, m: LoRAMixtureLinear, gates: Gates) -> torch.Tensor:
    if isinstance(gates, dict) or gates.dim() == 3:
        if m.layer is None:
            raise StokerError(f"per-layer gates, but {name} has no layer index in its name")
        if isinstance(gates, dict):
            if m.layer not in gates:
                raise StokerError(
                    f"per-layer gates have no entry for layer {m.layer} ({name}); give "
                    f"every layer its gates (layers {sorted(gates)} given)"
                )
            g = gates[m.layer]
        elif m.layer >= gates.shape[1]:
            raise StokerError(f"gates (B, L, E) have L={gates.shape[1]}, {name} is layer {m.layer}")
        else:
            g = gates[:, m.layer]  # (B, E)
    else:
        g = gates
    if g.dim() != 2 or g.shape[1] != m.n_adapters:
        raise StokerError(
            f"gates for {name} have shape {tuple(g.shape)}; expected (batch, "
            f"{m.n_adapters}) (one gate per adapter), or (batch, layers, {m.n_adapters})"
        )
    return g


def set_gates(model: nn.Module, gates: Gates | None) -> None:
    """Gates for the next forwards: (B, E) for every mixture layer, (B, L, E) or a dict
    layer → (B, E) per layer; None clears them. Autograd flows back into the gates."""
    layers = mixture_layers(model)
    if not layers:
        raise StokerError("the model has no LoRA mixture layers (apply_lora_mixture first)")
    chosen = {n: None if gates is None else _gates_for(n, m, gates) for n, m in layers.items()}
    for n, m in layers.items():  # all checked first: bad gates change nothing
        m.gates = chosen[n]


@contextmanager
def use_gates(model: nn.Module, gates: Gates) -> Iterator[None]:
    """`set_gates(model, gates)` for the block; the gates are cleared on exit."""
    set_gates(model, gates)
    try:
        yield
    finally:
        set_gates(model, None)
