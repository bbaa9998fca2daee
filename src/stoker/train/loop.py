"""The one training loop every recipe uses.

`train(cfg)` reads top to bottom like nanoGPT's train.py: set up devices and processes,
prepare data, build and parallelize the model, resume, then step: each optimizer step
accumulates `batch_size / (micro_batch_size · world)` micro-steps of its global batch (a pure
function of (seed, step), see data/loader.py), clips, steps, logs, evaluates and saves.
Checkpoints are atomic; SIGTERM/SIGINT set a flag and the loop saves after the current step
and exits 0, so a killed run resumes exactly (`train.resume: auto`).
"""

from __future__ import annotations

import contextlib
import math
import signal
from pathlib import Path
from typing import Any

import torch

from stoker.config import RecipeConfig, dump_config
from stoker.errors import StokerError
from stoker.monitor.advice import AdviceOnce, advise, print_advice, signals_for_run
from stoker.monitor.system import start_monitor
from stoker.train import distributed as D
from stoker.train import header as H
from stoker.train.checkpoint import remove_staging_dirs
from stoker.train.guard import NonFiniteGuard
from stoker.train.optim import build_optimizer, lr_at
from stoker.train.precision import autocast_context, choose_precision, model_width
from stoker.train.runlock import RunLock
from stoker.train.state import (
    check_out_dir,
    find_resume,
    load_training_state,
    save_training_state,
    trim_metrics,
)
from stoker.train.telemetry import Throughput, erase_on_error, memory_gb, progress_bar


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it between steps (never saves in the handler)."""

    def __init__(self):
        self.set = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.set = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def accumulation_steps(batch: int, micro: int, world: int) -> int:
    if batch % (micro * world):
        raise StokerError(
            f"train.batch_size={batch} is not divisible by train.micro_batch_size="
            f"{micro} × {world} process(es); pick a batch size that is a multiple "
            f"of {micro * world}"
        )
    return batch // (micro * world)


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward (less memory, ~1/3 more compute)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        fwd = block.forward
        block.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)


def train(cfg: RecipeConfig, source: str | None = None) -> dict[str, Any]:
    """Train `cfg` to `train.max_steps` (or until stopped); returns the run summary. A
    multi-stage recipe runs its stages in order (train/stages.py). `source`: the recipe file,
    named in the run's first line."""
    from stoker.tasks import task_class

    stages = task_class(cfg).stages(cfg)
    info = D.init_distributed(cfg.train.device, cfg.dist.backend)
    if stages is None:
        summary = _train_one(cfg, info, source)
    else:
        summary = _train_stages(cfg, stages, info, source)
    D.cleanup(info)  # on success only: after an error another rank may never reach it
    return summary


def _train_one(cfg: RecipeConfig, info: D.DistInfo, source: str | None) -> dict[str, Any]:
    out = Path(cfg.train.out_dir)
    with contextlib.ExitStack() as held:
        if info.is_main:
            check_out_dir(out)
            held.enter_context(RunLock(out))  # one run per out_dir; released on any exit
            remove_staging_dirs(out)  # what killed saves left behind
        return _train(cfg, cfg.train, info, out, source)


def _train_stages(
    cfg: RecipeConfig, stages, info: D.DistInfo, source: str | None
) -> dict[str, Any]:
    """Each stage through `_train_one`, skipped when it finished with the same fingerprint;
    a stage stopped by a signal ends the sequence (rerun to resume it)."""
    from stoker.train import stages as S

    out, summaries = Path(cfg.train.out_dir), {}
    with contextlib.ExitStack() as held:
        if info.is_main:
            check_out_dir(out)
            held.enter_context(RunLock(out))
            (out / "config.yaml").write_text(dump_config(cfg))  # what eval/predict rebuild
        for stage in stages:
            state = D.broadcast_object(
                S.prepare_stage(stage, print) if info.is_main else None, info
            )
            if state == "done":
                summaries[stage.name] = (S.read_marker(stage.out_dir) or {}).get("summary")
                continue
            if info.is_main:
                S.write_marker(stage, done=False)
            summary = summaries[stage.name] = _train_one(stage.cfg, info, source)
            if (summary.get("stopped") or "").startswith("stopped by signal"):
                break
            if info.is_main:
                S.write_marker(stage, done=True, summary=summary)
            D.barrier(info)
    return {"stages": summaries, "out_dir": str(out)}


def _train(cfg: RecipeConfig, t, info: D.DistInfo, out: Path, source: str | None) -> dict[str, Any]:
    from stoker.data.loader import BatchStream, loader_settings
    from stoker.reproducibility import configure
    from stoker.tasks import make_task
    from stoker.tasks.base import sum_over_ranks

    deterministic = t.deterministic if t.deterministic != "auto" else info.device.type == "cpu"
    repro = configure(deterministic, info.device.type)  # before any tensor math
    task = make_task(cfg, info)
    cfg = task.cfg  # resolved: e.g. the model section of train.init_from's model
    metric, direction = _early_stopping(task, t)
    prep_stats: dict[str, float] = {}  # tokens/s, if this run tokenized the corpus itself
    data_meta = None
    if info.is_main:
        (out / "config.yaml").write_text(dump_config(cfg))
        print(H.start_line(cfg.recipe, source, str(info.device), info.world, out), flush=True)
        data_meta = task.prepare(prep_stats)
    D.barrier(info)
    task.open_data()
    n_micro = accumulation_steps(t.batch_size, t.micro_batch_size, info.world)
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    ckpt = find_resume(t.resume, out, info)
    raw, model, opt = _build(task, cfg, info, ckpt)
    choice = _choose_precision(t.precision, info, raw, task)
    precision = choice.precision
    amp = autocast_context(precision, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "fp16")
    train_data = task.train_data
    torch.manual_seed(t.seed + 1000 + info.rank)  # dropout streams differ per rank

    step, best, bad_evals = 0, math.inf if direction == "min" else -math.inf, 0
    if ckpt is not None:
        step, best, bad_evals = _resume(ckpt, model, opt, cfg, info, train_data, out)
    fwd = torch.compile(model) if t.compile else model

    loading = loader_settings(
        info.device.type,
        cfg.data.num_workers,
        cfg.data.pin_memory,
        cfg.data.prefetch_factor,
        info.local_world,
    )
    batches = BatchStream(train_data, step, t.max_steps, info.rank, info.world, n_micro, **loading)
    # non-finite steps are skipped on the device; the host looks every step only on a CPU
    guard = NonFiniteGuard(opt, info.device, enabled=precision != "fp16")
    sync = info.device.type == "cuda"
    tracker = _make_tracker(cfg, info)
    meter = Throughput(task.flops_per_token(), info, precision)
    stopped, last_eval, loss_mean = None, {}, None
    live_advice = AdviceOnce()  # advice printed at the start, then when a rule first fires
    if info.is_main:  # the header's last lines; config-level advice (nothing measured yet)
        print(H.model_data_line(raw, cfg.data.dir, data_meta), flush=True)
        print(H.settings_line(precision, repro, loading, choice.reason), flush=True)
        print_advice(live_advice.new(_advice(cfg, info, precision)))
    bar = progress_bar(step, t.max_steps, info.is_main)

    def save(step: int) -> None:
        train_data.next_step = step  # batches are built ahead (workers); the saved position
        save_training_state(
            out,
            step,
            model,
            opt,
            cfg,
            info,
            train_data,
            {"best_val": best, "bad_evals": bad_evals},
            task.tokenizer_dir,
            task.checkpoint_meta(),
        )

    task.train_mode(model)
    with (
        StopFlag() as flag,
        batches,
        start_monitor(out, t.monitor_interval, info.is_main, info.device.index or 0) as monitor,
        erase_on_error(bar),
    ):
        while step < t.max_steps:
            lr = lr_at(step, t.max_steps, cfg.optim)
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            meter.start_step()
            micro_batches = []  # the whole step's, so every loss sum is divided by its count
            for _ in range(n_micro):
                meter.wait_for_data()
                micro_batches.append(task.to_device(next(batches), info.device))
                meter.data_ready()
            count, tokens = sum_over_ranks(
                [
                    sum(task.count(b) for b in micro_batches),
                    sum(task.tokens(b) for b in micro_batches),
                ],
                info,
            )
            scale = info.world / max(count, 1)  # DDP/FSDP average gradients over ranks
            loss_sum = torch.zeros((), device=info.device)
            for micro, b in enumerate(micro_batches):
                with D.grad_sync(model, micro == n_micro - 1), amp:
                    total, aux = task.loss(fwd, b)
                    loss = total * scale + aux / n_micro if aux is not None else total * scale
                scaler.scale(loss).backward()
                loss_sum += total.detach().float()
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), t.grad_clip if t.grad_clip > 0 else 1e30
            )
            loss_mean = D.all_reduce_mean(loss_sum, info) * scale  # Σ loss / count
            if guard.step(step + 1, loss_mean, grad_norm):
                scaler.step(opt)
                scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            log_now = step % t.log_interval == 0 or step == t.max_steps
            eval_now = t.eval_interval and (step % t.eval_interval == 0 or step == t.max_steps)
            save_now = step % t.save_interval == 0 or step == t.max_steps
            if sync and log_now:  # the window's time then includes the GPU's queue
                torch.cuda.synchronize(info.device)
            meter.end_step(int(tokens))
            monitor.step = step
            if not sync or log_now or eval_now or save_now:  # host reads: free on a CPU
                _check_finite(guard, t.nan_policy, step, save, out)

            if log_now:
                extra = task.telemetry(raw)  # the model's own, e.g. MoR routing
                row = {
                    "step": step,
                    "loss": float(loss_mean),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    **meter.report(),
                    **memory_gb(info),
                    **extra,
                }
                tracker.log(row)
                bar.set_postfix_str(
                    meter.postfix(row)
                    + "".join(f" {k} {v:.3g}" for k, v in extra.items())
                    + monitor.postfix(row),
                    refresh=False,
                )
                if info.is_main and step > t.log_interval:  # the first window includes warm-up
                    measured = {
                        "data_wait": row["data_wait"],
                        "num_workers": loading["num_workers"],
                    }
                    print_advice(
                        live_advice.new(_advice(cfg, info, precision, measured)), bar.write
                    )
            bar.update(1)

            if eval_now:
                last_eval = task.evaluate(fwd, t.eval_steps, amp, n_micro)
                meter.exclude_since_last_step()
                tracker.log({"step": step, **last_eval})
                value = last_eval[metric]
                if value < best - 1e-4 if direction == "min" else value > best + 1e-4:
                    best, bad_evals = value, 0
                else:
                    bad_evals += 1
                if t.early_stopping_metric and bad_evals >= t.early_stopping_patience:
                    stopped = f"early stopping: {metric} has not improved for {bad_evals} evals"
            if D.broadcast_flag(flag.set, info):
                stopped = stopped or f"stopped by signal at step {step}"
            if stopped or save_now:
                save(step)
                meter.exclude_since_last_step()
            if stopped:
                break
    bar.close()
    summary = {
        **meter.summary(step),
        "final_loss": float(loss_mean) if loss_mean is not None else None,
        "final_val_loss": last_eval.get("val_loss"),
        "stopped": stopped,
        "out_dir": str(out),
        # share of the run's time the system monitor cost (sampler CPU + bar line)
        "monitor_overhead": monitor.cost_seconds / max(meter.elapsed(), 1e-9),
    }
    measured = {
        "data_wait": monitor.data_wait,
        "tokens_per_second": summary["tokens_per_second"],
        "tokenize_tokens_per_second": prep_stats.get("tokens_per_second"),
        "num_workers": loading["num_workers"],
    }
    summary["advice"] = _advice(cfg, info, precision, measured)
    if info.is_main:
        print_advice(summary["advice"])
    tracker.summary(summary)
    tracker.close()
    if info.is_main:
        print(f"stoker: {stopped or 'done'} — {meter.summary_line(summary)}", flush=True)
    return summary


def _build(task, cfg: RecipeConfig, info: D.DistInfo, ckpt: Path | None):
    """(raw model, parallelized model, optimizer): built on the device, activation
    checkpointing and the strategy applied from outside."""
    raw = task.build_model(info.device, ckpt)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(raw)
    model = D.parallelize(raw, cfg.dist.strategy, info)
    zero1 = cfg.dist.strategy == "zero1" and info.enabled
    opt = build_optimizer(model, cfg.optim, info.device.type, zero1, task.param_groups(raw))
    return raw, model, opt


def _choose_precision(name: str, info: D.DistInfo, raw: torch.nn.Module, task):
    """`train.precision` resolved (train/precision.py) on rank 0 and broadcast (a CPU probe
    measured on each rank could differ between ranks), then applied to the model by the
    task (`Task.use_precision`)."""
    choice = choose_precision(name, info.device, model_width(raw)) if info.is_main else None
    choice = D.broadcast_object(choice, info)
    task.use_precision(raw, choice.precision)
    return choice


def _resume(ckpt: Path, model, opt, cfg: RecipeConfig, info: D.DistInfo, data, out: Path):
    """Load a checkpoint's training state; (step, best value, evals without improvement)."""
    state = load_training_state(ckpt, model, opt, cfg, info, data)
    step = state["step"]
    if info.is_main:
        dropped = trim_metrics(out, step)  # rows logged after that checkpoint
        print(
            f"stoker: resuming from step {step} ({ckpt})"
            + (f"; dropped {dropped} metrics row(s) logged after it" if dropped else ""),
            flush=True,
        )
    return step, state["best_val"], state["bad_evals"]


def _advice(cfg: RecipeConfig, info: D.DistInfo, precision: str, measured=None) -> list[str]:
    """What monitor/advice.py recommends for this run (`measured`: what the run saw so far)."""
    return advise(signals_for_run(cfg, info.device, precision, info.world, measured))


def _check_finite(guard: NonFiniteGuard, nan_policy: str, step: int, save, out: Path) -> None:
    """After the device's skipped non-finite steps: report them (`skip`), or save the last
    good state and stop with a StokerError."""
    bad = guard.poll()
    if bad and nan_policy == "skip":
        print(
            f"stoker: non-finite loss or gradients at {bad.count} step(s) "
            f"from step {bad.first}; those steps skipped",
            flush=True,
        )
    elif bad:
        save(step)
        raise StokerError(
            f"loss or gradients became non-finite at step {bad.first}; saved the "
            f"last good state (step {step}, that step not applied) to {out}; "
            "lower optim.lr, raise optim.warmup_steps or use train.nan_policy=skip"
        )


def _early_stopping(task, t) -> tuple[str, str]:
    """(metric, "min" | "max") that early stopping watches (the best value is tracked even
    when it is off): `train.early_stopping_metric`, which must be one the task reports."""
    metric = t.early_stopping_metric or next(iter(task.metrics))
    if metric not in task.metrics:
        raise StokerError(
            f"train.early_stopping_metric={metric} is not a metric of the "
            f"{task.name} recipe; use one of {', '.join(task.metrics)}"
        )
    return metric, task.metrics[metric]


def _make_tracker(cfg: RecipeConfig, info: D.DistInfo):
    from stoker.train.tracking import NullTracker, Tracker

    if not info.is_main:
        return NullTracker()
    return Tracker(cfg.train.out_dir, cfg.track, cfg.model_dump(mode="json"))


def train_command(args) -> int:
    """`stoker train RECIPE [--section.key=value ...]`"""
    from stoker.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "phase", None):
        overrides.append(f"--dynamo.phases=[{','.join(map(str, sorted(set(args.phase))))}]")
    cfg = load_config(args.recipe, overrides)
    if getattr(args, "phase", None) and cfg.recipe != "dynamo":
        raise StokerError(
            f"--phase applies to multi-phase recipes (dynamo); {args.recipe} is "
            f"a {cfg.recipe} recipe"
        )
    train(cfg, args.recipe)
    return 0
