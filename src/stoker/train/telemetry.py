"""What the loop measures about itself: throughput, data wait, MFU, memory, progress bar.

MFU = tokens/s × FLOPs/token ÷ (processes × peak FLOP/s) (docs/scaling.md §2). FLOPs/token is
the PaLM form 6N + 12·L·H·Q·T with N = all parameters (scaling/flops.py). The peak comes from
the device table (scaling/hardware.py); an unknown GPU gets no MFU, never a default. On a CPU
the peak is a matmul rate measured once per process in the run's dtype, and the row says so
(`mfu_basis`).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

_CPU_PEAK: dict[str, float] = {}


def _cache_file(name: str = "cpu_matmul_peak.json") -> Path:
    """A file of this machine's measurements: ~/.cache/stoker/NAME (or $STOKER_CACHE_DIR)."""
    root = (
        os.environ.get("STOKER_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stoker"
    )
    return Path(root) / name


def _machine_key(*what: object) -> str:
    """What a measurement belongs to: CPU model, threads, torch build, then `what` (e.g. the
    dtype and size of a matmul)."""
    from stoker.monitor.system import cpu_name

    machine = f"{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    return "|".join([machine, *map(str, what)])


def read_cache(path: Path) -> dict[str, Any]:
    """A measurement file's table; {} when it is missing or unreadable."""
    try:
        table = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def write_cache(path: Path, table: dict[str, Any]) -> None:
    """Replace a measurement file atomically; a read-only cache dir keeps nothing."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, path)


def matmul_rate(
    n: int, dtype: torch.dtype, device: str = "cpu", repeats: int = 3, warmup: int = 1
) -> float:
    """FLOP/s of the fastest of `repeats` n×n matmuls in `dtype` on `device`, measured now
    (after `warmup` untimed ones; on CUDA each timed one is synchronized)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(warmup):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def measured_matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """This CPU's matmul rate in `dtype`: the best of `repeats` n×n matmuls now and of every
    earlier measurement on this machine (kept in ~/.cache/stoker, or $STOKER_CACHE_DIR).
    A measurement taken while other processes use the cores is low; keeping the best makes
    the MFU denominator the machine's rate, not the moment's (cached per process too)."""
    key = _machine_key(dtype, n)
    if key not in _CPU_PEAK:
        path, rate = _cache_file(), matmul_rate(n, dtype, repeats=repeats)
        table = read_cache(path)  # a corrupt file: this run's number, written afresh
        with contextlib.suppress(TypeError, ValueError):
            rate = max(rate, float(table.get(key, 0.0)))
        write_cache(path, {**table, key: rate})
        _CPU_PEAK[key] = rate
    return _CPU_PEAK[key]


def peak_for(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s per device, basis label)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if device.type == "cuda":
        from stoker.scaling.hardware import peak_flops

        name = torch.cuda.get_device_name(device)
        peak = peak_flops(name, "bf16" if precision == "fp32" else precision)
        if precision == "fp32" and peak is not None:
            return peak, f"{name} bf16 dense peak (run is fp32)"
        return peak, f"{name} {precision} dense peak" if peak else f"unknown GPU {name}"
    if device.type == "cpu":
        return measured_matmul_flops(dtype), f"cpu best measured {precision} 2048² matmul"
    return None, f"no peak known for {device.type}"


class Throughput:
    """Tokens/s, data-wait fraction and MFU over the steps since the last report."""

    def __init__(self, flops_per_token: float, info, precision: str):
        self.flops_per_token = flops_per_token  # the task's (e.g. MoR: capacity-aware)
        self.peak, self.basis = peak_for(info.device, precision)
        self.world = info.world
        self.t_start = time.perf_counter()
        self.total_tokens = self.total_steps = 0
        self.last_end: float | None = None
        self._reset_window()

    def _reset_window(self) -> None:
        self.w_tokens, self.w_time, self.w_data = 0, 0.0, 0.0

    def start_step(self) -> None:
        if self.last_end is None:
            self.last_end = time.perf_counter()

    def wait_for_data(self) -> None:
        """The loop asks for the next micro-batch now; `data_ready` ends the wait. Only this
        interval counts as data wait (not the forward/backward of earlier micro-batches)."""
        self.t_mark = time.perf_counter()

    def data_ready(self) -> None:
        self.w_data += time.perf_counter() - self.t_mark

    def end_step(self, tokens: int) -> None:
        """Step time is wall time since the previous step ended: logging and the progress bar
        count, evaluation and checkpointing do not (see `exclude_since_last_step`)."""
        now = time.perf_counter()
        self.w_time += now - self.last_end
        self.last_end = now
        self.w_tokens += tokens
        self.total_tokens += tokens
        self.total_steps += 1

    def exclude_since_last_step(self) -> None:
        """Leave the time since the last step (an eval, a save) out of throughput."""
        self.last_end = None

    def mfu(self, tokens_per_second: float) -> float | None:
        """None without a peak rate or without a FLOPs count (a task that is no token model)."""
        if not self.peak or not self.flops_per_token:
            return None
        return tokens_per_second * self.flops_per_token / (self.world * self.peak)

    def report(self) -> dict[str, Any]:
        tps = self.w_tokens / self.w_time if self.w_time else 0.0
        row = {
            "tokens_per_second": tps,
            "mfu": self.mfu(tps),
            "mfu_basis": self.basis,
            "data_wait": self.w_data / self.w_time if self.w_time else 0.0,
        }
        self._reset_window()
        return row

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def summary(self, step: int) -> dict[str, Any]:
        elapsed = self.elapsed()
        tps = self.total_tokens / elapsed if elapsed else 0.0
        peak_mem = memory_gb(None).get("memory_gb")
        return {
            "steps": step,
            "tokens": self.total_tokens,
            "seconds": elapsed,
            "tokens_per_second": tps,
            "mfu": self.mfu(tps),
            "mfu_basis": self.basis,
            "flops_per_token": self.flops_per_token,
            "peak_memory_gb": peak_mem,
        }

    @staticmethod
    def postfix(row: dict[str, Any]) -> str:
        mfu = f" mfu {100 * row['mfu']:.1f}%" if row.get("mfu") is not None else ""
        return (
            f"loss {row['loss']:.4f} lr {row['lr']:.2e} "
            f"{row['tokens_per_second']:,.0f} tok/s{mfu} mem {row['memory_gb']:.2f}GB"
        )

    @staticmethod
    def summary_line(s: dict[str, Any]) -> str:
        mfu = f", MFU {100 * s['mfu']:.1f}% ({s['mfu_basis']})" if s.get("mfu") else ""
        val = f", val loss {s['final_val_loss']:.4f}" if s.get("final_val_loss") else ""
        return (
            f"{s['steps']} steps, {s['tokens']:,} tokens in {s['seconds']:.1f}s, "
            f"{s['tokens_per_second']:,.0f} tok/s{mfu}{val}"
        )


def memory_gb(info) -> dict[str, float]:
    """Peak accelerator memory (CUDA) or peak process RSS (CPU), in GB."""
    if (
        info is not None
        and info.device.type == "cuda"
        or info is None
        and torch.cuda.is_available()
        and torch.cuda.is_initialized()
    ):
        return {"memory_gb": torch.cuda.max_memory_allocated() / 1e9}
    return {"memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


@contextlib.contextmanager
def erase_on_error(bar):
    """Clear the progress bar when the run fails, so the error is the last line on stderr."""
    try:
        yield bar
    except BaseException:
        bar.leave = False
        bar.close()
        raise


def progress_bar(initial: int, total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0,
        desc="train",
        unit="step",
    )
