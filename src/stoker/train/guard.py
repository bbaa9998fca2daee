"""Skipping optimizer steps whose loss or gradients are not finite, without a per-step sync.

Reading a GPU tensor on the host (`bool(torch.isfinite(loss))`) waits for the whole step to
finish, so the CPU cannot queue the next step while the GPU works. With a fused AdamW (what
`build_optimizer` makes on CPU and CUDA) the check stays on the device: the flag "loss or
gradient norm not finite" is handed to the optimizer as `found_inf` (the mechanism GradScaler
uses), which leaves weights, moments and the step count untouched for that step, and it is
counted in device tensors that the host reads only in `poll` — every step on a CPU (reading is
free there, so the loop stops at the bad step itself), at log/eval/save steps on a GPU. Other
optimizers (ZeRO-1's wrapper) are checked on the host every step; a bad step is not applied.
fp16 runs leave all of this to GradScaler, which skips inf/NaN steps and lowers its scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BadSteps:
    count: int  # non-finite steps since the previous poll
    first: int  # the first of them (1-based step number)


class NonFiniteGuard:
    def __init__(self, opt: torch.optim.Optimizer, device: torch.device, enabled: bool = True):
        self.opt, self.enabled = opt, enabled
        self.on_device = (
            enabled and isinstance(opt, torch.optim.AdamW) and bool(opt.defaults.get("fused"))
        )
        self._count = torch.zeros((), dtype=torch.int64, device=device)
        self._first = torch.full((), -1, dtype=torch.int64, device=device)
        self._host_count, self._host_first, self._seen = 0, -1, 0

    def step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Flag optimizer step `step` (1-based) if `loss`/`grad_norm` is not finite; returns
        whether the caller should call `optimizer.step()` (always, when checked on device)."""
        if not self.enabled:
            return True
        if hasattr(grad_norm, "full_tensor"):  # FSDP2's DTensor norm
            grad_norm = grad_norm.full_tensor()
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        if self.on_device:
            self.opt.found_inf = bad.float()
            self._count += bad
            self._first = torch.where(bad & (self._first < 0), step, self._first)
            return True
        if bool(bad):
            self._host_count += 1
            if self._host_first < 0:
                self._host_first = step
            return False
        return True

    def poll(self) -> BadSteps | None:
        """Bad steps since the last poll, or None (reads the device counters: a sync)."""
        if not self.enabled:
            return None
        count, first = (
            (int(self._count), int(self._first))
            if self.on_device
            else (self._host_count, self._host_first)
        )
        new, self._seen = count - self._seen, count
        if new <= 0:
            return None
        if self.on_device:
            self._first.fill_(-1)
        else:
            self._host_first = -1
        return BadSteps(new, first)
