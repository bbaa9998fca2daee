"""`stoker eval`: validation loss and perplexity of a run or checkpoint on token shards.

For a Mixture-of-Recursions run it also reports how often causal threshold routing (what
decoding uses) agrees with training-time top-k routing, and the loss under each
(models/mor.py, `MoRDecoder.evaluate_routing`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from stoker.errors import StokerError


def evaluate_checkpoint(
    path: str | Path,
    data_dir: str | None = None,
    split: str = "val",
    batches: int | None = None,
    device: str = "auto",
) -> dict:
    """Mean next-token loss over `batches` (default: the run's train.eval_steps) fixed batches
    of `split` (the run's own data by default)."""
    from stoker.api import load_model
    from stoker.config import validate_config
    from stoker.data.loader import TokenWindows
    from stoker.data.shards import check_vocab, load_meta
    from stoker.models.gpt import lm_loss
    from stoker.train.checkpoint import read_meta, resolve_checkpoint
    from stoker.train.distributed import pick_device

    if batches is not None and batches < 1:
        raise StokerError(
            f"--batches must be at least 1, got {batches} (omit it for the run's train.eval_steps)"
        )
    dev = pick_device(device, "--device")
    ckpt = resolve_checkpoint(path)
    cfg = validate_config(read_meta(ckpt)["config"])
    data_dir = data_dir or cfg.data.dir
    if not Path(data_dir).is_dir():
        raise StokerError(
            f"data dir {data_dir} does not exist; pass --data-dir or run "
            "`stoker prepare` on the run's recipe"
        )
    meta = load_meta(data_dir)
    check_vocab(meta, cfg.model.vocab_size)
    model = load_model(ckpt, dev).eval()
    seq_len = cfg.train.seq_len or cfg.model.max_seq_len
    n = cfg.train.eval_steps if batches is None else batches
    micro = cfg.train.micro_batch_size
    n_micro = max(1, cfg.train.batch_size // micro)
    loader = TokenWindows(data_dir, split, seq_len, micro * n_micro, cfg.train.seed + 1)
    total, count, routing = 0.0, 0, {}
    with torch.inference_mode():
        for step in range(n):
            for m in range(n_micro):
                x, y = loader.batch(step, 0, 1, m, n_micro)
                total += float(lm_loss(model(x.to(dev)), y.to(dev)))
                count += 1
                if hasattr(model, "evaluate_routing"):
                    for k, v in model.evaluate_routing(x.to(dev), y.to(dev)).items():
                        routing[k] = routing.get(k, 0.0) + v
    loss = total / count
    return {
        "checkpoint": str(ckpt),
        "data_dir": str(data_dir),
        "split": split,
        "batches": n,
        "tokens": n * micro * n_micro * seq_len,
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        **({"routing": {k: v / count for k, v in routing.items()}} if routing else {}),
    }


def eval_command(args) -> int:
    device = getattr(args, "device", "auto")
    result = evaluate_checkpoint(args.path, args.data_dir, args.split, args.batches, device)
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
