"""Where a run's starting weights come from: `train.init_from` = RUN | CHECKPOINT | HF_DIR.

The architecture comes from the source: recipe `model` keys that contradict it are one error
naming them (dropout may be set). The tokenizer comes from it too. A run trained on a frozen
base records the base (`describe`: path and a SHA-256 over its weight files) in every
checkpoint, and whatever later rebuilds that model (resume, eval, generate, export) checks
the base is still the same (`check_base`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from stoker.config import ModelConfig, RecipeConfig, validate_config
from stoker.errors import StokerError

MAY_DIFFER = {"preset", "dropout", "init_std"}  # model keys a recipe may set over the source's


@dataclass
class Source:
    path: Path  # a checkpoint dir or a local HF dir
    kind: str  # "stoker" | "hf"
    model: ModelConfig
    tokenizer: Path | None  # its tokenizer dir, if it has one
    recipe: dict[str, Any] | None = None  # a stoker checkpoint's saved config

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve()), "kind": self.kind, "sha256": weights_sha256(self)}


def open_source(path: str | Path, key: str = "train.init_from") -> Source:
    """The model a path names, or a one-line StokerError saying why it is not one."""
    from stoker.api import is_hf_dir
    from stoker.train.checkpoint import read_meta, resolve_checkpoint

    p = Path(path)
    what = "a run dir, a stoker checkpoint or a local Hugging Face model directory"
    if not p.exists():
        raise StokerError(f"{key} {p} does not exist; give {what}")
    if is_hf_dir(p):
        from stoker.models.hf import config_from_hf, read_hf_config

        tok = p if (p / "tokenizer.json").is_file() else None
        return Source(p, "hf", config_from_hf(read_hf_config(p)), tok)
    try:
        ckpt = resolve_checkpoint(p)
    except StokerError:
        raise StokerError(f"{key} {p} is not a model; give {what}") from None
    saved = read_meta(ckpt).get("config", {})
    if saved.get("mor") is not None:
        raise StokerError(
            f"{key} {ckpt} is a Mixture-of-Recursions model; give a decoder "
            "(MoR recipes uptrain from one with mor.init_from)"
        )
    model = validate_config(saved.get("model", {}), ModelConfig)
    tok = ckpt / "tokenizer" if (ckpt / "tokenizer").is_dir() else None
    return Source(ckpt, "stoker", model, tok, saved)


def weights_sha256(src: Source) -> str:
    """SHA-256 over the source's weight files (name and content hash of each): a stoker
    checkpoint's from its manifest, an HF dir's `*.safetensors` read here."""
    from stoker.train.checkpoint import file_sha256, read_meta

    if src.kind == "stoker":
        files = read_meta(src.path).get("files") or {}
        entries = {
            k: v["sha256"]
            for k, v in files.items()
            if k == "model.safetensors" or k.startswith("dcp/")
        }
        if not entries:  # written before manifests
            entries = {"model.safetensors": file_sha256(src.path / "model.safetensors")}
    else:
        entries = {f.name: file_sha256(f) for f in sorted(src.path.glob("*.safetensors"))}
    text = "".join(f"{k} {v}\n" for k, v in sorted(entries.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def resolve_init(cfg: RecipeConfig) -> tuple[RecipeConfig, Source]:
    """`cfg` with the model section (and an unset tokenizer) taken from `train.init_from`."""
    src = open_source(cfg.train.init_from)
    given = cfg.model
    clash = [
        f"model.{k}={getattr(given, k)!r} (source: {getattr(src.model, k)!r})"
        for k in sorted(given.model_fields_set - MAY_DIFFER)
        if getattr(given, k) != getattr(src.model, k)
    ]
    if clash:
        raise StokerError(
            f"{', '.join(clash)} contradict train.init_from {src.path}, whose "
            "architecture the run takes; remove those keys from the recipe"
        )
    keep = {k: getattr(given, k) for k in ("dropout", "init_std") if k in given.model_fields_set}
    model = src.model.model_copy(update=keep)
    seq = cfg.train.seq_len
    if seq is not None and seq > model.max_seq_len:
        raise StokerError(
            f"train.seq_len={seq} exceeds the source's max_seq_len="
            f"{model.max_seq_len}; lower train.seq_len"
        )
    update: dict[str, Any] = {"model": model}
    if cfg.recipe == "pretrain" and cfg.data.tokenizer.path is None:
        if src.tokenizer is None:
            raise StokerError(
                f"train.init_from {src.path} carries no tokenizer; set "
                "data.tokenizer.path to the tokenizer it was trained with"
            )
        tok = cfg.data.tokenizer.model_copy(update={"path": str(src.tokenizer)})
        update["data"] = cfg.data.model_copy(update={"tokenizer": tok})
    return cfg.model_copy(update=update), src


def check_base(recorded: dict[str, Any] | None, what: str) -> Source:
    """The base a checkpoint was trained on, if it is still the same; else a one-line error."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("path"), str):
        raise StokerError(
            f"{what} holds adapters but no record of its base model; "
            "re-train it, or load the adapters onto their base yourself"
        )
    src = open_source(recorded["path"], f"the base of {what}")
    now = weights_sha256(src)
    if now != recorded.get("sha256"):
        raise StokerError(
            f"{what} was trained on the base {src.path} with weights SHA-256 "
            f"{str(recorded.get('sha256'))[:12]}…, but that base now hashes to {now[:12]}…; "
            "restore the original base weights (its adapters do not fit another base)"
        )
    return src


def load_source_model(
    src: Source, device: torch.device | str, model_cfg: ModelConfig | None = None
) -> nn.Module:
    """The source's decoder on `device` (a LoRA run's adapters merged in), with
    `model_cfg`'s dropout when given."""
    from stoker.api import load_model

    model = strip_lora(load_model(src.path, device))
    if model_cfg is not None:
        set_dropout(model, model_cfg.dropout)
        model.config = model_cfg
    return model


def strip_lora(model: nn.Module) -> nn.Module:
    """A model whose LoRA layers (if any) are merged into plain `nn.Linear`s."""
    from stoker.models.lora import LoRALayer, lora_layers, merge_lora, replace_linears

    layers = lora_layers(model)
    if not layers:
        return model
    merge_lora(model)

    def plain(name: str, m: LoRALayer) -> nn.Linear:
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight, lin.bias = m.weight, m.bias
        return lin

    replace_linears(model, list(layers), plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def set_dropout(model: nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(getattr(m, "dropout", None), float):  # attention's SDPA dropout
            m.dropout = p
