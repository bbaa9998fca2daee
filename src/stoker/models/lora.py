"""Low-rank adapters (LoRA; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv 2106.09685), our own, for any module tree built from `nn.Linear`s.

- `LoRALinear` wraps a frozen linear layer: y = W x + b + s·B A dropout(x), A (r, in) drawn
  like PEFT's (kaiming-uniform, a = √5), B (out, r) zero, so an adapted model's first forward
  is the base model's, bit for bit. s = alpha/r, or alpha/√r with rsLoRA (Kalajdzievski 2023,
  arXiv 2312.03732). The base `weight`/`bias` stay the very same Parameters under the same
  names, so a base checkpoint still loads and tied or shared weights stay tied.
- `apply_lora` replaces the linears `LoRAConfig.targets` names (fnmatch patterns on a module's
  dotted name or a dotted suffix of it, or `all-linear`: every linear but the LM head, as
  PEFT does) and freezes everything else. A module reachable under several names (MoR's
  shared blocks) is wrapped once: its adapter is shared as its weights are.
- `merge_lora` / `unmerge_lora` fold s·B A into W for inference and take it back out.
- `lora_state_dict` / `load_lora_state_dict`: the adapter tensors alone, for small checkpoints.
- `LoRALayer` is what this and the per-example mixture (models/lora_mixture.py) share; the
  PEFT file format is models/hf_peft.py.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from stoker.config import LoRAConfig
from stoker.errors import StokerError


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """The adapter's output scale: alpha/r, or alpha/√r (rsLoRA)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoRALayer(nn.Module):
    """A frozen linear layer's `weight`/`bias` (the base module's own Parameters) plus
    low-rank factors `lora_A` (rank, in) and `lora_B` (out, rank), and dropout on the adapter
    input. Subclasses decide how the rank rows are scaled."""

    def __init__(self, base: nn.Linear, rank: int, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        for p in (base.weight, base.bias):
            if p is not None:
                p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(
            torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init, and nn.Linear's
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()


class LoRALinear(LoRALayer):
    """W x + b + s·B A dropout(x), or W' x + b with W' = W + s·B A while `merged`."""

    def __init__(
        self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False
    ):
        super().__init__(base, r, dropout)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scale = lora_scale(r, alpha, rslora)
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out), what the base layer computes
        if self.merged:
            if self.training:
                raise StokerError(
                    "a merged LoRA layer cannot train (its adapter gets no gradient); "
                    "call unmerge_lora(model) before training"
                )
            return y
        z = F.linear(self.lora_dropout(x), self.lora_A) * self.scale  # (..., r)
        return y + F.linear(z, self.lora_B)  # (..., out); exactly y while B = 0

    def delta_weight(self) -> torch.Tensor:
        """s·B A (out, in), in float32 or wider, as merging adds it."""
        dtype = torch.promote_types(self.lora_B.dtype, torch.float32)
        return self.scale * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, rslora={self.rslora}, merged={self.merged}"
        )


# -------------------------------------------------------------------------------- selection
def name_matches(name: str, pattern: str) -> bool:
    """`pattern` (fnmatch, case-sensitive) matches the dotted `name` or a dotted suffix of it:
    `q_proj` and `self_attn.*` match `layers.0.self_attn.q_proj`, `layers.1.*` does not."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def layer_index(name: str) -> int | None:
    """The first integer component of a dotted module name (`layers.3.mlp.up_proj` -> 3)."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m[1]) if m else None


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's linear layers (adapted or not), each module once."""
    return [n for n, m in model.named_modules() if n and isinstance(m, (nn.Linear, LoRALayer))]


def _output_heads(model: nn.Module) -> set[int]:
    """ids of the output layers `all-linear` leaves alone: modules named `lm_head`, linears
    whose weight is an embedding's (tied), and `model.get_output_embeddings()` if defined."""
    heads = {id(m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "lm_head"}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    heads |= {
        id(m) for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) in embeddings
    }
    get = getattr(model, "get_output_embeddings", None)
    if callable(get) and isinstance(get(), nn.Module):
        heads.add(id(get()))
    return heads


def select_linears(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the plain `nn.Linear`s `targets` selects (first name of each module);
    StokerError listing the model's linear layers when nothing matches."""
    heads = _output_heads(model) if targets == "all-linear" else set()
    found = [
        n
        for n, m in model.named_modules()
        if n
        and isinstance(m, nn.Linear)
        and id(m) not in heads
        and (targets == "all-linear" or any(name_matches(n, p) for p in targets))
    ]
    if not found:
        kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in linear_names(model)))
        shown = targets if isinstance(targets, str) else ",".join(targets)
        raise StokerError(
            f"lora.targets={shown} matches no (unadapted) linear layer of this model; its "
            f"linear layers are: {', '.join(kinds) or 'none'}"
        )
    owners: dict[int, list[str]] = {}  # a tied weight: merging would change its other users
    for n, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(n)
    for n in found:
        users = owners[id(model.get_submodule(n).weight)]
        if len(users) > 1:
            raise StokerError(
                f"{n}.weight is tied to {users[0] if users[0] != n else users[1]}.weight; "
                "LoRA on a tied layer would change both when merged: leave it out of lora.targets"
            )
    return found


def replace_linears(
    model: nn.Module, names: Iterable[str], make: Callable[[str, nn.Linear], nn.Module]
) -> None:
    """Put `make(name, linear)` in place of each named linear, everywhere the same module
    object is registered (once per module: a shared layer gets one shared wrapper)."""
    wanted = {id(model.get_submodule(n)): n for n in names}
    made: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for attr, child in list(parent._modules.items()):  # every attribute, duplicates too
            if child is not None and id(child) in wanted:
                if id(child) not in made:  # in the replaced layer's train/eval mode
                    made[id(child)] = make(wanted[id(child)], child).train(child.training)
                setattr(parent, attr, made[id(child)])


def freeze_all_but_lora(model: nn.Module) -> None:
    """requires_grad on the adapter factors only."""
    lora = {
        id(p) for m in model.modules() if isinstance(m, LoRALayer) for p in (m.lora_A, m.lora_B)
    }
    for p in model.parameters():
        p.requires_grad_(id(p) in lora)


def _rank_of(name: str, cfg: LoRAConfig) -> int:
    for pattern, r in (cfg.ranks or {}).items():
        if name_matches(name, pattern):
            return r
    return cfg.r


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap the linears `cfg.targets` selects in `LoRALinear`s (rank `cfg.ranks`' first
    matching pattern, else `cfg.r`), freeze every other parameter; the adapted names."""
    names = select_linears(model, cfg.targets)
    unused = [p for p in cfg.ranks or {} if not any(name_matches(n, p) for n in names)]
    if unused:
        raise StokerError(
            f"lora.ranks pattern(s) {', '.join(unused)} match none of the adapted layers "
            f"({', '.join(dict.fromkeys(n.rsplit('.', 1)[-1] for n in names))})"
        )
    replace_linears(
        model,
        names,
        lambda n, lin: LoRALinear(lin, _rank_of(n, cfg), cfg.alpha, cfg.dropout, cfg.rslora),
    )
    freeze_all_but_lora(model)
    return names


def store_frozen_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep the frozen weights (and biases) of linear layers in `dtype`: what autocast in
    `dtype` casts them to on every forward anyway, so a forward under autocast computes the
    same values (same GEMM inputs), without the per-step cast and its copy held until
    backward, and with half the memory for the frozen base. Weights shared with an
    embedding (a tied LM head) and anything trainable stay as they are. The number of
    parameters converted."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    done: set[int] = set()
    for m in model.modules():
        if not isinstance(m, (nn.Linear, LoRALayer)):
            continue
        for p in (m.weight, m.bias):
            if p is None or p.requires_grad or id(p) in embedded or id(p) in done:
                continue
            p.data = p.data.to(dtype)
            done.add(id(p))
    return len(done)


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every adapted layer by (first) name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def _single_adapters(model: nn.Module, action: str) -> list[LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise StokerError(f"cannot {action}: the model has no LoRA layers (apply_lora first)")
    mixed = [n for n, m in layers.items() if not isinstance(m, LoRALinear)]
    if mixed:
        raise StokerError(
            f"cannot {action} {mixed[0]}: a mixture of adapters is gated per example, so it "
            "has no merged weight"
        )
    return list(layers.values())


def merge_lora(model: nn.Module) -> None:
    """W += s·B A in every LoRALinear (inference: no adapter cost; `unmerge_lora` undoes)."""
    for m in _single_adapters(model, "merge"):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """W -= s·B A where merged: the base weights back, up to rounding."""
    for m in _single_adapters(model, "unmerge"):
        m.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only (`<layer>.lora_A`, `<layer>.lora_B`), detached; a shared
    layer's once."""
    return {
        f"{n}.{k}": getattr(m, k).detach()
        for n, m in lora_layers(model).items()
        for k in ("lora_A", "lora_B")
    }


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy `lora_state_dict` tensors into an identically adapted model (keys and shapes
    must match exactly)."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        raise StokerError(
            f"adapter weights do not match the model's LoRA layers: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; apply the same lora config before loading"
        )
    bad = [k for k in own if own[k].shape != sd[k].shape]
    if bad:
        raise StokerError(
            f"adapter weight {bad[0]} has shape {tuple(sd[bad[0]].shape)}, the model's is "
            f"{tuple(own[bad[0]].shape)}: the ranks differ"
        )
    if any(getattr(m, "merged", False) for m in lora_layers(model).values()):
        raise StokerError("load adapter weights into an unmerged model (unmerge_lora first)")
    for k, t in own.items():
        t.copy_(sd[k])
