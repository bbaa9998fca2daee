"""PEFT interop for our LoRA adapters (models/lora.py): the one module that knows PEFT's
`adapter_config.json` keys and adapter weight names.

- `export_peft` writes a LoRA decoder's adapters as a PEFT adapter directory
  (`adapter_config.json` + `adapter_model.safetensors`) that
  `peft.PeftModel.from_pretrained(base, dir)` loads onto the transformers model `export_hf`
  writes; `import_peft` puts such an adapter (e.g. one trained with PEFT) onto our model.
- Module names are converted by models/hf.py's own weight mapping, run on each linear
  layer's `.weight`; PEFT prefixes them with `base_model.model.` and adds `.lora_A.weight`.
  Only a pure rename (LLaMA, SmolLM, Qwen2) converts; GPT-2, whose q/k/v live in one
  transposed, fused `c_attn`, is refused rather than approximated, as are MoR models
  (no transformers architecture) and mixtures (PEFT has no per-example gates).
- Scales: PEFT's s = lora_alpha/r (alpha/√r with use_rslora), `rank_pattern` and
  `alpha_pattern` giving per-module r and alpha (regex `(.*\\.)?(key)$` on the module name,
  first key wins), exactly our per-layer `LoRALinear(r, alpha, rslora)`. PEFT options that
  change the math (DoRA, bias training, modules_to_save, ...) are refused on import.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from stoker.errors import StokerError, file_error, file_errors
from stoker.models.gpt import Decoder
from stoker.models.hf import state_dict_to_hf
from stoker.models.lora import (
    LoRALayer,
    LoRALinear,
    freeze_all_but_lora,
    linear_names,
    lora_layers,
    replace_linears,
)
from stoker.models.mor import MoRDecoder

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight")
# adapter_config.json options whose non-default value changes what the adapter computes
_REFUSED = (
    "use_dora",
    "fan_in_fan_out",
    "modules_to_save",
    "lora_bias",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
)


def hf_module_names(model: nn.Module) -> dict[str, str]:
    """Our linear-layer name -> the transformers module name, for a LLaMA/Qwen2 `Decoder`;
    StokerError for a model whose layers have no exact PEFT counterpart."""
    if isinstance(model, MoRDecoder):
        raise StokerError(
            "a Mixture-of-Recursions model has no transformers architecture, "
            "so its adapters have no PEFT form; save them with lora_state_dict"
        )
    if not isinstance(model, Decoder):
        raise StokerError(f"PEFT conversion needs a stoker Decoder, got {type(model).__name__}")
    cfg = model.config
    if cfg.arch == "gpt2":
        raise StokerError(
            "PEFT export/import of GPT-2 adapters is not supported: transformers' GPT-2 fuses "
            "q/k/v into one transposed c_attn, so per-projection adapters do not map exactly"
        )
    out: dict[str, str] = {}
    for name in linear_names(model):
        w = model.get_submodule(name).weight
        hf = state_dict_to_hf({f"{name}.weight": w}, cfg)  # hf.py's mapping, one weight
        if len(hf) == 1:  # a tied head is left out: not adaptable anyway
            ((key, t),) = hf.items()
            if not key.endswith(".weight") or t.shape != w.shape or t.data_ptr() != w.data_ptr():
                raise StokerError(
                    f"{name} is not a plain rename in transformers; cannot map its adapter to PEFT"
                )
            out[name] = key.removesuffix(".weight")
    return out


def _most_common(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def _patterns(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """PEFT rank/alpha patterns for the modules whose value is not `default`: by last name
    component where every adapted module of it agrees, else by exact (escaped) name."""
    by_kind: dict[str, set[Any]] = {}
    for name, v in values.items():
        by_kind.setdefault(name.rsplit(".", 1)[-1], set()).add(v)
    out: dict[str, Any] = {}
    for name, v in values.items():
        kind = name.rsplit(".", 1)[-1]
        if v != default and len(by_kind[kind]) == 1:
            out[re.escape(kind)] = v
        elif v != default:
            out[re.escape(name)] = v
    return out


def peft_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The `adapter_config.json` dict of a LoRA decoder's adapters."""
    names = hf_module_names(model)
    layers = lora_layers(model)
    if not layers:
        raise StokerError("the model has no LoRA layers to export (apply_lora first)")
    if any(not isinstance(m, LoRALinear) for m in layers.values()):
        raise StokerError(
            "a LoRA mixture has no PEFT form (PEFT has no per-example gates); "
            "export a single-adapter model"
        )
    if len({m.rslora for m in layers.values()}) > 1:
        raise StokerError("PEFT has one use_rslora flag; these layers mix rsLoRA and LoRA")
    missing = [n for n in layers if n not in names]
    if missing:
        raise StokerError(f"{missing[0]} has no transformers counterpart (a tied LM head?)")
    hf = {names[n]: m for n, m in layers.items()}
    r, alpha = (
        _most_common([m.r for m in hf.values()]),
        _most_common([m.alpha for m in hf.values()]),
    )
    kinds = {n.rsplit(".", 1)[-1] for n in hf}
    covered = {h for h in names.values() if h.rsplit(".", 1)[-1] in kinds}
    targets = sorted(kinds) if covered == hf.keys() else sorted(hf)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common([_dropout(m) for m in hf.values()]),
        "target_modules": targets,
        "use_rslora": next(iter(hf.values())).rslora,
        "rank_pattern": _patterns({n: m.r for n, m in hf.items()}, r),
        "alpha_pattern": _patterns({n: m.alpha for n, m in hf.items()}, alpha),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _dropout(m: LoRALayer) -> float:
    return m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under PEFT's names (contiguous, CPU)."""
    names = hf_module_names(model)
    out = {}
    for n, m in lora_layers(model).items():
        for k in ("lora_A", "lora_B"):
            out[f"{_PREFIX}{names[n]}.{k}.weight"] = getattr(m, k).detach().cpu().contiguous()
    return out


def export_peft(
    model: nn.Module,
    out: str | Path,
    base_model_name_or_path: str | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (with `metadata` in its
    header, which PEFT ignores) to `out`."""
    config = peft_config(model, base_model_name_or_path)
    sd = peft_state_dict(model)
    dst = Path(out)
    if dst.exists() and not dst.is_dir():
        raise StokerError(f"{dst} is a file; choose a directory for the PEFT adapter")
    with file_errors(dst, "cannot write the PEFT adapter", "free space or fix permissions"):
        dst.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(dst / WEIGHTS), metadata={**(metadata or {}), "format": "pt"})
        (dst / CONFIG).write_text(json.dumps(config, indent=2))
    return dst


def adapter_metadata(adapter_dir: str | Path) -> dict[str, str]:
    """The header metadata of a PEFT adapter's weights file ({} if it has none)."""
    from safetensors import safe_open

    path = Path(adapter_dir) / WEIGHTS
    fix = "re-save the adapter"
    with (
        file_errors(path, "is not a readable safetensors file", fix),
        safe_open(str(path), framework="pt") as f,
    ):
        return dict(f.metadata() or {})


def is_peft_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def read_adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    return _read_adapter_config(Path(adapter_dir))


def _read_adapter_config(d: Path) -> dict[str, Any]:
    if not (d / CONFIG).is_file():
        raise StokerError(
            f"{d} has no {CONFIG}; point at a directory PEFT's save_pretrained "
            "wrote (adapter_config.json + adapter_model.safetensors)"
        )
    with file_errors(d / CONFIG, "is not a readable JSON file", "re-save the adapter"):
        config = json.loads((d / CONFIG).read_bytes())
    if not isinstance(config, dict):
        raise file_error(d / CONFIG, "does not hold a JSON object", "re-save the adapter")
    return config


def _read_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    d = Path(adapter_dir)
    config = _read_adapter_config(d)
    if not (d / WEIGHTS).is_file():
        fix = (
            "stoker loads only safetensors (unpickling can run code); re-save it with "
            "save_pretrained(..., safe_serialization=True)"
        )
        raise file_error(d, f"has no {WEIGHTS}", fix)
    with file_errors(d / WEIGHTS, "is not a readable safetensors file", "re-save the adapter"):
        weights = load_file(d / WEIGHTS)
    return config, weights


def _check_options(config: dict[str, Any]) -> None:
    if config.get("peft_type") != "LORA":
        raise StokerError(f"adapter peft_type is {config.get('peft_type')!r}; only LORA imports")
    if config.get("bias", "none") != "none":
        raise StokerError(f"adapter bias={config['bias']!r} trains biases; only bias=none imports")
    set_options = [k for k in _REFUSED if config.get(k) not in (None, False, [], {})]
    if set_options:
        raise StokerError(
            f"adapter option {set_options[0]}={config[set_options[0]]!r} is not "
            "supported by stoker's LoRA (it changes the computation)"
        )


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's lookup (peft.utils.other.get_pattern_key): the first key matching as
    `(.*\\.)?(key)$` gives the value."""
    for key, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return v
    return default


def import_peft(model: nn.Module, adapter_dir: str | Path) -> list[str]:
    """Put a PEFT LoRA adapter directory onto an unadapted LLaMA/Qwen2 `Decoder`: wraps the
    layers its weights name in `LoRALinear`s holding its tensors, freezes the rest; returns
    the adapted names (ours)."""
    config, weights = _read_adapter(adapter_dir)
    _check_options(config)
    ours = {h: n for n, h in hf_module_names(model).items()}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in weights.items():
        m = _KEY.fullmatch(key)
        if m is None or m[1] not in ours:
            raise StokerError(f"adapter weight {key} names no linear layer of this model")
        pairs.setdefault(ours[m[1]], {})[m[2]] = t
    if not pairs:
        raise StokerError(f"{adapter_dir}: the adapter holds no LoRA weights")
    hf = {n: h for h, n in ours.items()}
    r_alpha = {}
    for name, ab in pairs.items():
        layer = model.get_submodule(name)
        A, B = ab.get("lora_A"), ab.get("lora_B")
        if isinstance(layer, LoRALayer):
            raise StokerError(f"{name} already has a LoRA adapter; import onto a base model")
        if (
            A is None
            or B is None
            or A.shape[1:] != (layer.in_features,)
            or B.shape != (layer.out_features, A.shape[0])
        ):
            raise StokerError(
                f"adapter weights for {hf[name]} are missing lora_A/lora_B or do "
                f"not fit its shape ({layer.out_features}, {layer.in_features})"
            )
        alpha = _pattern_value(config.get("alpha_pattern"), hf[name], config.get("lora_alpha"))
        r_alpha[name] = (A.shape[0], float(alpha if alpha is not None else 8))
    rslora, p = bool(config.get("use_rslora")), float(config.get("lora_dropout") or 0.0)
    names = [n for n in linear_names(model) if n in pairs]  # model order
    replace_linears(model, names, lambda n, lin: LoRALinear(lin, *r_alpha[n], p, rslora))
    with torch.no_grad():
        for name, ab in pairs.items():
            layer = model.get_submodule(name)
            layer.lora_A.copy_(ab["lora_A"])
            layer.lora_B.copy_(ab["lora_B"])
    freeze_all_but_lora(model)
    return names
