"""Loop overhead: tokens/s through `stoker train` (loader, logging, eval off, checkpoint off)
vs the bare model step (forward, cross-entropy, backward, AdamW) on the same model and batch.

    .venv/bin/python benchmarks/bench_loop.py [--steps 30] [--precision fp32]

Each side runs in its own process. The model is the spine benchmark's `bench-llama` preset
(6 layers, d 384, 6/2 heads, d_ff 1024, vocab 8192), T 256, batch 8. The loop trains on the
python-stdlib shards (prepared once into .cache/bench-loop-data; any vocab ≤ 8192 fits).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--model.preset=bench-llama",
    "--train.batch_size=8",
    "--train.micro_batch_size=8",
    "--model.max_seq_len=256",
]


def bare_step(steps: int, precision: str) -> float:
    """Median tokens/s of the bare training step (run in a child process)."""
    import contextlib

    import torch

    from stoker.config import load_config
    from stoker.models.gpt import build_model, lm_loss
    from stoker.train.optim import build_optimizer

    cfg = load_config(None, COMMON)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim, "cpu")
    x = torch.randint(0, 8192, (8, 257))
    amp = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        with amp:
            loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 8 * 256 / statistics.median(times)


def loop(steps: int, precision: str) -> float:
    """Median logged tokens/s of `stoker train` on the same model (child process)."""
    data = ROOT / ".cache" / "bench-loop-data"
    with tempfile.TemporaryDirectory() as out:
        args = [
            *COMMON,
            f"--train.out_dir={out}",
            f"--data.dir={data}",
            "--data.max_documents=200",
            "--data.tokenizer.vocab_size=2048",
            f"--train.max_steps={steps + 5}",
            "--train.log_interval=1",
            "--train.eval_interval=0",
            "--train.save_interval=100000",
            f"--train.precision={precision}",
        ]
        from stoker.config import load_config
        from stoker.train.loop import train

        train(load_config(None, args))
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        tps = [r["tokens_per_second"] for r in rows if "loss" in r][5:]
    return statistics.median(tps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--child", choices=["bare", "loop"])
    args = ap.parse_args()
    if args.child:
        fn = bare_step if args.child == "bare" else loop
        print(json.dumps({"tokens_per_second": fn(args.steps, args.precision)}))
        return
    results = {}
    for child in ("bare", "loop", "bare", "loop"):  # interleaved, best of two each
        r = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                child,
                "--steps",
                str(args.steps),
                "--precision",
                args.precision,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        tps = json.loads(r.stdout.strip().splitlines()[-1])["tokens_per_second"]
        results[child] = max(results.get(child, 0.0), tps)
    ratio = results["loop"] / results["bare"]
    print(
        f"bench-llama T=256 B=8 {args.precision}: bare step {results['bare']:,.0f} tok/s, "
        f"stoker train loop {results['loop']:,.0f} tok/s, loop/bare = {ratio:.3f}"
    )


if __name__ == "__main__":
    main()
