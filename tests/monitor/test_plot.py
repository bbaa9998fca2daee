"""`stoker plot`: the figure's panels and lines equal the runs' series; PNG; bad input."""

import json
from pathlib import Path

import pytest

from stoker.cli import main
from stoker.errors import StokerError
from stoker.monitor.plot import PANELS, SYSTEM_PANEL, plot_runs

pytest.importorskip("matplotlib")


def write_run(d: Path, scale: float, system: bool = False) -> Path:
    d.mkdir(parents=True)
    rows = [
        {
            "step": s,
            "loss": scale * 5 / s,
            "lr": 1e-3 * s,
            "tokens_per_second": 100.0 * s,
            "mfu": 0.01 * s,
            "memory_gb": 0.5 + s / 10,
            "data_wait": 0.02,
        }
        for s in range(1, 7)
    ]
    rows.insert(3, {"step": 3, "val_loss": scale * 2.5, "val_perplexity": 12.0})
    rows.append({"step": 6, "val_loss": scale * 1.5, "val_perplexity": 4.5})
    rows.append({"event": "summary", "steps": 6, "tokens_per_second": 999.0})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if system:
        sys_rows = [
            {
                "time": 1000.0 + 5 * i,
                "step": i,
                "cpu_percent": 40.0 + i,
                "ram_percent": 60.0,
                "gpus": [
                    {"index": 0, "util_percent": 90.0, "mem_used_gb": 8.0, "mem_total_gb": 16.0}
                ],
            }
            for i in range(3)
        ]
        (d / "system.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sys_rows))
    return d


def lines_by_label(ax) -> dict[str, tuple[list, list]]:
    return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}


def test_two_runs_overlaid_with_every_panel(tmp_path):
    a = write_run(tmp_path / "a", 1.0, system=True)
    b = write_run(tmp_path / "b", 2.0)
    out = tmp_path / "cmp.png"
    fig = plot_runs([a, b], out)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == [p[0] for p in PANELS] + [SYSTEM_PANEL]
    loss = lines_by_label(axes[0])
    assert loss["a"] == ([1, 2, 3, 4, 5, 6], [5 / s for s in range(1, 7)])
    assert loss["b"][1] == [10 / s for s in range(1, 7)]
    assert loss["a val"] == ([3, 6], [2.5, 1.5]) and loss["b val"] == ([3, 6], [5.0, 3.0])
    for ax, key in zip(axes[1:5], ["lr", "tokens_per_second", "mfu", "memory_gb"], strict=True):
        got = lines_by_label(ax)
        assert set(got) == {"a", "b"}
        expected = {"lr": 1e-3, "tokens_per_second": 100.0, "mfu": 0.01}.get(key)
        ys = [expected * s if expected else 0.5 + s / 10 for s in range(1, 7)]
        assert got["a"] == ([1, 2, 3, 4, 5, 6], ys)
    system = lines_by_label(axes[5])
    assert system["a CPU"] == ([0.0, 5.0, 10.0], [40.0, 41.0, 42.0])
    assert system["a GPU util"][1] == [90.0] * 3 and system["a GPU mem"][1] == [50.0] * 3
    assert not any(k.startswith("b ") for k in system)  # run b has no system.jsonl
    assert axes[0].get_legend() is not None
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_command_writes_png_next_to_the_run(tmp_path, capsys):
    run = write_run(tmp_path / "run", 1.0)
    assert main(["plot", str(run)]) == 0
    assert (run / "plot.png").stat().st_size > 1000
    assert "plot.png" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "no_metrics", "no_loss"])
def test_bad_runs_are_one_line_errors(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case == "no_loss":
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "val_loss": 2.0}) + "\n")
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stoker: error:") and len(err.strip().splitlines()) == 1
    with pytest.raises(StokerError):
        plot_runs([run])


def test_plot_rejects_non_png_output(tmp_path, capsys):
    run = write_run(tmp_path / "run", 1.0)
    assert main(["plot", str(run), "--out", str(tmp_path / "x.pdf")]) == 2
    assert ".png" in capsys.readouterr().err
