"""`stoker bench`: the reported ratios and matmul fractions recomputed from the reported numbers
and an independent FLOPs count, the same function on both sides (first-step loss, greedy
tokens), a run without `transformers`, the mode selection (compiled modes opt-in, `all`), the
compiled rows' speedup and warm-up summaries from given worker results, the device choice (the
runs here are on CPU; a CUDA summary is checked from given worker results), and every
bad-argument path. Timings are never asserted. The end-to-end runs (marked slow) use tiny-llama with 2 timed
steps per worker; a compiled run is not among them (a cold compile of both models takes ~100 s
on 2 cores).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

from stoker.bench import (
    DEFAULT_MODES,
    MODES,
    add_arguments,
    check_args,
    print_table,
    resolve_device,
    summarize,
)
from stoker.cli import main
from stoker.config import ModelConfig
from stoker.monitor.system import cpu_name
from stoker.scaling.flops import count_params, flops_per_token

FAST = ["--preset", "tiny-llama", "--quick", "--steps", "2", "--warmup", "1", "--threads", "1"]


def run_bench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stoker", "bench", *FAST, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def summary() -> dict:
    """`stoker bench --json` (JSON on stdout, no table) for fp32, both decodes and data; the
    CPU's auto choice fixed to bf16, so decode-auto decodes in bf16 on any CPU."""
    env = {**os.environ, "STOKER_CPU_AUTO_PRECISION": "bf16"}
    r = run_bench("--modes", "fp32,decode,decode-auto,data", "--json", env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
def test_rows_in_mode_order_with_their_peers(summary):
    assert [(row["mode"], row["peer"]) for row in summary["rows"]] == [
        ("fp32", "transformers"),
        ("decode", "transformers"),
        ("decode-auto", "transformers"),
        ("data", "nanogpt"),
    ]
    assert summary["preset"] == "tiny-llama"
    assert summary["settings"]["batch"] == 8 and summary["settings"]["seq_len"] == 128
    assert summary["settings"]["threads"] == 1
    assert all(r["threads"] == 1 for runs in summary["runs"].values() for r in runs)


@pytest.mark.slow
def test_run_names_its_device_and_measures_matmul_at_the_cpu_size(summary):
    assert summary["device"] == "cpu" and summary["settings"]["device"] == "cpu"
    assert summary["device_name"] == cpu_name() != ""
    assert all(r["device"] == "cpu" for runs in summary["runs"].values() for r in runs)
    assert summary["settings"]["matmul_n"] == 2048
    assert summary["matmul_tf32"] is None and summary["peak_flops_per_s"] == {}


@pytest.mark.slow
def test_versions_are_those_of_the_installed_libraries(summary):
    import transformers

    assert summary["versions"] == {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


@pytest.mark.slow
def test_ratio_is_stoker_over_peer_median_tokens_per_s(summary):
    for row in summary["rows"]:
        stoker = [r["tokens_per_s"] for r in summary["runs"][f"stoker/{row['mode']}"]]
        peer = [r["tokens_per_s"] for r in summary["runs"][f"{row['peer']}/{row['mode']}"]]
        assert row["stoker_tokens_per_s"] == statistics.median(stoker)
        assert row["peer_tokens_per_s"] == statistics.median(peer)
        assert row["ratio"] == pytest.approx(statistics.median(stoker) / statistics.median(peer))


@pytest.mark.slow
def test_train_tokens_per_s_is_batch_times_seq_len_over_median_step(summary):
    for impl in ("stoker", "transformers"):
        (run,) = summary["runs"][f"{impl}/fp32"]
        assert len(run["step_times"]) == 2  # --steps 2 after --warmup 1
        assert run["step_s"] == statistics.median(run["step_times"])
        assert run["tokens_per_s"] == pytest.approx(8 * 128 / run["step_s"])


@pytest.mark.slow
def test_matmul_fraction_is_achieved_flops_over_matmul_rate(summary):
    cfg = ModelConfig(preset="tiny-llama")
    # PaLM's 6N + 12·L·H·Q·T with N = all parameters, written out here
    fpt = 6 * count_params(cfg).total + 12 * cfg.n_layer * cfg.n_head * cfg.dim_head * 128
    assert summary["flops_per_token"] == pytest.approx(fpt)
    assert flops_per_token(cfg, 128) == pytest.approx(fpt)
    rate = summary["matmul_flops_per_s"]["fp32"]
    assert set(summary["matmul_flops_per_s"]) == {"fp32"}  # bf16 not asked for
    assert rate == max(r["fp32"] for r in summary["runs"]["matmul/matmul"])
    (row,) = [r for r in summary["rows"] if r["mode"] == "fp32"]
    assert row["stoker_mm_frac"] == pytest.approx(row["stoker_tokens_per_s"] * fpt / rate)
    assert row["peer_mm_frac"] == pytest.approx(row["peer_tokens_per_s"] * fpt / rate)
    assert 0 < row["stoker_mm_frac"] < 1 and 0 < row["peer_mm_frac"] < 1


@pytest.mark.slow
def test_both_models_compute_the_same_function(summary):
    stoker_loss, hf_loss = summary["checks"]["loss0_fp32"]
    torch.testing.assert_close(stoker_loss, hf_loss, rtol=1e-5, atol=0)
    stoker_tokens, hf_tokens = summary["checks"]["tokens_decode"]
    assert len(stoker_tokens) == 96  # prompt 32 + 96 new fill tiny-llama's 128 positions
    assert stoker_tokens == hf_tokens


@pytest.mark.slow
def test_decode_auto_runs_stoker_in_generates_auto_dtype_and_checks_its_tokens(summary):
    """decode-auto decodes in `--dtype auto`'s dtype (bf16 here: fixed by the fixture) and
    pairs those tokens with an fp32 run of the same model in the same worker — which must
    be the decode fp32 row's tokens."""
    (row,) = [r for r in summary["rows"] if r["mode"] == "decode-auto"]
    assert row["stoker_dtype"] == "bf16"
    auto_tokens, fp32_tokens = summary["checks"]["fp32_tokens_decode-auto"]
    assert len(auto_tokens) == len(fp32_tokens) == 96
    assert fp32_tokens == summary["checks"]["tokens_decode"][0]
    assert summary["checks"]["tokens_decode-auto"][0] == auto_tokens


@pytest.mark.slow
def test_data_row_gives_loader_headroom_over_training(summary):
    rows = {r["mode"]: r for r in summary["rows"]}
    data = rows["data"]
    assert data["train_mode"] == "fp32"
    assert data["train_multiple"] == pytest.approx(
        data["stoker_tokens_per_s"] / rows["fp32"]["stoker_tokens_per_s"]
    )
    assert len(summary["runs"]["stoker/data"][0]["rates"]) == 2
    assert "data" not in "".join(summary["checks"])


@pytest.mark.slow
def test_table_shows_rates_ratios_fractions_and_checks(summary, capsys):
    print_table(summary)
    out = capsys.readouterr().out
    mm = summary["matmul_flops_per_s"]["fp32"]
    assert f"GFLOP/s: fp32 {mm / 1e9:.0f}" in out and "threads 1," in out
    assert f"torch {torch.__version__}" in out and "preset tiny-llama" in out
    assert f"stoker bench: cpu {summary['device_name']}, preset tiny-llama, threads 1, " in out
    assert "host ops only" not in out and "on the GPU" not in out
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    fp32 = summary["rows"][0]
    assert f"{fp32['ratio']:.2f}x" in lines["train fp32"]
    assert f"{fp32['stoker_mm_frac']:.0%}" in lines["train fp32"]
    assert lines["data loader"].endswith("nanoGPT get_batch")
    assert "check: first-step fp32 loss" in out
    assert "check: greedy tokens equal in 96/96 positions" in out
    assert "TokenWindows.batch delivers" in out
    assert "rate (a loader under ~10x the training rate would slow training)" in out


@pytest.mark.slow
def test_without_transformers_the_stoker_column_still_runs(tmp_path):
    fake = tmp_path / "hide" / "transformers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('hidden by test_bench')\n")
    path = os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    out = tmp_path / "bench.json"
    r = run_bench("--modes", "decode", "--json", str(out), env=env)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["stoker_tokens_per_s"] > 0
    assert row["peer_tokens_per_s"] is None and row["ratio"] is None
    assert row["peer_missing"] == "transformers not installed"
    decode_line = next(ln for ln in r.stdout.splitlines() if ln.startswith("decode fp32 "))
    assert decode_line.endswith("transformers not installed")
    assert "transformers not installed;" in r.stdout  # header


@pytest.mark.parametrize(
    "args, message",
    [
        (["--modes", "fp32,bogus"], "--modes: unknown mode bogus"),
        (["--modes", ","], "--modes: unknown mode (none)"),
        (["--modes", "bf16-compile,fp16-compile"], "--modes: unknown mode fp16-compile"),
        (["--modes", "compile"], "--modes: unknown mode compile; choose from fp32,"),
        (["--modes", "fp32-compile", "--warmup", "0"], "--warmup must be >= 1 with a -compile"),
        (["--preset", "gpt5"], "--preset gpt5: unknown preset"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--repeats", "-1"], "--repeats must be >= 1"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--retries", "-2"], "--retries must be >= 0"),
        (["--wait-idle", "-1"], "--wait-idle must be >= 0"),
        (["--threads", "two"], "invalid int value: 'two'"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["--json", "/nonexistent/dir/b.json"], "directory /nonexistent/dir does not exist"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_argument_is_one_line_exit_2(args, message, capsys):
    assert main(["bench", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err and captured.err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_one_line_exit_2(capsys):
    assert main(["bench", "--device", "cuda", *FAST]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "stoker: error: --device cuda: CUDA is not available; use --device cpu\n"
    )


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cpu", "cpu"),
        pytest.param(
            "auto",
            "cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="auto is cuda here"),
        ),
        pytest.param(
            "auto",
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA here"),
        ),
    ],
)
def test_device_resolves_auto_to_cuda_only_when_available(name, expected):
    assert resolve_device(name) == expected


def bench_args(*argv: str) -> argparse.Namespace:
    """`stoker bench` options as its parser reads them (no run)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    "modes, expected",
    [
        (None, ["fp32", "bf16", "decode", "decode-auto", "data"]),
        ("all", ["fp32", "fp32-compile", "bf16", "bf16-compile", "decode", "decode-auto", "data"]),
        ("data,all", list(MODES)),
        ("data,bf16-compile,fp32", ["fp32", "bf16-compile", "data"]),
        (" fp32-compile , bf16-compile ", ["fp32-compile", "bf16-compile"]),
    ],
)
def test_modes_compiled_only_on_request_in_table_order(modes, expected):
    args = bench_args() if modes is None else bench_args("--modes", modes)
    assert check_args(args) == expected
    assert not any(m.endswith("-compile") for m in DEFAULT_MODES)


def test_compiled_warmup_of_one_step_is_accepted():
    assert check_args(bench_args("--modes", "bf16-compile", "--warmup", "1")) == ["bf16-compile"]
    assert check_args(bench_args("--modes", "bf16", "--warmup", "0")) == ["bf16"]


def train_run(tokens_per_s: float, warmup_s: float, loss0: float, timed_graphs: int = 0) -> dict:
    """What `bench_workers.run_train` reports, with given numbers."""
    step_s = 8 * 128 / tokens_per_s
    return dict(
        tokens_per_s=tokens_per_s,
        step_s=step_s,
        loss0=loss0,
        timed_graphs=timed_graphs,
        warmup_steps=2,
        warmup_s=warmup_s,
        step_times=[step_s],
        threads=1,
        torch="2",
    )


def compiled_summary(modes: list[str], timed_graphs: int = 0) -> dict:
    """`summarize` over given worker results: eager and compiled bf16 of both impls."""
    runs = {("matmul", "matmul"): [{"bf16": 2e11}, {"bf16": 1e11}]}
    runs[("stoker", "bf16")] = [train_run(1000.0, 0.2, 6.25), train_run(1200.0, 0.4, 6.25)]
    runs[("transformers", "bf16")] = [train_run(800.0, 0.3, 6.25001)]
    runs[("stoker", "bf16-compile")] = [train_run(1430.0, 41.0, 6.2500004, timed_graphs)]
    runs[("transformers", "bf16-compile")] = [train_run(1000.0, 35.5, 6.2500102)]
    runs = {key: v for key, v in runs.items() if key[1] in (*modes, "matmul")}
    args = bench_args("--preset", "tiny-llama", "--modes", ",".join(modes), "--quick")
    args.repeats, args.device = 1, "cpu"
    return summarize(runs, modes, ModelConfig(preset="tiny-llama"), args)


def test_compiled_row_gives_speedup_over_eager_and_warmup_seconds(capsys):
    s = compiled_summary(["bf16", "bf16-compile"])
    eager, compiled = s["rows"]
    assert s["matmul_flops_per_s"] == {"bf16": 2e11}  # compiled rows share the dtype's rate
    assert compiled["ratio"] == pytest.approx(1430 / 1000)
    assert compiled["stoker_mm_frac"] == pytest.approx(1430 * s["flops_per_token"] / 2e11)
    assert compiled["stoker_vs_eager"] == pytest.approx(1430 / 1100)  # median of 1000, 1200
    assert compiled["peer_vs_eager"] == pytest.approx(1000 / 800)
    assert (compiled["stoker_warmup_s"], compiled["peer_warmup_s"]) == (41.0, 35.5)
    assert eager["stoker_warmup_s"] == pytest.approx(0.3) and "stoker_vs_eager" not in eager
    assert s["checks"]["loss0_bf16-compile"] == [6.2500004, 6.2500102]
    print_table(s)
    out = capsys.readouterr().out
    assert "train bf16 compile " in out and f"{compiled['ratio']:.2f}x" in out
    assert (
        "check: first-step bf16-compile loss 6.250000 vs 6.250010 (eager 6.250000 vs 6.250010)"
        in out
    )
    assert (
        "compile bf16: stoker 1.30x eager, transformers 1.25x eager; "
        "warm-up (2 step(s), compiling included) stoker 41.0 s, transformers 35.5 s"
    ) in out
    assert "recompilation" not in out


def test_compiled_row_without_eager_mode_gives_warmup_only_and_flags_recompiles(capsys):
    s = compiled_summary(["bf16-compile"], timed_graphs=1)
    (row,) = s["rows"]
    assert row["stoker_vs_eager"] is None and row["peer_vs_eager"] is None
    print_table(s)
    out = capsys.readouterr().out
    assert "compile bf16: warm-up (2 step(s), compiling included) stoker 41.0 s" in out
    assert "check: first-step bf16-compile loss 6.250000 vs 6.250010\n" in out
    assert "note: bf16-compile: 1 graph(s) compiled during the timed steps" in out


def test_cuda_summary_names_the_gpu_and_its_datasheet_peak_beside_the_measured_rate(capsys):
    gpu = dict(device="cuda", device_name="NVIDIA H100 80GB HBM3", host="Some Xeon")
    runs = {("matmul", "matmul"): [{"fp32": 5.1e13, "bf16": 7.5e14, "tf32": False, **gpu}]}
    for mode, rate in (("fp32", 1e5), ("bf16", 3e5)):
        runs[("stoker", mode)] = [train_run(rate, 2.0, 6.25) | gpu]
        runs[("transformers", mode)] = [train_run(rate / 1.5, 3.0, 6.25) | gpu]
    runs[("stoker", "data")] = [{"tokens_per_s": 6e7, **gpu}]
    runs[("nanogpt", "data")] = [{"tokens_per_s": 2e7, **gpu}]
    args = bench_args("--preset", "tiny-llama", "--threads", "16")
    args.repeats, args.device = 1, "cuda"
    s = summarize(runs, ["fp32", "bf16", "data"], ModelConfig(preset="tiny-llama"), args)
    assert (s["device"], s["device_name"], s["matmul_tf32"]) == ("cuda", gpu["device_name"], False)
    assert s["peak_flops_per_s"] == {"fp32": None, "bf16": 989e12}  # H100 SXM; no fp32 figure
    _, bf16, data = s["rows"]
    assert bf16["stoker_mm_frac"] == pytest.approx(3e5 * s["flops_per_token"] / 7.5e14)
    assert data["train_mode"] == "bf16" and data["train_multiple"] == pytest.approx(6e7 / 3e5)
    print_table(s)
    out = capsys.readouterr().out
    assert (
        "stoker bench: cuda NVIDIA H100 80GB HBM3 (host Some Xeon), preset tiny-llama, "
        "threads 16 (host ops only), "
    ) in out
    assert "matmul 8192^3 TFLOP/s: fp32 51.0 (TF32 off), bf16 750.0 / datasheet 989\n" in out
    assert "delivers 200x the stoker train bf16 rate on the GPU (a loader under" in out
