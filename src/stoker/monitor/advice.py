"""Advice: pure rules over measured signals, each naming the config change to make.

`advise(Signals(...))` returns a list of strings. Config-level rules (precision, compile) need
only the config and the device; measured rules (data wait, memory) fire only when their
measurement is present, so the same call serves the start of a run (nothing measured yet)
and its summary. `signals_for_run` collects the signals from a run; everything else here is
a pure function, tested with synthetic telemetry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# thresholds, in one place
DATA_BOUND = 0.10  # data wait above this share of step time
HEADROOM = 0.50  # accelerator memory use below this share: room for a bigger micro-batch
NEAR_OOM = 0.90  # above this share: one unlucky batch from OOM
LONG_RUN = 1000  # optimizer steps for which torch.compile's warm-up pays off
SLOW_TOKENIZE = 0.5  # tokenization slower than this share of training throughput
CPU_BF16_WIDTH = 256  # d_model from which bf16 autocast paid on a CPU with native bf16


@dataclass
class Signals:
    """What the rules look at; None = not measured."""

    device_type: str = "cpu"
    precision: str = "fp32"  # resolved (never "auto")
    bf16_supported: bool = False
    compile: bool = False
    max_steps: int = 0
    batch_size: int = 8
    micro_batch_size: int = 8
    world: int = 1
    strategy: str = "ddp"
    activation_checkpointing: bool = False
    d_model: int = 0
    num_workers: int = 0
    data_wait: float | None = None  # fraction of step time spent waiting for data
    mem_used_gb: float | None = None  # peak accelerator memory of the run
    mem_total_gb: float | None = None
    tokens_per_second: float | None = None  # training throughput (all processes)
    tokenize_tokens_per_second: float | None = None


def data_bound(s: Signals) -> str | None:
    if s.data_wait is None or s.data_wait <= DATA_BOUND:
        return None
    return (
        f"data-bound: {100 * s.data_wait:.0f}% of step time waits for data; raise "
        f"data.num_workers (now {s.num_workers}), set data.pin_memory=true on a GPU and "
        "data.prefetch_factor=4, or put the token shards on a faster (local) disk"
    )


def _mem_fraction(s: Signals) -> float | None:
    if s.device_type != "cuda" or not s.mem_used_gb or not s.mem_total_gb:
        return None
    return s.mem_used_gb / s.mem_total_gb


def memory_headroom(s: Signals) -> str | None:
    frac = _mem_fraction(s)
    if frac is None or frac >= HEADROOM:
        return None
    per_process = s.batch_size // max(1, s.world)
    bigger = s.micro_batch_size * 2
    if bigger <= per_process:
        change = f"train.micro_batch_size={bigger} (fewer accumulation steps, same batch)"
    else:
        change = f"train.micro_batch_size={bigger} with train.batch_size={bigger * s.world} or more"
    return (
        f"memory headroom: peak {s.mem_used_gb:.1f}/{s.mem_total_gb:.1f} GB "
        f"({100 * frac:.0f}%); try {change}"
    )


def near_oom(s: Signals) -> str | None:
    frac = _mem_fraction(s)
    if frac is None or frac <= NEAR_OOM:
        return None
    changes = []
    if not s.activation_checkpointing:
        changes.append("train.activation_checkpointing=true")
    if s.micro_batch_size > 1:
        changes.append(f"train.micro_batch_size={max(1, s.micro_batch_size // 2)}")
    if s.world > 1 and s.strategy == "ddp":
        changes.append("dist.strategy=zero1 (optimizer state sharded) or dist.strategy=fsdp2")
    if not changes:
        changes.append("a smaller model or train.seq_len")
    return (
        f"near OOM: peak {s.mem_used_gb:.1f}/{s.mem_total_gb:.1f} GB "
        f"({100 * frac:.0f}%); use " + ", ".join(changes)
    )


def fp32_on_bf16_device(s: Signals) -> str | None:
    """fp32 chosen by hand where bf16 pays. GPUs: bf16 is the default (auto) and ~2× faster.
    CPUs with native bf16 (AVX512-BF16, AMX): auto probes it (train/precision.py); from
    d_model 256 up it paid on every such CPU measured (bench-llama, d 384: 1.75×; docs/log.md)."""
    if s.precision != "fp32" or not s.bf16_supported:
        return None
    if s.device_type == "cuda":
        return (
            "fp32 on a bf16-capable GPU: train.precision=bf16 (or auto) is typically 2× "
            "faster and halves activation memory"
        )
    if s.device_type == "cpu" and s.d_model >= CPU_BF16_WIDTH:
        return (
            f"fp32 on a CPU with native bf16 and d_model={s.d_model}: train.precision=bf16 "
            "(autocast) was 1.75× faster at d_model 384 on such a CPU (fp32 master weights)"
        )
    return None


def compile_off_long_run(s: Signals) -> str | None:
    """On CUDA compile pays on long runs; on a CPU only in bf16 (inductor's fused C++ kernels
    took a bench-llama bf16 step from 1.06 to 0.85 s, while fp32 got slower: docs/log.md)."""
    if s.compile or s.max_steps < LONG_RUN:
        return None
    if s.device_type == "cuda":
        return (
            f"torch.compile is off for a {s.max_steps}-step CUDA run: train.compile=true "
            "usually pays back its warm-up within a few hundred steps"
        )
    if s.device_type == "cpu" and s.precision == "bf16":
        return (
            f"torch.compile is off for a {s.max_steps}-step bf16 CPU run: train.compile=true "
            "fuses the elementwise work around the matmuls (~1.25x per step measured) and "
            "pays back its ~15-45 s warm-up within a few hundred steps"
        )
    return None


def slow_tokenization(s: Signals) -> str | None:
    if not s.tokenize_tokens_per_second or not s.tokens_per_second:
        return None
    if s.tokenize_tokens_per_second >= SLOW_TOKENIZE * s.tokens_per_second:
        return None
    return (
        f"tokenization ({s.tokenize_tokens_per_second:,.0f} tok/s) is slower than training "
        f"({s.tokens_per_second:,.0f} tok/s) and ran inside this run: run `stoker prepare` "
        "once ahead of training (on a machine with more cores) and point data.dir at it"
    )


RULES = (
    data_bound,
    memory_headroom,
    near_oom,
    fp32_on_bf16_device,
    compile_off_long_run,
    slow_tokenization,
)


def advise(s: Signals) -> list[str]:
    """Every rule's advice for `s`, in rule order."""
    return [msg for rule in RULES if (msg := rule(s)) is not None]


def signals_for_run(
    cfg, device, precision: str, world: int, measured: dict[str, Any] | None = None
) -> Signals:
    """Signals from a recipe config and its device; `measured` adds `data_wait`,
    `tokens_per_second`, `mem_used_gb` … (keys of `Signals`)."""
    import torch

    t = cfg.train
    bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":  # native bf16 dot products (AVX512-BF16 / AMX), per oneDNN
        from stoker.train.precision import cpu_has_native_bf16

        bf16 = cpu_has_native_bf16()
    s = Signals(
        device_type=device.type,
        precision=precision,
        bf16_supported=bf16,
        compile=t.compile,
        max_steps=t.max_steps,
        batch_size=t.batch_size,
        micro_batch_size=t.micro_batch_size,
        world=world,
        strategy=cfg.dist.strategy,
        activation_checkpointing=t.activation_checkpointing,
        d_model=cfg.model.d_model,
        num_workers=cfg.data.num_workers if isinstance(cfg.data.num_workers, int) else 0,
    )
    for key, value in (measured or {}).items():
        if value is not None and hasattr(s, key):
            setattr(s, key, value)
    if device.type == "cuda" and s.mem_used_gb is None and torch.cuda.is_initialized():
        s.mem_used_gb = torch.cuda.max_memory_reserved(device) / 1e9
        s.mem_total_gb = torch.cuda.get_device_properties(device).total_memory / 1e9
    return s


def print_advice(lines: list[str], write=None) -> None:
    for line in lines:
        (write or (lambda m: print(m, flush=True)))(f"stoker: advice: {line}")


class AdviceOnce:
    """During a run: each rule's advice is printed the first time it fires (a rule is named
    by its message's prefix, e.g. "data-bound"), not again at every log step."""

    def __init__(self) -> None:
        self.told: set[str] = set()

    def new(self, lines: list[str]) -> list[str]:
        fresh = [line for line in lines if line.split(":", 1)[0] not in self.told]
        self.told.update(line.split(":", 1)[0] for line in fresh)
        return fresh


def check_advice(checks: dict[str, Any]) -> list[str]:
    """Advice from `stoker monitor`'s environment checks (see monitor/commands.py)."""
    out = []
    if not checks.get("cuda_available"):
        build = (
            f"torch built with CUDA {checks['torch_cuda']}"
            if checks.get("torch_cuda")
            else "a CPU-only torch build: install a CUDA wheel of torch for GPUs"
        )
        out.append(
            f"no CUDA GPU visible ({build}): training runs on the CPU; check the "
            "driver and CUDA_VISIBLE_DEVICES"
        )
    for d in checks.get("gpus", []):
        if not d.get("bf16"):
            out.append(
                f"GPU {d['index']} ({d['name']}) lacks bf16: train.precision=auto uses "
                "fp16 with a GradScaler"
            )
        if d.get("total_gb") and d.get("free_gb", 0) < 0.1 * d["total_gb"]:
            out.append(
                f"GPU {d['index']} has only {d['free_gb']:.1f}/{d['total_gb']:.1f} GB "
                "free: another process holds its memory"
            )
    if checks.get("cuda_available") and not checks.get("nccl_available"):
        out.append("NCCL is unavailable: multi-GPU runs need dist.backend=gloo (much slower)")
    if not checks.get("gloo_available"):
        out.append("gloo is unavailable: CPU multi-process runs (and their tests) cannot start")
    if checks.get("cuda_available") and not checks.get("nvml_available"):
        out.append(
            "pip install nvidia-ml-py (or 'stoker[monitor]') for GPU utilization, "
            "power and temperature"
        )
    if not checks.get("psutil_available"):
        out.append("pip install psutil (or 'stoker[monitor]') for CPU and RAM readings")
    return out
