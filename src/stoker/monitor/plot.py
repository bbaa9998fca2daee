"""`stoker plot RUN [RUN ...]`: headless figures of runs' metrics.jsonl (+ system.jsonl).

Six panels — loss (val loss dashed), learning rate, tokens/s, MFU, memory, system
utilization — with every run overlaid and labelled by its directory name. Uses matplotlib's
object API (`matplotlib.figure.Figure`, Agg canvas), never pyplot, so it needs no display and
leaves no global state behind.

A run killed mid-write (kill -9, OOM, a lost node) leaves a partial last line in its JSONL
files, and a resumed run appends after it: such lines are skipped and counted in one note on
stderr. A file most of whose lines are not JSON objects is not a run log: one-line error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from stoker.errors import StokerError
from stoker.jsonl import read_jsonl

# (panel title, y label, [(row key, line style, label suffix)])
PANELS: list[tuple[str, str, list[tuple[str, str, str]]]] = [
    ("loss", "loss", [("loss", "-", ""), ("val_loss", "--", " val")]),
    ("learning rate", "lr", [("lr", "-", "")]),
    ("tokens/s", "tokens/s", [("tokens_per_second", "-", "")]),
    ("MFU", "MFU", [("mfu", "-", "")]),
    ("memory", "GB", [("memory_gb", "-", "")]),
]
SYSTEM_PANEL = "system utilization"
SYSTEM_SERIES = [
    ("cpu_percent", "CPU"),
    ("ram_percent", "RAM"),
    ("gpu_util_percent", "GPU util"),
    ("gpu_mem_percent", "GPU mem"),
]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def series(rows: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list, list]:
    """(xs, ys) of the rows that have a numeric `key` (summary rows excluded)."""
    pts = [
        (r[x], r[key])
        for r in rows
        if r.get("event") is None and _number(r.get(x)) and _number(r.get(key))
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def read_system(run: Path) -> tuple[list[dict[str, Any]], int]:
    """(system.jsonl rows with `seconds` since the first sample and GPU-0 fields flattened,
    lines skipped)."""
    path = run / "system.jsonl"
    if not path.is_file():
        return [], 0
    rows, bad = read_jsonl(path)
    rows = [r for r in rows if _number(r.get("time"))]
    t0 = rows[0]["time"] if rows else 0.0
    for r in rows:
        r["seconds"] = r["time"] - t0
        gpus = r.get("gpus")
        gpu = gpus[0] if isinstance(gpus, list) and gpus and isinstance(gpus[0], dict) else {}
        if _number(gpu.get("util_percent")):
            r["gpu_util_percent"] = gpu["util_percent"]
        used, total = gpu.get("mem_used_gb"), gpu.get("mem_total_gb")
        if _number(used) and _number(total) and total > 0:
            r["gpu_mem_percent"] = 100 * used / total
    return rows, bad


def load_run(run: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(metrics rows, system rows) of a run directory; StokerError if there is nothing.
    Skipped lines (a partial last line) are reported once per run on stderr."""
    path = Path(run)
    if not path.is_dir():
        raise StokerError(f"{run}: no such run directory")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise StokerError(f"no metrics.jsonl in {run}; pass a run directory of `stoker train`")
    rows, bad = read_jsonl(metrics)
    if not any("loss" in r for r in rows):
        raise StokerError(f"{metrics} has no training rows (no `loss`)")
    system, bad_system = read_system(path)
    if bad or bad_system:
        where = [
            f"{n} in {f}" for n, f in ((bad, metrics), (bad_system, path / "system.jsonl")) if n
        ]
        print(
            f"stoker: plot: skipped unparsable lines ({', '.join(where)}); a run killed "
            "mid-write leaves a partial last line",
            file=sys.stderr,
        )
    return rows, system


def plot_runs(runs: list[str | Path], out: str | Path | None = None):
    """A matplotlib Figure of `runs` overlaid; written as PNG to `out` when given."""
    from matplotlib.figure import Figure

    loaded = [(Path(r).resolve().name or str(r), *load_run(r)) for r in runs]
    fig = Figure(figsize=(12, 10), layout="constrained")
    axes = fig.subplots(3, 2).flatten()
    for ax, (title, ylabel, keys) in zip(axes, PANELS, strict=False):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        for i, (name, rows, _) in enumerate(loaded):
            for key, style, suffix in keys:
                xs, ys = series(rows, key)
                if xs:
                    ax.plot(xs, ys, style, color=f"C{i}", label=name + suffix)
    ax = axes[len(PANELS)]
    ax.set_title(SYSTEM_PANEL)
    ax.set_xlabel("seconds")
    ax.set_ylabel("%")
    styles = ["-", "--", ":", "-."]
    for i, (name, _, system) in enumerate(loaded):
        for (key, label), style in zip(SYSTEM_SERIES, styles, strict=True):
            xs, ys = series(system, key, x="seconds")
            if xs:
                ax.plot(xs, ys, style, color=f"C{i}", label=f"{name} {label}")
    for ax in axes:
        if ax.get_lines():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if out is not None:
        fig.savefig(out, dpi=100)
    return fig


def plot_command(args: argparse.Namespace) -> int:
    """`stoker plot RUN [RUN ...] [--out FILE.png]`"""
    out = Path(args.out) if args.out else Path(args.runs[0]) / "plot.png"
    if out.suffix.lower() != ".png":
        raise StokerError(f"--out {out}: only .png is supported")
    if args.out and not out.parent.is_dir():
        raise StokerError(f"--out {out}: directory {out.parent} does not exist")
    plot_runs(args.runs, out)
    print(f"stoker: wrote {out}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (with metrics.jsonl)")
    p.add_argument("--out", help="PNG file to write (default: RUN/plot.png of the first run)")
