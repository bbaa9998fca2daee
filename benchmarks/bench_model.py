"""stoker's decoder against `transformers`' LlamaForCausalLM on the same tiny LLaMA.

    make bench                                            # = the next line
    .venv/bin/python benchmarks/bench_model.py [--quick] [--json [PATH]] [--threads N]

The model is the `bench-llama` preset (6 layers, d 384, 6 heads / 2 KV heads, d_ff 1024,
vocab 8192, untied head); transformers gets a `LlamaConfig` of identical shapes with
`attn_implementation="sdpa"` and stoker's initial weights, so both compute the same function
(the first-step loss and the greedy tokens are compared as a check). Every (impl, mode) runs in
its own subprocess with the same torch thread count, so no allocator, oneDNN cache or thread
pool state is shared. Measured:

- train fp32 / bf16: forward, cross-entropy, backward, AdamW step on batch 8 × T 256
  (bf16 = `torch.autocast("cpu", dtype=torch.bfloat16)` over fp32 weights); warmup steps,
  then the median of the timed steps. Achieved FLOP/s (6N + 12·L·H·Q·T per token, Kaplan et
  al. 2020 / PaLM appendix B) is reported as a fraction of this machine's matmul rate in that
  dtype (best of several 2048×2048 matmuls, measured in its own subprocess).
- decode: greedy, batch 1, prompt 32, 128 new tokens with the KV cache (transformers:
  `generate(do_sample=False)`; stoker: `stoker.generate` if present, else a greedy loop over
  `Decoder.forward(ids, cache)`), median over repeats, new tokens / wall time incl. prefill.

Ratios are stoker / transformers (> 1: stoker faster). A benchmark, never a test assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PRESET = "bench-llama"
BATCH, PROMPT, NEW_TOKENS = 8, 32, 128
MATMUL_N = 2048
IMPLS = ("stoker", "transformers")
MODES = ("fp32", "bf16", "decode")


# ------------------------------------------------------------------------------ models
def model_config():
    from stoker.config import ModelConfig

    return ModelConfig(preset=PRESET)


def flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6N (N = all parameters) + 12·L·H·Q·T attention."""
    from stoker.models.gpt import build_model

    n_params = sum(p.numel() for p in build_model(cfg, device="meta").parameters())
    try:  # the project's own accounting, once it exists
        from stoker.scaling.flops import flops_per_token as project_flops

        return float(project_flops(cfg))
    except (ImportError, TypeError, AttributeError):
        pass
    L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.dim_head, cfg.max_seq_len
    return 6.0 * n_params + 12.0 * L * H * Q * T


def build(impl: str, cfg):
    """(model, loss(ids, targets)), each impl with its own loss code; transformers gets a copy
    of stoker's initial weights."""
    import torch

    from stoker.models.gpt import build_model, lm_loss

    torch.manual_seed(0)
    ours = build_model(cfg)
    if impl == "stoker":
        return ours, lambda ids, targets: lm_loss(ours(ids), targets)
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_head,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    hf = LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    try:  # the project's converter, the one place that knows HF weight names
        from stoker.models.hf import state_dict_to_hf

        state = state_dict_to_hf(ours.state_dict(), cfg)
    except ImportError:  # stoker's LLaMA names are HF's without the `model.` prefix
        state = {k if k.startswith("lm_head") else f"model.{k}": v
                 for k, v in ours.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    # HF's own causal-LM loss (fp32 upcast, mean CE); `shift_labels`: targets already shifted
    return hf, lambda ids, targets: hf(input_ids=ids, labels=targets, shift_labels=targets,
                                       use_cache=False).loss


# ----------------------------------------------------------------------------- workers
def run_matmul(dtype_name: str, reps: int) -> dict:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(MATMUL_N, MATMUL_N).to(dtype)
    b = torch.randn(MATMUL_N, MATMUL_N).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return {"flops_per_s": 2 * MATMUL_N**3 / best}


def run_train(impl: str, mode: str, warmup: int, steps: int) -> dict:
    import contextlib

    import torch

    cfg = model_config()
    model, loss_fn = build(impl, cfg)
    model.train()
    # as the training loop builds it on CPU (train/optim.py: foreach AdamW), same for both
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            foreach=True)
    g = torch.Generator().manual_seed(1)
    T = cfg.max_seq_len
    data = torch.randint(0, cfg.vocab_size, (BATCH, T + 1), generator=g)
    ids, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    if mode == "bf16":
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    times, losses = [], []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        with autocast():
            loss = loss_fn(ids, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    step_s = statistics.median(times[warmup:])
    return {"tokens_per_s": BATCH * T / step_s, "step_s": step_s,
            "step_times": times[warmup:], "loss0": losses[0]}


def stoker_greedy(model, prompt, new_tokens: int):
    """Greedy decoding with stoker's KV cache: prefill, then one token per forward."""
    import torch

    try:
        from stoker.generate import generate
    except ImportError:
        generate = None
    if generate is not None:  # yields (B,) ids one step at a time
        new = torch.stack(list(generate(model, prompt, new_tokens, temperature=0.0)), dim=1)
        return torch.cat([prompt, new], dim=1)  # (B, P + N)
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + new_tokens)
    ids, out = prompt, []
    for _ in range(new_tokens):
        ids = model(ids, cache)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        out.append(ids)
    return torch.cat([prompt, *out], dim=1)


def run_decode(impl: str, repeats: int) -> dict:
    import torch

    cfg = model_config()
    model, _ = build(impl, cfg)
    model.eval()
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT), generator=g)
    if impl == "stoker":
        decode = lambda: stoker_greedy(model, prompt, NEW_TOKENS)
    else:
        decode = lambda: model.generate(prompt, do_sample=False, max_new_tokens=NEW_TOKENS,
                                        min_new_tokens=NEW_TOKENS)
    times = []
    with torch.inference_mode():
        out = decode()  # warmup
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = decode()
            times.append(time.perf_counter() - t0)
    assert out.shape == (1, PROMPT + NEW_TOKENS), out.shape
    t = statistics.median(times)
    return {"tokens_per_s": NEW_TOKENS / t, "seconds": t, "times": times,
            "tokens": out[0, PROMPT:].tolist()}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    impl, mode = args.worker
    if impl == "matmul":
        result = run_matmul(mode, reps=5 if args.quick else 10)
    elif mode == "decode":
        result = run_decode(impl, repeats=3 if args.quick else 7)
    else:
        warmup, steps = (2, 5) if args.quick else (3, 12)
        result = run_train(impl, mode, warmup, steps)
    result.update(threads=torch.get_num_threads(), torch=torch.__version__)
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------ parent
def spawn(impl: str, mode: str, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--worker", impl, mode, "--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    print(f"  {impl:12s} {mode:6s} ...", end=" ", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"worker {impl} {mode} failed (exit {proc.returncode})")
    print(f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return json.loads(lines[-1].removeprefix("RESULT "))


def summarize(runs: dict, modes: list[str], fpt: float) -> dict:
    """Medians over repeats, ratios stoker/transformers, fractions of the matmul rate."""
    med = lambda key, field: statistics.median(r[field] for r in runs[key])
    out = {"matmul_flops_per_s": {d: max(r["flops_per_s"] for r in runs[("matmul", d)])
                                  for d in ("fp32", "bf16")},
           "flops_per_token": fpt, "rows": []}
    for mode in modes:
        row = {"mode": mode}
        for impl in IMPLS:
            row[impl] = med((impl, mode), "tokens_per_s")
            if mode != "decode":
                rate = out["matmul_flops_per_s"][mode]
                row[f"{impl}_mm_frac"] = row[impl] * fpt / rate
        row["ratio"] = row["stoker"] / row["transformers"]
        out["rows"].append(row)
    checks = {}
    for mode in modes:
        key, field = ("decode_tokens", "tokens") if mode == "decode" else (f"loss0_{mode}", "loss0")
        checks[key] = [runs[(impl, mode)][0][field] for impl in IMPLS]
    out["checks"] = checks
    return out


def print_table(s: dict, args) -> None:
    mm = s["matmul_flops_per_s"]
    print(f"\nbench-llama, batch {BATCH} x T 256 (train), batch 1 prompt {PROMPT} + "
          f"{NEW_TOKENS} new (decode); {args.threads} threads, repeats {args.repeats}")
    print(f"matmul {MATMUL_N}^3: fp32 {mm['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {mm['bf16'] / 1e9:.1f} GFLOP/s; train FLOPs/token {s['flops_per_token']:.3e}")
    print(f"{'mode':8s} {'stoker tok/s':>13s} {'transformers':>13s} {'ratio':>6s} "
          f"{'stoker mm%':>11s} {'hf mm%':>7s}")
    for r in s["rows"]:
        fr = (f"{100 * r['stoker_mm_frac']:10.1f}% {100 * r['transformers_mm_frac']:6.1f}%"
              if "stoker_mm_frac" in r else f"{'-':>11s} {'-':>7s}")
        name = {"fp32": "train32", "bf16": "trainbf", "decode": "decode"}[r["mode"]]
        print(f"{name:8s} {r['stoker']:13.1f} {r['transformers']:13.1f} "
              f"{r['ratio']:5.2f}x {fr}")
    for key, (a, b) in s["checks"].items():
        if key == "decode_tokens":
            same = sum(x == y for x, y in zip(a, b))
            print(f"check: greedy tokens equal in {same}/{len(a)} positions")
        else:
            print(f"check: first-step {key.removeprefix('loss0_')} loss {a:.5f} vs {b:.5f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer warmup/timed steps and repeats")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write results as JSON to PATH (or stdout with no PATH)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads in every worker (default: usable cores)")
    p.add_argument("--repeats", type=int, default=None,
                   help="processes per (impl, mode), alternating order (default 1 quick, 2 full)")
    p.add_argument("--modes", default=",".join(MODES), help="subset of fp32,bf16,decode")
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    args.repeats = args.repeats or (1 if args.quick else 2)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    modes = [m for m in MODES if m in args.modes.split(",")]
    runs: dict = {}
    jobs = [("matmul", "fp32"), ("matmul", "bf16")]
    for rep in range(args.repeats):
        order = IMPLS if rep % 2 == 0 else IMPLS[::-1]
        jobs += [(impl, mode) for mode in modes for impl in order]
    for impl, mode in jobs:
        runs.setdefault((impl, mode), []).append(spawn(impl, mode, args))
    s = summarize(runs, modes, flops_per_token(model_config()))
    s["runs"] = {f"{i}/{m}": v for (i, m), v in runs.items()}
    if args.json is None:
        print_table(s, args)
    else:
        text = json.dumps(s, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            print_table(s, args)


if __name__ == "__main__":
    main()
