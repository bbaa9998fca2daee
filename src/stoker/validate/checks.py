"""The checks of `stoker validate` on one run config (a recipe, or one stage of a multi-stage
recipe), as behaviour of the real task (tasks/base.py): each builds what the loop builds and
looks at what it does, never at what a config claims.

Each check is a function `(probe) -> detail` that raises `Failed` (or any error) to fail;
`NEEDS` orders them, and a check whose needs did not pass is skipped.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from stoker.errors import StokerError


class Failed(Exception):
    """A check's finding: what is wrong, in one line."""


class Probe:
    """What the checks share: the config, its task, the model it builds and one batch."""

    def __init__(self, cfg: Any, work: Path, quick: bool = False):
        self.cfg, self.work, self.quick = cfg, work, quick
        self.unit, self.full = "", None  # the stage; the recipe's own config (--quick)
        work.mkdir(parents=True, exist_ok=True)
        self.task: Any = None
        self.model: nn.Module | None = None
        self.batch: Any = None

    def fresh_model(self, seed: int = 0) -> nn.Module:
        """The task's model as the loop builds it (frozen parts frozen), in training mode."""
        torch.manual_seed(self.cfg.train.seed + seed)
        model = self.task.build_model(torch.device("cpu"), None)
        self.task.train_mode(model)
        return model

    def optimizer(self, model: nn.Module, lr: float | None = None, scaled: bool = True
                  ) -> torch.optim.Optimizer:  # fmt: skip
        """AdamW over the task's groups at `lr` (default the recipe's), times each group's
        `lr_scale` as the loop's schedule applies it unless not `scaled`."""
        from stoker.train.optim import build_optimizer

        groups = self.task.param_groups(model)
        for g in groups:
            g["lr"] = (lr or self.cfg.optim.lr) * (g.get("lr_scale", 1.0) if scaled else 1.0)
        return build_optimizer(model, self.cfg.optim, "cpu", False, groups)

    def draw(self, step: int) -> Any:
        """Micro-batch 0 of `step`, as the loop draws it on one process."""
        t = self.cfg.train
        return self.task.train_data.batch(step, 0, 1, 0, max(1, t.batch_size // t.micro_batch_size))

    def step_loss(self, model: nn.Module, batch: Any = None) -> tuple[torch.Tensor, int]:
        """The loop's per-target loss on `batch` (default: the probe's), and its count."""
        batch = self.batch if batch is None else batch
        total, aux = self.task.loss(model, batch)
        n = self.task.count(batch)
        loss = total / max(n, 1)
        return (loss + aux if aux is not None else loss), n


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _frozen(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not p.requires_grad}


def _count(params: dict[str, nn.Parameter]) -> int:
    return sum(p.numel() for p in params.values())


# ---------------------------------------------------------------------------------- checks
def check_config(p: Probe) -> str:
    """Schema (loaded already), paths and sizes: the task resolves its sources and reads
    (prepares) its data as the loop would."""
    from stoker.tasks import make_task

    p.task = make_task(p.cfg)
    p.cfg = p.task.cfg  # resolved (e.g. the model section of train.init_from)
    stats = p.task.prepare({})
    p.task.open_data()
    counts = {k: v for k, v in (stats or {}).items() if isinstance(v, int | float)}
    shown = ", ".join(f"{k} {v:,}" for k, v in list(counts.items())[:3])
    return f"{p.cfg.recipe}: data {p.cfg.data.dir}" + (f" ({shown})" if shown else "")


def check_init(p: Probe) -> str:
    """The parameter table of the model the task builds (frozen parts frozen)."""
    p.model = p.fresh_model()
    train, frozen = _trainable(p.model), _frozen(p.model)
    if not train:
        raise Failed("the model has no trainable parameter")
    n_train, n_all = _count(train), _count(train) + _count(frozen)
    from stoker.validate.params import full_shape_table, groups_table

    detail = (f"{n_all:,} parameters, {n_train:,} trainable ({100 * n_train / n_all:.2f}%)"
              f"{groups_table(train)}")  # fmt: skip
    try:
        full = full_shape_table(p.full, p.unit) if p.full is not None else None
    except Exception as e:  # the quick run stands in for what the recipe's shapes need
        full = f"not counted ({' '.join(str(e).split())[:120]})"
    return detail + (f" | at the recipe's shapes (meta device): {full}" if full else "")


def check_data(p: Probe) -> str:
    """A training batch as the loop draws it (step 0): every sample supervised, labels on
    the response only (the task's own `inspect_batch`)."""
    p.batch = p.task.to_device(p.draw(0), torch.device("cpu"))
    try:
        return p.task.inspect_batch(p.batch)
    except StokerError as e:
        raise Failed(str(e)) from None


def check_forward(p: Probe) -> str:
    """A finite loss; about ln V (the uniform guess) for a freshly initialized head."""
    assert p.model is not None
    with torch.no_grad():
        loss, n = p.step_loss(p.model)
    value = float(loss)
    if not math.isfinite(value):
        raise Failed(f"the loss is {value} on the first batch")
    expected = p.task.initial_loss()
    if expected is None:
        return f"loss {value:.4f} over {n:,} targets (trained weights: no ln V reference)"
    if abs(value - expected) > 0.25 * expected:
        raise Failed(f"the initial loss {value:.3f} is far from ln V = {expected:.3f} (a fresh "
                     "head should guess near-uniformly: check the init or the labels)")  # fmt: skip
    return f"loss {value:.4f} vs ln V {expected:.4f} at init"


def check_step(p: Probe) -> str:
    """Backward: every trainable parameter gets a finite gradient, no frozen one any."""
    model = p.fresh_model()
    train, frozen = _trainable(model), _frozen(model)
    batches = 0
    for step in range(8):  # a multi-task batch may lack a task whose head then gets nothing
        batch = p.batch if step == 0 else p.task.to_device(p.draw(step), torch.device("cpu"))
        loss, _ = p.step_loss(model, batch)
        loss.backward()
        batches += 1
        missing = [n for n, q in train.items() if q.grad is None]
        if not missing:
            break
    if missing:
        raise Failed(f"{len(missing)} trainable tensor(s) get no gradient in {batches} batches, "
                     f"e.g. {missing[0]} (not on the loss's path)")  # fmt: skip
    bad = [n for n, q in train.items() if not bool(torch.isfinite(q.grad).all())]
    if bad:
        raise Failed(f"non-finite gradient in {bad[0]}")
    leaked = [n for n, q in frozen.items() if q.grad is not None]
    if leaked:
        raise Failed(f"frozen tensor {leaked[0]} got a gradient")
    zero = sum(1 for q in train.values() if not bool(q.grad.any()))
    return (f"{len(train)} trainable tensors with gradients in {batches} batch(es) ({zero} "
            f"all zero), {len(frozen)} frozen without")  # fmt: skip


def _frozen_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with parameters, all frozen, and no trainable module inside."""
    out = []
    for name, m in model.named_modules():
        params = list(m.parameters())
        inside = any(name.startswith(f"{o}.") for o, _ in out)
        if params and not any(q.requires_grad for q in params) and not inside:
            out.append((name, m))
    return out


def _mode_dependent(m: nn.Module) -> bool:
    """A module whose forward differs between train and eval mode."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.modules.instancenorm._InstanceNorm):
        return m.track_running_stats
    if isinstance(m, nn.Dropout | nn.MultiheadAttention):
        return getattr(m, "p", getattr(m, "dropout", 0.0)) > 0
    return False


def check_freezing(p: Probe) -> str:
    """Two optimizer steps (LoRA's A moves only once B has): every frozen tensor and frozen
    module's buffer bitwise unchanged, every trainable tensor with a gradient changed, every
    trainable tensor in the optimizer, frozen modules in eval mode."""
    model = p.fresh_model()
    frozen_mods = _frozen_modules(model)
    training: list[str] = []  # frozen mode-dependent modules that ran in training mode
    hooks = [s.register_forward_pre_hook(lambda mod, _, name=f"{n}.{sub}".strip("."):
                                         training.append(name) if mod.training else None)
             for n, m in frozen_mods for sub, s in m.named_modules() if _mode_dependent(s)]  # fmt: skip
    with torch.no_grad():
        p.step_loss(model)
    for h in hooks:
        h.remove()
    if training:
        raise Failed(f"frozen module {training[0]} is in training mode (its dropout or "
                     "BatchNorm statistics would act as in training)")  # fmt: skip
    before = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=False).items()}
    kept = {f"{n}.{b}" if n else b for n, m in frozen_mods for b, _ in m.named_buffers()}
    kept |= set(_frozen(model))
    opt = p.optimizer(model)
    in_opt = {id(q) for g in opt.param_groups for q in g["params"]}
    train = _trainable(model)
    outside = [n for n, q in train.items() if id(q) not in in_opt]
    if outside:
        raise Failed(f"trainable {outside[0]} is in no optimizer group (it would never train)")
    moved_by_grad = set()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        loss, _ = p.step_loss(model)
        loss.backward()
        moved_by_grad |= {n for n, q in train.items() if q.grad is not None and bool(q.grad.any())}
        opt.step()
    after = model.state_dict()
    changed = [n for n in kept if n in after and not torch.equal(before[n], after[n])]
    if changed:
        raise Failed(f"frozen {changed[0]} changed in a step")
    still = [n for n in moved_by_grad if torch.equal(before[n], after[n])]
    if still:
        raise Failed(f"trainable {still[0]} has a gradient but did not change")
    return (f"{len(kept)} frozen tensors unchanged, {len(moved_by_grad)}/{len(train)} trainable "
            f"changed (the rest had zero gradients), {len(frozen_mods)} frozen module(s) in eval")  # fmt: skip


def check_checkpoint(p: Probe) -> str:
    """Save as the loop saves (trainable tensors only where the task says so), scramble a
    fresh model's saved tensors, load: identical outputs; only trainable keys stored."""
    from safetensors import safe_open

    from stoker.train.checkpoint import load_weights, save_model_checkpoint, saved_part

    model = p.fresh_model()
    opt = p.optimizer(model)
    loss, _ = p.step_loss(model)
    loss.backward()
    opt.step()  # trained tensors differ from a fresh model's
    model.eval()
    ckpt = save_model_checkpoint(p.work / "ckpt", saved_part(model, model.state_dict()), {})
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())  # noqa: SIM118
    trainable, frozen = set(_trainable(model)), set(_frozen(model))
    if stored & frozen and getattr(model, "_stoker_saves_trainable_only", False):
        raise Failed(f"the checkpoint holds frozen {sorted(stored & frozen)[0]}")
    if not trainable <= stored:
        raise Failed(f"the checkpoint lacks trainable {sorted(trainable - stored)[0]}")
    other = p.fresh_model(seed=1)
    with torch.no_grad():
        for t in saved_part(other, other.state_dict()).values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    load_weights(other, ckpt)
    other.eval()
    with torch.no_grad():
        a, _ = p.step_loss(model)
        b, _ = p.step_loss(other)
    if not torch.equal(a, b):
        raise Failed(f"the reloaded model gives loss {float(b):.6f}, the saved one {float(a):.6f}")
    size = (ckpt / "model.safetensors").stat().st_size
    return f"{len(stored)} tensors ({size / 2**20:.2f} MiB) round-trip to identical outputs"


def check_tracking(p: Probe) -> str:
    """The run's tracker (MLflow where on) gets a run whose metrics read back."""
    from stoker.train.tracking import Tracker, read_metrics

    out = Path(tempfile.mkdtemp(prefix="track-", dir=p.work))
    track = p.cfg.track
    if p.quick:  # MLflow into the temp dir whenever it is installed
        import importlib.util
        import logging

        on = importlib.util.find_spec("mlflow") is not None
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        track = track.model_copy(update={"mlflow": on, "mlflow_uri": None})
    tracker = Tracker(out, track, {"recipe": p.cfg.recipe})
    rows = [{"step": s, "loss": 2.0 / s} for s in (1, 2)]
    for row in rows:
        tracker.log(row)
    run = next((s.run for s in tracker.sinks if hasattr(s, "run")), None)
    tracker.close()
    back = [r.get("loss") for r in read_metrics(out)]
    if back[-2:] != [r["loss"] for r in rows]:
        raise Failed(f"metrics.jsonl in {out} reads back {back}, not what was logged")
    if not track.mlflow or run is None:
        return "metrics.jsonl reads back (track.mlflow off: no MLflow run)"
    from mlflow.tracking import MlflowClient

    run_id = run.info.run_id
    uri = track.mlflow_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
    history = MlflowClient(uri).get_metric_history(run_id, "loss")
    if sorted((m.step, m.value) for m in history) != [(r["step"], r["loss"]) for r in rows]:
        raise Failed(f"MLflow run {run_id} holds {[(m.step, m.value) for m in history]}")
    return f"MLflow run {run_id[:8]} and metrics.jsonl read back both steps"


def check_short_run(p: Probe, max_steps: int = 100) -> str:
    """Overfit the one batch: the loss falls by at least half."""
    model = p.fresh_model(seed=2)
    # one LR of at least 3e-3 for every group: what can fit, not the recipe's schedule
    opt = p.optimizer(model, lr=max(p.cfg.optim.lr, 3e-3), scaled=False)
    first = last = None
    what = "loss"
    for step in range(1, max_steps + 1):
        opt.zero_grad(set_to_none=True)
        loss, _ = p.step_loss(model)
        loss.backward()
        opt.step()
        with torch.no_grad():
            watched = p.task.fit_loss(model, p.batch)
        what = "loss" if watched is None else "the trained part's loss"
        last = (loss if watched is None else watched).item()
        first = last if first is None else first
        if last <= 0.5 * first:
            return f"{what} {first:.3f} -> {last:.3f} in {step} steps on one batch"
    raise Failed(f"{what} went {first:.3f} -> {last:.3f} in {max_steps} steps on one batch "
                 "(it should at least halve: the model cannot fit what it is shown)")  # fmt: skip


CHECKS = {
    "config": check_config,
    "init": check_init,
    "freezing": check_freezing,
    "data": check_data,
    "forward": check_forward,
    "step": check_step,
    "checkpoint": check_checkpoint,
    "tracking": check_tracking,
    "short_run": check_short_run,
}
NEEDS = {
    "config": (),
    "init": ("config",),
    "data": ("config",),
    "freezing": ("init", "data"),
    "forward": ("init", "data"),
    "step": ("forward",),
    "checkpoint": ("init", "data"),
    "tracking": ("config",),
    "short_run": ("step",),
}
# the order checks run in: each after its needs (freezing needs data's batch)
ORDER = ["config", "init", "data", "freezing", "forward", "step", "checkpoint", "tracking",
         "short_run"]  # fmt: skip
