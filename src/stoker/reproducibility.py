"""Bit-identical runs: the settings that make two runs with the same seed agree exactly.

CPU: Intel MKL (PyTorch's x86 BLAS for fp32 matmuls) picks code paths by memory alignment at
run time, so two fp32 runs of the same recipe drift apart after a few steps (measured on a Xeon
with AMX: first difference at step 2–16, ~1e-5 by step 30). MKL's Conditional Numerical
Reproducibility mode `AUTO,STRICT` (this CPU's code path, results independent of alignment)
removes that. MKL reads it from the environment (`MKL_CBWR`) when PyTorch loads it, so the CLI
chooses it from the recipe before anything imports torch (`choose_for_recipe`); setting it
later, even through MKL's own `mkl_cbwr_set`, measured ineffective. Without MKL (ARM, macOS)
there is nothing to set. bf16 matmuls go through oneDNN, which measured deterministic run to
run. The cost is measured in docs/log.md ("Determinism").

CUDA: `torch.use_deterministic_algorithms`, deterministic cuDNN and
`CUBLAS_WORKSPACE_CONFIG=:4096:8` (cuBLAS reads it when its first handle is created).
"""

from __future__ import annotations

import ctypes
import os
import sys
from functools import lru_cache

STRICT_MODE = "AUTO,STRICT"
_SET_TOO_LATE: list[bool] = []  # [True] when MKL_CBWR was set by us after torch was imported


def choose_cpu_math(deterministic: bool) -> None:
    """Before `import torch`: ask for MKL's reproducible mode (MKL reads MKL_CBWR when torch
    loads it; measured: setting it later, or calling `mkl_cbwr_set` at run time, leaves runs
    differing). A value the user exported is kept."""
    if not deterministic or "MKL_CBWR" in os.environ:
        return
    os.environ["MKL_CBWR"] = STRICT_MODE
    # CNR holds for a fixed thread count: under load MKL otherwise picks fewer threads per call
    # (measured: runs differed while another process kept a core busy, and were identical
    # with these set); the count is what torch's intra-op pool will use
    threads = os.environ.get("OMP_NUM_THREADS") or str(_cores())
    for key, value in (
        ("MKL_NUM_THREADS", threads),
        ("MKL_DYNAMIC", "FALSE"),
        ("OMP_DYNAMIC", "FALSE"),
    ):
        os.environ.setdefault(key, value)
    _SET_TOO_LATE[:] = ["torch" in sys.modules]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def choose_for_recipe(recipe: str | None, overrides: list[str]) -> None:
    """`choose_cpu_math` for the recipe's `train.deterministic` (auto counts as on: on a GPU
    run the CPU does little math); a recipe that does not load is left to the real load."""
    from stoker.config import load_config
    from stoker.errors import StokerError

    try:
        wanted = load_config(recipe, overrides).train.deterministic
    except (StokerError, OSError, ValueError):
        return
    choose_cpu_math(wanted is not False)


@lru_cache(maxsize=1)
def _has_mkl() -> bool:
    """Whether the loaded PyTorch carries Intel MKL (the x86 wheels export its service API)."""
    try:
        import torch

        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return hasattr(lib, "mkl_serv_cbwr_get")
    except OSError:
        return False


def cpu_math_status(deterministic: bool) -> str:
    """What holds for this process: 'strict' (set by stoker before torch loaded), 'env'
    (MKL_CBWR from the user's environment), 'default', 'no-mkl', or 'too-late' (asked for
    after torch was imported, so MKL kept its default mode)."""
    choose_cpu_math(deterministic)  # for API users who did not: works if torch is not loaded
    if not _has_mkl():
        return "no-mkl"
    if "MKL_CBWR" in os.environ and not _SET_TOO_LATE:
        return "env"  # the user's own choice, exported before the process started
    if _SET_TOO_LATE == [False]:
        return "strict"
    return "too-late" if deterministic else "default"


def configure(deterministic: bool, device_type: str) -> str:
    """Apply the determinism settings for a run on `device_type`; returns a short description
    for the run's log (with a warning when MKL's mode was chosen too late)."""
    import torch

    cpu = cpu_math_status(deterministic)
    if deterministic and device_type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        return "deterministic CUDA algorithms, cuBLAS workspace :4096:8"
    if not deterministic:
        return "off" + (" (MKL's reproducible mode set in this process)" if cpu == "strict" else "")
    return {
        "strict": "MKL CNR AUTO,STRICT",
        "no-mkl": "no MKL (nothing to set)",
        "env": f"MKL_CBWR={os.environ.get('MKL_CBWR')} (from the environment)",
        "too-late": "WARNING: torch was imported before stoker could choose MKL's "
        "reproducible mode, so runs may differ in the last bits; set "
        "MKL_CBWR=AUTO,STRICT in the environment or use `stoker train`",
    }[cpu]
