"""Mixture-of-Recursions model invariants (docs/mor.md): real tying, R = 1 = plain stack,
expert-choice and token-choice routing against step-by-step reference implementations,
capacities, untouched unselected tokens, router gradients and losses by hand, KV sharing."""

import math

import pytest
import torch
import torch.nn.functional as F

from stoker.config import ModelConfig, MoRConfig
from stoker.errors import StokerError
from stoker.models.gpt import apply_rope, build_model
from stoker.models.mor import _Pass, build_mor, sharing_plan
from stoker.models.mor_routing import balance_loss, capacity, expert_bce, z_loss
from stoker.scaling.flops import count_params, count_params_shared, mor_router_params

V = 97


def tiny_cfg(n_layer: int = 6, **kw) -> ModelConfig:
    base = dict(
        arch="llama",
        n_layer=n_layer,
        n_head=4,
        n_kv_head=2,
        d_model=32,
        d_ff=64,
        vocab_size=V,
        max_seq_len=32,
    )
    return ModelConfig(**{**base, **kw})


def tiny_mor(n_layer: int = 6, seed: int = 0, **mor) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_mor(tiny_cfg(n_layer), MoRConfig(**mor))


def expanded_decoder(model) -> torch.nn.Module:
    """A plain decoder with one untied layer per applied layer, weights copied by the plan."""
    dec = build_model(model.config)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}
    for j, u in enumerate(model.plan):
        sd.update({f"layers.{j}.{k}": v for k, v in model.layers[u].state_dict().items()})
    dec.load_state_dict(sd)
    return dec


# ----------------------------------------------------------------------------------- sharing
def test_sharing_plans_follow_reference_definitions():
    assert sharing_plan(6, 2, "cycle") == [0, 1, 2, 0, 1, 2]  # layer i + r·B tied
    assert sharing_plan(6, 2, "sequence") == [0, 0, 1, 1, 2, 2]  # layers i·R … i·R+R−1 tied
    assert sharing_plan(8, 3, "middle_cycle") == [0, 1, 2, 1, 2, 1, 2, 3]
    assert sharing_plan(8, 3, "middle_sequence") == [0, 1, 1, 1, 2, 2, 2, 3]
    plan = sharing_plan(32, 2, "middle_cycle")  # SmolLM-360M rec2: 0, 15-layer block ×2, 31
    assert plan[0] == 0 and plan[-1] == 16 and plan[1:16] == plan[16:31] == list(range(1, 16))
    with pytest.raises(StokerError, match="divisible by recursions=3"):
        sharing_plan(32, 3, "cycle")


@pytest.mark.parametrize(
    "sharing,n,R",
    [("cycle", 6, 2), ("sequence", 6, 2), ("middle_cycle", 8, 3), ("middle_sequence", 8, 3)],
)
def test_tied_layers_share_parameters_and_sum_their_gradients(sharing, n, R):
    """Recursive baseline = the plain stack with every applied layer a copy of its block, and
    each shared Parameter's gradient is the sum over the applied layers it serves
    (attention, MLP and norms: every parameter of the block)."""
    model = tiny_mor(n, recursions=R, sharing=sharing, router="none")
    dec = expanded_decoder(model)
    x = torch.randint(0, V, (2, 12))
    torch.testing.assert_close(model(x), dec(x), rtol=0, atol=0)
    model(x).square().mean().backward()
    dec(x).square().mean().backward()
    assert len(model.layers) == max(model.plan) + 1 < len(model.plan)
    for u, block in enumerate(model.layers):
        users = [j for j, uu in enumerate(model.plan) if uu == u]
        for name, p in block.named_parameters():
            want = sum(dec.layers[j].get_parameter(name).grad for j in users)
            torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)
    names = {n for n, _ in model.named_parameters()}
    assert "layers.1.self_attn.q_proj.weight" in names and not any("layers.9" in n for n in names)


@pytest.mark.parametrize("hidden", [0, 24], ids=["linear", "mlp"])
@pytest.mark.parametrize("router", ["expert", "token", "none"])
@pytest.mark.parametrize("sharing,R", [("cycle", 3), ("middle_cycle", 2), ("sequence", 2)])
def test_unique_parameter_count_equals_analytic(router, sharing, R, hidden):
    router = "none" if sharing == "sequence" else router
    cfg, mor = (
        tiny_cfg(8 if sharing == "middle_cycle" else 6),
        MoRConfig(recursions=R, sharing=sharing, router=router, router_hidden=hidden),
    )
    model = build_mor(cfg, mor, device="meta")
    want = count_params_shared(cfg, R, sharing).total + mor_router_params(cfg, mor)
    assert sum(p.numel() for p in model.parameters()) == want


def test_smollm_360m_recursion_params_match_reference_section_4():
    cfg = ModelConfig(preset="smollm-360m")
    model = build_mor(cfg, MoRConfig(recursions=2, router="none"), device="meta")
    non_embedding = sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.d_model
    assert non_embedding == count_params_shared(cfg, 2, "middle_cycle").non_embedding
    assert non_embedding == 167_150_400 and math.floor(non_embedding / 1e5) / 10 == 167.1
    assert math.floor(count_params(cfg).non_embedding / 1e5) / 10 == 314.6
    assert round(count_params_shared(cfg, 3, "middle_cycle").non_embedding / 1e6, 1) == 118.0
    deeper = cfg.model_copy(update={"n_layer": 34})
    assert round(count_params_shared(deeper, 4, "middle_cycle").non_embedding / 1e6, 1) == 98.3


@pytest.mark.parametrize("router", ["expert", "token", "none"])
@pytest.mark.parametrize("kv_cache", ["recursion", "shared"])
@pytest.mark.parametrize("sharing", ["cycle", "sequence", "middle_cycle", "middle_sequence"])
def test_one_recursion_is_exactly_the_plain_stack(router, kv_cache, sharing):
    if sharing.endswith("sequence") and kv_cache == "shared":
        return
    model = tiny_mor(6, recursions=1, sharing=sharing, router=router, kv_cache=kv_cache)
    dec = build_model(model.config)
    model.load_state_dict(dec.state_dict())
    x = torch.randint(0, V, (2, 16))
    assert torch.equal(model(x), dec(x))


# ---------------------------------------------------------------------- reference algorithms
def reference_forward(model, ids: torch.Tensor) -> torch.Tensor:
    """docs/mor.md step by step, one sequence at a time, with plain indexing: expert-choice
    top-k over the still-active tokens, sorted by position, block on the subsequence with RoPE
    at the original positions, h + g·F(h); token-choice h + p_d·F^d(h)."""
    R, edge, Bk, plan = model.recursions, model.n_edge, model.block_size, model.plan
    out = []
    for b in range(ids.shape[0]):
        T = ids.shape[1]
        pos = torch.arange(T)
        h, (cos, sin) = model.embed(ids[b : b + 1], pos)  # (1, T, C)
        for j in range(edge):
            h = model.layers[plan[j]](h, (cos, sin))

        def block(z, at, r, cos=cos, sin=sin):
            for i in range(Bk):
                z = model.layers[plan[edge + r * Bk + i]](z, (cos[at], sin[at]))
            return z

        if model.router == "expert":
            active = pos
            for r in range(R):
                logit = model.routers[r](h[0, active]).squeeze(-1)
                chosen = active[logit.topk(max(1, (R - r) * T // R)).indices].sort().values
                g = model.mor.alpha * torch.sigmoid(model.routers[r](h[0, chosen]))  # (k, 1)
                h = h.clone()
                h[0, chosen] = h[0, chosen] + g * block(h[:, chosen], chosen, r)[0]
                active = chosen
        else:
            probs = model.routers[0](h[0]).softmax(-1)  # (T, R)
            depth = probs.argmax(-1)
            state = h.clone()
            for r in range(R):
                at = pos[depth >= r]
                state[0, at] = block(state[:, at], at, r)[0]
            h = h + probs.gather(-1, depth[:, None]) * state
        for j in range(len(plan) - edge, len(plan)):
            h = model.layers[plan[j]](h, (cos, sin))
        out.append(model.lm_head(model.norm(h)))
    return torch.cat(out)


def sharpen(model, scale: float = 40.0):
    """Spread router logits so routing decisions vary from token to token."""
    with torch.no_grad():
        for r in model.routers:
            r.weight.mul_(scale)
    return model


@pytest.mark.parametrize("router", ["expert", "token"])
@pytest.mark.parametrize(
    "sharing,n,R", [("cycle", 6, 3), ("middle_cycle", 6, 2), ("middle_cycle", 8, 3)]
)
def test_routing_matches_step_by_step_reference(router, sharing, n, R):
    model = sharpen(tiny_mor(n, recursions=R, sharing=sharing, router=router))
    x = torch.randint(0, V, (3, 12))
    torch.testing.assert_close(model(x), reference_forward(model, x), rtol=1e-5, atol=1e-5)


def test_expert_selected_counts_equal_hierarchical_capacities():
    model = sharpen(tiny_mor(6, recursions=3, sharing="cycle", router="expert"))
    model(torch.randint(0, V, (4, 12)))
    sel = model.last_selected
    assert [capacity(3, r, 12) for r in range(3)] == [12, 8, 4]
    for r, want in enumerate([12, 8, 4]):
        assert (sel[r].sum(dim=1) == want).all()
        if r:
            assert not (sel[r] & ~sel[r - 1]).any()  # only still-active tokens are chosen
    assert torch.equal(model.last_depth, sel[0].long() + sel[1].long() + sel[2].long())


def test_unselected_tokens_are_bitwise_unchanged_and_selected_get_gated_update():
    model = tiny_mor(6, recursions=2, sharing="cycle", router="expert")
    torch.manual_seed(1)
    B, T, C = 3, 10, 32
    h = torch.randn(B, T, C)
    sel = torch.rand(B, T) < 0.5  # rows select different numbers of tokens
    sel[0] = False
    sel[0, 3] = True
    gate = torch.rand(B, T)
    _, rope = model.embed(torch.zeros(1, T, dtype=torch.long), torch.arange(T))
    p = _Pass(rope, torch.arange(T), None, False)

    def gated(x, y, idx):
        return x + gate.gather(1, idx)[..., None] * y

    out = model._run_block(1, h, sel, p, gated)
    assert torch.equal(out[~sel], h[~sel])
    for b in range(B):
        at = torch.nonzero(sel[b]).squeeze(1)
        z = h[b : b + 1, at]
        for i in range(model.block_size):
            z = model.layers[model.plan[model.block_size + i]](z, (rope[0][at], rope[1][at]))
        want = h[b, at] + gate[b, at, None] * z[0]
        torch.testing.assert_close(out[b, at], want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- losses, gradients
@pytest.mark.parametrize("hidden", [0, 16], ids=["linear", "mlp"])
@pytest.mark.parametrize("router", ["expert", "token"])
def test_routers_receive_gradients_from_lm_and_auxiliary_loss(router, hidden):
    model = tiny_mor(6, recursions=2, sharing="middle_cycle", router=router, router_hidden=hidden)
    weights = [p for r in model.routers for p in r.parameters()]
    assert len(weights) == len(model.routers) * (2 if hidden else 1)
    x = torch.randint(0, V, (2, 12))
    F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    assert all(w.grad.abs().sum() > 0 for w in weights)  # through the gates
    model.zero_grad()
    model(x)
    model.auxiliary_loss().backward()
    assert all(w.grad.abs().sum() > 0 for w in weights)


def test_expert_bce_by_hand():
    logit = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    cand = torch.tensor([[True, True, True, False]])
    sel = torch.tensor([[True, False, True, False]])
    want = (
        math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-0.5))
    ) / 3
    assert float(expert_bce(logit, cand, sel)) == pytest.approx(want, rel=1e-6)


def test_expert_auxiliary_loss_equals_hand_computation():
    model = sharpen(
        tiny_mor(6, recursions=3, sharing="cycle", router="expert", aux_loss_coeff=0.001), 5.0
    )
    logits = []
    for r in model.routers:
        r.register_forward_hook(lambda m, i, o: logits.append(o.squeeze(-1).detach()))
    model(torch.randint(0, V, (2, 9)))
    sel, total = model.last_selected, 0.0
    for r, logit in enumerate(logits):
        cand = torch.ones_like(sel[0]) if r == 0 else sel[r - 1]
        p = 1 / (1 + torch.exp(-logit.double()))
        bce = -(sel[r] * p.log() + (~sel[r]) * (1 - p).log())
        total += float(bce[cand].sum() / cand.sum())
    assert float(model.auxiliary_loss().detach()) == pytest.approx(0.001 * total, rel=1e-5)


def test_token_choice_gives_every_token_exactly_one_depth():
    model = sharpen(tiny_mor(8, recursions=3, sharing="middle_cycle", router="token"), 20.0)
    model(torch.randint(0, V, (4, 16)))
    depth, sel = model.last_depth, model.last_selected
    assert ((depth >= 1) & (depth <= 3)).all()
    exits = [sel[r] & ~(sel[r + 1] if r + 1 < 3 else torch.zeros_like(sel[r])) for r in range(3)]
    assert torch.equal(sum(e.long() for e in exits), torch.ones_like(depth))  # one exit each
    assert len(set(depth.flatten().tolist())) > 1  # the test is not vacuous


def test_balancing_loss_by_hand():
    probs = torch.tensor([[[0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.2, 0.8]]])
    choice = probs.argmax(-1)  # depths 1, 1, 1, 2
    # P = (0.6, 0.4), f = 2·(3/4, 1/4) = (1.5, 0.5): 0.6·1.5 + 0.4·0.5
    assert float(balance_loss(probs, choice)) == pytest.approx(1.1, rel=1e-6)
    logits = torch.tensor([[[0.0, 0.0]]])
    assert float(z_loss(logits)) == pytest.approx(math.log(2) ** 2, rel=1e-6)


def test_token_auxiliary_loss_equals_hand_computation():
    model = sharpen(tiny_mor(6, recursions=2, sharing="middle_cycle", router="token"), 20.0)
    seen = []
    model.routers[0].register_forward_hook(lambda m, i, o: seen.append(o.detach().double()))
    model(torch.randint(0, V, (2, 10)))
    logits = seen[0].flatten(0, 1)  # (N, R)
    probs = logits.exp() / logits.exp().sum(-1, keepdim=True)
    choice = probs.argmax(-1)
    P = probs.mean(0)
    f = torch.stack([(choice == i).double().mean() for i in range(2)]) * 2
    z = (logits.exp().sum(-1).log() ** 2).mean()
    want = 0.1 * float((P * f).sum()) + 1e-5 * float(z)
    assert float(model.auxiliary_loss().detach()) == pytest.approx(want, rel=1e-5)


def test_loss_free_bias_balancing_moves_toward_underused_depths():
    model = sharpen(
        tiny_mor(6, recursions=2, sharing="middle_cycle", router="token", bias_balance_rate=0.01),
        20.0,
    )
    model(torch.randint(0, V, (2, 16)))
    load = torch.bincount((model.last_depth - 1).flatten(), minlength=2).float()
    assert torch.equal(torch.sign(model.router_bias), torch.sign(load.mean() - load))


# ------------------------------------------------------------------------------- KV sharing
def test_recursive_kv_sharing_attends_to_first_recursion_keys():
    model = tiny_mor(4, recursions=2, sharing="cycle", router="none", kv_cache="shared")
    x = torch.randint(0, V, (2, 12))
    T = 12
    h, (cos, sin) = model.embed(x, torch.arange(T))
    first_inputs = []
    for blk in model.layers:  # recursion 0: the plain blocks
        first_inputs.append(h)
        h = blk(h, (cos, sin))
    for blk, h0 in zip(model.layers, first_inputs, strict=True):  # recursion 1: r0's k/v
        a = blk.self_attn
        B = h.shape[0]
        q = a.q_proj(blk.input_layernorm(h)).view(B, T, 4, 8).transpose(1, 2)
        k = a.k_proj(blk.input_layernorm(h0)).view(B, T, 2, 8).transpose(1, 2)
        v = a.v_proj(blk.input_layernorm(h0)).view(B, T, 2, 8).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        h = h + a.o_proj(y.reshape(B, T, 32))
        h = h + blk.mlp(blk.post_attention_layernorm(h))
    want = model.lm_head(model.norm(h))
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, expanded_decoder(model)(x), atol=1e-4)  # it matters


def test_config_rejects_routing_with_sequence_sharing():
    from stoker.config import validate_config

    with pytest.raises(StokerError, match="recursive baseline"):
        validate_config({"model": {"n_layer": 6}, "mor": {"sharing": "sequence"}})
    with pytest.raises(StokerError, match="divisible by mor.recursions=3"):
        validate_config({"model": {"n_layer": 6}, "mor": {"recursions": 3}})
    with pytest.raises(StokerError, match="need mor.init_from"):
        validate_config({"mor": {"init": "stepwise"}})


def test_router_none_can_be_set_from_the_command_line():
    from stoker.config import load_config

    cfg = load_config("recipes/mor/tiny-expert-rec2.yaml", ["--mor.router=none"])
    assert cfg.mor.router == "none"


def test_baseline_gate_applies_the_fixed_gated_update_per_recursion():
    """The ablation control: router none with `baseline_gate` c is h <- h + c·F(h) per
    recursion (F = the shared block with its residuals), by hand on the layers."""
    model = tiny_mor(8, recursions=2, sharing="middle_cycle", router="none", baseline_gate=0.3)
    x = torch.randint(0, V, (2, 12))
    T = x.shape[1]
    h, rope = model.embed(x, torch.arange(T))
    h = model.layers[model.plan[0]](h, rope)
    for r in range(2):
        z = h
        for i in range(model.block_size):
            z = model.layers[model.plan[1 + r * model.block_size + i]](z, rope)
        h = h + 0.3 * z
    h = model.layers[model.plan[-1]](h, rope)
    torch.testing.assert_close(model(x), model.lm_head(model.norm(h)), rtol=1e-5, atol=1e-5)
    plain = tiny_mor(8, recursions=2, sharing="middle_cycle", router="none")
    assert not torch.allclose(plain(x), model(x))  # same seed, same weights: the gate matters
    with pytest.raises(ValueError, match="baseline_gate applies to the recursive baseline"):
        MoRConfig(router="expert", baseline_gate=0.1)
