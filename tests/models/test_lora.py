"""LoRA invariants (models/lora.py): B = 0 is the base model bit for bit, training moves only
adapters, merged = unmerged, adapters are small, shared layers get one shared adapter, and
every documented bad input is one StokerError. CPU, float32, tiny shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from stoker.config import LoRAConfig, ModelConfig, MoRConfig, validate_config
from stoker.errors import StokerError
from stoker.models.gpt import build_model, lm_loss
from stoker.models.lora import (
    LoRALinear,
    apply_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    name_matches,
    unmerge_lora,
)
from stoker.models.mor import build_mor

V, B, T = 97, 2, 12
SHAPE = dict(n_layer=2, n_head=4, d_model=32, vocab_size=V, max_seq_len=32)


def make(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        return build_model(
            ModelConfig(arch="llama", n_kv_head=2, d_ff=64, tie_embeddings=False, **SHAPE)
        )
    if kind == "qwen2":
        return build_model(ModelConfig(arch="llama", n_kv_head=2, d_ff=64, qkv_bias=True, **SHAPE))
    if kind == "gpt2":
        return build_model(ModelConfig(arch="gpt2", bias=True, **SHAPE))
    cfg = ModelConfig(arch="llama", n_kv_head=2, d_ff=64, **{**SHAPE, "n_layer": 4})
    return build_mor(cfg, MoRConfig(recursions=2, sharing="cycle", router="expert"))


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(0.1 * torch.randn(m.lora_B.shape, generator=gen))


KINDS = ["llama", "qwen2", "gpt2", "mor"]


# ----------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapters_give_the_base_logits_bitwise(kind, targets):
    model = make(kind).eval()
    x = ids()
    with torch.no_grad():
        base = model(x)
        names = apply_lora(model, LoRAConfig(targets=targets, dropout=0.1))
        assert names and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
        assert not any(m.training for m in model.modules())  # wrappers keep eval mode
        assert torch.equal(model(x), base)
        randomize_b(model)  # and the adapters are really in the forward path
        assert not torch.allclose(model(x), base, atol=1e-3)


@pytest.mark.parametrize("kind", ["llama", "mor"])
def test_training_moves_every_adapter_and_no_frozen_tensor(kind):
    model = make(kind)
    apply_lora(model, LoRAConfig(targets="all-linear", r=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all(n.endswith((".lora_A", ".lora_B")) for n in adapters)
    # every parameter goes to the optimizer, with weight decay: frozen ones must get no grad
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, before = ids(), None
    for step in range(20):
        loss = lm_loss(model(x)[:, :-1], x[:, 1:])
        if kind == "mor":
            loss = loss + model.auxiliary_loss()
        before = float(loss.detach()) if step == 0 else before
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in frozen.items())
    assert all(not torch.equal(params[n], t) for n, t in adapters.items())
    with torch.no_grad():
        assert float(lm_loss(model(x)[:, :-1], x[:, 1:])) < before - 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_merged_equals_unmerged_and_unmerge_restores_the_base(kind):
    model = make(kind).eval()
    apply_lora(model, LoRAConfig(targets="all-linear", r=4, alpha=8))
    randomize_b(model)
    base = {n: m.weight.detach().clone() for n, m in lora_layers(model).items()}
    x = ids()
    with torch.no_grad():
        want = model(x)
        merge_lora(model)
        merge_lora(model)  # idempotent
        assert any(not torch.equal(m.weight, base[n]) for n, m in lora_layers(model).items())
        assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
        for n, m in lora_layers(model).items():
            assert_close(m.weight, base[n], atol=1e-6, rtol=0)
        assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_merged_layer_refuses_to_train():
    model = make("llama")
    apply_lora(model, LoRAConfig())
    merge_lora(model)
    with pytest.raises(StokerError, match="unmerge_lora"):
        model(ids())


def test_dropout_acts_on_the_adapter_input_only():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    layer = LoRALinear(lin, r=4, alpha=4.0, dropout=0.5).train()
    x = torch.randn(3, 5, 16)
    assert torch.equal(layer(x), lin(x))  # B = 0: dropout cannot reach the base path
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    mask_x = F.dropout(x, 0.5, training=True)
    assert_close(y, lin(x) + (mask_x @ layer.lora_A.T) @ layer.lora_B.T, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.eval()(x), layer(x))  # eval: no dropout


def test_lora_init_matches_peft_and_linear():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 32), r=16, alpha=16.0)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) on fan_in 64, as nn.Linear and PEFT
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert torch.equal(layer.lora_B, torch.zeros(32, 16))


# ----------------------------------------------------------------------------- scales, ranks
def test_rslora_scale_is_alpha_over_sqrt_r():
    torch.manual_seed(0)
    lin = nn.Linear(8, 8, bias=False)
    plain, rs = (LoRALinear(lin, r=4, alpha=8.0, rslora=f) for f in (False, True))
    assert (plain.scale, rs.scale) == (2.0, 4.0)
    with torch.no_grad():
        rs.lora_B.normal_()
    x = torch.randn(2, 8)
    assert_close(rs(x) - lin(x), 4.0 * x @ rs.lora_A.T @ rs.lora_B.T, atol=1e-5, rtol=1e-5)
    model = make("llama")
    apply_lora(model, LoRAConfig(r=16, alpha=8, rslora=True))
    assert {m.scale for m in lora_layers(model).values()} == {2.0}


def test_per_target_ranks_first_matching_pattern_wins():
    model = make("llama")
    cfg = LoRAConfig(targets="all-linear", r=8, ranks={"v_proj": 2, "layers.1.*": 4, "mlp.*": 3})
    apply_lora(model, cfg)
    r = {n: m.r for n, m in lora_layers(model).items()}
    assert r["layers.0.self_attn.v_proj"] == r["layers.1.self_attn.v_proj"] == 2
    assert r["layers.1.self_attn.q_proj"] == r["layers.1.mlp.up_proj"] == 4
    assert r["layers.0.mlp.down_proj"] == 3 and r["layers.0.self_attn.o_proj"] == 8
    m = lora_layers(model)["layers.0.mlp.down_proj"]
    assert m.lora_A.shape == (3, 64) and m.lora_B.shape == (32, 3) and m.scale == 16 / 3


def test_patterns_match_names_or_dotted_suffixes():
    name = "layers.0.self_attn.q_proj"
    assert name_matches(name, "q_proj") and name_matches(name, "self_attn.*")
    assert name_matches(name, "layers.0.*") and name_matches(name, "*_proj")
    assert not name_matches(name, "layers.1.*") and not name_matches(name, "proj")
    assert not name_matches("layers.0.self_attn.xq_proj", "q_proj")


# ----------------------------------------------------------------------------- sharing
def test_shared_module_is_wrapped_once_and_its_adapter_shared():
    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(8, 8)
            self.again = self.first  # the same module under a second name
            self.stack = nn.Sequential(nn.Linear(8, 8), self.first)

        def forward(self, x):
            return self.stack(self.again(self.first(x)))

    net = TwoPaths()
    names = apply_lora(net, LoRAConfig(targets="all-linear", r=2))
    assert names == ["first", "stack.0"]
    assert net.first is net.again is net.stack[1] and isinstance(net.first, LoRALinear)
    assert list(lora_state_dict(net)) == [
        "first.lora_A",
        "first.lora_B",
        "stack.0.lora_A",
        "stack.0.lora_B",
    ]


def test_mor_shared_blocks_carry_one_adapter_per_unique_layer():
    model = make("mor")
    names = apply_lora(model, LoRAConfig())
    assert len(model.plan) == 4 and len(model.layers) == 2  # each block applied twice
    assert names == [f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert len(lora_state_dict(model)) == 8


def test_any_module_with_linear_children_adapts():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(5, 16)
    want = enc(x)
    assert apply_lora(enc, LoRAConfig(targets=["0", "2"], r=2)) == ["0", "2"]
    assert torch.equal(enc(x), want)
    assert [n for n, p in enc.named_parameters() if p.requires_grad] == [
        "0.lora_A",
        "0.lora_B",
        "2.lora_A",
        "2.lora_B",
    ]


# ----------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_smollm2_135m_adapter_is_under_five_percent_of_the_base(targets):
    model = build_model(ModelConfig(preset="smollm2-135m"), device="meta")
    base = sum(p.numel() * p.element_size() for p in model.parameters())
    apply_lora(model, LoRAConfig(r=8, targets=targets))
    sd = lora_state_dict(model)
    adapter = sum(t.numel() * t.element_size() for t in sd.values())
    C, KV, F_, L = 576, 192, 1536, 30  # per layer: A (r, in) + B (out, r) per target
    per = {
        "q_proj": 8 * (C + C),
        "v_proj": 8 * (C + KV),
        "k_proj": 8 * (C + KV),
        "o_proj": 8 * (C + C),
        "gate_proj": 8 * (C + F_),
        "up_proj": 8 * (C + F_),
        "down_proj": 8 * (F_ + C),
    }
    kinds = per if targets == "all-linear" else targets
    assert adapter == 4 * L * sum(per[k] for k in kinds)
    assert adapter < 0.05 * base
    assert "lm_head.lora_A" not in sd


def test_adapter_state_dict_round_trips():
    model, other = make("qwen2"), make("qwen2", seed=3)
    for m in (model, other):
        apply_lora(m, LoRAConfig(targets="all-linear", r=4))
    randomize_b(model)
    load_lora_state_dict(other, lora_state_dict(model))
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            lora_state_dict(other).values(), lora_state_dict(model).values(), strict=True
        )
    )
    assert all(not k.endswith((".weight", ".bias")) for k in lora_state_dict(model))


# ----------------------------------------------------------------------------- bad input
def test_targets_matching_nothing_list_the_linear_layers():
    with pytest.raises(StokerError) as e:
        apply_lora(make("llama"), LoRAConfig(targets=["qkv", "attn.c_attn"]))
    msg = str(e.value)
    assert "\n" not in msg and "qkv,attn.c_attn" in msg
    assert msg.endswith("q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head")


def test_all_linear_leaves_the_lm_head_alone():
    untied = make("llama")  # an untied head is a plain nn.Linear, excluded by being the head
    names = apply_lora(untied, LoRAConfig(targets="all-linear"))
    assert len(names) == 14 and not any("lm_head" in n for n in names)
    assert isinstance(untied.lm_head, nn.Linear) and not untied.lm_head.weight.requires_grad
    gpt2 = apply_lora(make("gpt2"), LoRAConfig(targets="all-linear"))  # tied head: also out
    assert len(gpt2) == 12 and not any("lm_head" in n for n in gpt2)


def test_tied_head_is_refused_and_untied_head_may_be_targeted():
    with pytest.raises(StokerError, match="tied to embed_tokens.weight"):
        apply_lora(make("qwen2"), LoRAConfig(targets=["lm_head"]))
    assert apply_lora(make("llama"), LoRAConfig(targets=["lm_head"])) == ["lm_head"]


def test_bad_ranks_configs_and_mismatched_state_dicts_are_one_line_errors():
    with pytest.raises(StokerError, match="lora.ranks pattern"):
        apply_lora(make("llama"), LoRAConfig(ranks={"up_proj": 2}))  # not among q/v
    with pytest.raises(StokerError, match="lora.targets"):
        validate_config({"targets": ""}, LoRAConfig)
    with pytest.raises(StokerError, match="r"):
        validate_config({"r": 0}, LoRAConfig)
    assert validate_config({"targets": "q_proj, o_proj"}, LoRAConfig).targets == [
        "q_proj",
        "o_proj",
    ]
    model, other = make("llama"), make("llama")
    apply_lora(model, LoRAConfig(r=4))
    apply_lora(other, LoRAConfig(r=2))
    with pytest.raises(StokerError, match="ranks differ"):
        load_lora_state_dict(other, lora_state_dict(model))
    with pytest.raises(StokerError, match="missing"):
        load_lora_state_dict(other, {})
    with pytest.raises(StokerError, match="no LoRA layers"):
        merge_lora(make("gpt2"))


def test_frozen_linears_stored_in_bf16_give_the_autocast_step_bit_for_bit():
    """Under bf16 autocast a frozen base stored in bf16 computes what autocast computes from
    fp32 weights: the same loss and the same adapter gradients, exactly; tied embedding
    weights, norms and the adapters keep their dtype."""
    import copy

    from stoker.models.gpt import build_model, lm_loss
    from stoker.models.lora import apply_lora, store_frozen_linears

    cfg = ModelConfig(preset="tiny-llama", tie_embeddings=True)
    torch.manual_seed(0)
    ref = build_model(cfg)
    apply_lora(ref, LoRAConfig(targets="all-linear"))
    for p in ref.parameters():  # B = 0 at init would hide gradient differences
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    stored = copy.deepcopy(ref)
    n = store_frozen_linears(stored, torch.bfloat16)
    linears = [m for m in stored.modules() if isinstance(m, torch.nn.Linear | LoRALinear)]
    assert n == len([m for m in linears if m is not stored.lm_head])  # tied head skipped
    assert stored.lm_head.weight.dtype == stored.embed_tokens.weight.dtype == torch.float32
    assert stored.norm.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in stored.parameters() if p.requires_grad)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for model in (ref, stored):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        loss.backward()
        losses.append(loss)
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
