"""stoker's decoder against `transformers`' LlamaForCausalLM on the same tiny LLaMA.

    make bench                                            # = the next line
    .venv/bin/python benchmarks/bench_model.py [--quick] [--json [PATH]] [--threads N]
                                               [--repeats R] [--modes fp32,bf16,decode]
                                               [--wait-idle SECONDS] [--retries N]

The model is the `bench-llama` preset (6 layers, d 384, 6 heads / 2 KV heads, d_ff 1024,
vocab 8192, untied head); transformers gets a `LlamaConfig` of identical shapes with
`attn_implementation="sdpa"` and a copy of stoker's initial weights, so both compute the same
function (the first-step losses and the greedy tokens are printed as a check). Every
(impl, mode) runs in its own subprocess with the same torch thread count, so no allocator,
oneDNN cache or thread-pool state is shared; with `--repeats` > 1 the order alternates.

- train fp32 / bf16: forward, cross-entropy (each impl's own loss code), backward, AdamW step
  (foreach, as stoker's loop builds it on CPU) on batch 8 × T 256; bf16 is
  `torch.autocast("cpu", dtype=torch.bfloat16)` over fp32 weights. Warmup steps, then the
  median step time. Achieved FLOP/s (6N + 12·L·H·Q·T per token, N = all parameters; Kaplan
  et al. 2020, PaLM appendix B) is shown as a fraction of this machine's matmul rate in that
  dtype: the best of several 2048×2048 matmuls, measured in its own subprocess.
- decode: greedy, batch 1, prompt 32, 128 new tokens with the KV cache in fp32 (transformers:
  `generate(do_sample=False)`; stoker: `stoker.generate.generate`, or a greedy loop over
  `Decoder.forward(ids, cache)` if that module is absent); new tokens / wall time incl.
  prefill, median over repeats.

Ratios are stoker / transformers (> 1: stoker faster). The `other` column is the CPU (in cores)
that processes other than the worker used while it ran (the worst cell of the row): on a
shared machine numbers taken with `other` above ~0.2 are not comparable; `--wait-idle` waits
for a quiet machine before each worker and `--retries` re-runs disturbed workers.
A benchmark, never a test assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    try:  # the project's own accounting, once it exists
        from stoker.scaling.flops import flops_per_token as project_flops

        return float(project_flops(cfg, cfg.max_seq_len))
    except (ImportError, TypeError, AttributeError):
        pass
    from stoker.models.gpt import build_model

    n_params = sum(p.numel() for p in build_model(cfg, device="meta").parameters())
    L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.dim_head, cfg.max_seq_len
    return 6.0 * n_params + 12.0 * L * H * Q * T


def build(impl: str, cfg):
    """(model, loss(ids, targets)) with each impl's own loss code; transformers gets a copy of
    stoker's initial weights."""
    import torch

    from stoker.models.gpt import build_model, lm_loss

    torch.manual_seed(0)
    ours = build_model(cfg)
    if impl == "stoker":
        return ours, lambda ids, targets: lm_loss(ours(ids), targets)
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.dim_head,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    hf = LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    try:  # the project's converter, the one place that knows HF weight names
        from stoker.models.hf import state_dict_to_hf

        state = state_dict_to_hf(ours.state_dict(), cfg)
    except ImportError:  # stoker's LLaMA names are HF's without the `model.` prefix
        state = {
            k if k.startswith("lm_head") else f"model.{k}": v for k, v in ours.state_dict().items()
        }
    hf.load_state_dict(state, strict=True)
    # HF's causal-LM loss (fp32 upcast, mean CE); `shift_labels`: the targets are shifted already
    return (
        hf,
        lambda ids, targets: (
            hf(input_ids=ids, labels=targets, shift_labels=targets, use_cache=False).loss
        ),
    )


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
    opt = torch.optim.AdamW(
        model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True
    )
    T = cfg.max_seq_len
    data = torch.randint(
        0, cfg.vocab_size, (BATCH, T + 1), generator=torch.Generator().manual_seed(1)
    )
    ids, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()  # (B, T) each
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
    return {
        "tokens_per_s": BATCH * T / step_s,
        "step_s": step_s,
        "step_times": times[warmup:],
        "loss0": losses[0],
    }


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
    prompt = torch.randint(
        0, cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(2)
    )
    if impl == "stoker":
        decode = lambda: stoker_greedy(model, prompt, NEW_TOKENS)
    else:
        decode = lambda: model.generate(
            prompt, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS
        )
    times = []
    with torch.inference_mode():
        out = decode()  # warmup
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = decode()
            times.append(time.perf_counter() - t0)
    if out.shape != (1, PROMPT + NEW_TOKENS):
        raise RuntimeError(f"{impl} decoded shape {tuple(out.shape)}")
    t = statistics.median(times)
    return {
        "tokens_per_s": NEW_TOKENS / t,
        "seconds": t,
        "times": times,
        "tokens": out[0, PROMPT:].tolist(),
    }


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    impl, mode = args.worker
    if impl == "matmul":
        result = run_matmul(mode, reps=5 if args.quick else 10)
    elif mode == "decode":
        result = run_decode(impl, repeats=3 if args.quick else 7)
    else:
        warmup, steps = (2, 4) if args.quick else (3, 10)
        result = run_train(impl, mode, warmup, steps)
    result.update(threads=torch.get_num_threads(), torch=torch.__version__)
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------ parent
def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU-seconds of the whole machine, of this process's finished children)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy / os.sysconf("SC_CLK_TCK"), kids.ru_utime + kids.ru_stime


def wait_idle(max_wait: float, limit: float = 0.15, window: float = 2.0) -> None:
    """Wait up to `max_wait` s for a `window` in which other processes use < `limit` cores."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        a = cpu_seconds()
        time.sleep(window)
        b = cpu_seconds()
        if a is None or b is None or (b[0] - a[0]) / window < limit:
            return


def spawn(impl: str, mode: str, args) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, __file__, "--worker", impl, mode, "--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    if args.wait_idle:
        wait_idle(args.wait_idle)
    print(f"  {impl:12s} {mode:6s} ...", end=" ", file=sys.stderr, flush=True)
    before, t0 = cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, after = time.perf_counter() - t0, cpu_seconds()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"worker {impl} {mode} failed (exit {proc.returncode})")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    if before and after:  # CPU of everything else on the machine, in cores, while this ran
        result["other_cores"] = max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall)
    print(
        f"{wall:.0f}s, other load {result.get('other_cores', float('nan')):.2f} cores",
        file=sys.stderr,
        flush=True,
    )
    return result


def measure(impl: str, mode: str, args) -> dict:
    """One worker's result; with `--retries`, re-run while other processes disturbed it and
    keep the least disturbed run."""
    best: dict | None = None
    for _ in range(1 + args.retries):
        result = spawn(impl, mode, args)
        if best is None or result.get("other_cores", 0) < best.get("other_cores", 0):
            best = result
        if best.get("other_cores", 0) <= args.max_other:
            break
    return best


def summarize(runs: dict, modes: list[str], fpt: float) -> dict:
    """Medians over repeats, ratios stoker/transformers, fractions of the matmul rate."""
    med = lambda key, field: statistics.median(r.get(field, float("nan")) for r in runs[key])
    out = {
        "matmul_flops_per_s": {
            d: max(r["flops_per_s"] for r in runs[("matmul", d)]) for d in ("fp32", "bf16")
        },
        "flops_per_token": fpt,
        "rows": [],
        "checks": {},
    }
    for mode in modes:
        row = {"mode": mode}
        for impl in IMPLS:
            row[impl] = med((impl, mode), "tokens_per_s")
            row[f"{impl}_other_cores"] = max(r.get("other_cores", 0.0) for r in runs[(impl, mode)])
            if mode != "decode":
                row[f"{impl}_mm_frac"] = row[impl] * fpt / out["matmul_flops_per_s"][mode]
        row["ratio"] = row["stoker"] / row["transformers"]
        out["rows"].append(row)
        field = "tokens" if mode == "decode" else "loss0"
        out["checks"][f"{field}_{mode}"] = [runs[(impl, mode)][0][field] for impl in IMPLS]
    return out


def print_table(s: dict, args) -> None:
    mm = s["matmul_flops_per_s"]
    print(
        f"\n{PRESET}: train batch {BATCH} x T 256, decode batch 1 prompt {PROMPT} + "
        f"{NEW_TOKENS} new; {args.threads} threads, {args.repeats} process(es) per cell, "
        f"{'quick' if args.quick else 'full'}"
    )
    print(
        f"matmul {MATMUL_N}^3: fp32 {mm['fp32'] / 1e9:.0f} GFLOP/s, bf16 {mm['bf16'] / 1e9:.0f} "
        f"GFLOP/s; training FLOPs/token {s['flops_per_token'] / 1e6:.1f} M"
    )
    print(
        f"{'':9s}{'stoker':>10s}{'transformers':>14s}{'ratio':>8s}{'stoker':>9s}{'hf':>7s}"
        f"{'other':>8s}"
    )
    print(
        f"{'mode':9s}{'tok/s':>10s}{'tok/s':>14s}{'s/t':>8s}{'mm %':>9s}{'mm %':>7s}{'cores':>8s}"
    )
    names = {"fp32": "train32", "bf16": "trainbf16", "decode": "decode"}
    for r in s["rows"]:
        frac = (
            f"{100 * r['stoker_mm_frac']:8.0f}%{100 * r['transformers_mm_frac']:6.0f}%"
            if "stoker_mm_frac" in r
            else f"{'-':>9s}{'-':>7s}"
        )
        other = max(r["stoker_other_cores"], r["transformers_other_cores"])
        print(
            f"{names[r['mode']]:9s}{r['stoker']:10.1f}{r['transformers']:14.1f}"
            f"{r['ratio']:7.2f}x{frac}{other:8.2f}"
        )
    for key, (a, b) in s["checks"].items():
        if key.startswith("tokens"):
            same = sum(x == y for x, y in zip(a, b, strict=True))
            print(f"check: greedy tokens equal in {same}/{len(a)} positions")
        else:
            print(f"check: first-step {key.removeprefix('loss0_')} loss {a:.5f} vs {b:.5f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer warmup/timed steps and repeats")
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write the results as JSON to PATH (no PATH: to stdout, no table)",
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p.add_argument(
        "--threads",
        type=int,
        default=cores,
        help="torch threads in every worker (default: the usable cores)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="worker processes per (impl, mode), order alternating "
        "(default 1 with --quick, else 2)",
    )
    p.add_argument("--modes", default=",".join(MODES), help="subset of fp32,bf16,decode")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each worker, wait up to SECONDS for other processes to go quiet",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=0,
        help="re-run a worker up to this many times while other processes used more "
        "than --max-other cores during it; the least disturbed run counts",
    )
    p.add_argument(
        "--max-other",
        type=float,
        default=0.25,
        metavar="CORES",
        help="other processes' CPU (in cores) tolerated by --retries (default 0.25)",
    )
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    args.repeats = args.repeats or (1 if args.quick else 2)
    modes = [m for m in MODES if m in args.modes.split(",")]
    if not modes:
        p.error(f"--modes: choose from {','.join(MODES)}")
    jobs = []
    for rep in range(args.repeats):
        order = IMPLS if rep % 2 == 0 else IMPLS[::-1]
        jobs += [("matmul", "fp32"), ("matmul", "bf16")]
        jobs += [(impl, mode) for mode in modes for impl in order]
    runs: dict = {}
    for impl, mode in jobs:
        runs.setdefault((impl, mode), []).append(measure(impl, mode, args))
    summary = summarize(runs, modes, flops_per_token(model_config()))
    summary["runs"] = {f"{impl}/{mode}": v for (impl, mode), v in runs.items()}
    summary["settings"] = {
        "threads": args.threads,
        "repeats": args.repeats,
        "quick": args.quick,
        "batch": BATCH,
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
    }
    if args.json == "-":
        print(json.dumps(summary, indent=1))
        return
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print_table(summary, args)


if __name__ == "__main__":
    main()
