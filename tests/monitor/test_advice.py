"""Every advice rule, driven by synthetic telemetry: one case that fires, one that doesn't."""

import pytest

from stoker.monitor.advice import (
    Signals,
    advise,
    check_advice,
    compile_off_long_run,
    data_bound,
    fp32_on_bf16_device,
    memory_headroom,
    near_oom,
    slow_tokenization,
)

GPU = dict(device_type="cuda", precision="bf16", bf16_supported=True, mem_total_gb=80.0)


def test_data_bound_names_loader_workers():
    msg = data_bound(Signals(data_wait=0.35, num_workers=0))
    assert msg is not None and "35%" in msg and "data.num_workers" in msg
    assert data_bound(Signals(data_wait=0.02)) is None
    assert data_bound(Signals(data_wait=None)) is None


def test_memory_headroom_suggests_a_larger_micro_batch():
    msg = memory_headroom(Signals(**GPU, mem_used_gb=20.0, batch_size=32, micro_batch_size=8))
    assert msg is not None and "train.micro_batch_size=16" in msg and "same batch" in msg
    full = memory_headroom(Signals(**GPU, mem_used_gb=20.0, batch_size=8, micro_batch_size=8))
    assert "train.batch_size=16" in full
    assert memory_headroom(Signals(**GPU, mem_used_gb=60.0)) is None
    assert memory_headroom(Signals(device_type="cpu", mem_used_gb=1.0, mem_total_gb=64.0)) is None


def test_near_oom_names_checkpointing_smaller_micro_batch_and_sharding():
    msg = near_oom(Signals(**GPU, mem_used_gb=78.0, micro_batch_size=8, world=8))
    assert msg is not None
    for change in (
        "train.activation_checkpointing=true",
        "train.micro_batch_size=4",
        "dist.strategy=zero1",
        "fsdp2",
    ):
        assert change in msg
    single = near_oom(Signals(**GPU, mem_used_gb=78.0, activation_checkpointing=True))
    assert "activation_checkpointing" not in single and "dist.strategy" not in single
    assert near_oom(Signals(**GPU, mem_used_gb=50.0)) is None


def test_fp32_on_bf16_gpu_suggests_bf16():
    msg = fp32_on_bf16_device(Signals(device_type="cuda", precision="fp32", bf16_supported=True))
    assert msg is not None and "train.precision=bf16" in msg
    assert fp32_on_bf16_device(Signals(device_type="cuda", precision="fp32")) is None  # e.g. V100
    assert fp32_on_bf16_device(Signals(**GPU)) is None  # already bf16
    assert fp32_on_bf16_device(Signals(device_type="cpu", precision="fp32")) is None
    # CPUs with native bf16: only from d_model 256 up (the tiny demo gains 1.1x)
    cpu = dict(device_type="cpu", precision="fp32", bf16_supported=True)
    assert fp32_on_bf16_device(Signals(**cpu, d_model=128)) is None
    msg = fp32_on_bf16_device(Signals(**cpu, d_model=384))
    assert msg is not None and "train.precision=bf16" in msg and "d_model=384" in msg


def test_compile_off_on_long_cuda_run_suggests_compile():
    msg = compile_off_long_run(Signals(**GPU, max_steps=20_000))
    assert msg is not None and "train.compile=true" in msg
    assert compile_off_long_run(Signals(**GPU, max_steps=100)) is None
    assert compile_off_long_run(Signals(**GPU, max_steps=20_000, compile=True)) is None
    assert compile_off_long_run(Signals(device_type="cpu", max_steps=20_000)) is None  # fp32
    cpu_bf16 = compile_off_long_run(Signals(device_type="cpu", precision="bf16", max_steps=20_000))
    assert cpu_bf16 is not None and "bf16 CPU run" in cpu_bf16


def test_slow_tokenization_suggests_preparing_ahead():
    msg = slow_tokenization(Signals(tokenize_tokens_per_second=1e4, tokens_per_second=1e5))
    assert msg is not None and "stoker prepare" in msg
    assert slow_tokenization(Signals(tokenize_tokens_per_second=1e6, tokens_per_second=1e5)) is None
    assert slow_tokenization(Signals(tokens_per_second=1e5)) is None


def test_healthy_gpu_run_gets_no_advice_and_unhealthy_gets_several():
    assert advise(Signals(**GPU, mem_used_gb=60.0, data_wait=0.01, max_steps=100)) == []
    bad = advise(
        Signals(
            device_type="cuda",
            precision="fp32",
            bf16_supported=True,
            max_steps=5000,
            data_wait=0.5,
            mem_used_gb=79.0,
            mem_total_gb=80.0,
        )
    )
    assert len(bad) == 4  # data-bound, near OOM, fp32, compile


@pytest.mark.parametrize(
    ("checks", "needle"),
    [
        (
            {"cuda_available": False, "gloo_available": True, "psutil_available": True},
            "no CUDA GPU",
        ),
        (
            {
                "cuda_available": True,
                "nccl_available": False,
                "gloo_available": True,
                "nvml_available": True,
                "psutil_available": True,
            },
            "NCCL is unavailable",
        ),
        (
            {
                "cuda_available": True,
                "nccl_available": True,
                "gloo_available": True,
                "nvml_available": False,
                "psutil_available": True,
            },
            "nvidia-ml-py",
        ),
        ({"cuda_available": False, "gloo_available": False, "psutil_available": True}, "gloo"),
        ({"cuda_available": False, "gloo_available": True, "psutil_available": False}, "psutil"),
        (
            {
                "cuda_available": True,
                "nccl_available": True,
                "gloo_available": True,
                "nvml_available": True,
                "psutil_available": True,
                "gpus": [
                    {"index": 0, "name": "T4", "bf16": False, "free_gb": 0.5, "total_gb": 16.0}
                ],
            },
            "lacks bf16",
        ),
    ],
)
def test_environment_check_advice(checks, needle):
    assert any(needle in line for line in check_advice(checks))


def test_healthy_gpu_environment_gets_no_advice():
    checks = {
        "cuda_available": True,
        "nccl_available": True,
        "gloo_available": True,
        "nvml_available": True,
        "psutil_available": True,
        "gpus": [{"index": 0, "name": "H100", "bf16": True, "free_gb": 79.0, "total_gb": 80.0}],
    }
    assert check_advice(checks) == []
