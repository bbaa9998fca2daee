"""Non-finite steps are skipped on the device (fused AdamW's found_inf) or on the host."""

import torch

from stoker.train.guard import BadSteps, NonFiniteGuard


def _param_and_opt(fused: bool):
    p = torch.nn.Parameter(torch.ones(4))
    kwargs = {"fused": True} if fused else {"foreach": True}
    return p, torch.optim.AdamW([p], lr=0.1, **kwargs)


def test_device_guard_skips_the_bad_step_without_touching_state():
    p, opt = _param_and_opt(fused=True)
    guard = NonFiniteGuard(opt, torch.device("cpu"))
    assert guard.on_device
    p.grad = torch.full((4,), float("nan"))
    assert guard.step(1, torch.tensor(float("nan")), torch.tensor(float("nan")))
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4))
    assert float(opt.state[p]["step"]) == 0 and not opt.state[p]["exp_avg"].any()
    p.grad = torch.ones(4)
    assert guard.step(2, torch.tensor(1.0), torch.tensor(2.0))
    opt.step()  # a good step after it applies normally: AdamW's first step moves by lr
    torch.testing.assert_close(p.detach(), torch.full((4,), 1 - 0.1 * 0.01 - 0.1))
    assert guard.poll() == BadSteps(count=1, first=1)
    assert guard.poll() is None  # counted once
    p.grad = torch.ones(4)
    guard.step(3, torch.tensor(float("inf")), torch.tensor(1.0))
    guard.step(4, torch.tensor(1.0), torch.tensor(float("inf")))
    assert guard.poll() == BadSteps(count=2, first=3)


def test_host_guard_for_optimizers_without_found_inf():
    p, opt = _param_and_opt(fused=False)
    guard = NonFiniteGuard(opt, torch.device("cpu"))
    assert not guard.on_device
    assert guard.step(1, torch.tensor(1.0), torch.tensor(1.0))
    assert not guard.step(2, torch.tensor(float("nan")), torch.tensor(1.0))
    assert guard.poll() == BadSteps(count=1, first=2)


def test_disabled_guard_for_fp16_leaves_it_to_the_scaler():
    p, opt = _param_and_opt(fused=True)
    guard = NonFiniteGuard(opt, torch.device("cpu"), enabled=False)
    assert guard.step(1, torch.tensor(float("nan")), torch.tensor(1.0))
    assert guard.poll() is None and not hasattr(opt, "found_inf")
