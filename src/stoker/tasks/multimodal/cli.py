"""`stoker eval RUN` and `stoker export-hf RUN OUT` for a multimodal run: every finished stage
evaluated on the held-out data, and the trained encoders and aligner as self-describing
files."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch

from stoker.errors import StokerError


def run_config(path: str | Path):
    """The recipe config of a multimodal run dir (its root), or None if `path` is not one."""
    from stoker.config import load_config

    p = Path(path) / "config.yaml"
    try:
        if not p.is_file() or "recipe: multimodal" not in p.read_text():
            return None
    except OSError:
        return None
    cfg = load_config(str(p), [])
    return cfg if cfg.multimodal.stage is None else None


def finished_stages(path: str | Path) -> list[tuple[Any, Path]]:
    """(stage config, checkpoint) of each stage that finished with the run's current config
    and data, in order; a one-line error when there is none."""
    from stoker.tasks.multimodal.stages import plan
    from stoker.train.stages import finished_checkpoint

    cfg = run_config(path)
    if cfg is None:
        raise StokerError(f"{path} is not a multimodal run (no config.yaml with recipe: "
                          "multimodal)")  # fmt: skip
    done = [(s.cfg, ckpt) for s in plan(cfg)
            if (ckpt := finished_checkpoint(s.out_dir, s.fingerprint)) is not None]  # fmt: skip
    if not done:
        raise StokerError(f"{path} has no stage finished with its config and data; train it "
                          "first: stoker train RECIPE")  # fmt: skip
    return done


def evaluate_run(path: str | Path, device: str = "auto") -> dict[str, dict[str, float]]:
    from stoker.tasks.multimodal.task import MultimodalTask
    from stoker.train.distributed import DistInfo, pick_device

    dev, out = pick_device(device, "--device"), {}
    for cfg, ckpt in finished_stages(path):
        model = MultimodalTask.load_trained(cfg, ckpt, dev)
        task = MultimodalTask(cfg, DistInfo(device=dev))
        task.open_data()
        out[cfg.multimodal.stage] = task.evaluate(model, 0, contextlib.nullcontext(), 1)
    return out


def eval_command(args) -> int:
    with torch.inference_mode():
        result = evaluate_run(args.path, getattr(args, "device", "auto"))
    if args.json:
        print(json.dumps(result))
        return 0
    for stage, metrics in result.items():
        shown = "  ".join(f"{k} {v:.1f}" if k != "val_loss" else f"{k} {v:.4f}"
                          for k, v in metrics.items())  # fmt: skip
        print(f"{stage:14} {shown}")
    return 0


def export_command(args) -> int:
    """The encoders and the aligner of a run's phase 1, one self-describing file each."""
    from stoker.models.multimodal import save_module
    from stoker.tasks.multimodal.task import MultimodalTask

    stages = dict((cfg.multimodal.stage, (cfg, ckpt)) for cfg, ckpt in finished_stages(args.path))
    if "phase1" not in stages:
        raise StokerError(f"{args.path} has no finished phase 1 to export; train it first")
    cfg, ckpt = stages["phase1"]
    model = MultimodalTask.load_trained(cfg, ckpt, torch.device("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = {m: cfg.multimodal.encoder(m).kind for m in model.encoders}
    for m, enc in model.encoders.items():
        e = cfg.multimodal.encoder(m)
        options = {"widths": list(e.widths), "n_classes": cfg.data.n_classes}
        if m == "audio":
            options |= {"sample_rate": cfg.data.sample_rate, "n_mels": e.n_mels,
                        "n_fft": e.n_fft, "hop_length": e.hop_length}  # fmt: skip
        save_module(out / f"encoder-{m}.safetensors", enc, "encoder",
                    {"kind": kinds[m], "options": options})  # fmt: skip
    save_module(out / "aligner.safetensors", model.aligner, "aligner",
                {"dims": model.aligner.dims, "dim": model.aligner.dim, "encoders": kinds})  # fmt: skip
    print(f"exported {args.path} -> {out} (encoder-*.safetensors, aligner.safetensors; load "
          "with stoker.models.multimodal.load_module)")  # fmt: skip
    return 0
