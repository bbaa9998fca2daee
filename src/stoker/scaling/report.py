"""`stoker count` and `stoker plan`: exact parameters, FLOPs/token, memory, and a training
plan (throughput, time, cost, Chinchilla loss, compute-optimal alternative) on named GPUs.

Every number says where it comes from: the FLOPs convention, the peak table (docs/scaling.md
§4), an assumed MFU, and the data a scaling law was fitted on. Throughput is
num_gpus × peak × MFU ÷ FLOPs/token, never a promised figure (docs/scaling.md §4).
Formulas: docs/scaling.md. The text output lives in report_text.py; this module computes
the JSON-able results and wires the commands.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict

from stoker.config import PRESETS, RecipeConfig, load_config, validate_config
from stoker.errors import StokerError
from stoker.scaling import flops, hardware, laws
from stoker.scaling.report_text import print_count, print_plan

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def _amount(text: str) -> float:
    """`85e9`, `85B`, `1.2T`, `6.6e20` -> float (K, M, B/G, T suffixes)."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([kmbgt]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 85e9, 85B, 6.6e20)")
    try:
        return float(m.group(1)) * _SUFFIX.get(m.group(2), 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """Options of `stoker count` and `stoker plan`."""
    parser.add_argument("recipe", nargs="?", help="recipe YAML (or use --preset)")
    parser.add_argument("--preset", help=f"model preset instead of a recipe: {', '.join(PRESETS)}")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the recipe's)")
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        help="sequences per GPU per forward, for memory (default: the recipe's)",
    )
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=8 if name == "count" else 1,
        help="GPUs that ZeRO-1/FSDP2 shard over"
        + (" (default 8)" if name == "count" else " (default 1)"),
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    if name != "plan":
        return
    parser.add_argument("--gpu", help=f"GPU name: {', '.join(hardware.known_devices())}")
    parser.add_argument(
        "--mfu",
        type=float,
        default=0.35,
        help="assumed model FLOPs utilization (default 0.35, the measured "
        "llama-1.36b anchor of docs/scaling.md §4)",
    )
    parser.add_argument("--dtype", default="bf16", help="peak column: bf16 (default) or fp16")
    parser.add_argument(
        "--convention",
        default="palm",
        choices=list(flops.CONVENTIONS),
        help="FLOPs/token convention the MFU refers to (default palm)",
    )
    parser.add_argument(
        "--strategy",
        choices=flops.STRATEGIES,
        help="memory estimate for this strategy (default: the recipe's)",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=_amount, help="training tokens D (e.g. 85B)")
    budget.add_argument("--budget-flops", type=_amount, help="compute budget C = 6·N·D")
    budget.add_argument("--hours", type=float, help="wall-clock hours on the GPUs")
    parser.add_argument("--price-per-gpu-hour", type=float, help="price of one GPU-hour")
    parser.add_argument("--law", help="your own Chinchilla constants E,A,B,alpha,beta")
    parser.add_argument(
        "--fit",
        nargs="+",
        metavar="RUN",
        help="fit the law to these runs (metrics.jsonl files or run dirs)",
    )
    parser.add_argument(
        "--fit-final-only",
        action="store_true",
        help="fit on each run's last point only (default: every logged point)",
    )
    parser.add_argument("--target-loss", type=float, help="also report tokens to reach it")


def _load(args: argparse.Namespace) -> tuple[RecipeConfig, str, bool]:
    """(config, label, from_recipe) for a recipe path or --preset."""
    if args.recipe and args.preset:
        raise StokerError("give a recipe or --preset, not both")
    if args.preset:
        if args.preset not in PRESETS:
            raise StokerError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
        return validate_config({"model": {"preset": args.preset}}), args.preset, False
    if not args.recipe:
        raise StokerError(f"give a recipe YAML or --preset NAME (known: {', '.join(PRESETS)})")
    cfg = load_config(args.recipe)
    if cfg.train.init_from is not None:  # the architecture is the source's
        from stoker.tasks.source import resolve_init

        cfg = resolve_init(cfg)[0]
    return cfg, args.recipe, True


def _shape(cfg: RecipeConfig, args: argparse.Namespace) -> tuple[int, int, str]:
    """(seq_len, micro_batch_size, precision) from options, else the recipe."""
    m = cfg.model
    T = args.seq_len if args.seq_len is not None else cfg.train.seq_len or m.max_seq_len
    mb = args.micro_batch_size
    mb = mb if mb is not None else cfg.train.micro_batch_size
    if not (0 < T < 2**63 and 0 < mb < 2**63 and 0 < args.num_gpus < 2**63):  # floats overflow
        raise StokerError("--seq-len, --micro-batch-size and --num-gpus must be in [1, 2**63)")
    if m.arch == "gpt2" and m.max_seq_len < T:
        raise StokerError(
            f"seq_len {T} exceeds model.max_seq_len={m.max_seq_len} of a "
            "learned-position (gpt2) model"
        )
    precision = cfg.train.precision
    return T, mb, precision if precision in ("fp32", "fp16") else "bf16"


def _memory_json(e: flops.MemoryEstimate) -> dict:
    parts = {k: v for k, v in asdict(e).items() if k not in ("strategy", "num_gpus", "tokens")}
    return {**parts, "total": e.total(False), "total_checkpointed": e.total(True)}


# ---------------------------------------------------------------------------------- count
def count_result(cfg: RecipeConfig, label: str, args: argparse.Namespace) -> dict:
    """Everything `stoker count` prints, as a JSON-able dict."""
    m = cfg.model
    T, mb, precision = _shape(cfg, args)
    mor = getattr(cfg, "mor", None)
    shared = mor and flops.count_params_shared(m, mor.recursions, mor.sharing)
    p = shared or flops.count_params(m)
    routers = 0 if mor is None else flops.mor_router_params(m, mor)
    memory = {
        s: flops.estimate_memory(m, s, args.num_gpus, mb, T, precision, mor)
        for s in flops.STRATEGIES
    }
    lora, adapters = getattr(cfg, "lora", None), 0
    if lora is not None:  # adapters counted on a model built on the meta device
        from stoker.tasks.finetune import adapter_params

        adapters = adapter_params(m, lora)
    names = flops.CONVENTIONS if mor is None else flops.MOR_CONVENTIONS
    per_token = {c: flops.flops_per_token(m, T, c, mor) for c in names}
    return {
        "model": label,
        "arch": m.arch,
        "params_total": p.total + routers + adapters,
        "params_non_embedding": p.non_embedding + routers + adapters,
        "params_trainable": adapters if lora else p.total + routers,  # LoRA: a frozen base
        "params": {
            "embedding": p.embedding,
            "position": p.position,
            "lm_head": p.lm_head,
            "per_layer": p.layer,
            "attention_per_layer": p.attention,
            "mlp_per_layer": p.mlp,
            "norms_per_layer": p.norms,
            "n_layer": p.n_layer,
            "final_norm": p.final_norm,
            "torchtitan_n": p.without_embedding_tables,
        },
        "seq_len": T,
        "flops_per_token": per_token,
        "flops_conventions": names,
        "mor": None if mor is None else flops.mor_summary(m, mor, T),
        "memory": {
            "micro_batch_size": mb,
            "num_gpus": args.num_gpus,
            "precision": precision,
            "unit": "bytes per GPU",
            "per_strategy": {s: _memory_json(e) for s, e in memory.items()},
        },
    }


def count_command(args: argparse.Namespace) -> int:
    cfg, label, _ = _load(args)
    result = count_result(cfg, label, args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_count(result, cfg.model)
    return 0


# ----------------------------------------------------------------------------------- plan
def _throughput(args: argparse.Namespace, per_token: float) -> dict:
    """Device, peak and tokens/s = GPUs × peak × MFU ÷ FLOPs/token (None without --gpu)."""
    if not 0 < args.mfu <= 1:
        raise StokerError(f"--mfu must be in (0, 1], got {args.mfu}")
    optional = (args.price_per_gpu_hour, args.target_loss)
    if not all(0 <= v < math.inf for v in optional if v is not None):  # nan fails too
        raise StokerError("--price-per-gpu-hour and --target-loss must be finite numbers >= 0")
    if args.gpu is None:
        keys = ("gpu", "gpu_name", "peak_flops", "tokens_per_second", "device_memory_gib")
        return {**dict.fromkeys(keys), "dtype": args.dtype}
    device = hardware.require_device(args.gpu)
    peak = hardware.peak_flops(device.name, args.dtype)
    if peak is None:
        raise StokerError(
            f"no dense {args.dtype} peak for {device.name} in the table "
            "(T4 has fp16 only: --dtype fp16)"
        )
    return {
        "gpu": args.gpu,
        "gpu_name": device.name,
        "dtype": args.dtype,
        "peak_flops": peak,
        "tokens_per_second": args.num_gpus * peak * args.mfu / per_token,
        "device_memory_gib": device.memory_gib,
    }


def _tokens(
    args: argparse.Namespace,
    cfg: RecipeConfig,
    from_recipe: bool,
    n: int,
    rate: float | None,
    seq_len: int,
) -> tuple[float, str]:
    """Training tokens D and where they come from."""
    given = [v for v in (args.tokens, args.budget_flops, args.hours) if v is not None]
    if given and not 0 < given[0] < math.inf:  # nan, inf (1e999) and <= 0
        raise StokerError("--tokens, --budget-flops and --hours must be positive finite numbers")
    if args.tokens is not None:
        return args.tokens, "--tokens"
    if args.budget_flops is not None:
        return args.budget_flops / (6 * n), "--budget-flops C / (6N)"
    if args.hours is not None:
        if rate is None:
            raise StokerError("--hours needs --gpu NAME to know the throughput")
        return rate * args.hours * 3600, "--hours × tokens/s"
    if from_recipe:
        steps = cfg.train.max_steps * cfg.train.batch_size * seq_len
        return float(steps), "recipe: train.max_steps × batch_size × seq_len"
    return 20.0 * n, "20 tokens per parameter (Hoffmann et al.'s rule of thumb; set --tokens)"


def _laws(args: argparse.Namespace) -> tuple[list[laws.Chinchilla], dict | None]:
    chosen = [laws.HOFFMANN, laws.BESIROGLU]
    if args.law:
        chosen.append(laws.parse_law(args.law))
    fit_info = None
    if args.fit:
        fit, runs = laws.fit_runs(args.fit, args.fit_final_only)
        chosen.append(fit.law)
        fit_info = {
            "objective": fit.objective,
            "points": fit.n_points,
            "sizes": fit.n_sizes,
            "runs": [
                {"path": r.source, "params": r.n_params, "points": len(r.tokens), "loss_key": r.key}
                for r in runs
            ],
        }
    return chosen, fit_info


def plan_result(cfg: RecipeConfig, label: str, from_recipe: bool, args: argparse.Namespace) -> dict:
    """Everything `stoker plan` prints, as a JSON-able dict."""
    m = cfg.model
    T, mb, precision = _shape(cfg, args)
    n = flops.count_params(m).total
    per_token = flops.flops_per_token(m, T, args.convention)
    hw = _throughput(args, per_token)
    rate = hw["tokens_per_second"]
    tokens, basis = _tokens(args, cfg, from_recipe, n, rate, T)
    budget = 6.0 * n * tokens
    hours = tokens / rate / 3600 if rate else None
    price = args.price_per_gpu_hour
    chosen, fit_info = _laws(args)
    strategy = args.strategy or cfg.dist.strategy
    mem = flops.estimate_memory(m, strategy, args.num_gpus, mb, T, precision)
    result = {
        "model": label,
        "params_total": n,
        "seq_len": T,
        "flops_per_token": per_token,
        "flops_convention": args.convention,
        **hw,
        "num_gpus": args.num_gpus,
        "mfu": args.mfu,
        "tokens_per_second_per_gpu": rate / args.num_gpus if rate else None,
        "tokens": tokens,
        "tokens_basis": basis,
        "tokens_per_param": tokens / n,
        "budget_flops": budget,
        "training_flops": per_token * tokens,
        "hours": hours,
        "gpu_hours": hours * args.num_gpus if hours else None,
        "price_per_gpu_hour": price,
        "cost": hours * args.num_gpus * price if hours and price else None,
        "law_caveat": laws.DATA_CAVEAT,
        "law_in_fitted_range": laws.in_fitted_range(n, tokens),
        "memory_per_gpu": {
            "strategy": strategy,
            "micro_batch_size": mb,
            "bytes": mem.total(False),
            "bytes_checkpointed": mem.total(True),
        },
        "fit": fit_info,
    }
    result.update(_law_results(chosen, n, tokens, budget, rate, args.target_loss))
    return result


def _law_results(
    chosen: list[laws.Chinchilla],
    n: int,
    tokens: float,
    budget: float,
    rate: float | None,
    target: float | None,
) -> dict:
    """loss_<law> at (N, D), each law's constants, its compute-optimal (N, D) for the same
    budget, and the tokens (and hours) to reach `target`."""
    out: dict = {"laws": {}, "compute_optimal": {}}
    if target is not None:
        out["target_loss"] = {"loss": target}
    for law in chosen:
        out[f"loss_{law.name}"] = law.loss(n, tokens)
        out["laws"][law.name] = {k: v for k, v in asdict(law).items() if k != "name"}
        n_opt, d_opt = law.optimal(budget)
        out["compute_optimal"][law.name] = {
            "params": n_opt,
            "tokens": d_opt,
            "loss": law.loss(n_opt, d_opt),
            "tokens_per_param": d_opt / n_opt,
        }
        if target is not None:
            need = law.tokens_for_loss(n, target)
            reachable = math.isfinite(need)
            out["target_loss"][law.name] = {
                "tokens": need if reachable else None,
                "hours": need / rate / 3600 if rate and reachable else None,
            }
    return out


def plan_command(args: argparse.Namespace) -> int:
    cfg, label, from_recipe = _load(args)
    result = plan_result(cfg, label, from_recipe, args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_plan(result)
    return 0
