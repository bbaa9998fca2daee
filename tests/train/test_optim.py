"""Optimizer groups and learning-rate schedules against hand computations."""

import math

import pytest
import torch

from stoker.config import ModelConfig, OptimConfig
from stoker.models.gpt import build_model
from stoker.train.optim import build_optimizer, lr_at, param_groups


def test_decay_only_on_2d_weights_and_tied_weight_once():
    model = build_model(ModelConfig(preset="tiny-gpt2"))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())  # tied embedding counted once
    opt = build_optimizer(model, OptimConfig(), "cpu")
    assert opt.defaults.get("fused") is True


def test_fused_adamw_matches_foreach_reference():
    """The fused CPU AdamW stoker builds takes the same steps as torch's foreach AdamW."""
    torch.manual_seed(0)
    a = build_model(ModelConfig(preset="tiny-llama"))
    b = build_model(ModelConfig(preset="tiny-llama"))
    b.load_state_dict(a.state_dict())
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(a, cfg, "cpu")
    ref = torch.optim.AdamW(
        param_groups(b, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True
    )
    for _ in range(3):
        grads = [torch.randn_like(p) for p in a.parameters()]
        for m, opt in ((a, fused), (b, ref)):
            for p, g in zip(m.parameters(), grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_cosine_schedule_hand_values():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, schedule="cosine", warmup_steps=10)
    assert lr_at(0, 110, cfg) == pytest.approx(0.1)
    assert lr_at(9, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, 110, cfg) == pytest.approx(0.1)


def test_wsd_schedule_decays_linearly_over_last_fraction():
    cfg = OptimConfig(lr=2.0, min_lr_ratio=0.0, schedule="wsd", warmup_steps=5, decay_fraction=0.2)
    assert lr_at(4, 100, cfg) == pytest.approx(2.0)
    assert lr_at(79, 100, cfg) == pytest.approx(2.0)
    assert lr_at(80, 100, cfg) == pytest.approx(2.0)
    assert lr_at(90, 100, cfg) == pytest.approx(1.0)
    assert lr_at(100, 100, cfg) == pytest.approx(0.0)


def test_constant_schedule():
    cfg = OptimConfig(lr=0.5, schedule="constant", warmup_steps=2)
    assert [lr_at(s, 10, cfg) for s in (0, 1, 2, 9)] == [0.25, 0.5, 0.5, 0.5]


def test_adamw_step_moves_weights():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny-llama"))
    opt = build_optimizer(model, OptimConfig(lr=1e-2), "cpu")
    before = model.layers[0].mlp.up_proj.weight.clone()
    model(torch.randint(0, 512, (2, 8))).sum().backward()
    opt.step()
    assert not torch.equal(before, model.layers[0].mlp.up_proj.weight)
