"""`train.precision`: what `auto` resolves to on each device, and why.

- CUDA: bf16 on GPUs with native bf16 (Ampere and newer); fp16 + GradScaler on older GPUs such
  as the T4 and V100, whose bf16 torch only emulates.
- CPU: bf16 (autocast over fp32 weights) when the CPU computes bf16 dot products natively
  (AVX512-BF16 or AMX, as oneDNN reports) *and* a probe finds it faster at the model's width:
  one transformer layer of that width (heads of 64, SwiGLU 4×, 1,024 tokens) runs forward +
  backward in fp32 and under bf16 autocast, and bf16 wins when it is ≥ 5 % faster. How much
  bf16 pays depends on the CPU and the width (docs/log.md: 1.07× for the demo's d 128 on an
  AVX512-BF16 EPYC, 1.6× for d 384; ~6× faster matmuls on AMX), so it is measured, once per
  machine (CPU model, threads, torch build, width), and kept in the cache next to the matmul
  rates (~/.cache/stoker/cpu_precision.json, or $STOKER_CACHE_DIR). Otherwise fp32.
  `STOKER_CPU_AUTO_PRECISION=fp32|bf16` fixes the CPU choice without probing (the test suite
  uses it: a choice that depends on timing would make a test depend on the machine).
- MPS and others: fp32.
The choice and its reason are printed once, in the run's header. Decoding (`stoker generate
--dtype auto`, `decode_dtype`) uses bf16 weights and KV cache wherever the hardware has native
bf16.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from stoker.errors import StokerError

PROBE_GAIN = 1.05  # bf16 must be this much faster than fp32 for auto to choose it
PROBE_TOKENS = 1024  # rows of the probe layer: 4 × 256
ENV = "STOKER_CPU_AUTO_PRECISION"
CACHE_NAME = "cpu_precision.json"  # next to the matmul rates (train/telemetry.py)


@dataclass(frozen=True)
class Choice:
    """A resolved precision and, for `auto`, why it was chosen (None when named)."""

    precision: str
    reason: str | None = None


def resolve_precision(name: str, device: torch.device, width: int | None = None) -> str:
    """The precision `train.precision=name` runs in on `device` (see the module docstring)."""
    return choose_precision(name, device, width).precision


def choose_precision(name: str, device: torch.device, width: int | None = None) -> Choice:
    """`resolve_precision` with its reason; `width`: the model's hidden size (the CPU probe's
    layer width; without it, the CPU stays fp32)."""
    if name != "auto":
        if name == "fp16" and device.type != "cuda":
            raise StokerError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32")
        return Choice(name)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return Choice("bf16", "the GPU has native bf16")
        return Choice("fp16", "the GPU has no native bf16 (torch would emulate it)")
    if device.type != "cpu":
        return Choice("fp32", f"no mixed precision on {device.type}")
    return _cpu_choice(width)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX, as oneDNN (torch's CPU matmul library) reports."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def forced_cpu_precision() -> str | None:
    """`STOKER_CPU_AUTO_PRECISION` (fp32 or bf16), None when unset; StokerError otherwise."""
    forced = os.environ.get(ENV)
    if forced and forced not in ("fp32", "bf16"):
        raise StokerError(f"{ENV}={forced!r}: use fp32 or bf16 (or unset it to probe)")
    return forced or None


def _cpu_choice(width: int | None) -> Choice:
    forced = forced_cpu_precision()
    if forced:
        return Choice(forced, f"{ENV}={forced}")
    if not cpu_has_native_bf16():
        return Choice("fp32", "this CPU has no native bf16 (AVX512-BF16 / AMX)")
    if not width:
        return Choice("fp32", "no model width to probe bf16 at")
    fp32_s, bf16_s = probe_times(width)
    gain = fp32_s / bf16_s
    chosen = "bf16" if gain >= PROBE_GAIN else "fp32"
    from stoker.train.telemetry import _cache_file

    where = str(_cache_file(CACHE_NAME)).replace(str(Path.home()), "~", 1)
    return Choice(
        chosen,
        f"native-bf16 CPU, a width-{width} layer {gain:.2f}x as fast as fp32 "
        f"(bf16 from {PROBE_GAIN:.2f}x; probe cached in {where})",
    )


def probe_times(width: int) -> tuple[float, float]:
    """(fp32, bf16) seconds of one probe layer's forward + backward at `width`: from the
    cache when this machine measured them before, else measured now and cached."""
    from stoker.train.telemetry import _cache_file, _machine_key, read_cache, write_cache

    key, path = _machine_key(width), _cache_file(CACHE_NAME)
    table = read_cache(path)
    if isinstance(table.get(key), list) and len(table[key]) == 2:
        return float(table[key][0]), float(table[key][1])
    times = measure_layer(width)
    write_cache(path, {**table, key: list(times)})
    return times


def measure_layer(width: int, repeats: int = 3) -> tuple[float, float]:
    """Best-of-`repeats` seconds of forward + backward of one LLaMA-style layer of `width`
    (RMSNorm, attention with heads of 64 via SDPA and RoPE, SwiGLU with d_ff 4·width) on
    4 × 256 random tokens, in fp32 and under bf16 autocast; the RNG state is restored, so
    probing does not change what the run draws."""
    from stoker.config import ModelConfig
    from stoker.models.gpt import Block, rope_tables

    heads = max(1, width // 64)
    cfg = ModelConfig(
        preset="tiny-llama", d_model=heads * 64, n_head=heads, n_kv_head=heads, d_ff=4 * width
    )
    state = torch.random.get_rng_state()
    try:
        block = Block(cfg)
        x = torch.randn(PROBE_TOKENS // 256, 256, cfg.d_model, requires_grad=True)
        rope = rope_tables(torch.arange(256), cfg.dim_head, cfg.rope_theta)
    finally:
        torch.random.set_rng_state(state)
    best = {}
    for dtype in ("fp32", "bf16"):
        times = []
        for i in range(repeats + 1):  # the first call warms oneDNN's kernel caches
            t0 = time.perf_counter()
            with autocast_context(dtype, torch.device("cpu")):
                y = block(x, rope)
            y.float().sum().backward()
            if i:
                times.append(time.perf_counter() - t0)
        best[dtype] = min(times)
    return best["fp32"], best["bf16"]


def model_width(model: torch.nn.Module) -> int | None:
    """The model's hidden size as the probe needs it: the input width of the linear layers
    holding most weights (d_model for a decoder; the encoder's for DYNAMO); None without any."""
    weight: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weight[module.in_features] = weight.get(module.in_features, 0) + module.weight.numel()
    return max(weight, key=weight.get) if weight else None


def decode_dtype(device: torch.device) -> str:
    """Weights and KV cache for decoding with `--dtype auto`: bf16 on GPUs with native bf16
    and on CPUs with native bf16 (a decoding step streams every weight once: half the bytes;
    on the bench prompts its greedy tokens equal fp32's, `stoker bench`'s decode-auto row
    checks it), else fp32. `STOKER_CPU_AUTO_PRECISION` fixes the CPU choice here too."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if device.type != "cpu":
        return "fp32"
    return forced_cpu_precision() or ("bf16" if cpu_has_native_bf16() else "fp32")


def autocast_context(precision: str, device: torch.device):
    """torch.autocast in bf16/fp16 on `device`; nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
