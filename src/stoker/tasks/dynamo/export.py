"""A DYNAMO run in Hugging Face formats: the frozen encoder as a transformers directory, each
task's adapter as a PEFT LoRA directory, the heads and router beside them; and back.

`stoker export-hf RUN OUT` on a DYNAMO run (its last finished phase, 3 else 2, as `stoker eval`
loads it) writes

    OUT/encoder/             config.json + model.safetensors: a `BertModel` / `RobertaModel`
                             (models/hf_encoder.py `export_hf_encoder`), the adapters' base;
    OUT/adapters/<task>/     adapter_config.json + adapter_model.safetensors: adapter k of the
                             mixture alone, under transformers' module names
                             (`base_model.model.encoder.layer.0.attention.self.query.lora_A.weight`),
                             task_type FEATURE_EXTRACTION; its `base_model_name_or_path` is
                             OUT/encoder as an absolute path (what `AutoPeftModel` resolves;
                             `PeftModel.from_pretrained(base, dir)` ignores it);
    OUT/heads.safetensors    every head (`heads.<task>.*`) and the router (`router.*`) under
                             our names, the encoder's hash in its header;
    OUT/dynamo.json          tasks in adapter order (name, kind, labels, adapter dir), pooling,
                             router and LoRA settings: with the files above, the whole model.

What PEFT computes from adapter k (scale lora_alpha/r, or /√r with use_rslora) is our mixture
with one-hot gates on k; `add_weighted_adapter(all, [1]*K, combination_type="cat")` is our
all-ones gates (evaluate.py's `merged` mode; PEFT's cat is exact only without rsLoRA).
`load_dynamo_adapters(model, OUT)` puts the tensors back bit for bit, after checking tasks,
modules, ranks and scales (any mismatch: a one-line StokerError, nothing changed);
`load_dynamo_export(OUT)` rebuilds the whole model from the directory alone.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stoker.config import LoRAConfig
from stoker.errors import StokerError, file_error, file_errors
from stoker.models.dynamo import ClassifierHead, DynamoModel
from stoker.models.hf_peft import CONFIG, WEIGHTS, _check_options, _pattern_value
from stoker.models.hf_peft import read_adapter_config as _read_config
from stoker.models.lora_mixture import LoRAMixtureLinear, mixture_layers

FORMAT, VERSION = "stoker-dynamo-export", 1
MANIFEST, HEADS, ENCODER, ADAPTERS = "dynamo.json", "heads.safetensors", "encoder", "adapters"
ENCODER_SHA = "stoker_encoder_sha256"  # key in the weights files' safetensors headers
_PREFIX = "base_model.model."
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


# ----------------------------------------------------------------------------------- names
def hf_module_names(model: DynamoModel) -> dict[str, str]:
    """Each mixture layer's name (ours, `encoder.layers.0.self_attn.q_proj`) -> its module in
    a transformers `BertModel` / `RobertaModel` (`encoder.layer.0.attention.self.query`)."""
    from stoker.models.hf_encoder import encoder_state_dict_to_hf

    out = {}
    for name in mixture_layers(model):
        inner = name.removeprefix("encoder.")
        try:
            (key,) = encoder_state_dict_to_hf({f"{inner}.weight": torch.empty(0)})
        except KeyError:
            raise StokerError(f"{name} has no transformers counterpart") from None
        out[name] = key.removesuffix(".weight")
    return out


def _one(values: list[Any], what: str) -> Any:
    if len(set(values)) != 1:
        raise StokerError(
            f"PEFT has one {what} per adapter; these layers use {sorted(set(values))}"
        )
    return values[0]


def _dropout(m: LoRAMixtureLinear) -> float:
    return float(getattr(m.lora_dropout, "p", 0.0))


# ---------------------------------------------------------------------------------- export
def adapter_config(model: DynamoModel, k: int, base: str | None) -> dict[str, Any]:
    """The `adapter_config.json` dict of adapter k (its rank per module; one alpha, dropout
    and rsLoRA flag for all, as the mixture has)."""
    layers, names = mixture_layers(model), hf_module_names(model)
    ranks = {names[n]: m.ranks[k] for n, m in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": _one([m.alpha for m in layers.values()], "lora_alpha"),
        "lora_dropout": _one([_dropout(m) for m in layers.values()], "lora_dropout"),
        "target_modules": list(ranks),
        "use_rslora": _one([m.rslora for m in layers.values()], "use_rslora"),
        "rank_pattern": {re.escape(h): v for h, v in ranks.items() if v != r},
        "alpha_pattern": {},
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def adapter_state_dict(model: DynamoModel, k: int) -> dict[str, torch.Tensor]:
    """Adapter k's A (r, in) and B (out, r) of every layer under PEFT's names (CPU copies)."""
    names, out = hf_module_names(model), {}
    for n, m in mixture_layers(model).items():
        A, B = m.adapter(k)
        out[f"{_PREFIX}{names[n]}.lora_A.weight"] = A.detach().cpu().contiguous().clone()
        out[f"{_PREFIX}{names[n]}.lora_B.weight"] = B.detach().cpu().contiguous().clone()
    return out


def _heads_and_router(model: DynamoModel) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu().contiguous().clone() for n, t in model.state_dict().items()
            if n.startswith(("heads.", "router."))}  # fmt: skip


def manifest(model: DynamoModel, sha: str, source: str | None, phase: int | None) -> dict:
    """dynamo.json: what rebuilds the model around the weights files."""
    tasks = []
    for name, kind in zip(model.task_names, model.kinds, strict=True):
        head = model.heads[name]
        t: dict[str, Any] = {"name": name, "kind": kind, "adapter": f"{ADAPTERS}/{name}"}
        if kind == "classify":
            t["n_labels"] = head.out_proj.out_features
            t["head"] = "pooled encoding -> dense, tanh -> labels"
        elif kind == "qa":
            t["head"] = "start/end logits per token"
        else:
            t["head"] = "dense, GELU, LayerNorm -> tied word embeddings + bias (next token)"
        tasks.append(t)
    layers = mixture_layers(model)
    first = next(iter(layers.values()))
    classifiers = [h for h in model.heads.values() if isinstance(h, ClassifierHead)]
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "phase": phase,
        "encoder": ENCODER,
        "encoder_sha256": sha,
        "heads": HEADS,
        "tasks": tasks,
        "pooling": model.pooling,
        "head_dropout": classifiers[0].dropout.p if classifiers else 0.1,
        "router": {
            "hidden": model.router.net[0].out_features,
            "dropout": model.router.net[2].p,
            "n_adapters": model.n_adapters,
            "pool": model.router_pool,
        },
        "lora": {
            "r": first.ranks[0],
            "alpha": first.alpha,
            "dropout": _dropout(first),
            "rslora": first.rslora,
            "targets": [n.removeprefix("encoder.") for n in layers],
        },
    }


def _clean_encoder(model: DynamoModel):
    """The frozen encoder without its adapters (a plain `Encoder` sharing its tensors)."""
    from stoker.models.encoder import build_encoder

    base = {n: t for n, t in model.encoder.state_dict().items()
            if not n.endswith((".lora_A", ".lora_B"))}  # fmt: skip
    enc = build_encoder(model.encoder.config, device="meta")
    enc.load_state_dict(base, strict=True, assign=True)
    return enc


def _check_out(dst: Path) -> None:
    if dst.exists() and (
        not dst.is_dir() or (any(dst.iterdir()) and not (dst / MANIFEST).is_file())
    ):
        raise StokerError(
            f"{dst} exists and is not an earlier DYNAMO export; choose a new output directory "
            "(export replaces only its own earlier output)"
        )


def _write(model: DynamoModel, tmp: Path, final: Path, sha: str, info: dict) -> None:
    """Every file of the export into `tmp`; the adapters' base is named by its `final` path."""
    from stoker.models.hf_encoder import export_hf_encoder

    export_hf_encoder(_clean_encoder(model), tmp / ENCODER)
    meta = {ENCODER_SHA: sha, "format": "pt"}
    for k, name in enumerate(model.task_names):
        d = tmp / ADAPTERS / name
        d.mkdir(parents=True)
        save_file(adapter_state_dict(model, k), str(d / WEIGHTS), metadata=meta)
        (d / CONFIG).write_text(
            json.dumps(adapter_config(model, k, str(final / ENCODER)), indent=2)
        )
    save_file(_heads_and_router(model), str(tmp / HEADS), metadata=meta)
    (tmp / MANIFEST).write_text(json.dumps(info, indent=2))  # last: marks a complete export


def export_dynamo(
    model: DynamoModel, out: str | Path, source: str | None = None, phase: int | None = None
) -> list[Path]:
    """Write the export (module docstring) to `out`, replacing an earlier export there; the
    directories written: the encoder, each task's adapter, then `out` itself."""
    from stoker.tasks.dynamo.task import encoder_hash

    for name in model.task_names:
        if not _SAFE_NAME.fullmatch(name):
            raise StokerError(f"dynamo task name {name!r} cannot be a directory name; rename the "
                              "task (letters, digits, ., _, -)")  # fmt: skip
    dst = Path(out)
    _check_out(dst)
    final = dst.resolve()
    sha = encoder_hash(model)
    tmp = final.parent / f".{final.name}.partial"
    fix = "free space or fix permissions there, or choose another output dir"
    try:
        with file_errors(dst, "cannot write the export", fix):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _write(model, tmp, final, sha, manifest(model, sha, source, phase))
            if final.exists():
                shutil.rmtree(final)  # empty, or an earlier export (_check_out)
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left only by a failed write
    return [dst / ENCODER, *(dst / ADAPTERS / n for n in model.task_names), dst]


# ------------------------------------------------------------------------------------ load
def read_manifest(out: str | Path) -> dict[str, Any]:
    """dynamo.json of an export directory (one-line StokerError if absent or malformed)."""
    path = Path(out) / MANIFEST
    fix = "point at a directory `stoker export-hf` wrote for a DYNAMO run"
    if not path.is_file():
        raise file_error(Path(out), f"has no {MANIFEST}", fix)
    with file_errors(path, "is not a readable JSON file", fix):
        m = json.loads(path.read_bytes())
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("tasks"), list):
        raise file_error(path, f"is not a {FORMAT} manifest", fix)
    if m.get("version") != VERSION:
        raise file_error(path, f"has version {m.get('version')!r}, this stoker reads {VERSION}",
                         "re-export the run with this stoker")  # fmt: skip
    return m


def _check_tasks(model: DynamoModel, m: dict[str, Any], out: Path, labels: bool) -> None:
    """The export's tasks are the model's: names and kinds in adapter order, and (`labels`)
    each classify task's number of labels."""

    def n_labels(kind: str, n: Any) -> Any:
        return n if labels and kind == "classify" else None

    ours = [(n, k, n_labels(k, model.heads[n].out_proj.out_features if k == "classify" else None))
            for n, k in zip(model.task_names, model.kinds, strict=True)]  # fmt: skip
    theirs = [(t.get("name"), t.get("kind"), n_labels(t.get("kind"), t.get("n_labels")))
              for t in m["tasks"] if isinstance(t, dict)]  # fmt: skip
    if theirs != ours:
        show = lambda ts: [f"{n} ({k}{f', {c} labels' if c else ''})" for n, k, c in ts]
        raise StokerError(f"{out} holds adapters for tasks {show(theirs)}, the model has "
                          f"{show(ours)} (in adapter order); load it into the model it was "
                          "exported from")  # fmt: skip


def _read_adapter(model: DynamoModel, k: int, d: Path) -> dict[str, tuple[torch.Tensor, ...]]:
    """Adapter k's (A, B) per mixture layer name from PEFT dir `d`, every check done."""
    config = _read_config(d)
    _check_options(config)
    fix = "re-export it; stoker reads only safetensors"
    if not (d / WEIGHTS).is_file():
        raise file_error(d, f"has no {WEIGHTS}", fix)
    with file_errors(d / WEIGHTS, "is not a readable safetensors file", fix):
        weights = load_file(str(d / WEIGHTS))
    layers, names = mixture_layers(model), hf_module_names(model)
    ours = {h: n for n, h in names.items()}
    for key in weights:
        mod = key.removeprefix(_PREFIX).rsplit(".", 2)[0]
        if (
            not key.startswith(_PREFIX)
            or mod not in ours
            or not key.endswith((".lora_A.weight", ".lora_B.weight"))
        ):
            raise StokerError(f"{d}: adapter weight {key} names no adapted module of this model")
    out = {}
    for name, m in layers.items():
        hf = names[name]
        A = weights.get(f"{_PREFIX}{hf}.lora_A.weight")
        B = weights.get(f"{_PREFIX}{hf}.lora_B.weight")
        if A is None or B is None:
            raise StokerError(f"{d} has no adapter for module {hf}; it was exported from a model "
                              "that adapts other modules")  # fmt: skip
        r = int(_pattern_value(config.get("rank_pattern"), hf, config.get("r")))
        alpha = float(_pattern_value(config.get("alpha_pattern"), hf, config.get("lora_alpha")))
        want = (m.ranks[k], m.in_features), (m.out_features, m.ranks[k])
        if r != m.ranks[k] or (tuple(A.shape), tuple(B.shape)) != want:
            raise StokerError(f"{d}: module {hf} has rank {r} (A {tuple(A.shape)}, B "
                              f"{tuple(B.shape)}), adapter {k} of the model has rank {m.ranks[k]} "
                              f"(A {want[0]}, B {want[1]})")  # fmt: skip
        if alpha != m.alpha or bool(config.get("use_rslora")) != m.rslora:
            raise StokerError(f"{d}: module {hf} has lora_alpha {alpha:g}, use_rslora "
                              f"{bool(config.get('use_rslora'))}; the model has {m.alpha:g}, "
                              f"{m.rslora} (a different scale)")  # fmt: skip
        out[name] = (A, B)
    return out


def _read_heads(model: DynamoModel, path: Path) -> dict[str, torch.Tensor]:
    fix = "re-export the run"
    if not path.is_file():
        raise file_error(path.parent, f"has no {HEADS}", fix)
    with file_errors(path, "is not a readable safetensors file", fix):
        sd = load_file(str(path))
    expected = _heads_and_router(model)
    if sd.keys() != expected.keys():
        odd = sorted(sd.keys() ^ expected.keys())[:3]
        raise StokerError(f"{path} does not hold this model's heads and router (differs at {odd})")
    for n, t in sd.items():
        if t.shape != expected[n].shape:
            raise StokerError(f"{path}: {n} has shape {tuple(t.shape)}, the model's is "
                              f"{tuple(expected[n].shape)}")  # fmt: skip
    return sd


def load_dynamo_adapters(model: DynamoModel, out: str | Path, heads: bool = True) -> None:
    """Put an export's adapters (and, with `heads`, its heads and router) into `model`'s
    mixture exactly; refused with one line, leaving `model` unchanged, when the export's
    tasks, encoder, modules, ranks or scales are not the model's."""
    from stoker.tasks.dynamo.task import encoder_hash

    out = Path(out)
    m = read_manifest(out)
    _check_tasks(model, m, out, heads)
    if m.get("encoder_sha256") != encoder_hash(model):
        raise StokerError(f"{out} was exported with another encoder (its weights hash differs "
                          "from this model's); its adapters only fit that encoder")  # fmt: skip
    adapters = [_read_adapter(model, k, out / ADAPTERS / name)
                for k, name in enumerate(model.task_names)]  # fmt: skip
    sd = _read_heads(model, out / HEADS) if heads else {}
    layers = mixture_layers(model)
    with torch.no_grad():
        for k, tensors in enumerate(adapters):
            for name, (A, B) in tensors.items():
                a, b = layers[name].adapter(k)
                a.copy_(A)
                b.copy_(B)
        if sd:
            model.load_state_dict(sd, strict=False)


def load_dynamo_export(out: str | Path, device: str | torch.device = "cpu") -> DynamoModel:
    """The DYNAMO model of an export directory alone (encoder, adapters, heads, router), in
    eval mode."""
    from stoker.models.hf_encoder import load_encoder

    out = Path(out)
    m = read_manifest(out)
    try:
        lora, r = m["lora"], m["router"]
        tasks = [(t["name"], t["kind"], int(t.get("n_labels", 2))) for t in m["tasks"]]
        cfg = LoRAConfig(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                         rslora=lora["rslora"], targets=lora["targets"])  # fmt: skip
        kw = dict(router_hidden=r["hidden"], router_dropout=r["dropout"],
                  pooling=m["pooling"], head_dropout=m["head_dropout"],
                  router_pool=r.get("pool", "mean"))  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise file_error(out / MANIFEST, "is missing or has a malformed field",
                         "re-export the run", f"{type(e).__name__}: {e}") from None  # fmt: skip
    model = DynamoModel(load_encoder(out / m.get("encoder", ENCODER)), tasks, cfg, **kw)
    load_dynamo_adapters(model, out)
    return model.to(device).eval()


# ------------------------------------------------------------------------------------- run
def final_model(path: str | Path) -> tuple[DynamoModel, int]:
    """(model, phase) of a DYNAMO run's last finished phase, 3 else 2, on the CPU."""
    from stoker.tasks.dynamo.cli import trained_model

    model, _, phase = trained_model(path, torch.device("cpu"))
    return model, phase


def export_command(args) -> int:
    """`stoker export-hf DYNAMO_RUN OUT_DIR`: one line per directory written (`--adapter`
    changes nothing: the adapters are always PEFT directories, on the encoder written too)."""
    _check_out(Path(args.out))  # before the model is built
    model, phase = final_model(args.path)
    written = export_dynamo(model, args.out, str(args.path), phase)
    arch = "RobertaModel" if model.encoder.config.arch == "roberta" else "BertModel"
    print(f"exported the encoder of {args.path} -> {written[0]} ({arch}; load with "
          "transformers.AutoModel.from_pretrained)")  # fmt: skip
    for name, d in zip(model.task_names, written[1:-1], strict=True):
        print(f"exported adapter {name} (phase {phase}) -> {d} (PEFT LoRA; load with "
              f"peft.PeftModel.from_pretrained(base, {str(d)!r}))")  # fmt: skip
    print(f"exported the heads and router -> {written[-1]} ({HEADS} + {MANIFEST}; load the whole "
          "model with stoker.tasks.dynamo.export.load_dynamo_export)")  # fmt: skip
    return 0
