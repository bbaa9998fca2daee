"""Cost of `train.deterministic` on this CPU: tokens/s of `stoker train` with it on and off.

    .venv/bin/python benchmarks/bench_determinism.py [--repeats 3] [--steps 60]

Each run is its own `stoker train` process (MKL's reproducibility mode is chosen once per
process, before its first matmul). On and off alternate, so a change in the machine's load
hits both sides alike; the medians and their ratio are printed per model and precision. Models:
the demo recipe (recipes/pretrain/tiny.yaml, d 128) and the `bench-llama` preset (d 384, T 256).
It also checks what the setting is for: two runs with it on have identical losses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "tiny (demo)": [],
    "bench-llama": [
        "--model.preset=bench-llama",
        "--model.max_seq_len=256",
        "--model.vocab_size=8192",
        "--train.batch_size=8",
        "--train.micro_batch_size=8",
        "--data.dir=data/bench-determinism",
        "--data.tokenizer.vocab_size=8192",
    ],
}


def run(out: Path, steps: int, extra: list[str]) -> tuple[float, list[float]]:
    cmd = [
        sys.executable,
        "-m",
        "stoker",
        "train",
        str(ROOT / "recipes/pretrain/tiny.yaml"),
        f"--train.max_steps={steps}",
        "--train.eval_interval=0",
        "--train.log_interval=1",
        f"--train.save_interval={steps}",
        "--train.monitor_interval=0",
        "--train.resume=never",
        f"--train.out_dir={out}",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-2000:])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    # steady-state tokens/s: the median of the logged windows after the first (warm-up)
    tps = statistics.median(r["tokens_per_second"] for r in rows[1:] if "loss" in r)
    return tps, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    print(
        f"{'model':<14} {'precision':<9} {'off tok/s':>10} {'on tok/s':>10} {'on/off':>7} "
        f"{'on: identical runs':>19} {'off: identical runs':>20}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for precision in ("fp32", "bf16"):
                tps: dict[bool, list[float]] = {True: [], False: []}
                curves: dict[bool, list[list[float]]] = {True: [], False: []}
                for i in range(args.repeats):
                    for on in (False, True) if i % 2 == 0 else (True, False):
                        out = Path(tmp) / f"{model}-{precision}-{on}-{i}"
                        t, losses = run(
                            out,
                            args.steps,
                            [
                                *MODELS[model],
                                f"--train.precision={precision}",
                                f"--train.deterministic={on}",
                            ],
                        )
                        tps[on].append(t)
                        curves[on].append(losses)
                off, on = statistics.median(tps[False]), statistics.median(tps[True])
                same = {k: all(c == v[0] for c in v[1:]) for k, v in curves.items()}
                print(
                    f"{model:<14} {precision:<9} {off:>10,.0f} {on:>10,.0f} {on / off:>7.3f} "
                    f"{str(same[True]):>19} {str(same[False]):>20}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
