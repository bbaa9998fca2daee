"""A LoRA fine-tuning step, stoker (`models.lora.apply_lora`) against transformers + PEFT
(`peft.get_peft_model`), side by side on identical configurations.

    .venv/bin/python benchmarks/bench_lora.py [--quick] [--json PATH] [--device auto|cpu|cuda]
        [--preset smollm2-135m] [--targets q_proj,v_proj | all-linear] [--batch-size 2]
        [--seq-len 256] [--warmup 2] [--steps 5] [--repeats 1] [--threads N]
        [--dtypes fp32,bf16] [--wait-idle SECONDS]

Both sides train the same function: the preset's decoder (default the SmolLM2-135M shape: 30
layers, d 576, 9 heads / 3 KV heads, d_ff 1536, vocab 49152, tied embeddings), randomly
initialized by `build_model` with seed 0; LoRA r=8, alpha=16, dropout 0 on `--targets` (PEFT's
`all-linear` too) drawn by `apply_lora`. The peer is the same shape in `transformers`
(`AutoModelForCausalLM.from_config(hf_config_from(cfg), attn_implementation="sdpa")`) holding
our base weights (`models.hf.state_dict_to_hf`) and our adapter factors
(`models.hf_peft.peft_state_dict` -> `peft.set_peft_model_state_dict`), so the step-1 losses
agree to rounding and, with the same optimizer, every later loss does: the check is printed
(fp32 within 1e-4, bf16 within 2e-2) and the run fails when it does not hold.

A step is forward + each side's own loss code (`gpt.lm_loss`; HF's `labels=` loss) + backward +
AdamW (lr 2e-4, betas 0.9/0.999, no weight decay: HF Trainer's defaults) on the trainable
parameters only, fused in both (stoker: `train.optim.build_optimizer`; peer:
`torch.optim.AdamW(fused=True)`, Trainer's `adamw_torch_fused`). The batch is B × T random
token ids from a fixed seed; fp32, and bf16 as `torch.autocast(device, dtype=torch.bfloat16)`
over fp32 weights — with stoker's frozen base linears stored in bf16, as `stoker train` keeps
them under bf16 (`models.lora.store_frozen_linears`: the values autocast would cast them to,
so the losses are unchanged; PEFT's base stays fp32, as `get_peft_model` leaves it).
Every (impl, dtype) cell runs in its own subprocess with the same torch thread count (default:
all cores; on a shared machine use `--threads 1`, as a busy core stalls every multi-threaded op)
and, with `--repeats` > 1, in alternating order, medians shown.
tokens/s is B·T over the median timed step; `per CPU-s` is the ratio of tokens per CPU-second
of each cell's process over its timed steps (steadier under other load at one thread).

Memory is measured over the training steps only, after the models are built (the peer's
process held our model too while converting). CUDA: `torch.cuda.max_memory_allocated` after
`reset_peak_memory_stats`. CPU: the resident set's high-water mark (VmHWM, reset through
/proc/self/clear_refs; where that is refused, the lifetime ru_maxrss), and `peak - libraries`,
that peak minus the resident set after the cell's imports (transformers + peft add ~90 MB) and
before its model exists: weights, activations, gradients, optimizer state and allocator slack.
RSS peaks vary by ±5 % from run to run (glibc heap retention), so compare medians.
Ratios are stoker / peer: tokens/s ≥ 1 means stoker is faster, memory ≤ 1 that it uses less.
A benchmark, never a test assertion; results in docs/log.md (2026-12-02, LoRA step).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

IMPLS = ("stoker", "peft")
DTYPES = ("fp32", "bf16")
LOSS_TOL = {"fp32": 1e-4, "bf16": 2e-2}  # |step-1 loss stoker - peer|
LORA = dict(r=8, alpha=16.0, dropout=0.0)
OPTIM = dict(lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
DEFAULTS = dict(preset="smollm2-135m", batch_size=2, seq_len=256, warmup=2, steps=5)
QUICK = dict(preset="tiny-llama", batch_size=2, seq_len=32, warmup=1, steps=1)


# ------------------------------------------------------------------------------ worker
def lora_config(targets: str) -> Any:
    from stoker.config import LoRAConfig

    return LoRAConfig(**LORA, targets=targets)


def build_stoker(spec: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    """(model, loss(ids, targets), trainable params): our decoder with our adapters."""
    import torch

    from stoker.config import ModelConfig
    from stoker.models.gpt import build_model, lm_loss
    from stoker.models.lora import apply_lora, store_frozen_linears

    cfg = ModelConfig(preset=spec["preset"])
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_lora(model, lora_config(spec["targets"]))
    model = model.to(spec["device"])
    if spec["dtype"] == "bf16":  # as `stoker train` does under bf16 (FinetuneTask.use_precision)
        store_frozen_linears(model, torch.bfloat16)
    return model, lambda ids, targets: lm_loss(model(ids), targets), trainable(model)


def build_peft(spec: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    """(model, loss(ids, targets), trainable params): the transformers model with PEFT's
    adapters, holding our initial base weights and adapter factors."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    from stoker.config import ModelConfig
    from stoker.models.gpt import build_model
    from stoker.models.hf import hf_config_from, state_dict_to_hf
    from stoker.models.hf_peft import peft_state_dict
    from stoker.models.lora import apply_lora

    cfg, lcfg = ModelConfig(preset=spec["preset"]), lora_config(spec["targets"])
    torch.manual_seed(0)  # the stoker cell's weights, drawn in the same order
    ours = build_model(cfg)
    apply_lora(ours, lcfg)
    adapters = {k: t.clone() for k, t in peft_state_dict(ours).items()}
    base = {k: t for k, t in ours.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    fields = hf_config_from(cfg)
    fields.pop("architectures")
    hf_cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
    keys = hf.load_state_dict(state_dict_to_hf(base, cfg), strict=False)
    tied = ["lm_head.weight"] if cfg.tie_embeddings else []  # tied by from_config
    if keys.unexpected_keys or keys.missing_keys != tied:
        raise RuntimeError(f"base weights do not match the transformers model: {keys}")
    del ours, base
    gc.collect()
    targets = lcfg.targets if lcfg.targets == "all-linear" else list(lcfg.targets)
    peft_cfg = LoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(hf, peft_cfg)
    keys = set_peft_model_state_dict(model, adapters)
    missing = [k for k in keys.missing_keys if ".lora_" in k]
    if keys.unexpected_keys or missing:
        raise RuntimeError(
            f"adapters do not match PEFT's: {keys.unexpected_keys[:3]} {missing[:3]}"
        )
    model = model.to(spec["device"])

    def loss(ids, targets):  # HF's causal-LM loss; the targets are shifted already
        return model(input_ids=ids, labels=targets, shift_labels=targets, use_cache=False).loss

    return model, loss, trainable(model)


def import_libraries(impl: str, device: str) -> None:
    """What each cell's code imports, before the memory baseline is read; AdamW's first use
    imports torch._dynamo (~70 MB here), which transformers imports anyway."""
    import stoker.models.gpt
    import stoker.models.lora  # noqa: F401
    from stoker.train.optim import fused_adamw_available

    fused_adamw_available(device)

    if impl == "peft":  # and the converter that gives the peer our weights
        import peft  # noqa: F401
        import transformers  # noqa: F401
        from transformers import LlamaForCausalLM  # noqa: F401

        import stoker.models.hf_peft  # noqa: F401


def trainable(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(impl: str, model: Any, params: list[Any], device: str) -> Any:
    """Fused AdamW on the trainable parameters: what `stoker train` builds, and HF Trainer's
    `adamw_torch_fused` (no weight decay either way, so the decay groups do not matter)."""
    import torch

    from stoker.config import OptimConfig
    from stoker.train import optim

    if impl == "stoker":
        return optim.build_optimizer(model, OptimConfig(**OPTIM), device)
    fused = optim.fused_adamw_available(device)
    kwargs = {k: v for k, v in OPTIM.items() if k != "weight_decay"}
    return torch.optim.AdamW(params, weight_decay=OPTIM["weight_decay"], fused=fused, **kwargs)


class PeakMemory:
    """Peak memory (MiB) from `reset()` on: CUDA's allocator peak, or on CPU the resident
    high-water mark (VmHWM, reset via /proc/self/clear_refs; else lifetime ru_maxrss)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.device, self.scope = torch, device, "steps"

    def now(self) -> float:
        if self.device == "cuda":
            return self.torch.cuda.memory_allocated() / 2**20
        return self._status("VmRSS")

    def reset(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.scope = "process"

    def peak(self) -> float:
        if self.device == "cuda":
            return self.torch.cuda.max_memory_allocated() / 2**20
        if self.scope == "steps":
            return self._status("VmHWM")
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    @staticmethod
    def _status(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
        raise RuntimeError(f"/proc/self/status has no {field}")


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """One (impl, dtype) cell: build, then `warmup` + `steps` training steps."""
    import contextlib

    import torch

    torch.set_num_threads(spec["threads"])
    device, B, T = spec["device"], spec["batch_size"], spec["seq_len"]
    memory = PeakMemory(device)
    import_libraries(spec["impl"], device)
    libraries = memory.now() if device == "cpu" else 0.0  # the interpreter and its imports
    model, loss_fn, params = (build_stoker if spec["impl"] == "stoker" else build_peft)(spec)
    model.train()
    opt = build_optimizer(spec["impl"], model, params, device)
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    data = torch.randint(0, vocab, (B, T + 1), generator=gen).to(device)  # (B, T+1)
    ids, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()  # (B, T) each
    bf16 = spec["dtype"] == "bf16"
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else None
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    gc.collect()
    memory.reset()
    before = memory.now()
    times, losses, cpu = [], [], time.process_time()
    for i in range(spec["warmup"] + spec["steps"]):
        if i == spec["warmup"]:
            cpu = time.process_time()
        sync()
        t0 = time.perf_counter()
        with autocast() if autocast else contextlib.nullcontext():
            loss = loss_fn(ids, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    step_s = statistics.median(times[spec["warmup"] :])
    return {
        "tokens_per_s": B * T / step_s,
        "step_s": step_s,
        "step_times": times[spec["warmup"] :],
        "tokens_per_cpu_s": B * T * spec["steps"] / (time.process_time() - cpu),
        "losses": losses,
        "peak_mib": memory.peak(),
        "before_mib": before,
        "libraries_mib": libraries,
        "memory_scope": memory.scope,
        "trainable": sum(p.numel() for p in params),
        "threads": torch.get_num_threads(),
    }


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from stoker.monitor.system import cpu_name

    result = run_cell(spec)
    versions = {"torch": torch.__version__}
    if spec["impl"] == "peft":
        import peft
        import transformers

        versions |= {"transformers": transformers.__version__, "peft": peft.__version__}
    name = torch.cuda.get_device_name() if spec["device"] == "cuda" else cpu_name()
    return {**spec, **result, **versions, "device_name": name}


# ------------------------------------------------------------------------------ parent
def spawn(spec: dict[str, Any], wait: float = 0.0) -> dict[str, Any]:
    """Run one cell in a fresh interpreter (after waiting up to `wait` s for the machine to go
    quiet); its result plus `other_cores` (the CPU other processes used meanwhile, in cores)."""
    import os

    from stoker.bench import run_worker, wait_idle

    if wait:
        wait_idle(wait)
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    return run_worker(cmd, env, f"{spec['impl']:6s} {spec['dtype']}", "bench_lora: the")


def summarize(runs: dict[str, list[dict[str, Any]]], args: dict[str, Any]) -> dict[str, Any]:
    """Medians per cell, ratios stoker / peer and the loss agreement per dtype. `runs` maps
    `impl/dtype` to that cell's worker results (one per repeat)."""
    cells, rows = {}, []
    for key, results in runs.items():
        med = lambda k, rs=results: statistics.median(r[k] for r in rs)  # noqa: E731
        first = results[0]
        cells[key] = {
            **first,
            "tokens_per_s": med("tokens_per_s"),
            "peak_mib": med("peak_mib"),
            "train_mib": med("peak_mib") - med("before_mib"),
            "net_mib": med("peak_mib") - med("libraries_mib"),
            "tokens_per_cpu_s": med("tokens_per_cpu_s"),
            "tokens_per_s_runs": [r["tokens_per_s"] for r in results],
            "other_cores": max(r.get("other_cores", 0.0) for r in results),
        }
    for dtype in args["dtypes"]:
        s, p = cells[f"stoker/{dtype}"], cells[f"peft/{dtype}"]
        steps = list(zip(s["losses"], p["losses"], strict=True))
        row = {
            "dtype": dtype,
            "stoker": s,
            "peer": p,
            "speed_ratio": s["tokens_per_s"] / p["tokens_per_s"],
            "cpu_speed_ratio": s["tokens_per_cpu_s"] / p["tokens_per_cpu_s"],
            "memory_ratio": s["peak_mib"] / p["peak_mib"],
            "net_memory_ratio": s["net_mib"] / p["net_mib"],
            "loss_diff": abs(steps[0][0] - steps[0][1]),
            "max_loss_diff": max(abs(a - b) for a, b in steps),
            "same_trainable": s["trainable"] == p["trainable"],
        }
        row["losses_agree"] = row["loss_diff"] <= LOSS_TOL[dtype] and row["same_trainable"]
        rows.append(row)
    return {
        "args": args,
        "rows": rows,
        "cells": cells,
        "losses_agree": all(r["losses_agree"] for r in rows),
    }


def print_table(summary: dict[str, Any]) -> None:
    a, rows = summary["args"], summary["rows"]
    c = rows[0]["peer"]
    print(
        f"\nLoRA step, {a['preset']}, r={LORA['r']} alpha={LORA['alpha']:g} targets="
        f"{a['targets']}, B={a['batch_size']} T={a['seq_len']}, {a['warmup']} warmup + "
        f"{a['steps']} timed steps, median of {a['repeats']} run(s)"
    )
    print(
        f"{c['device_name']} ({a['device']}), {c['threads']} threads, torch {c['torch']}, "
        f"transformers {c['transformers']}, peft {c['peft']}; trainable params "
        f"{rows[0]['stoker']['trainable']:,} (stoker) / {c['trainable']:,} (peft)"
    )
    unit = "MiB allocated" if a["device"] == "cuda" else "MiB resident"
    print(
        f"{'':6}{'tokens/s':^26}{'per CPU-s':>10}{'peak ' + unit:^28}{'peak - libraries':^22}{'step-1 loss':^31}"
        f"{'other':>6}"
    )
    print(
        f"{'dtype':6}{'stoker':>9}{'peft':>9}{'s/p':>8}{'s/p':>10}{'stoker':>10}{'peft':>10}{'s/p':>8}"
        f"{'stoker':>8}{'peft':>8}{'s/p':>6}{'stoker':>11}{'peft':>11}{'|diff|':>9}{'cores':>6}"
    )
    for r in rows:
        s, p = r["stoker"], r["peer"]
        print(
            f"{r['dtype']:6}{s['tokens_per_s']:>9,.0f}{p['tokens_per_s']:>9,.0f}"
            f"{r['speed_ratio']:>8.2f}{r['cpu_speed_ratio']:>10.2f}{s['peak_mib']:>10,.0f}{p['peak_mib']:>10,.0f}"
            f"{r['memory_ratio']:>8.2f}{s['net_mib']:>8,.0f}{p['net_mib']:>8,.0f}"
            f"{r['net_memory_ratio']:>6.2f}{s['losses'][0]:>11.6f}{p['losses'][0]:>11.6f}"
            f"{r['loss_diff']:>9.1e}{max(s['other_cores'], p['other_cores']):>6.2f}"
        )
    for r in rows:
        verdict = "agree" if r["losses_agree"] else "DISAGREE"
        print(
            f"check {r['dtype']}: step-1 losses {verdict} (|diff| {r['loss_diff']:.1e}, "
            f"tolerance {LOSS_TOL[r['dtype']]:.0e}; max over all {len(r['stoker']['losses'])} "
            f"steps {r['max_loss_diff']:.1e}; same trainable count: {r['same_trainable']})"
        )


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_lora: --device cuda, but torch sees no GPU")
    return name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from stoker.monitor.system import cpu_cores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help=f"tiny shape for a smoke test ({QUICK}); explicit options still win",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--preset", help=f"model preset (default {DEFAULTS['preset']})")
    ap.add_argument("--targets", default="q_proj,v_proj", help="q_proj,v_proj or all-linear")
    for k in ("batch_size", "seq_len", "warmup", "steps"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"default {DEFAULTS[k]}")
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell, order alternating")
    ap.add_argument("--threads", type=int, default=cpu_cores(), help="torch threads per cell")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="fp32,bf16 or one of them")
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each cell, wait up to SECONDS for other processes to go quiet",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    dtypes = [d for d in args.dtypes.split(",") if d]
    if not dtypes or set(dtypes) - set(DTYPES) or min(args.steps, args.repeats) < 1:
        raise SystemExit("bench_lora: --dtypes from fp32,bf16; --steps and --repeats >= 1")
    params = {k: getattr(args, k) for k in (*DEFAULTS, "targets", "threads")}
    params |= {"device": resolve_device(args.device)}
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.repeats):  # alternating order: a busy spell hits both sides
        for dtype in dtypes:
            for impl in IMPLS if rep % 2 == 0 else IMPLS[::-1]:
                result = spawn({**params, "impl": impl, "dtype": dtype}, args.wait_idle)
                runs.setdefault(f"{impl}/{dtype}", []).append(result)
    summary = summarize(runs, {**params, "dtypes": dtypes, "repeats": args.repeats})
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print_table(summary)
    return 0 if summary["losses_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
