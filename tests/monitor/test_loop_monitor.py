"""The monitor inside the training loop: system.jsonl, advice in the summary, off switch,
and `stoker plot` of a real tiny run."""

import json

from stoker.config import load_config
from stoker.monitor.plot import plot_runs
from stoker.train import loop
from stoker.train.loop import train


def test_tiny_run_writes_system_rows_and_advice(make_args, tmp_path, monkeypatch):
    """The monitor's interval outlasts the run, so its rows are known whatever the machine's
    speed: one the test takes after step 3 (through the loop's per-step `lr_at` call) and the
    final one stop() writes at step 6."""
    monitors = []

    def start_monitor(*args, **kwargs):
        monitors.append(real_start_monitor(*args, **kwargs))
        return monitors[-1]

    def lr_at(step, *args, **kwargs):
        if step == 3:  # three steps done, the fourth about to start
            monitors[0].tick()
        return real_lr_at(step, *args, **kwargs)

    real_start_monitor, real_lr_at = loop.start_monitor, loop.lr_at
    monkeypatch.setattr(loop, "start_monitor", start_monitor)
    monkeypatch.setattr(loop, "lr_at", lr_at)
    out = tmp_path / "run"
    summary = train(
        load_config(
            None, make_args("--train.max_steps=6", "--train.monitor_interval=3600", out=out)
        )
    )
    rows = [json.loads(x) for x in (out / "system.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6]  # the tick at step 3, the final one at stop
    assert all(0 <= r["cpu_percent"] <= 100 and r["ram_total_gb"] > 0 for r in rows)
    assert all(0 <= r["data_wait"] <= 1 for r in rows)
    assert isinstance(summary["advice"], list)
    assert 0 < summary["monitor_overhead"] < 1  # measured: sampler CPU time / run time
    saved = json.loads((out / "summary.json").read_text())
    assert saved["advice"] == summary["advice"]

    fig = plot_runs([out])
    loss_line = fig.get_axes()[0].get_lines()[0]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert list(loss_line.get_ydata()) == [r["loss"] for r in metrics if "loss" in r]
    assert fig.get_axes()[5].get_lines()  # system utilization from system.jsonl


def test_monitor_interval_zero_writes_no_system_file(make_args, tmp_path):
    out = tmp_path / "run"
    train(
        load_config(
            None,
            make_args(
                "--train.max_steps=2",
                "--train.eval_interval=0",
                "--train.monitor_interval=0",
                out=out,
            ),
        )
    )
    assert not (out / "system.jsonl").exists()


def test_tokenizing_inside_the_run_feeds_the_tokenization_advice(make_args, tmp_path, monkeypatch):
    """A run that tokenizes its corpus itself reports that rate to the advice; a run on an
    up-to-date data dir does not (the rule's threshold is forced so it fires when fed)."""
    from stoker.monitor import advice

    monkeypatch.setattr(advice, "SLOW_TOKENIZE", 1e12)

    def run(out):
        return train(
            load_config(
                None,
                make_args(
                    "--train.max_steps=2",
                    "--train.eval_interval=0",
                    f"--data.dir={tmp_path / 'd'}",
                    out=tmp_path / out,
                ),
            )
        )

    first = run("a")  # tokenizes into the new data dir
    assert any(a.startswith("tokenization (") for a in first["advice"])
    again = run("b")  # finds it up to date
    assert not any(a.startswith("tokenization (") for a in again["advice"])


def test_measured_advice_is_printed_once_when_it_first_fires(
    make_args, tmp_path, monkeypatch, capsys
):
    """With the data-bound threshold forced below any measurement, the rule fires at the
    second log step: printed then, not at every later step, and again in the summary."""
    from stoker.monitor import advice

    monkeypatch.setattr(advice, "DATA_BOUND", -1.0)
    summary = train(load_config(None, make_args("--train.max_steps=6", "--train.eval_interval=0")))
    out = capsys.readouterr().out
    assert out.count("stoker: advice: data-bound") == 2  # when triggered + run summary
    during, _, after = out.partition("stoker: advice: data-bound")
    assert "stoker: done" not in during and "stoker: done" in after
    assert any(a.startswith("data-bound") for a in summary["advice"])
