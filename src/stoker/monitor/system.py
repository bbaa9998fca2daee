"""System sampling: CPU, RAM, process RSS and NVIDIA GPUs, read by a background thread.

`sample_system()` takes one reading. psutil gives CPU/RAM/RSS; NVML (`pynvml`, package
nvidia-ml-py) gives each GPU's memory, utilization, power and temperature; `torch.cuda` gives
the caching allocator's view of this process (`torch.mps` on Apple silicon). Each source is optional: a missing package or
a failing call leaves its fields out, never raises. `SystemSampler.tick()` takes one sample and
appends it to `out_dir/system.jsonl`; its daemon thread ticks every `interval` seconds and once
more on stop, so the training loop only reads the latest sample (an attribute) and never waits
on a sensor. Tests call `tick()` themselves instead of sleeping until the thread has run.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

_NVML: dict[str, Any] = {}  # {"mod": pynvml or None}, initialised once per process


def _nvml():
    """The initialised pynvml module, or None (not installed, no driver, no GPU)."""
    if "mod" not in _NVML:
        try:
            import pynvml

            pynvml.nvmlInit()
            _NVML["mod"] = pynvml
        except Exception:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded
            _NVML["mod"] = None
    return _NVML["mod"]


def cpu_cores() -> int:
    """Cores this process may run on (affinity/cgroup-aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _try(fn, *args, default=None):
    try:
        return fn(*args)
    except Exception:
        return default


def host_stats(cpu_interval: float | None = None) -> dict[str, Any]:
    """CPU %, RAM % / GB and this process's RSS. `cpu_interval=None` measures CPU since the
    previous call (non-blocking); a number blocks that long for a fresh reading."""
    try:
        import psutil
    except ImportError:
        return {}
    vm = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(interval=cpu_interval),
        "cpu_count": psutil.cpu_count(),
        "ram_percent": vm.percent,
        "ram_used_gb": (vm.total - vm.available) / 1e9,
        "ram_total_gb": vm.total / 1e9,
        "process_rss_gb": psutil.Process(os.getpid()).memory_info().rss / 1e9,
    }


def nvml_stats() -> list[dict[str, Any]]:
    """One dict per NVIDIA GPU (NVML indices): memory, utilization, power, temperature."""
    nv = _nvml()
    if nv is None:
        return []
    gpus = []
    for i in range(_try(nv.nvmlDeviceGetCount, default=0)):
        h = _try(nv.nvmlDeviceGetHandleByIndex, i)
        if h is None:
            continue
        g: dict[str, Any] = {"index": i, "name": _try(nv.nvmlDeviceGetName, h)}
        if isinstance(g["name"], bytes):
            g["name"] = g["name"].decode()
        mem = _try(nv.nvmlDeviceGetMemoryInfo, h)
        if mem is not None:
            g["mem_used_gb"], g["mem_total_gb"] = mem.used / 1e9, mem.total / 1e9
        util = _try(nv.nvmlDeviceGetUtilizationRates, h)
        if util is not None:
            g["util_percent"] = float(util.gpu)
        power = _try(nv.nvmlDeviceGetPowerUsage, h)  # milliwatts
        if power is not None:
            g["power_w"] = power / 1000
        temp = _try(nv.nvmlDeviceGetTemperature, h, 0)  # 0 = NVML_TEMPERATURE_GPU
        if temp is not None:
            g["temperature_c"] = float(temp)
        gpus.append(g)
    return gpus


def torch_cuda_stats() -> dict[str, float]:
    """This process's CUDA allocator stats, only if CUDA is already initialised (a sampler
    thread must not be the one to create a CUDA context)."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    return {
        "torch_allocated_gb": torch.cuda.memory_allocated() / 1e9,
        "torch_reserved_gb": torch.cuda.memory_reserved() / 1e9,
        "torch_max_allocated_gb": torch.cuda.max_memory_allocated() / 1e9,
    }


def torch_mps_stats() -> dict[str, float]:
    """Apple-silicon GPU memory held by this process (Metal), where MPS is available."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available() or not hasattr(torch, "mps"):
        return {}
    return {
        "mps_allocated_gb": _try(torch.mps.current_allocated_memory, default=0) / 1e9,
        "mps_driver_gb": _try(torch.mps.driver_allocated_memory, default=0) / 1e9,
    }


def sample_system(cpu_interval: float | None = None) -> dict[str, Any]:
    """One reading of every available source, with a wall-clock `time`."""
    row: dict[str, Any] = {"time": time.time(), **host_stats(cpu_interval)}
    gpus = nvml_stats()
    if gpus:
        row["gpus"] = gpus
    row.update(torch_cuda_stats())
    row.update(torch_mps_stats())
    return row


def summary_line(
    sample: dict[str, Any] | None, data_wait: float | None = None, gpu_index: int = 0
) -> str:
    """`GPU 8.2/16.0GB 51% | util 85% | CPU 45% | RAM 67% | data 3%`; parts whose source is
    missing (no GPU, no psutil, no sample yet) are left out."""
    parts: list[str] = []
    sample = sample or {}
    gpus = sample.get("gpus") or []
    gpu = next((g for g in gpus if g.get("index") == gpu_index), gpus[0] if gpus else None)
    if gpu and "mem_total_gb" in gpu:
        used, total = gpu["mem_used_gb"], gpu["mem_total_gb"]
        parts.append(f"GPU {used:.1f}/{total:.1f}GB {100 * used / total:.0f}%")
    if gpu and "util_percent" in gpu:
        parts.append(f"util {gpu['util_percent']:.0f}%")
    if "cpu_percent" in sample:
        parts.append(f"CPU {sample['cpu_percent']:.0f}%")
    if "ram_percent" in sample:
        parts.append(f"RAM {sample['ram_percent']:.0f}%")
    if data_wait is not None:
        parts.append(f"data {100 * data_wait:.0f}%")
    return " | ".join(parts)


class NullMonitor:
    """The monitor when it is off (or on ranks other than 0): keeps the data-wait average
    the advice needs, samples nothing."""

    latest: dict[str, Any] | None = None
    step: int | None = None

    def __init__(self) -> None:
        self._wait_sum, self._wait_n = 0.0, 0
        # seconds the monitor itself cost: CPU time of the sampler thread plus the time the
        # loop spends building the progress-bar line (its share of a run is `overhead`)
        self.cost_seconds = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        pass

    @property
    def data_wait(self) -> float | None:
        """Mean data-wait fraction over the rows seen so far."""
        return self._wait_sum / self._wait_n if self._wait_n else None

    def observe(self, row: dict[str, Any]) -> None:
        self.step = row.get("step", self.step)
        if row.get("data_wait") is not None:
            self._wait_sum += row["data_wait"]
            self._wait_n += 1

    def postfix(self, row: dict[str, Any]) -> str:
        """Record a logged row; the text to append to the progress bar."""
        self.observe(row)
        return ""


class SystemSampler(NullMonitor):
    """Samples the system every `interval` s on a daemon thread into `path` (JSON lines).

    `latest` is the most recent sample (replaced atomically, so reading it is free);
    `step` is stamped on each row when the loop sets it. `tick()` takes one sample now: the
    thread calls it on its interval and once more when stopped; a test calls it directly.
    """

    def __init__(self, path: str | Path | None, interval: float = 5.0, gpu_index: int = 0):
        super().__init__()
        self.path, self.interval, self.gpu_index = path, interval, gpu_index
        self._stop = threading.Event()
        self._primed = threading.Event()
        self._cost_lock = threading.Lock()  # the thread's ticks and the loop's postfix both add
        self._thread = threading.Thread(target=self._run, name="stoker-monitor", daemon=True)

    def start(self) -> SystemSampler:
        """Start the thread; returns once its CPU counter is primed, so the first row's CPU
        reading covers the time since `start()`."""
        self._thread.start()
        self._primed.wait()
        return self

    def _add_cost(self, seconds: float) -> None:
        with self._cost_lock:
            self.cost_seconds += seconds

    def tick(self) -> dict[str, Any]:
        """Take one sample now: stamp step and data wait, append it to `path`, make it
        `latest`. Its CPU % covers the time since the previous reading in the same thread
        (psutil keeps one counter per thread)."""
        t0 = time.thread_time()
        row = {**sample_system(), "step": self.step}
        if self.data_wait is not None:
            row["data_wait"] = self.data_wait
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.latest = row
        self._add_cost(time.thread_time() - t0)
        return row

    def _run(self) -> None:
        # prime psutil's CPU counter in this thread, so its first row is a reading and not
        # psutil's 0.0 placeholder; the first row comes after one interval
        try:
            host_stats()
        finally:
            self._primed.set()  # never leave start() waiting
        _nvml()  # one-time driver set-up, not a per-sample cost
        while not self._stop.wait(self.interval):
            self.tick()
        self.tick()  # the final sample, on this thread's CPU counter like the others

    def stop(self) -> None:
        """Stop the thread after it has written a final sample."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()

    def postfix(self, row: dict[str, Any]) -> str:
        t0 = time.perf_counter()
        self.observe(row)
        line = summary_line(self.latest, row.get("data_wait"), self.gpu_index)
        self._add_cost(time.perf_counter() - t0)
        return f" | {line}" if line else ""


def start_monitor(
    out_dir: str | Path, interval: float, enabled: bool = True, gpu_index: int = 0
) -> NullMonitor:
    """A started `SystemSampler` writing `out_dir/system.jsonl`, or a `NullMonitor` when
    `interval` is 0 or `enabled` is false (ranks other than 0)."""
    if not enabled or interval <= 0:
        return NullMonitor()
    return SystemSampler(Path(out_dir) / "system.jsonl", interval, gpu_index).start()
