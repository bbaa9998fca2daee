"""LoRA adapters in and out of PEFT's directory format, as commands see them.

- `export_adapter`: a LoRA fine-tuning run -> a PEFT adapter directory
  (`adapter_config.json` + `adapter_model.safetensors`, models/hf_peft.py) whose
  `base_model_name_or_path` is the run's base and whose weights header records the base's
  weights hash, plus the run's tokenizer files.
- `import_adapter`: a PEFT adapter directory + its base -> a stoker checkpoint holding the
  adapters only (the base recorded as a LoRA run records it), so eval, generate, export and
  `train.resume` treat it like a run of ours. An adapter whose recorded base hash differs from
  the base it is put on is refused. Per-module alphas, which a `lora` section cannot express,
  are merged into a full checkpoint instead.
"""

from __future__ import annotations

from pathlib import Path

from stoker.config import FinetuneRecipeConfig, LoRAConfig, TrainConfig, validate_config
from stoker.errors import StokerError

BASE_SHA = "stoker_base_sha256"  # key in the adapter weights' safetensors header


def export_adapter(ckpt: Path, out: str | Path) -> Path:
    from stoker.api import load_model
    from stoker.data.tokenizer import copy_tokenizer_files
    from stoker.models.hf_peft import export_peft
    from stoker.train.checkpoint import read_meta

    meta = read_meta(ckpt)
    cfg = validate_config(meta["config"])
    if getattr(cfg, "lora", None) is None or "base" not in meta:
        raise StokerError(
            f"{ckpt} is not a LoRA fine-tuning run; --adapter exports LoRA "
            "adapters (drop it to export the whole model)"
        )
    base = meta["base"]
    model = load_model(ckpt)  # checks the base is still the one it was trained on
    dst = export_peft(model, out, base["path"], {BASE_SHA: base["sha256"]})
    if (ckpt / "tokenizer").is_dir():
        copy_tokenizer_files(ckpt / "tokenizer", dst)
    return dst


def import_adapter(adapter_dir: Path, dst: Path, base: str | Path | None = None) -> Path:
    from stoker.models.hf_peft import adapter_metadata, import_peft, read_adapter_config
    from stoker.models.lora import lora_layers
    from stoker.tasks.source import load_source_model, open_source, strip_lora, weights_sha256
    from stoker.train.checkpoint import (
        save_model_checkpoint,
        save_trainable_only,
        saved_part,
        write_checkpoint,
        write_checkpoint_extras,
    )

    base = base or read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base:
        raise StokerError(
            f"{adapter_dir} names no base model (base_model_name_or_path); "
            "pass --base DIR, the model the adapter was trained on"
        )
    src = open_source(base, "the adapter's base")
    recorded, now = adapter_metadata(adapter_dir).get(BASE_SHA), weights_sha256(src)
    if recorded is not None and recorded != now:
        raise StokerError(
            f"the adapter {adapter_dir} was exported against a base whose weights "
            f"hash {recorded[:12]}…, but {src.path} hashes {now[:12]}…; pass "
            "--base with the model it was trained on"
        )
    model = load_source_model(src, "cpu")
    names = import_peft(model, adapter_dir)
    layers = lora_layers(model)
    alphas = {m.alpha for m in layers.values()}
    tok = src.tokenizer
    if len(alphas) > 1:  # not expressible as one lora section: the adapted model, merged
        config = FinetuneRecipeConfig(model=src.model).model_dump(mode="json")
        return save_model_checkpoint(dst, strip_lora(model), config, tok)
    ranks = [m.r for m in layers.values()]
    r = max(set(ranks), key=ranks.count)
    lora = LoRAConfig(
        r=r,
        alpha=alphas.pop(),
        targets=names,
        rslora=next(iter(layers.values())).rslora,
        ranks={n: m.r for n, m in layers.items() if m.r != r} or None,
        dropout=min(read_adapter_config(adapter_dir).get("lora_dropout") or 0.0, 0.99),
    )
    described = src.describe()
    config = FinetuneRecipeConfig(
        model=src.model, lora=lora, train=TrainConfig(init_from=described["path"])
    )
    save_trainable_only(model)
    sd = saved_part(model, model.state_dict())

    def write(tmp: Path) -> None:
        from stoker.train.checkpoint import save_state_dict

        save_state_dict(sd, tmp / "model.safetensors")
        write_checkpoint_extras(tmp, tok, None)

    meta = {
        "step": 0,
        "config": config.model_dump(mode="json"),
        "base": described,
        "init_from": described,
    }
    return write_checkpoint(dst, meta, write)
