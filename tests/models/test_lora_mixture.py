"""Mixture-of-LoRA invariants (models/lora_mixture.py): zero gates = base bit for bit, a
one-hot gate = that adapter alone as a plain LoRALinear, any gates = the gate-weighted sum of
single adapters, a mixed batch = each example alone, exact gate gradients (gradcheck,
float64), per-layer gates, and one-line errors for missing or misshapen gates."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from stoker.config import LoRAConfig, ModelConfig, MoRConfig
from stoker.errors import StokerError
from stoker.models.gpt import build_model, lm_loss
from stoker.models.lora import LoRALinear, merge_lora
from stoker.models.lora_mixture import (
    LoRAMixtureLinear,
    apply_lora_mixture,
    mixture_layers,
    set_gates,
    use_gates,
)
from stoker.models.mor import build_mor

V, B, T = 97, 3, 10
RANKS = [2, 4, 3]
E = len(RANKS)
TOL = dict(atol=1e-6, rtol=1e-6)


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(
        arch="llama",
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        d_model=32,
        d_ff=64,
        vocab_size=V,
        max_seq_len=32,
        **kw,
    )


def randomize(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in mixture_layers(model).values():
            m.lora_B.copy_(0.2 * torch.randn(m.lora_B.shape, generator=gen, dtype=m.lora_B.dtype))


def mixed_model(seed: int = 0, **cfg) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(model_cfg()).eval()
    apply_lora_mixture(model, RANKS, LoRAConfig(targets="all-linear", alpha=8, **cfg))
    randomize(model)
    return model


def ids(seed: int = 0, n: int = B) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def single(mix: LoRAMixtureLinear, e: int) -> LoRALinear:
    """Adapter e of a mixture layer as a plain LoRALinear with the same A_e, B_e."""
    lin = nn.Linear(mix.in_features, mix.out_features, bias=mix.bias is not None)
    lin.weight, lin.bias = mix.weight, mix.bias
    one = LoRALinear(lin, mix.ranks[e], mix.alpha, rslora=mix.rslora)
    A, Bm = mix.adapter(e)
    with torch.no_grad():
        one.lora_A.copy_(A)
        one.lora_B.copy_(Bm)
    return one


# ----------------------------------------------------------------------------- layer level
def test_any_gates_equal_the_gate_weighted_sum_of_single_adapters():
    torch.manual_seed(0)
    mix = LoRAMixtureLinear(nn.Linear(16, 12), RANKS, alpha=6.0, rslora=True)
    with torch.no_grad():
        mix.lora_B.normal_()
    x, g = torch.randn(B, T, 16), torch.randn(B, E)
    mix.gates = g
    base = nn.functional.linear(x, mix.weight, mix.bias)
    want = base + sum(g[:, e, None, None] * (single(mix, e)(x) - base) for e in range(E))
    assert_close(mix(x), want, atol=1e-5, rtol=1e-5)
    assert mix.lora_A.shape == (9, 16) and mix.lora_B.shape == (12, 9)


def test_gate_gradients_match_finite_differences():
    torch.manual_seed(0)
    mix = LoRAMixtureLinear(nn.Linear(6, 5, dtype=torch.float64), [1, 3], alpha=4.0)
    with torch.no_grad():
        mix.lora_B.normal_()
    x = torch.randn(2, 4, 6, dtype=torch.float64)

    def f(gates):
        mix.gates = gates
        return mix(x)

    g = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (g,), eps=1e-6, atol=1e-8)


def test_gate_gradients_through_a_whole_model_match_finite_differences():
    """GPT-2 flavour: LayerNorm and GELU run in float64 (our RMSNorm upcasts only to float32)."""
    torch.manual_seed(0)
    cfg = model_cfg().model_copy(update={"arch": "gpt2", "n_kv_head": None, "d_ff": None})
    model = build_model(cfg).double().eval()
    apply_lora_mixture(model, [2, 1], LoRAConfig(targets=["q_proj", "down_proj"]))
    randomize(model)
    x = ids(n=2)

    def f(gates):  # a float64 loss (lm_loss computes in float32, too coarse here)
        with use_gates(model, gates):
            logits = model(x)[:, :-1]
        return nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())

    g = torch.rand(2, 2, 2, dtype=torch.float64, requires_grad=True)  # per layer (B, L, E)
    assert torch.autograd.gradcheck(f, (g,), eps=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- model level
def test_zero_gates_give_the_base_model_bitwise():
    model = mixed_model(dropout=0.2)
    x = ids()
    with torch.no_grad():
        with use_gates(model, torch.zeros(B, E)):
            got = model(x)
        with use_gates(model, torch.ones(B, E)):
            assert not torch.allclose(model(x), got, atol=1e-3)  # the adapters are in the path
    torch.manual_seed(0)
    base = build_model(model_cfg()).eval()
    with torch.no_grad():
        assert torch.equal(got, base(x))


@pytest.mark.parametrize("e", range(E))
def test_one_hot_gates_equal_that_adapter_alone(e):
    model = mixed_model()
    x = ids()
    with torch.no_grad(), use_gates(model, nn.functional.one_hot(torch.full((B,), e), E).float()):
        got = model(x)
    for name, mix in list(mixture_layers(model).items()):  # now swap in single adapters
        model.set_submodule(name, single(mix, e).eval())
    with torch.no_grad():
        assert_close(got, model(x), **TOL)


def test_a_mixed_batch_equals_each_example_alone():
    model = mixed_model()
    x, g = ids(), torch.tensor([[1.0, 0.0, 0.0], [0.3, -0.5, 1.2], [0.0, 0.0, 2.0]])
    with torch.no_grad():
        with use_gates(model, g):
            batch = model(x)
        for b in range(B):
            with use_gates(model, g[b : b + 1]):
                assert_close(batch[b : b + 1], model(x[b : b + 1]), **TOL)


def test_per_layer_gates_as_tensor_or_dict_and_a_zero_layer_is_unadapted():
    model = mixed_model()
    x, g = ids(), torch.rand(B, 2, E)
    with torch.no_grad():
        with use_gates(model, g):
            tensor = model(x)
        with use_gates(model, {0: g[:, 0], 1: g[:, 1]}):
            assert torch.equal(model(x), tensor)
        with use_gates(model, g[:, 0]):  # shared gates differ from per-layer ones
            assert not torch.allclose(model(x), tensor, atol=1e-4)
        zero1 = torch.stack([g[:, 0], torch.zeros(B, E)], dim=1)  # (B, L, E)
        with use_gates(model, zero1):
            want = model(x)
        for mix in mixture_layers(model).values():  # layer 1 without adapters instead
            if mix.layer == 1:
                mix.lora_B.zero_()
        with use_gates(model, g[:, 0]):
            assert torch.equal(model(x), want)


def test_training_through_gates_moves_adapters_and_router_only():
    model = mixed_model()
    model.train()
    router = nn.Linear(T, E)  # a toy per-example router on the token ids
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([*model.parameters(), *router.parameters()], lr=1e-2)
    x = ids()
    for _ in range(5):
        with use_gates(model, router(x.float()).softmax(-1)):
            loss = lm_loss(model(x)[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        assert router.weight.grad.abs().sum() > 0
        opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in frozen.items())
    assert all(n.endswith((".lora_A", ".lora_B")) for n, p in params.items() if p.requires_grad)


def test_mor_shared_blocks_share_their_mixture_and_layer_index():
    torch.manual_seed(0)
    cfg = model_cfg().model_copy(update={"n_layer": 4})
    model = build_mor(cfg, MoRConfig(recursions=2, sharing="cycle", router="none")).eval()
    x = ids()
    with torch.no_grad():
        base = model(x)
        names = apply_lora_mixture(model, [2, 2])
        assert {mixture_layers(model)[n].layer for n in names} == {0, 1}
        with use_gates(model, torch.zeros(B, 2, 2)):
            assert torch.equal(model(x), base)


# ----------------------------------------------------------------------------- bad input
def test_missing_or_misshapen_gates_are_one_line_errors():
    model = mixed_model()
    x = ids()
    with pytest.raises(StokerError, match="need gates"):
        model(x)
    with pytest.raises(StokerError, match=r"expected \(batch, 3\)"):
        set_gates(model, torch.zeros(B, 2))
    with pytest.raises(StokerError, match="no entry for layer 1"):
        set_gates(model, {0: torch.zeros(B, E)})
    with pytest.raises(StokerError, match="L=1"):
        set_gates(model, torch.zeros(B, 1, E))
    assert all(m.gates is None for m in mixture_layers(model).values())  # nothing half-set
    set_gates(model, torch.zeros(B + 1, E))
    with pytest.raises(StokerError, match="4 examples, the batch has 3"):
        model(x)
    with pytest.raises(StokerError, match="no LoRA mixture layers"):
        set_gates(build_model(model_cfg()), torch.zeros(B, E))
    with pytest.raises(StokerError, match="no merged weight"):
        merge_lora(model)
    with pytest.raises(StokerError, match="positive ranks"):
        apply_lora_mixture(build_model(model_cfg()), [])
    with pytest.raises(StokerError, match="lora.ranks"):
        apply_lora_mixture(build_model(model_cfg()), [2], LoRAConfig(ranks={"q_proj": 2}))
    top = nn.ModuleDict({"head": nn.Linear(4, 4)})
    apply_lora_mixture(top, [1], LoRAConfig(targets=["head"]))
    with pytest.raises(StokerError, match="no layer index"):
        set_gates(top, torch.zeros(1, 1, 1))
