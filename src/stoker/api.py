"""The Python API: build a model from a config, load one from a run, checkpoint or HF dir.

    model = stoker.load_model("runs/tiny")          # latest checkpoint of a run
    tok = stoker.load_tokenizer("runs/tiny")
    logits = model(torch.tensor([tok.encode("def f(x):")]))   # (B, T, V)
"""

from __future__ import annotations

from pathlib import Path

import torch

from stoker.config import ModelConfig, validate_config
from stoker.data.tokenizer import Tokenizer
from stoker.errors import StokerError
from stoker.models.gpt import Decoder
from stoker.models.gpt import build_model as _build_decoder
from stoker.train.checkpoint import MARKER, load_weights, read_meta, resolve_checkpoint


def build_model(config: ModelConfig | dict, device: str | torch.device | None = None
                ) -> torch.nn.Module:
    """A freshly initialized model for a model config (or its dict)."""
    if isinstance(config, dict):
        config = validate_config(config, ModelConfig)
    return _build_decoder(config, device)


def is_hf_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not (p / MARKER).is_file()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Decoder:
    """A model from a run dir (latest checkpoint), a checkpoint dir, or a local HF directory."""
    if is_hf_dir(path):
        from stoker.models.hf import load_hf_model

        return load_hf_model(path).to(device)
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    model = build_model(meta["config"]["model"])
    load_weights(model, ckpt)
    return model.to(device).eval()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer carried with a run, checkpoint or HF dir."""
    if is_hf_dir(path):
        return Tokenizer.load(path)
    ckpt = resolve_checkpoint(path)
    if not (ckpt / "tokenizer").is_dir():
        raise StokerError(f"checkpoint {ckpt} carries no tokenizer/; pass --tokenizer DIR")
    return Tokenizer.load(ckpt / "tokenizer")
