"""Parameter tables for `stoker validate`'s init check: trainable tensors grouped by what
they are (LoRA factors, projectors, missing-modality embeddings, heads, the rest)."""

from __future__ import annotations

from pathlib import Path

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


def _skeleton(cfg, unit: str) -> nn.Module | None:
    """The model of `unit` at the recipe's own shapes on the meta device (no memory, no
    weights read), frozen as its task freezes it; None where that needs files (a decoder of
    `train.init_from`, DYNAMO's encoder)."""
    import torch

    from stoker.api import build_model

    if cfg.recipe in ("pretrain", "mor") and cfg.train.init_from is None:
        return build_model(cfg.model, "meta", cfg.mor if cfg.recipe == "mor" else None)
    if cfg.recipe != "multimodal" or unit not in ("lm", "phase2"):
        return None
    if unit == "phase2" and cfg.multimodal.phase2.features == "sequence":
        return None  # its slot lengths come from the data
    from stoker.models.gpt import build_model as build_decoder
    from stoker.models.lora import apply_lora
    from stoker.models.multimodal import freeze
    from stoker.models.multimodal_lm import MultimodalLM
    from stoker.tasks.multimodal.task import AlignModel

    mm = cfg.multimodal
    if unit == "phase2":  # the small encoders on the CPU (their mel filter bank is computed)
        encoders = {m: _encoder(cfg, m) for m in mm.modalities}
    shape = mm.lm.model  # vocab_size as the recipe writes it, or the pretrained decoder's
    if mm.lm.init_from is not None and Path(mm.lm.init_from).exists():
        from stoker.tasks.source import open_source

        shape = open_source(mm.lm.init_from, "multimodal.lm.init_from").model
    with torch.device("meta"):
        lm = build_decoder(shape)
        if unit == "lm":
            return lm
        align = AlignModel(encoders, mm.aligner.dim)
        apply_lora(lm, cfg.lora)
        return MultimodalLM(align.encoders, freeze(align.aligner), lm, {}, mm.phase2.n_tokens,
                            mm.phase2.projector_hidden)  # fmt: skip


def _encoder(cfg, modality: str) -> nn.Module:
    """The unit's encoder; a pretrained one whose directory is absent counts as nothing (an
    empty module of the aligner's input width)."""
    from stoker.models.multimodal import freeze
    from stoker.tasks.multimodal.task import build_encoder

    enc = cfg.multimodal.encoder(modality)
    if enc.pretrained and not Path(enc.path).exists():
        empty = nn.Module()
        empty.dim = cfg.multimodal.aligner.dim
        return empty
    return freeze(build_encoder(cfg, modality))


def full_shape_table(cfg, unit: str) -> str | None:
    """'N parameters, T trainable (x%): lora …, projectors …' of `unit` at full shape."""
    model = _skeleton(cfg, unit)
    if model is None:
        return None
    train = {n: p for n, p in model.named_parameters() if p.requires_grad}
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in train.values())
    return (f"{n_all:,} parameters, {n_train:,} trainable ({100 * n_train / n_all:.2f}%)"
            f"{groups_table(train)}")  # fmt: skip
