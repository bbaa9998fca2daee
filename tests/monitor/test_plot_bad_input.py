"""`stoker plot` of damaged run logs: a partial line (kill -9 mid-write, then perhaps a resume
appending after it) is skipped with one note on stderr; a file that is garbage throughout is a
one-line error naming it, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stoker.cli import main
from stoker.monitor.plot import load_run

pytest.importorskip("matplotlib")


def rows(n: int = 6) -> list[str]:
    return [json.dumps({"step": s, "loss": 5.0 / s, "lr": 1e-3}) + "\n" for s in range(1, n + 1)]


def system_rows(n: int = 3) -> list[str]:
    return [json.dumps({"time": 100.0 + i, "cpu_percent": 50.0}) + "\n" for i in range(n)]


def run_dir(tmp_path: Path, metrics: str | bytes, system: str | bytes | None = None) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    as_bytes = lambda t: t if isinstance(t, bytes) else t.encode()
    (d / "metrics.jsonl").write_bytes(as_bytes(metrics))
    if system is not None:
        (d / "system.jsonl").write_bytes(as_bytes(system))
    return d


def plot(run: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["plot", str(run)])
    return rc, capsys.readouterr().err


def test_partial_last_line_is_skipped_with_one_note(tmp_path, capsys):
    lines = rows()
    run = run_dir(tmp_path, "".join(lines) + lines[0][:17])  # killed mid-write
    rc, err = plot(run, capsys)
    assert rc == 0, err
    assert err.count("\n") == 1 and "skipped unparsable lines (1 in" in err, err
    assert str(run / "metrics.jsonl") in err
    assert (run / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["step"] for r in load_run(run)[0]] == [1, 2, 3, 4, 5, 6]


def test_partial_line_a_resumed_run_appended_after_is_skipped(tmp_path, capsys):
    lines = rows()
    glued = lines[2][:10] + lines[3]  # the kill left half of step 3; the resume wrote step 4
    run = run_dir(tmp_path, "".join(lines[:2]) + glued + "".join(lines[4:]))
    rc, err = plot(run, capsys)
    assert rc == 0 and "skipped unparsable lines (1 in" in err, err
    assert [r["step"] for r in load_run(run)[0]] == [1, 2, 5, 6]


def test_partial_system_line_is_skipped_and_counted_in_the_same_note(tmp_path, capsys):
    lines = system_rows()
    run = run_dir(tmp_path, "".join(rows()), "".join(lines) + lines[0][:9])
    rc, err = plot(run, capsys)
    assert rc == 0 and err.count("\n") == 1, err
    assert f"1 in {run / 'system.jsonl'}" in err
    assert len(load_run(run)[1]) == 3


@pytest.mark.parametrize(
    "which, garbage",
    [
        ("metrics", np.random.default_rng(0).bytes(4000)),
        ("metrics", "step,loss\n1,5.0\n2,2.5\n"),
        ("system", np.random.default_rng(1).bytes(4000)),
    ],
    ids=["metrics-random-bytes", "metrics-csv", "system-random-bytes"],
)
def test_garbage_throughout_is_a_one_line_error_naming_the_file(tmp_path, capsys, which, garbage):
    if which == "metrics":
        run = run_dir(tmp_path, garbage)
    else:
        run = run_dir(tmp_path, "".join(rows()), garbage)
    rc, err = plot(run, capsys)
    assert rc == 2 and err.startswith("stoker: error: ") and err.count("\n") == 1, err
    assert f"{run / f'{which}.jsonl'}: is not a JSON-lines run log (" in err
    assert "Traceback" not in err and not (run / "plot.png").exists()
