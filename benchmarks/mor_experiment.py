"""Compute-matched Mixture-of-Recursions comparison at tiny scale (issue 6; Bae et al. 2025 §3).

    .venv/bin/python benchmarks/mor_experiment.py [--vanilla-steps 300] [--out-root DIR]

Four models with the same shape (8 applied layers, d 128, 4/2 heads, d_ff 384, vocab 2048,
T 128; recipes/mor/tiny-*.yaml) train on the built-in python-stdlib corpus (data/tiny):
vanilla (8 unique layers), recursive (rec2 middle_cycle: layer 0, a 3-layer block applied
twice, layer 7; no router), MoR-2 expert-choice and MoR-2 token-choice. Every run gets the same
training-FLOPs budget, `--vanilla-steps` × the vanilla FLOPs/step, with FLOPs/token from
`stoker count` (PaLM convention, capacity-aware for MoR; token-choice assumes balanced depths):
steps = budget ÷ (FLOPs/token × tokens/step). Each run is its own `stoker train` process, one
after another; then `stoker eval` on 20 fixed validation batches (for MoR also under causal
threshold routing). Prints a markdown table; tokens/s are wall-clock on this machine (median
of the logged windows). `--reuse` keeps finished runs (e.g. to redo one disturbed by load).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = "recipes/mor/tiny-expert-rec2.yaml"
RUNS = {  # name -> overrides on the tiny MoR recipe
    "vanilla": None,
    "recursive (rec2)": ["--mor.router=none"],
    "MoR-2 expert": ["--mor.router=expert"],
    "MoR-2 token": ["--mor.router=token"],
    # controls: the recursive baseline with the routers' gated update h + c·F(h), c fixed at
    # the expert gate's typical 0.05 and the token-choice weight's typical 0.5
    "recursive gated (c=0.05)": ["--mor.router=none", "--mor.baseline_gate=0.05"],
    "recursive gated (c=0.5)": ["--mor.router=none", "--mor.baseline_gate=0.5"],
}


def stoker(*args: str) -> str:
    cmd = [sys.executable, "-m", "stoker", *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def vanilla_recipe(out_root: Path) -> Path:
    """The tiny MoR recipe without its `mor` section: a plain 8-layer decoder."""
    import yaml

    data = yaml.safe_load((ROOT / TINY).read_text())
    data.pop("mor")
    data["recipe"] = "pretrain"
    path = out_root / "vanilla.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def accounting(recipe: Path, overrides: list[str]) -> tuple[float, int]:
    """(training FLOPs/token, non-embedding params): the figures `stoker count` prints."""
    from stoker.config import load_config
    from stoker.scaling import flops

    cfg = load_config(recipe, overrides)
    m, mor, T = cfg.model, getattr(cfg, "mor", None), cfg.train.seq_len or cfg.model.max_seq_len
    if mor is None:
        return flops.flops_per_token(m, T), flops.count_params(m).non_embedding
    params = flops.count_params_shared(m, mor.recursions, mor.sharing).non_embedding
    return flops.mor_flops_per_token(m, mor, T), params + flops.mor_router_params(m, mor)


def logged(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def run(name: str, recipe: Path, overrides: list[str], steps: int, out: Path, reuse: bool) -> dict:
    """Train (unless `reuse` finds this run finished), evaluate, and summarize one model.
    tokens/s is the median over the logged 25-step windows: robust to bursts of other load."""
    done = [r for r in logged(out) if r.get("event") == "summary" and r["steps"] == steps]
    if not (reuse and done):
        shutil.rmtree(out, ignore_errors=True)
        args = [
            *overrides,
            f"--train.max_steps={steps}",
            f"--train.out_dir={out}",
            "--train.resume=never",
            f"--train.save_interval={steps}",
            f"--train.eval_interval={steps}",
            "--train.log_interval=25",
        ]
        stoker("train", str(recipe), *args)
    rows = logged(out)
    summary = next(r for r in rows if r.get("event") == "summary")
    windows = [r["tokens_per_second"] for r in rows if "step" in r and "tokens_per_second" in r]
    ev = json.loads(stoker("eval", str(out), "--batches", "20", "--json"))
    routing = ev.get("routing", {})
    return {
        "name": name,
        "steps": steps,
        "tokens": summary["tokens"],
        "tok_s": statistics.median(windows),
        "val": ev["loss"],
        "val_threshold": routing.get("loss_threshold"),
        "depth_agree": routing.get("depth_agreement"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vanilla-steps", type=int, default=300)
    ap.add_argument("--out-root", type=Path, default=ROOT / "runs" / "mor-experiment")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs, redo the rest")
    args = ap.parse_args()
    args.out_root.mkdir(parents=True, exist_ok=True)
    plain = vanilla_recipe(args.out_root)
    recipes = {n: (plain, []) if o is None else (ROOT / TINY, o) for n, o in RUNS.items()}
    acc = {n: accounting(r, o) for n, (r, o) in recipes.items()}
    from stoker.config import load_config

    cfg = load_config(plain)
    tokens_per_step = cfg.train.batch_size * (cfg.train.seq_len or cfg.model.max_seq_len)
    budget = args.vanilla_steps * tokens_per_step * acc["vanilla"][0]
    rows = []
    for n, (recipe, over) in recipes.items():
        steps = round(budget / (acc[n][0] * tokens_per_step))
        out = (
            args.out_root
            / n.replace(" (rec2)", "").replace(" (c=", "-").strip(")").replace(" ", "-").lower()
        )
        print(f"{n}: {steps} steps ({acc[n][0] / 1e6:.2f} MFLOPs/token)", flush=True)
        rows.append(run(n, recipe, over, steps, out, args.reuse))
    print(
        f"\nbudget {budget:.3g} training FLOPs (PaLM convention), {tokens_per_step} tokens/step\n"
    )
    print(
        "| model | non-emb. params | FLOPs/token | steps | tokens | val loss | val loss, causal "
        "routing | depth agreement | tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fpt, params = acc[r["name"]]
        thr = f"{r['val_threshold']:.4f}" if r["val_threshold"] is not None else "—"
        agree = f"{r['depth_agree']:.1%}" if r["depth_agree"] is not None else "—"
        print(
            f"| {r['name']} | {params / 1e6:.3f}M | {fpt / 1e6:.2f}M | {r['steps']} | "
            f"{r['tokens']:,} | {r['val']:.4f} | {thr} | {agree} | {r['tok_s']:,.0f} |"
        )


if __name__ == "__main__":
    main()
