"""`stoker eval`: the recipe's evaluation of a run or checkpoint — validation loss and
perplexity on token shards (pretrain, MoR), supervised loss on held-out samples (finetune).

For a Mixture-of-Recursions run it also reports how often causal threshold routing (what
decoding uses) agrees with training-time top-k routing, and the loss under each
(models/mor.py, `MoRDecoder.evaluate_routing`)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from stoker.errors import StokerError


def evaluate_checkpoint(
    path: str | Path,
    data_dir: str | None = None,
    split: str = "val",
    batches: int | None = None,
    device: str = "auto",
    seq_len: int | None = None,
    batch_size: int | None = None,
) -> dict:
    """The recipe's own evaluation (its task's, as in training) of a run or checkpoint on
    `split` of its data (or `data_dir`): `batches` fixed batches (default: the run's
    train.eval_steps; all held-out samples for fine-tuning runs), `batch_size` sequences per
    forward (default: the run's micro-batches) of `seq_len` tokens (default: the run's)."""
    from stoker.api import load_model
    from stoker.config import validate_config
    from stoker.tasks import task_class
    from stoker.train.checkpoint import read_meta, resolve_checkpoint
    from stoker.train.distributed import DistInfo, pick_device

    if batches is not None and batches < 1:
        raise StokerError(
            f"--batches must be at least 1, got {batches} (omit it for the run's train.eval_steps)"
        )
    for name, v in (("--seq-len", seq_len), ("--batch-size", batch_size)):
        if v is not None and v < 1:
            raise StokerError(f"{name} must be at least 1, got {v}")
    dev = pick_device(device, "--device")
    ckpt = resolve_checkpoint(path)
    cfg = validate_config(read_meta(ckpt)["config"])
    if seq_len is not None:
        if seq_len > cfg.model.max_seq_len:
            raise StokerError(
                f"--seq-len {seq_len} exceeds the model's max_seq_len={cfg.model.max_seq_len}"
            )
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seq_len": seq_len})})
    data_dir = data_dir or cfg.data.dir
    if not Path(data_dir).is_dir():
        raise StokerError(
            f"data dir {data_dir} does not exist; pass --data-dir or run "
            "`stoker prepare` on the run's recipe"
        )
    task = task_class(cfg)(cfg, DistInfo(device=dev), resolve=False)
    task.detailed = True  # the model's own evaluation too (MoR routing)
    t = cfg.train
    n_micro = 1 if batch_size is not None else max(1, t.batch_size // t.micro_batch_size)
    per_forward = batch_size or t.micro_batch_size
    task.open_eval(data_dir, split, per_forward * n_micro)
    model = load_model(ckpt, dev)
    finetune = cfg.recipe == "finetune"
    n = batches if batches is not None else (None if finetune else t.eval_steps)
    with torch.inference_mode():
        metrics = task.evaluate(model, n, contextlib.nullcontext(), n_micro)
    targets = int(metrics["val_targets"])
    return {
        "checkpoint": str(ckpt),
        "data_dir": str(data_dir),
        "split": split,
        "batches": n,
        "tokens": targets,
        "loss": metrics["val_loss"],
        "perplexity": metrics["val_perplexity"],
        **({"routing": metrics["routing"]} if "routing" in metrics else {}),
    }


def eval_command(args) -> int:
    if getattr(args, "lm_eval", None) is not None:  # lm-evaluation-harness tasks
        from stoker.eval.lm_harness_run import lm_eval_command

        return lm_eval_command(args)
    from stoker.tasks.dynamo.cli import eval_command as dynamo_eval
    from stoker.tasks.dynamo.cli import run_config

    if run_config(args.path) is not None:  # a DYNAMO run: its table of tasks × routings
        return dynamo_eval(args)
    from stoker.tasks.multimodal import cli as mm

    if mm.run_config(args.path) is not None:  # a multimodal run: each stage's held-out metrics
        return mm.eval_command(args)
    device = getattr(args, "device", "auto")
    result = evaluate_checkpoint(
        args.path,
        args.data_dir,
        args.split,
        args.batches,
        device,
        getattr(args, "seq_len", None),
        getattr(args, "batch_size", None),
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['split']} loss {result['loss']:.4f}  perplexity "
            f"{result['perplexity']:.2f}  ({result['tokens']:,} tokens, {result['checkpoint']})"
        )
        if "routing" in result:
            r = result["routing"]
            agree = "  ".join(
                f"r{k.rsplit('_r', 1)[1]} {v:.1%}"
                for k, v in r.items()
                if k.startswith("mor_agree_r")
            )
            print(
                f"routing: threshold sigmoid(logit) > 0.5 vs training top-k: per-token depth "
                f"agreement {r['depth_agreement']:.1%}; decisions {agree or 'n/a'}; loss "
                f"top-k {r['loss_topk']:.4f} vs threshold (causal) {r['loss_threshold']:.4f}"
            )
    return 0
