"""Causal decoding of Mixture-of-Recursions models: threshold routing with a KV cache equals
recomputing the whole prefix with the same routing, and the future never changes the past."""

import pytest
import torch

from stoker.config import ModelConfig, MoRConfig
from stoker.generate import generate
from stoker.models.mor import build_mor

V = 97
VARIANTS = [
    dict(router="expert", kv_cache="recursion", sharing="middle_cycle", recursions=3),
    dict(router="expert", kv_cache="shared", sharing="cycle", recursions=2),
    dict(router="token", kv_cache="recursion", sharing="cycle", recursions=3),
    dict(router="token", kv_cache="shared", sharing="middle_cycle", recursions=2),
    dict(router="none", kv_cache="shared", sharing="middle_cycle", recursions=2),
    dict(router="none", kv_cache="recursion", sharing="sequence", recursions=2),
]


def model_for(variant: dict, arch: str = "llama") -> torch.nn.Module:
    torch.manual_seed(0)
    n = 8 if variant["sharing"] == "middle_cycle" and variant["recursions"] == 3 else 6
    extra = dict(n_kv_head=2) if arch == "llama" else dict(bias=True)
    cfg = ModelConfig(
        arch=arch, n_layer=n, n_head=4, d_model=32, d_ff=64, vocab_size=V, max_seq_len=32, **extra
    )
    model = build_mor(cfg, MoRConfig(**variant)).eval()
    with torch.no_grad():  # spread router logits: decisions vary from token to token
        for r in getattr(model, "routers", []):
            r.weight.mul_(40.0)
    model.threshold_routing = True
    return model


def full(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(x), model.last_depth


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v['router']}-{v['kv_cache']}")
def test_cached_decoding_equals_full_threshold_forward(variant):
    model = model_for(variant)
    x = torch.randint(0, V, (2, 20))
    want, depth = full(model, x)
    if model.router != "none":  # the test is not vacuous: some tokens stop early
        assert 1 < depth.float().mean() < model.recursions
    cache = model.new_cache(2, 20)
    with torch.no_grad():
        pieces = [model(x[:, :6], cache)]  # prefill
        depths = [model.last_depth]
        for t in range(6, 14):  # one token at a time
            pieces.append(model(x[:, t : t + 1], cache))
            depths.append(model.last_depth)
        pieces.append(model(x[:, 14:], cache))  # a chunk after a cached prefix
        depths.append(model.last_depth)
    torch.testing.assert_close(torch.cat(pieces, dim=1), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat(depths, dim=1), depth)
    assert cache.length == 20


def test_cached_decoding_works_for_learned_positions():
    model = model_for(VARIANTS[0], arch="gpt2")
    x = torch.randint(0, V, (1, 12))
    want, _ = full(model, x)
    cache = model.new_cache(1, 12)
    with torch.no_grad():
        got = torch.cat(
            [model(x[:, :5], cache), *[model(x[:, t : t + 1], cache) for t in range(5, 12)]], dim=1
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS[:3], ids=lambda v: f"{v['router']}-{v['kv_cache']}")
def test_generation_equals_recomputing_the_prefix_every_step(variant):
    model = model_for(variant)
    prompt = torch.randint(0, V, (1, 5))
    tokens = [int(t) for t in generate(model, prompt, 8)]  # greedy, cached
    ids = prompt
    for tok in tokens:
        logits, _ = full(model, ids)  # the whole prefix again, same threshold routing
        assert int(logits[0, -1].argmax()) == tok
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)


@pytest.mark.parametrize("variant", VARIANTS[:4], ids=lambda v: f"{v['router']}-{v['kv_cache']}")
def test_future_tokens_never_change_past_routing_or_logits(variant):
    model = model_for(variant)
    x = torch.randint(0, V, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, V, (2, 7))
    (lx, dx), (ly, dy) = full(model, x), full(model, y)
    torch.testing.assert_close(lx[:, :9], ly[:, :9], rtol=0, atol=1e-6)
    assert torch.equal(dx[:, :9], dy[:, :9])
    assert not torch.equal(dx[:, 9:], dy[:, 9:]) or not torch.allclose(lx[:, 9:], ly[:, 9:])


def test_training_time_top_k_routing_is_not_causal():
    """Why decoding needs threshold routing: with top-k, a later token can push an earlier
    one out of a recursion (docs/mor.md)."""
    model = model_for(VARIANTS[0])
    model.threshold_routing = False
    changed = False
    for seed in range(5):
        torch.manual_seed(seed)
        x = torch.randint(0, V, (1, 16))
        y = x.clone()
        y[:, 12:] = torch.randint(0, V, (1, 4))
        changed |= not torch.equal(full(model, x)[1][:, :12], full(model, y)[1][:, :12])
    assert changed
