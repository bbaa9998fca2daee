"""The system sampler: readings, graceful degradation, the thread and the summary line."""

import json
import sys
import time

import pytest

from stoker.monitor.system import (
    NullMonitor,
    SystemSampler,
    host_stats,
    nvml_stats,
    sample_system,
    start_monitor,
    summary_line,
)


def test_sample_has_plausible_cpu_and_ram_readings():
    s = sample_system(cpu_interval=0.05)
    assert abs(s["time"] - time.time()) < 60
    assert 0 <= s["cpu_percent"] <= 100
    assert 0 < s["ram_percent"] <= 100 and s["ram_total_gb"] > 0
    assert 0 < s["process_rss_gb"] < s["ram_total_gb"]


def test_without_psutil_the_sample_keeps_only_what_it_has(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` raises ImportError
    assert host_stats() == {}
    s = sample_system()
    assert "time" in s and "cpu_percent" not in s
    assert summary_line(s, data_wait=0.03) == "data 3%"


def test_without_nvml_or_gpu_there_are_no_gpu_fields(monkeypatch):
    from stoker.monitor import system

    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    monkeypatch.delitem(system._NVML, "mod", raising=False)  # initialise NVML afresh
    assert nvml_stats() == []
    assert "gpus" not in sample_system()


def test_mps_fields_only_where_mps_exists(monkeypatch):
    import torch

    from stoker.monitor import system

    if not torch.backends.mps.is_available():
        assert system.torch_mps_stats() == {}
        assert not any(k.startswith("mps_") for k in sample_system())
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 2e9, raising=False)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 3e9, raising=False)
    assert system.torch_mps_stats() == {"mps_allocated_gb": 2.0, "mps_driver_gb": 3.0}


def test_summary_line_with_a_gpu_and_on_a_cpu_machine():
    gpu = {
        "gpus": [{"index": 0, "mem_used_gb": 8.2, "mem_total_gb": 16.0, "util_percent": 85.0}],
        "cpu_percent": 45.2,
        "ram_percent": 67.0,
    }
    assert (
        summary_line(gpu, data_wait=0.031)
        == "GPU 8.2/16.0GB 51% | util 85% | CPU 45% | RAM 67% | data 3%"
    )
    cpu = {"cpu_percent": 45.2, "ram_percent": 67.0}
    assert summary_line(cpu) == "CPU 45% | RAM 67%"
    assert summary_line(None) == ""


def test_first_row_reads_real_cpu_use(tmp_path):
    """psutil keeps its CPU counter per thread: the sampler thread primes its own, so the
    first row is a reading, not psutil's 0.0 placeholder. The bound is machine-relative: the
    whole machine was at least as busy as this process's own CPU time says."""
    import psutil

    path = tmp_path / "system.jsonl"
    n_cpus = len(psutil.cpu_times(percpu=True))  # what psutil's system-wide figure averages
    wall, cpu = time.perf_counter(), time.process_time()
    with SystemSampler(path, interval=3600).start():  # no interval row: only the final one
        end = time.process_time() + 0.3
        while time.process_time() < end:  # 0.3 CPU-seconds on one core, however fast
            pass
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 1
    floor = 100 * cpu / (wall * n_cpus)  # this process alone, averaged over every CPU
    assert rows[0]["cpu_percent"] > floor / 2, (rows[0]["cpu_percent"], floor)


def test_tick_writes_a_row_with_step_and_data_wait(tmp_path):
    path = tmp_path / "system.jsonl"
    mon = SystemSampler(path)  # not started: only explicit ticks sample
    mon.step = 7
    mon.postfix({"step": 7, "data_wait": 0.2})
    first = mon.tick()
    mon.postfix({"step": 8, "data_wait": 0.4})
    second = mon.tick()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows == [first, second] and mon.latest == second
    assert all("time" in r and 0 <= r["cpu_percent"] <= 100 for r in rows)
    assert (first["step"], first["data_wait"]) == (7, 0.2)
    assert (second["step"], second["data_wait"]) == (8, pytest.approx(0.3))
    assert mon.cost_seconds > 0
    mon.stop()  # never started: nothing more to write
    assert len(path.read_text().splitlines()) == 2


def test_thread_ticks_on_its_interval_and_once_more_on_stop(tmp_path):
    path = tmp_path / "system.jsonl"
    mon = SystemSampler(path, interval=0.01).start()
    mon.step = 7
    mon.postfix({"step": 7, "data_wait": 0.2})
    # wait for two interval rows, however slow the machine: only a thread that never ticks
    # reaches the deadline
    deadline = time.monotonic() + 60
    while (path.read_text().count("\n") if path.exists() else 0) < 2:
        assert time.monotonic() < deadline, "the sampler thread wrote fewer than two rows"
        time.sleep(0.01)
    mon.stop()
    assert not mon._thread.is_alive()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) >= 3  # at least two interval rows, then the final one
    assert all("time" in r and "cpu_percent" in r for r in rows)
    assert rows[-1]["step"] == 7 and rows[-1]["data_wait"] == 0.2 and mon.latest == rows[-1]
    mon.stop()  # a second stop writes nothing
    assert len(path.read_text().splitlines()) == len(rows)


def test_postfix_reads_the_latest_sample_and_averages_data_wait(tmp_path):
    mon = SystemSampler(tmp_path / "s.jsonl")
    assert mon.postfix({"step": 1, "data_wait": 0.1}) == " | data 10%"  # no sample yet
    mon.tick()
    text = mon.postfix({"step": 2, "data_wait": 0.3})
    assert text == " | " + summary_line(mon.latest, 0.3)
    assert f"CPU {mon.latest['cpu_percent']:.0f}%" in text and text.endswith("data 30%")
    assert abs(mon.data_wait - 0.2) < 1e-12


def test_sampler_without_psutil_still_writes_rows(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)
    path = tmp_path / "system.jsonl"
    with SystemSampler(path, interval=3600).start() as mon:
        mon.step = 3
    (row,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert row["step"] == 3 and "time" in row and "cpu_percent" not in row


def test_monitor_off_or_other_ranks_sample_nothing(tmp_path):
    for mon in (start_monitor(tmp_path, 0.0), start_monitor(tmp_path, 5.0, enabled=False)):
        assert isinstance(mon, NullMonitor) and not isinstance(mon, SystemSampler)
        assert mon.postfix({"step": 1, "data_wait": 0.5}) == "" and mon.data_wait == 0.5
    assert not (tmp_path / "system.jsonl").exists()
