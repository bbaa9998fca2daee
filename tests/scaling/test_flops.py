"""Accounting tests for scaling/flops.py: parameters against meta-built models, FLOPs against
torch's FlopCounterMode, activation memory against the tensors autograd actually saves."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stoker.config import PRESETS, ModelConfig
from stoker.errors import StokerError
from stoker.models.gpt import build_model
from stoker.scaling.flops import (
    CONVENTIONS,
    count_lora_params,
    count_params,
    count_params_shared,
    estimate_memory,
    flops_per_token,
    forward_flops,
    head_activation_bytes,
    layer_activation_bytes,
)


def numel(cfg: ModelConfig) -> int:
    return sum(p.numel() for p in build_model(cfg, "meta").parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_count_equals_meta_model_for_every_preset(name):
    cfg = ModelConfig(preset=name)
    assert count_params(cfg).total == numel(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(arch="llama", n_head=8, n_kv_head=2, qkv_bias=True, tie_embeddings=False),  # Qwen2
        dict(arch="llama", n_head=4, head_dim=32, bias=True, d_ff=96),
        dict(arch="gpt2", bias=False, tie_embeddings=False, head_dim=8),
        dict(arch="gpt2", bias=True, n_head=2),
    ],
)
def test_param_count_equals_meta_model_for_variants(overrides):
    cfg = ModelConfig(n_layer=3, d_model=64, vocab_size=300, max_seq_len=40, **overrides)
    assert count_params(cfg).total == numel(cfg)


def test_param_counts_match_reference_section_1():
    assert count_params(ModelConfig(preset="llama-1.36b")).total == 1_294_159_104
    assert count_params(ModelConfig(preset="gpt2-1.36b")).total == 1_404_968_832
    gpt2 = count_params(ModelConfig(preset="gpt2-124m"))
    assert gpt2.total == 124_439_808
    assert gpt2.total - gpt2.position == 123_653_376  # nanoGPT's "123.65M"
    assert round(count_params(ModelConfig(preset="smollm2-135m")).total / 1e6, 1) == 134.5
    llama2_7b = ModelConfig(
        n_layer=32,
        n_head=32,
        d_model=4096,
        vocab_size=32000,
        max_seq_len=4096,
        tie_embeddings=False,
    )
    assert count_params(llama2_7b).total == 6_738_415_616


def test_flops_per_token_matches_reference_section_2():
    cfg = ModelConfig(preset="llama-1.36b")
    assert flops_per_token(cfg, 2048) == pytest.approx(8.784e9, abs=0.0005e9)
    assert flops_per_token(cfg, 2048, "torchtitan") == pytest.approx(8.342e9, abs=0.0005e9)
    assert flops_per_token(cfg, 2048, "detailed") == pytest.approx(
        3 * sum(forward_flops(cfg, 2048, causal=True).values())
    )
    with pytest.raises(StokerError, match="known: palm"):
        flops_per_token(cfg, 2048, "nanogpt-ish")


def counted_flops(model, x, backward: bool) -> int:
    """FlopCounterMode's count; the math SDPA backend makes attention visible on CPU/meta."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = model(x)
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_forward_and_training_flops_within_2_percent_of_flop_counter(arch):
    cfg = ModelConfig(
        arch=arch,
        n_layer=2,
        n_head=4,
        n_kv_head=2 if arch == "llama" else None,
        d_model=64,
        vocab_size=320,
        max_seq_len=32,
        bias=arch == "gpt2",
    )
    B, T = 2, 32
    x = torch.randint(0, cfg.vocab_size, (B, T))
    model = build_model(cfg)
    analytic = B * T * sum(forward_flops(cfg, T, causal=False).values())
    assert counted_flops(model, x, False) == pytest.approx(analytic, rel=0.02)
    assert counted_flops(model, x, True) == pytest.approx(3 * analytic, rel=0.02)
    causal = B * T * sum(forward_flops(cfg, T, causal=True).values())
    assert causal < analytic  # the masked half of q·kᵀ and softmax·v is not work


def test_full_size_forward_flops_on_meta_match_flop_counter():
    cfg = ModelConfig(preset="llama-1.36b")
    T = 2048
    counted = counted_flops(
        build_model(cfg, "meta"), torch.zeros(1, T, dtype=torch.long, device="meta"), False
    )
    assert counted == pytest.approx(T * sum(forward_flops(cfg, T, causal=False).values()), rel=0.02)
    # torchtitan's 6N + 12LHQT is exactly 3× the matmuls FlopCounterMode sees here;
    # PaLM with N = all params also counts the embedding lookup as a matmul (+5%).
    assert 3 * counted / T == pytest.approx(flops_per_token(cfg, T, "torchtitan"), rel=1e-3)
    assert flops_per_token(cfg, T, "palm") / (3 * counted / T) == pytest.approx(1.053, abs=1e-3)


def test_mor_sharing_params_match_reference_section_4():
    def millions(p):  # docs/mor.md rounds to 0.1M (167.1M is 167,149,440 blocks + 960 norm)
        return pytest.approx(p * 1e6, abs=0.051e6)

    smollm = ModelConfig(preset="smollm-360m")
    assert count_params(smollm).non_embedding == millions(314.6)
    assert count_params(smollm).embedding == millions(47.2)
    rec2 = count_params_shared(smollm, 2, "middle_cycle")
    assert rec2.n_layer == 17 and rec2.non_embedding == millions(167.1)
    assert count_params_shared(smollm, 3, "middle_cycle").non_embedding == millions(118.0)
    deeper = ModelConfig(preset="smollm-360m", n_layer=34)
    assert count_params_shared(deeper, 4, "middle_sequence").non_embedding == millions(98.3)
    assert count_params_shared(smollm, 4, "cycle").n_layer == 8
    assert count_params_shared(smollm, 1, "cycle").total == count_params(smollm).total
    with pytest.raises(StokerError, match="divisible"):
        count_params_shared(smollm, 3, "cycle")
    with pytest.raises(StokerError, match="known: cycle"):
        count_params_shared(smollm, 2, "spiral")


def test_lora_params_match_model_linear_shapes():
    cfg = ModelConfig(preset="tiny-llama")
    model = build_model(cfg, "meta")
    targets = ("q_proj", "v_proj", "down_proj")
    expected = sum(
        8 * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if name.endswith(targets)
    )
    assert count_lora_params(cfg, 8, targets) == expected
    assert count_lora_params(cfg, 8, targets, adapters=3) == 3 * expected
    with pytest.raises(StokerError, match="unknown LoRA target"):
        count_lora_params(cfg, 8, ("qkv",))


def _from_param(t: torch.Tensor) -> bool:
    """True for a weight's autocast copy or view (counted as weight copies, not activations)."""
    fn = t.grad_fn
    while fn is not None and fn.name() in ("TBackward0", "ToCopyBackward0", "ViewBackward0"):
        fn = fn.next_functions[0][0]
    return fn is not None and fn.name() == "torch::autograd::AccumulateGrad"


def saved_activation_bytes(cfg: ModelConfig, mode: str, B: int, T: int) -> int:
    """Bytes of distinct storages autograd saves in one forward + loss, weights excluded."""
    model = build_model(cfg)
    model.fused_loss = True  # as `train.fused_loss: auto` sets it on the GPUs the plan is for
    if mode == "low":
        model = model.to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if (
            s.data_ptr() not in params
            and not (t.is_leaf and t.requires_grad)
            and not _from_param(t)
        ):
            saved[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (B, T))
    # bf16 runs train under autocast whatever holds the weights (train/loop.py)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        model(x, targets=x)  # the loss as the LM task computes it (fused under autocast)
    return sum(saved.values())


@pytest.mark.parametrize("mode", ["fp32", "autocast", "low"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_activation_estimate_within_5_percent_of_saved_tensors(arch, mode):
    cfg = ModelConfig(
        arch=arch,
        n_layer=2,
        n_head=4,
        n_kv_head=2 if arch == "llama" else None,
        d_model=64,
        vocab_size=320,
        max_seq_len=24,
        tie_embeddings=False,
    )
    B, T = 2, 24
    head = head_activation_bytes(cfg, mode)
    estimate = B * T * (cfg.n_layer * layer_activation_bytes(cfg, mode) + head["saved"])
    estimate += head["fixed"]
    assert saved_activation_bytes(cfg, mode, B, T) == pytest.approx(estimate, rel=0.05)


def test_memory_states_are_16_bytes_per_param_and_shard_as_documented():
    cfg = ModelConfig(preset="llama-1.36b")
    n = count_params(cfg).total
    ddp = estimate_memory(cfg, "ddp", 4, 1, 2048)
    assert ddp.states == 16 * n and round(ddp.states / 1e9, 1) == 20.7  # docs/scaling.md §3
    zero1 = estimate_memory(cfg, "zero1", 4, 1, 2048)
    assert zero1.optimizer == 8 * n / 4 and zero1.weights == 4 * n
    fsdp2 = estimate_memory(cfg, "fsdp2", 4, 1, 2048)
    assert fsdp2.states == 16 * n / 4
    assert ddp.activations_checkpointed < ddp.activations
    fixed = head_activation_bytes(cfg, "autocast")["fixed"]  # the fused head's weight grad
    assert fixed == 4 * cfg.vocab_size * cfg.d_model
    assert estimate_memory(cfg, "ddp", 4, 2, 2048).activations - fixed == 2 * (
        ddp.activations - fixed
    )
    fp32 = estimate_memory(cfg, "ddp", 1, 1, 2048, precision="fp32")
    assert fp32.weight_copies == 0 and fp32.activations > ddp.activations
    with pytest.raises(StokerError, match="known: ddp"):
        estimate_memory(cfg, "zero3")


def test_conventions_are_documented():
    cfg = ModelConfig(preset="gpt2-124m")
    values = {c: flops_per_token(cfg, 1024, c) for c in CONVENTIONS}
    assert values["palm"] > values["nanogpt"] > values["torchtitan"] > values["kaplan"]
