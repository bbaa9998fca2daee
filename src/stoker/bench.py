"""`stoker bench`: stoker's decoder and data loader against what a user would otherwise run,
side by side on this machine.

    stoker bench [--quick] [--json [PATH]] [--device auto|cpu|cuda] [--threads N] [--repeats R]
                 [--preset NAME] [--modes fp32,bf16,decode,data | all] [--wait-idle SECONDS]
                 [--retries N]
    make bench                     # = .venv/bin/python benchmarks/bench_model.py = stoker bench

The model is a preset (default `bench-llama`: 6 layers, d 384, 6 heads / 2 KV heads, d_ff
1024, vocab 8192, untied head, T 256). The peer model is the same shape in `transformers`
(`AutoModelForCausalLM` from `models.hf.hf_config_from`, `attn_implementation="sdpa"`) holding a
copy of stoker's initial weights (`models.hf.state_dict_to_hf`), so both compute the same
function: the first-step losses and the greedy tokens are printed as a check. Every
(impl, mode) runs in its own subprocess (`python -m stoker.bench_workers SPEC`; that module
holds the timed code) with the same torch thread count, so no allocator, oneDNN cache or
thread-pool state is shared; with `--repeats` > 1 the order alternates. `--device` (default
auto: cuda when torch sees a GPU, else cpu) holds the models, inputs, KV caches and optimizer
state; on CUDA every timed step, decode run and matmul starts and ends with
`torch.cuda.synchronize()`, and `--threads` sets the torch threads of host-side ops only.

- fp32 / bf16 (training step): forward, cross-entropy (each impl's own loss code: stoker's
  model computes its head + loss from `forward(ids, targets=...)`, as `stoker train` does,
  fused under autocast on CUDA by `models.loss`; transformers' `labels=` loss), backward,
  AdamW step (fused in both: stoker's `build_optimizer`, and `adamw_torch_fused`, HF Trainer's
  default for torch >= 2.8, with the same decay groups) on batch 8 × T = max_seq_len; bf16 is
  `torch.autocast(device, dtype=torch.bfloat16)` over fp32 weights. Warmup steps, then the
  median step time. Achieved FLOP/s (`scaling.flops.flops_per_token`: 6N + 12·L·H·Q·T per
  token, N = all parameters; Kaplan et al. 2020, PaLM appendix B) is shown as a fraction of
  this machine's matmul rate in that dtype: the best of several 2048×2048 matmuls (8192×8192 on
  a GPU), measured in its own subprocess before and after the model cells. On CUDA fp32 runs
  with torch's TF32 setting left at its default (the header says which), and where
  `scaling.hardware` knows the GPU its datasheet peak is printed next to the measured rate.
- fp32-compile / bf16-compile (opt-in: `--modes ...,bf16-compile` or `--modes all`): the same
  step with each model under `torch.compile` as its trainer applies it: `stoker train
  --train.compile=true` compiles the model, head and loss included (the plain head + loss in
  the graph: inductor fuses it); HF Trainer's `torch_compile=True` has accelerate call
  `torch.compile(model)` (inductor, default mode), the loss computed inside the model too.
  Compiling happens in the warmup steps (`--warmup` >= 1; their total time is shown as the
  warm-up seconds), each worker with an empty inductor cache, so it is a cold compile (40-75 s per
  cell on 2 cores, tiny-llama or bench-llama). With the eager mode of the same dtype in the run,
  the compiled/eager speedup of each impl is printed; graphs compiled during the timed steps (a
  recompile the warmup did not cover) are flagged.
- decode: greedy, batch 1, prompt 32, 128 new tokens (fewer when T is shorter) with the KV
  cache in fp32 (transformers: `generate(do_sample=False)`; stoker: `stoker.generate.generate`
  on the model as `stoker generate` prepares it, q/k/v and gate/up fused by
  `models.decoding.fuse_projections`); new tokens / wall time incl. prefill, median over repeats.
- decode-auto: the same, stoker in the dtype `stoker generate --dtype auto` picks
  (`train.precision.decode_dtype`: bf16 weights and KV cache on hardware with native bf16,
  else fp32) against transformers at its default (fp32); what a user of each gets without
  flags. Its check compares stoker's greedy tokens in that dtype with stoker's fp32 tokens
  (one untimed fp32 run in the same worker) and with the peer's.
- data: tokens/s delivered by `data.loader.TokenWindows.batch` (batch 8 × T) from a 4M-token
  shard dir of random ids written as `stoker prepare` writes one, against nanoGPT's `get_batch`
  (np.memmap opened per batch, offsets from torch.randint, torch.stack of int64 copies) on the
  same file. It is also given as a multiple of the fastest stoker training rate of the same
  run: the loader's headroom (a loader under ~10× the training rate would show in the step
  time). It is a host measurement on every device; on CUDA the multiple is of the GPU's rate.

Ratios are stoker / peer (> 1: stoker faster). Without `transformers` the model rows show
stoker alone. The `other` column is the CPU (in cores) that processes other than the worker
used while it ran (the worst cell of the row): on a shared machine numbers taken with `other`
above ~0.2 are not comparable; `--wait-idle` waits for a quiet machine before each worker and
`--retries` re-runs disturbed workers. On CUDA it is still host CPU: other processes' use of the
GPU is not seen. A benchmark, never a test assertion.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stoker.bench_report import DECODE_MODES, TRAIN_MODES, print_table
from stoker.bench_workers import (
    BATCH,
    COMPILED,
    MATMUL_N,
    decode_lengths,
    model_config,
    train_variant,
    write_shards,
)
from stoker.errors import StokerError

DEFAULT_PRESET = "bench-llama"
DATA_TOKENS = 4 * 2**20  # tokens in the data mode's train shard
DTYPES = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
MODES = (*TRAIN_MODES, *DECODE_MODES, "data")  # table order
DEFAULT_MODES = ("fp32", "bf16", *DECODE_MODES, "data")  # compiling takes minutes: opt-in
PEERS = dict.fromkeys((*TRAIN_MODES, *DECODE_MODES), "transformers") | {"data": "nanogpt"}
# (warmup, timed) steps / decode runs / data rounds per mode: with --quick, without
STEPS = dict.fromkeys(TRAIN_MODES, ((2, 4), (3, 10)))
STEPS |= dict.fromkeys(DECODE_MODES, ((1, 3), (1, 7))) | {"data": ((1, 5), (2, 10))}
HELP = {
    "quick": "fewer steps and repeats (minutes)",
    "json": "write the results as JSON to PATH (no PATH: JSON to stdout instead of the table)",
    "threads": "torch threads per worker (on cuda: host-side ops only)",
    "device": "where the models train and decode (default auto: cuda if available, else cpu)",
    "repeats": "worker processes per cell, order alternating (default 1 with --quick, else 2)",
    "modes": f"comma-separated subset of {','.join(MODES)}, or all (default "
    f"{','.join(DEFAULT_MODES)}; the -compile modes spend ~1 min per cell compiling)",
    "preset": f"model preset (default {DEFAULT_PRESET}; tiny-llama for a fast run)",
    "steps": "timed train steps / decode runs / data rounds per worker (default 4/3/5 with "
    "--quick, else 10/7/10)",
    "warmup": "untimed steps / runs / rounds before them (default 2/1/1 with --quick, else 3/1/2)",
    "idle": "before each worker, wait up to SECONDS for other processes to go quiet",
    "retries": "re-run a worker up to N times while other processes used more than --max-other "
    "cores during it; the least disturbed run counts",
    "other": "other processes' CPU tolerated by --retries (default 0.25 cores)",
}


# ------------------------------------------------------------------------------ parent
def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU-seconds of the whole machine, of this process's finished children)."""
    try:
        import resource

        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (ImportError, OSError, ValueError):
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


def spawn(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run one worker subprocess; its result plus `other_cores` (other processes' CPU)."""
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    env["TOKENIZERS_PARALLELISM"] = "false"
    if spec["mode"].endswith(COMPILED):  # a cold compile: no graphs cached by earlier workers
        cache = tempfile.mkdtemp(prefix="inductor-", dir=spec["data_dir"])  # the run's temp dir
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
    cmd = [sys.executable, "-m", "stoker.bench_workers", json.dumps(spec)]
    if args.wait_idle:
        wait_idle(args.wait_idle)
    what = ",".join(spec["dtypes"]) if spec["impl"] == "matmul" else spec["mode"]
    return run_worker(cmd, env, f"{spec['impl'] + ' ' + what:26s}", "stoker bench: worker")


def run_worker(cmd: list[str], env: dict[str, str], name: str, who: str) -> dict[str, Any]:
    """Run a benchmark worker process that prints `RESULT <json>`: that result plus
    `other_cores` (the CPU every other process used meanwhile, in cores), with a progress
    line on stderr; a failed worker's output is shown and ends the benchmark (`who` names
    it in the message)."""
    print(f"  {name} ...", end=" ", file=sys.stderr, flush=True)
    before, t0 = cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, after = time.perf_counter() - t0, cpu_seconds()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{who} {name.strip()} failed (exit {proc.returncode})")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    if before and after:
        result["other_cores"] = max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / wall)
    note = result.get("missing") or f"other load {result.get('other_cores', float('nan')):.2f}"
    print(f"{wall:.0f}s, {note}", file=sys.stderr, flush=True)
    return result


def measure(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One worker's result; with `--retries`, re-run while other processes disturbed it and
    keep the least disturbed run."""
    best: dict[str, Any] | None = None
    for _ in range(1 + args.retries):
        result = spawn(spec, args)
        if best is None or result.get("other_cores", 0) < best.get("other_cores", 0):
            best = result
        if best.get("other_cores", 0) <= args.max_other:
            break
    return best


def steps_for(mode: str, args: argparse.Namespace) -> tuple[int, int]:
    """(warmup, timed) steps of a mode's worker: --warmup / --steps, else the defaults."""
    warmup, steps = STEPS.get(mode, ((0, 0), (0, 0)))[0 if args.quick else 1]
    return (warmup if args.warmup is None else args.warmup), (args.steps or steps)


def resolve_device(name: str) -> str:
    """cpu or cuda for `--device NAME`: auto is cuda when torch sees a GPU; StokerError for cuda
    without one."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise StokerError("--device cuda: CUDA is not available; use --device cpu")
    return name


def run_all(args: argparse.Namespace, modes: list[str], tmp: str) -> dict[tuple, list]:
    """Every worker's results by (impl, mode), alternating stoker/peer order per repeat."""
    dtypes = [d for d in DTYPES if any(train_variant(m)[0] == d for m in modes)]
    common = {"quick": args.quick, "preset": args.preset, "threads": args.threads}
    common["device"] = args.device
    runs: dict[tuple, list] = {}
    peer_missing = None  # set once a transformers worker could not import it
    for rep in range(args.repeats):
        jobs = []
        for mode in modes:
            pair = ["stoker", PEERS[mode]]
            jobs += [(impl, mode) for impl in (pair if rep % 2 == 0 else pair[::-1])]
        if dtypes:  # before and after: this machine's speed drifts (shared hosts)
            jobs = [("matmul", "matmul"), *jobs, ("matmul", "matmul")]
        for impl, mode in jobs:
            if impl == "transformers" and peer_missing:
                runs[(impl, mode)] = [peer_missing]  # known already: don't spawn again
                continue
            spec = {"impl": impl, "mode": mode, "dtypes": dtypes, "data_dir": tmp, **common}
            spec["warmup"], spec["steps"] = steps_for(mode, args)
            result = measure(spec, args)
            if "missing" in result:
                peer_missing = result
            runs.setdefault((impl, mode), []).append(result)
    return runs


def summarize_row(mode: str, runs: dict, matmul: dict[str, float], fpt: float) -> dict:
    """Medians over repeats, ratio stoker/peer, fractions of the matmul rate, warm-up seconds;
    a compiled mode's speedup over its eager mode (`*_vs_eager`) when that ran too."""
    peer = PEERS[mode]

    def med(impl: str, key: str = "tokens_per_s", m: str = mode) -> float:
        return statistics.median(r[key] for r in runs[(impl, m)])

    missing = runs[(peer, mode)][0].get("missing")
    row: dict[str, Any] = {"mode": mode, "peer": peer, "peer_missing": missing}
    row["stoker_tokens_per_s"] = med("stoker")
    row["peer_tokens_per_s"] = None if missing else med(peer)
    row["ratio"] = None if missing else row["stoker_tokens_per_s"] / row["peer_tokens_per_s"]
    if mode in TRAIN_MODES:
        dtype, compiled = train_variant(mode)
        for side, impl in (("stoker", "stoker"), ("peer", peer)):
            rate = row[f"{side}_tokens_per_s"]
            row[f"{side}_mm_frac"] = None if rate is None else rate * fpt / matmul[dtype]
            row[f"{side}_warmup_s"] = None if rate is None else med(impl, "warmup_s")
            if compiled:
                eager = None if rate is None or (impl, dtype) not in runs else med(impl, m=dtype)
                row[f"{side}_vs_eager"] = None if eager is None else rate / eager
        cells = [r for impl in ("stoker", peer) for r in runs[(impl, mode)]]
        row["timed_graphs"] = max(r.get("timed_graphs", 0) for r in cells)
        row["warmup_steps"] = cells[0]["warmup_steps"]
    others = [r.get("other_cores", 0.0) for impl in ("stoker", peer) for r in runs[(impl, mode)]]
    row["other_cores"] = max(others)
    return row


def summarize(runs: dict, modes: list[str], cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The JSON result: device, settings, versions, matmul rates (with the datasheet peaks of a
    known GPU), one row per mode, checks, raw runs."""
    from stoker.scaling.flops import flops_per_token
    from stoker.scaling.hardware import peak_flops

    fpt = flops_per_token(cfg, cfg.max_seq_len)
    dtypes = {train_variant(m)[0] for m in modes if m in TRAIN_MODES}
    matmul = {d: max(r[d] for r in runs[("matmul", "matmul")]) for d in DTYPES if d in dtypes}
    rows = [summarize_row(mode, runs, matmul, fpt) for mode in modes]
    train = {r["mode"]: r["stoker_tokens_per_s"] for r in rows if r["mode"] in TRAIN_MODES}
    checks = {}
    for row in rows:
        mode = row["mode"]
        if mode == "data":  # the loader's headroom over the fastest training mode
            row["train_mode"] = max(train, key=train.get) if train else None
            fastest = train.get(row["train_mode"])
            row["train_multiple"] = (
                None if fastest is None else row["stoker_tokens_per_s"] / fastest
            )
        elif not row["peer_missing"]:
            field = "tokens" if mode in DECODE_MODES else "loss0"
            checks[f"{field}_{mode}"] = [runs[(i, mode)][0][field] for i in ("stoker", PEERS[mode])]
        if mode == "decode-auto":
            first = runs[("stoker", mode)][0]
            row["stoker_dtype"] = first["dtype"]
            checks["fp32_tokens_decode-auto"] = [first["tokens"], first["tokens_fp32"]]
    results = [r for v in runs.values() for r in v]
    version = lambda lib: next((r[lib] for r in results if lib in r), None)
    settings = {k: v for k, v in vars(args).items() if k not in ("command", "overrides", "json")}
    settings.update(batch=BATCH, seq_len=cfg.max_seq_len, data_tokens=DATA_TOKENS)
    settings.update(zip(("prompt", "new_tokens"), decode_lengths(cfg), strict=True))
    settings.update(matmul_n=MATMUL_N[args.device])
    name, gpu = version("device_name"), args.device == "cuda"
    return {
        "preset": args.preset,
        "device": args.device,
        "device_name": name,
        "host": version("host"),
        "versions": {"torch": version("torch"), "transformers": version("transformers")},
        "matmul_flops_per_s": matmul,
        "matmul_tf32": version("tf32"),  # CUDA only: torch's allow_tf32 during the fp32 matmuls
        "peak_flops_per_s": {d: peak_flops(name, d) for d in matmul} if gpu and name else {},
        "flops_per_token": fpt,
        "rows": rows,
        "checks": checks,
        "settings": settings,
        "runs": {f"{impl}/{mode}": v for (impl, mode), v in runs.items()},
    }


def check_args(args: argparse.Namespace) -> list[str]:
    """The selected modes, in table order; StokerError naming any bad option."""
    from stoker.config import PRESETS

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    modes = list(MODES) if "all" in modes else modes
    bad = [m for m in modes if m not in MODES] or ([] if modes else ["(none)"])
    if bad:
        raise StokerError(
            f"--modes: unknown mode {','.join(bad)}; choose from {','.join(MODES)}, or all"
        )
    if args.preset not in PRESETS:
        raise StokerError(f"--preset {args.preset}: unknown preset; known: {', '.join(PRESETS)}")
    lows = dict.fromkeys(("threads", "repeats", "steps"), 1)
    lows |= dict.fromkeys(("warmup", "retries", "wait_idle", "max_other"), 0)
    for name, low in lows.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise StokerError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if args.warmup == 0 and any(m.endswith(COMPILED) for m in modes):
        raise StokerError("--warmup must be >= 1 with a -compile mode (compiling is warm-up)")
    if args.json not in (None, "-") and not Path(args.json).parent.is_dir():
        raise StokerError(f"--json {args.json}: directory {Path(args.json).parent} does not exist")
    return [m for m in MODES if m in modes]


def bench_command(args: argparse.Namespace) -> int:
    """`stoker bench [--quick] [--json [PATH]] [--modes ...] [--preset NAME] ...`"""
    modes = check_args(args)
    args.device = resolve_device(args.device)
    args.repeats = args.repeats or (1 if args.quick else 2)
    cfg = model_config(args.preset)
    with tempfile.TemporaryDirectory(prefix="stoker-bench-") as tmp:
        if "data" in modes:
            write_shards(Path(tmp), cfg.vocab_size, DATA_TOKENS)
        runs = run_all(args, modes, tmp)
    summary = summarize(runs, modes, cfg, args)
    if args.json == "-":
        print(json.dumps(summary, indent=1))
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print_table(summary)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`stoker bench`'s options (cli.py adds them only when `bench` is the subcommand)."""
    from stoker.monitor.system import cpu_cores

    cores = cpu_cores()
    n = {"type": int, "metavar": "N"}
    p.epilog = "Each (implementation, mode) runs in its own process; methods: stoker/bench.py."
    p.add_argument("--quick", action="store_true", help=HELP["quick"])
    p.add_argument("--json", nargs="?", const="-", metavar="PATH", help=HELP["json"])
    p.add_argument("--device", choices=DEVICES, default="auto", help=HELP["device"])
    p.add_argument("--threads", **n, default=cores, help=f"{HELP['threads']} (default {cores})")
    p.add_argument("--repeats", **n, help=HELP["repeats"])
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=HELP["modes"])
    p.add_argument("--preset", default=DEFAULT_PRESET, help=HELP["preset"])
    p.add_argument("--steps", **n, help=HELP["steps"])
    p.add_argument("--warmup", **n, help=HELP["warmup"])
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS", help=HELP["idle"])
    p.add_argument("--retries", **n, default=0, help=HELP["retries"])
    p.add_argument("--max-other", type=float, default=0.25, metavar="CORES", help=HELP["other"])


def main(argv: list[str] | None = None) -> None:
    """`python -m stoker.bench [OPTIONS]` = `stoker bench [OPTIONS]` (exits with its code)."""
    from stoker.cli import main as cli_main

    raise SystemExit(cli_main(["bench", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
