"""`stoker monitor`: a live system line plus environment checks (CUDA, bf16, free memory,
NCCL/gloo), with advice. Works on a CPU-only machine without psutil or NVML."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from stoker.errors import StokerError
from stoker.monitor.system import _nvml, sample_system, summary_line


def system_checks() -> dict[str, Any]:
    """What a training run on this machine can use."""
    import importlib.util

    import torch

    dist = torch.distributed
    checks: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "nccl_available": bool(dist.is_available() and dist.is_nccl_available()),
        "gloo_available": bool(dist.is_available() and dist.is_gloo_available()),
        "nvml_available": _nvml() is not None,
        "psutil_available": importlib.util.find_spec("psutil") is not None,
        "gpus": [],
    }
    if checks["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            major, _ = torch.cuda.get_device_capability(i)
            checks["gpus"].append(
                {
                    "index": i,
                    "name": torch.cuda.get_device_name(i),
                    "bf16": major >= 8,
                    "free_gb": free / 1e9,
                    "total_gb": total / 1e9,
                }
            )
    return checks


def format_checks(checks: dict[str, Any]) -> str:
    lines = [
        f"torch {checks['torch']} (CUDA {checks['torch_cuda'] or 'none'}), "
        f"CUDA visible: {'yes' if checks['cuda_available'] else 'no'}, "
        f"NCCL: {'yes' if checks['nccl_available'] else 'no'}, "
        f"gloo: {'yes' if checks['gloo_available'] else 'no'}, "
        f"NVML: {'yes' if checks['nvml_available'] else 'no'}"
    ]
    for g in checks["gpus"]:
        lines.append(
            f"GPU {g['index']}: {g['name']}, bf16 {'yes' if g['bf16'] else 'no'}, "
            f"{g['free_gb']:.1f}/{g['total_gb']:.1f} GB free"
        )
    return "\n".join(lines)


def _line(sample: dict[str, Any]) -> str:
    line = summary_line(sample) or "no readings (pip install psutil nvidia-ml-py)"
    rss = f" | RSS {sample['process_rss_gb']:.2f}GB" if "process_rss_gb" in sample else ""
    return time.strftime("%H:%M:%S ") + line + rss


def monitor_command(args: argparse.Namespace) -> int:
    """`stoker monitor [--interval S] [--once] [--json]`"""
    from stoker.monitor.advice import check_advice

    if args.interval <= 0:
        raise StokerError(f"--interval must be > 0 seconds, got {args.interval}")
    checks = system_checks()
    advice = check_advice(checks)
    # a blocking first reading: psutil's CPU % is measured over an interval
    sample = sample_system(cpu_interval=min(args.interval, 0.5))
    if args.json:
        print(json.dumps({"system": sample, "checks": checks, "advice": advice}), flush=True)
    else:
        print(format_checks(checks))
        for line in advice:
            print(f"advice: {line}")
        print(_line(sample), flush=True)
    while not args.once:
        time.sleep(args.interval)
        sample = sample_system()
        print(json.dumps(sample) if args.json else _line(sample), flush=True)
    sys.stdout.flush()
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--interval", type=float, default=2.0, help="seconds between readings (default: 2)"
    )
    p.add_argument("--once", action="store_true", help="print one reading and exit")
    p.add_argument(
        "--json",
        action="store_true",
        help="JSON: one object (system, checks, advice), then one per reading",
    )
