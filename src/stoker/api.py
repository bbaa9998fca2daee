"""The Python API: build a model from a config, load one from a run, checkpoint or HF dir.

model = stoker.load_model("runs/tiny")          # latest checkpoint of a run
tok = stoker.load_tokenizer("runs/tiny")
logits = model(torch.tensor([tok.encode("def f(x):")]))   # (B, T, V)
"""

from __future__ import annotations

from pathlib import Path

import torch

from stoker.config import ModelConfig, MoRConfig, validate_config
from stoker.data.tokenizer import Tokenizer
from stoker.errors import StokerError
from stoker.models.gpt import Decoder
from stoker.models.gpt import build_model as _build_decoder
from stoker.train.checkpoint import MARKER, read_meta, resolve_checkpoint


def build_model(
    config: ModelConfig | dict,
    device: str | torch.device | None = None,
    mor: MoRConfig | dict | None = None,
) -> torch.nn.Module:
    """A freshly initialized model for a model config (or its dict): the decoder, or a
    Mixture-of-Recursions model when `mor` is given (uptrained from `mor.init_from` if set)."""
    if isinstance(config, dict):
        config = validate_config(config, ModelConfig)
    if mor is None:
        return _build_decoder(config, device)
    from stoker.models.mor import build_mor

    mor = validate_config(mor, MoRConfig) if isinstance(mor, dict) else mor
    model = build_mor(config, mor, device)
    if mor.init_from is not None and str(device) != "meta":
        from stoker.models.mor_init import uptrain
        from stoker.train.sharded import load_model_state_dict

        src = resolve_checkpoint(mor.init_from)
        uptrain(
            model,
            load_model_state_dict(src),
            validate_config(read_meta(src)["config"]["model"], ModelConfig),
            mor.init,
        )
    return model


def is_hf_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and not (p / MARKER).is_file()


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Decoder:
    """A model from a run dir (latest checkpoint), a checkpoint dir, or a local HF directory
    (a `MoRDecoder` for Mixture-of-Recursions runs; base + LoRA adapters for LoRA runs, whose
    base must still be the one they were trained on). The model is built on the meta device
    and filled on `device` from the checkpoint one tensor at a time: no random init, and no
    host copy of the whole model (a sharded checkpoint is consolidated here from its chunks)."""
    if is_hf_dir(path):
        from stoker.models.hf import load_hf_model

        return load_hf_model(path).to(device)
    from stoker.tasks import task_class

    ckpt = resolve_checkpoint(path)
    cfg = validate_config(read_meta(ckpt)["config"])
    return task_class(cfg).load_trained(cfg, ckpt, torch.device(device))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer carried with a run, checkpoint or HF dir."""
    if is_hf_dir(path):
        return Tokenizer.load(path)
    ckpt = resolve_checkpoint(path)
    if not (ckpt / "tokenizer").is_dir():
        raise StokerError(f"checkpoint {ckpt} carries no tokenizer/; pass --tokenizer DIR")
    return Tokenizer.load(ckpt / "tokenizer")
