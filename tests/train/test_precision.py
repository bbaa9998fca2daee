"""`train.precision: auto` on each kind of device, without the devices: torch's answer to
"does this GPU do bf16" is faked as a T4 (emulated only) and an A100 (native) give it."""

import pytest
import torch

from stoker.errors import StokerError
from stoker.train.precision import resolve_precision


def fake_gpu(monkeypatch, native: bool) -> None:
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or including_emulation  # every CUDA GPU can emulate bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


def test_auto_is_fp16_on_a_gpu_that_only_emulates_bf16(monkeypatch):
    fake_gpu(monkeypatch, native=False)  # T4, V100: sm_75 / sm_70
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"


def test_auto_is_bf16_on_a_gpu_with_native_bf16(monkeypatch):
    fake_gpu(monkeypatch, native=True)  # A100, H100, RTX 30xx and newer
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_auto_is_fp32_on_cpu_and_named_precisions_are_kept():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(StokerError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", torch.device("cpu"))


# ---------------------------------------------------------------- the CPU's auto choice
from stoker.train import precision as P  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def probing(monkeypatch, tmp_path):
    """auto on a CPU as a user gets it: no forced choice, a fresh probe cache, a CPU with
    native bf16, and a fake layer timing (fp32 s, bf16 s) that counts its calls."""
    monkeypatch.delenv(P.ENV, raising=False)
    monkeypatch.setenv("STOKER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: True)
    calls = []

    def fake(times):
        monkeypatch.setattr(P, "measure_layer", lambda width: calls.append(width) or times)

    return fake, calls


def test_auto_picks_bf16_on_a_native_bf16_cpu_when_the_probe_finds_it_faster(probing):
    fake, calls = probing
    fake((0.30, 0.20))  # 1.5x
    choice = P.choose_precision("auto", CPU, width=128)
    assert choice.precision == "bf16"
    assert "width-128" in choice.reason and "1.50x" in choice.reason
    assert P.resolve_precision("auto", CPU, width=128) == "bf16"
    assert calls == [128]  # measured once per machine and width: the second call read the cache


def test_auto_stays_fp32_when_bf16_is_not_faster_enough(probing):
    fake, _ = probing
    fake((0.30, 0.29))  # 1.03x < PROBE_GAIN
    assert P.choose_precision("auto", CPU, width=64).precision == "fp32"


def test_auto_is_fp32_without_native_bf16_and_probes_nothing(probing, monkeypatch):
    fake, calls = probing
    fake((1.0, 0.1))
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: False)
    choice = P.choose_precision("auto", CPU, width=128)
    assert choice.precision == "fp32" and "no native bf16" in choice.reason and calls == []


def test_probe_cache_is_per_width_and_a_corrupt_cache_is_remeasured(probing, tmp_path):
    fake, calls = probing
    fake((0.3, 0.2))
    P.probe_times(128)
    P.probe_times(384)
    P.probe_times(128)
    assert calls == [128, 384]
    (tmp_path / "cpu_precision.json").write_text("{not json")
    P.probe_times(128)
    assert calls == [128, 384, 128]


def test_forced_cpu_choice_and_a_bad_value(monkeypatch):
    monkeypatch.setenv(P.ENV, "bf16")
    assert P.resolve_precision("auto", CPU, width=64) == "bf16"
    assert P.resolve_precision("fp32", CPU, width=64) == "fp32"  # a named precision wins
    monkeypatch.setenv(P.ENV, "fp16")
    with pytest.raises(StokerError, match="STOKER_CPU_AUTO_PRECISION='fp16': use fp32 or bf16"):
        P.resolve_precision("auto", CPU, width=64)


def test_measure_layer_runs_both_dtypes_and_leaves_the_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    fp32_s, bf16_s = P.measure_layer(64, repeats=1)
    assert fp32_s > 0 and bf16_s > 0  # times only: which is faster depends on the CPU
    assert torch.equal(torch.rand(4), expected)


def test_model_width_is_the_decoders_hidden_size():
    from stoker.config import ModelConfig
    from stoker.models.gpt import build_model

    model = build_model(ModelConfig(preset="tiny-llama", d_model=96, n_head=4, d_ff=256))
    assert P.model_width(model) == 96
    assert P.model_width(torch.nn.Embedding(3, 4)) is None


def test_the_header_says_why_auto_chose():
    from stoker.train.header import settings_line

    loading = {"num_workers": 0, "pin_memory": False}
    line = settings_line("bf16", "yes", loading, "native-bf16 CPU, ...")
    assert line.startswith("stoker: precision bf16 (auto: native-bf16 CPU, ...); deterministic")
    assert "(auto" not in settings_line("fp32", "yes", loading)
