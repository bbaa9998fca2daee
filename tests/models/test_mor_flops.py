"""MoR accounting: capacity-aware analytic FLOPs against torch's FlopCounterMode, the
FLOPs ratios to the vanilla decoder, and the memory estimate's use of shared weights."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from stoker.config import ModelConfig, MoRConfig
from stoker.models.mor import build_mor
from stoker.scaling.flops import (
    estimate_memory,
    flops_per_token,
    forward_flops,
    layer_activation_bytes,
    mor_flops_per_token,
    mor_forward_flops,
    mor_token_counts,
)


def counted_flops(model, x, backward: bool) -> int:
    """FlopCounterMode's count; the math SDPA backend makes attention visible on CPU."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = model(x)
        if backward:
            (out.float().sum() + model.auxiliary_loss()).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize(
    "mor",
    [
        dict(router="expert", recursions=2, sharing="middle_cycle"),
        dict(router="expert", recursions=2, sharing="middle_cycle", router_hidden=32),
        dict(router="expert", recursions=3, sharing="cycle"),
        dict(router="expert", recursions=3, sharing="cycle", kv_cache="shared"),
        dict(router="none", recursions=2, sharing="middle_cycle", kv_cache="shared"),
    ],
    ids=lambda m: (
        f"{m['router']}{'-mlp' if m.get('router_hidden') else ''}-R{m['recursions']}-"
        f"{m.get('kv_cache', 'recursion')}"
    ),
)
def test_analytic_mor_flops_within_5_percent_of_flop_counter(mor):
    mor = MoRConfig(**mor)
    cfg = ModelConfig(
        arch="llama",
        n_layer=6 if mor.recursions == 3 else 8,
        n_head=4,
        n_kv_head=2,
        d_model=64,
        d_ff=192,
        vocab_size=320,
        max_seq_len=48,
    )
    B, T = 2, 48
    torch.manual_seed(0)
    model = build_mor(cfg, mor)
    x = torch.randint(0, cfg.vocab_size, (B, T))
    analytic = B * T * sum(mor_forward_flops(cfg, mor, T, causal=False).values())
    assert counted_flops(model, x, False) == pytest.approx(analytic, rel=0.05)  # exact today
    assert counted_flops(model, x, True) == pytest.approx(3 * analytic, rel=0.05)


def test_flops_ratios_to_vanilla_at_reference_scale():
    """docs/mor.md quotes ≈0.748 (MoR-2) and ≈0.667 (MoR-3) of vanilla per token for
    the layers; linear ∝ capacity, attention ∝ capacity² (recursion-wise caching)."""
    cfg, T = ModelConfig(preset="smollm-360m"), 2048
    vanilla = forward_flops(cfg, T)
    layers = sum(vanilla.values()) - vanilla["lm_head"]
    ratios = []
    for R in (2, 3):
        mor = MoRConfig(recursions=R)
        f = mor_forward_flops(cfg, mor, T)
        ratios.append((sum(f.values()) - f["lm_head"] - f["router"]) / layers)
    assert ratios == [pytest.approx(0.748, abs=0.005), pytest.approx(0.667, abs=0.005)]
    assert mor_token_counts(MoRConfig(recursions=3), 12) == [12, 8, 4]
    base = MoRConfig(recursions=2, router="none")
    assert mor_flops_per_token(cfg, base, T) == pytest.approx(flops_per_token(cfg, T))
    assert mor_flops_per_token(cfg, MoRConfig(recursions=2), T) < 0.8 * flops_per_token(cfg, T)


def test_memory_estimate_counts_unique_weights_and_capacity_weighted_activations():
    cfg = ModelConfig(preset="smollm-360m")
    plain = estimate_memory(cfg, "ddp", 1, 4, 2048)
    rec = estimate_memory(cfg, "ddp", 1, 4, 2048, mor=MoRConfig(recursions=2, router="none"))
    mor = estimate_memory(cfg, "ddp", 1, 4, 2048, mor=MoRConfig(recursions=2))
    assert rec.weights < 0.6 * plain.weights and rec.activations == plain.activations
    saved = 15 * 0.5 * 4 * 2048 * layer_activation_bytes(cfg, "autocast")  # half of 15 layers
    assert plain.activations - mor.activations == pytest.approx(saved)
