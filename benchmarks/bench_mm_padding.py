"""Phase-2 step of the multimodal recipe: dynamic padding (each micro-batch to its longest row)
vs static padding to the LM's max_seq_len (what systems that pad every sample to a fixed
length do), on the digits conversations.

    python benchmarks/bench_mm_padding.py [--recipe recipes/multimodal/digits.yaml]
        [--data DIR] [--steps 30] [--repeats 3] [--threads N] [--static-width T] [--json FILE]

The model is phase 2's (frozen CNN encoders and aligner, projectors, missing embeddings, the
decoder with LoRA) with freshly drawn weights: a step's cost does not depend on their values.
Both modes train on the same rows with the same optimizer (AdamW on the trainable tensors);
modes alternate (A B A B ...) and each reports its median over repeats. Throughput counts
real (non-pad) tokens, so padding shows up as lost speed. The losses of the first step agree
(padding is masked), which the script checks before printing any timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(cfg):
    from stoker.models.gpt import build_model
    from stoker.models.lora import apply_lora
    from stoker.models.multimodal import freeze
    from stoker.models.multimodal_lm import MultimodalLM
    from stoker.tasks.multimodal import lm
    from stoker.tasks.multimodal.task import AlignModel, build_encoder

    torch.manual_seed(0)
    encoders = {m: freeze(build_encoder(cfg, m)) for m in cfg.multimodal.modalities}
    align = AlignModel(encoders, cfg.multimodal.aligner.dim)
    shape = cfg.multimodal.lm.model.model_copy(update={"vocab_size": lm.tokenizer(cfg).vocab_size})
    decoder = build_model(shape)
    apply_lora(decoder, cfg.lora)
    return MultimodalLM(align.encoders, freeze(align.aligner), decoder,
                        lm.tokenizer(cfg).tag_ids, cfg.multimodal.phase2.n_tokens)  # fmt: skip


def run(cfg, conv, pad_length: int | None, steps: int, batch: int) -> dict:
    from stoker.models.gpt import lm_loss_sum
    from stoker.tasks.multimodal import lm

    model = build(cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    pad = lm.tokenizer(cfg).pad_id
    rows = [list(range(i * batch, (i + 1) * batch)) for i in range(steps + 1)]
    losses, tokens, t0 = [], 0, 0.0
    for i, idx in enumerate(rows):
        if i == 1:
            t0 = time.perf_counter()  # step 0 is warm-up
        b = lm.select(conv, idx, pad, pad_length)
        total, count = lm_loss_sum(model(b)[:, :-1], b["labels"][:, 1:])
        loss = total / count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i:
            tokens += int((b["input_ids"] != pad).sum())
    wall = time.perf_counter() - t0
    return {"tokens_per_s": tokens / wall, "first_loss": losses[0],
            "width": pad_length or "longest"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from stoker.config import load_config
    from stoker.tasks.multimodal import lm

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "multimodal" / "digits.yaml"))
    ap.add_argument("--data", default=None, help="the digits data dir (default: the recipe's)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument(
        "--static-width",
        type=int,
        default=None,
        help="static padding width (default: the LM's max_seq_len)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.recipe, [f"--data.dir={args.data}"] if args.data else [])
    conv = lm.conversations(cfg, "train")
    B, T = cfg.train.micro_batch_size, args.static_width or cfg.multimodal.lm.model.max_seq_len
    if len(conv.samples) < B * (args.steps + 1):
        raise SystemExit(f"bench_mm_padding: {len(conv.samples)} conversations; need "
                         f"{B * (args.steps + 1)} for {args.steps} steps of {B}")  # fmt: skip
    results: dict[str, list[dict]] = {"dynamic": [], "static": []}
    for _ in range(args.repeats):
        results["dynamic"].append(run(cfg, conv, None, args.steps, B))
        results["static"].append(run(cfg, conv, T, args.steps, B))
    a, b = results["dynamic"][0]["first_loss"], results["static"][0]["first_loss"]
    if abs(a - b) > 1e-4 * max(1.0, abs(a)):
        raise SystemExit(f"bench_mm_padding: first-step losses differ ({a} vs {b}); no timing")
    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in results.items()}
    lengths = [len(s.ids) for s in conv.samples]
    print(f"check: first-step losses agree ({a:.6f} vs {b:.6f})")
    print(
        f"conversations: {len(lengths)}, tokens per sample {min(lengths)}..{max(lengths)} "
        f"(mean {statistics.mean(lengths):.1f}), static width {T}, micro-batch {B}"
    )
    print(f"{'padding':10}{'real tok/s':>12}")
    for k, v in med.items():
        print(f"{k:10}{v:>12,.0f}")
    ratio = med["dynamic"] / med["static"]
    print(
        f"dynamic / static: {ratio:.2f}x ({args.threads} threads, {args.repeats} repeats, "
        f"median; {args.steps} timed steps each)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"median": med, "ratio": ratio, "runs": results,
                                               "threads": args.threads}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
