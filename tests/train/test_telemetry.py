"""The CPU MFU denominator: the best matmul rate measured on this machine, kept on disk."""

import json

import pytest
import torch

from stoker.train import telemetry


def test_cpu_peak_keeps_the_best_measurement(monkeypatch, tmp_path):
    monkeypatch.setenv("STOKER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(telemetry, "_CPU_PEAK", {})
    now = telemetry.measured_matmul_flops(torch.float32, n=256, repeats=2)
    table = json.loads((tmp_path / "cpu_matmul_peak.json").read_text())
    key = telemetry._machine_key(torch.float32, 256)
    assert table[key] == now > 0
    # an earlier, quieter measurement on this machine wins over a slower one now
    table[key] = now * 100
    (tmp_path / "cpu_matmul_peak.json").write_text(json.dumps(table))
    monkeypatch.setattr(telemetry, "_CPU_PEAK", {})
    assert telemetry.measured_matmul_flops(torch.float32, n=256, repeats=2) == now * 100


def test_cpu_peak_survives_a_corrupt_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("STOKER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(telemetry, "_CPU_PEAK", {})
    (tmp_path / "cpu_matmul_peak.json").write_text("{not json")
    assert telemetry.measured_matmul_flops(torch.float32, n=128, repeats=1) > 0


class FakeClock:
    """perf_counter for the meter: time moves only when the test says."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate_step(meter, clock, n_micro: int, fetch: float, compute: float) -> None:
    """The loop's call order for one step: per micro-batch wait for data, then compute."""
    meter.start_step()
    for _ in range(n_micro):
        meter.wait_for_data()
        clock.now += fetch
        meter.data_ready()
        clock.now += compute
    meter.end_step(8 * 32)


def test_data_wait_counts_only_the_wait_for_each_micro_batch(monkeypatch, make_args):
    from stoker.config import load_config
    from stoker.tasks import make_task
    from stoker.train.distributed import DistInfo

    cfg = load_config(None, make_args())
    flops = make_task(cfg).flops_per_token()
    meters = {n: telemetry.Throughput(flops, DistInfo(), "fp32") for n in (1, 4)}
    clock = FakeClock()
    monkeypatch.setattr(telemetry.time, "perf_counter", clock)
    shares = {}
    for n, meter in meters.items():  # the same step split into 1 or 4 micro-batches
        for _ in range(3):
            simulate_step(meter, clock, n, fetch=0.001, compute=0.040 / n)
        shares[n] = meter.report()["data_wait"]
    assert shares[1] == pytest.approx(0.001 / 0.041)
    assert shares[4] == pytest.approx(0.004 / 0.044)


def test_gradient_accumulation_does_not_inflate_data_wait(make_args, tmp_path):
    """A real run: 4 micro-batches per step used to read ~74% data wait (the compute of the
    earlier micro-batches counted as waiting); building a batch takes well under a tenth of
    a micro-batch's forward and backward on any CPU."""
    from stoker.config import load_config
    from stoker.train.loop import train

    waits = {}
    for micro in (8, 2):
        out = tmp_path / f"m{micro}"
        train(
            load_config(
                None,
                make_args(
                    "--train.max_steps=6",
                    "--train.eval_interval=0",
                    f"--train.micro_batch_size={micro}",
                    out=out,
                ),
            )
        )
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        waits[micro] = max(r["data_wait"] for r in rows[1:] if "data_wait" in r)
    assert waits[8] < 0.3 and waits[2] < 0.3, waits
