"""`stoker import-hf` / `stoker export-hf`: Hugging Face directories <-> stoker checkpoints.

The conversion itself (config keys, weight names) is models/hf.py's; this module adds what a
command needs around it: checkpoints (train/checkpoint.py), tokenizer files (data/tokenizer.py)
and loading a run (api.py), which models/ may not import.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from stoker.config import ModelConfig, validate_config
from stoker.errors import StokerError, file_errors
from stoker.models.hf import hf_config_from, load_hf_model, state_dict_to_hf


def _check_import_target(src: Path, dst: Path) -> None:
    from stoker.train.checkpoint import is_checkpoint

    if dst.exists() and (
        not dst.is_dir()
        or dst.resolve() == src.resolve()
        or (any(dst.iterdir()) and not is_checkpoint(dst))
    ):
        raise StokerError(
            f"{dst} exists and is not a stoker checkpoint; choose a new output "
            "directory (import never overwrites other files)"
        )


def import_hf(hf_dir: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """Write a stoker checkpoint (weights, config, tokenizer/) of a local HF model directory,
    a GGUF file (LLaMA family; stoker/gguf.py) or a PEFT LoRA adapter directory (onto `base`,
    default its `base_model_name_or_path`; see `import_adapter`)."""
    from stoker.config import RecipeConfig
    from stoker.data.tokenizer import copy_hf_tokenizer
    from stoker.gguf import gguf_to_hf_dir, is_gguf_file
    from stoker.models.hf_peft import is_peft_dir
    from stoker.train.checkpoint import save_model_checkpoint

    src, dst = Path(hf_dir), Path(out)
    _check_import_target(src, dst)
    if src.is_file() and is_gguf_file(src):
        tmp = dst.parent / f".gguf-{dst.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            return import_hf(gguf_to_hf_dir(src, tmp), dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if is_peft_dir(src):
        from stoker.hf_adapters import import_adapter

        return import_adapter(src, dst, base)
    model = load_hf_model(src)

    def extra(tmp: Path) -> None:
        fix = "check the files' permissions and the free space"
        with file_errors(src, "cannot copy the tokenizer files", fix):
            copy_hf_tokenizer(src, tmp / "tokenizer")
            if (src / "generation_config.json").is_file():
                shutil.copy2(src / "generation_config.json", tmp / "generation_config.json")

    config = RecipeConfig(model=model.config).model_dump(mode="json")
    return save_model_checkpoint(dst, model, config=config, extra=extra)


def _special_ids(ckpt: Path) -> dict[str, Any]:
    """bos/eos/pad token ids for `generation_config.json`: the imported model's own file, or
    what the checkpoint's tokenizer names."""
    path = ckpt / "generation_config.json"
    if path.is_file():
        try:
            gen = json.loads(path.read_text())
            return {
                k: gen[k]
                for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if gen.get(k) is not None
            }
        except (OSError, json.JSONDecodeError):
            pass
    if not (ckpt / "tokenizer" / "tokenizer.json").is_file():
        return {}
    from stoker.data.tokenizer import Tokenizer

    tok = Tokenizer.load(ckpt / "tokenizer")
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    return {k: v for k, v in ids.items() if v is not None}


def export_hf(path: str | Path, out: str | Path, adapter: bool = False) -> Path:
    """Write a transformers-loadable directory (config.json, model.safetensors,
    generation_config.json, tokenizer files) for a stoker run or checkpoint; a LoRA run's
    adapters merged in, or with `adapter` the adapters alone as a PEFT directory."""
    from stoker.api import load_model
    from stoker.data.tokenizer import copy_hf_tokenizer
    from stoker.tasks.source import strip_lora
    from stoker.train.checkpoint import is_checkpoint, read_meta, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    if adapter:
        from stoker.hf_adapters import export_adapter

        return export_adapter(ckpt, out)
    if read_meta(ckpt).get("config", {}).get("mor") is not None:
        raise StokerError(
            f"{ckpt} is a Mixture-of-Recursions model; transformers has no "
            "architecture for it, so export-hf cannot write one"
        )
    model_cfg = read_meta(ckpt).get("config", {}).get("model")
    if not isinstance(model_cfg, dict):
        raise StokerError(f"{ckpt}/stoker.json has no model config; re-save the checkpoint")
    cfg = validate_config(model_cfg, ModelConfig)
    hf_cfg = hf_config_from(cfg)
    dst = Path(out)
    if dst.exists() and (not dst.is_dir() or is_checkpoint(dst)):
        raise StokerError(f"{dst} is a file or a stoker checkpoint; choose another output dir")
    model = strip_lora(load_model(ckpt))  # a LoRA run: base + merged adapters
    sd = state_dict_to_hf({k: t.detach() for k, t in model.state_dict().items()}, cfg)
    ids = _special_ids(ckpt)
    unknown = {"bos_token_id": None, "eos_token_id": None}  # not transformers' defaults
    fix = "free space or fix permissions there, or choose another output dir"
    with file_errors(dst, "cannot write the export", fix):
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "config.json").write_text(json.dumps({**hf_cfg, **unknown, **ids}, indent=2))
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
        if (ckpt / "generation_config.json").is_file():  # the imported model's own, verbatim
            shutil.copy2(ckpt / "generation_config.json", dst / "generation_config.json")
        else:
            (dst / "generation_config.json").write_text(json.dumps(ids, indent=2))
        if (ckpt / "tokenizer").is_dir():
            copy_hf_tokenizer(ckpt / "tokenizer", dst)
    return dst


def import_hf_command(args) -> int:
    """`stoker import-hf HF_DIR|FILE.gguf|PEFT_DIR OUT_CKPT [--base DIR]`."""
    from stoker.train.checkpoint import read_meta

    out = import_hf(args.hf_dir, args.out, getattr(args, "base", None))
    meta = read_meta(out)
    cfg = validate_config(meta["config"]["model"], ModelConfig)
    tok = "with" if (out / "tokenizer").is_dir() else "without"
    kind = f"LoRA adapter on {meta['base']['path']}" if "base" in meta else cfg.arch
    print(
        f"imported {kind} ({cfg.n_layer} layers, d {cfg.d_model}) from {args.hf_dir} "
        f"-> {out} ({tok} tokenizer)"
    )
    return 0


def export_hf_command(args) -> int:
    """`stoker export-hf RUN_OR_CKPT OUT_DIR [--adapter]`."""
    from stoker.tasks.dynamo.cli import run_config

    if run_config(args.path) is not None:  # a DYNAMO run: encoder + a PEFT adapter per task
        from stoker.tasks.dynamo.export import export_command

        return export_command(args)
    from stoker.tasks.multimodal import cli as mm

    if mm.run_config(args.path) is not None:  # encoders + aligner, self-describing files
        return mm.export_command(args)
    out = export_hf(args.path, args.out, getattr(args, "adapter", False))
    if getattr(args, "adapter", False):
        base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
        print(
            f"exported the adapter of {args.path} -> {out} (PEFT; load with "
            f"peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), "
            f"{str(out)!r}))"
        )
        return 0
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    print(
        f"exported {args.path} -> {out} ({arch}; load with "
        "transformers.AutoModelForCausalLM.from_pretrained)"
    )
    return 0
