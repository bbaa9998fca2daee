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

from stoker.api import build_model
from stoker.config import RecipeConfig, dump_config
from stoker.errors import StokerError
from stoker.models.gpt import lm_loss
from stoker.monitor.advice import AdviceOnce, advise, print_advice, signals_for_run
from stoker.monitor.system import start_monitor
from stoker.train import distributed as D
from stoker.train.checkpoint import remove_staging_dirs
from stoker.train.guard import NonFiniteGuard
from stoker.train.optim import build_optimizer, lr_at
from stoker.train.runlock import RunLock
from stoker.train.sharded import materialize
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


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on CUDA GPUs that support it, fp16 (+ GradScaler) on older GPUs, fp32 on
    CPU/MPS (bf16 autocast on CPU is slower for small models; see docs/log.md)."""
    if name != "auto":
        if name == "fp16" and device.type != "cuda":
            raise StokerError("train.precision=fp16 needs a CUDA GPU; use bf16 or fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def accumulation_steps(batch: int, micro: int, world: int) -> int:
    if batch % (micro * world):
        raise StokerError(f"train.batch_size={batch} is not divisible by train.micro_batch_size="
                          f"{micro} × {world} process(es); pick a batch size that is a multiple "
                          f"of {micro * world}")
    return batch // (micro * world)


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in backward (less memory, ~1/3 more compute)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        fwd = block.forward
        block.forward = lambda *a, _f=fwd, **k: checkpoint(_f, *a, use_reentrant=False, **k)


@torch.no_grad()
def evaluate(model, loader, n_batches: int, info: D.DistInfo, amp, n_micro: int) -> float:
    """Mean validation loss over `n_batches` fixed global batches (every rank its slice)."""
    model.eval()
    total = torch.zeros((), device=info.device)
    for step in range(n_batches):
        for micro in range(n_micro):
            x, y = loader.batch(step, info.rank, info.world, micro, n_micro)
            x, y = x.to(info.device), y.to(info.device)
            with amp:
                total += lm_loss(model(x), y).float() / n_micro
    model.train()
    return float(D.all_reduce_mean(total / max(1, n_batches), info))


def train(cfg: RecipeConfig) -> dict[str, Any]:
    """Train `cfg` to `train.max_steps` (or until stopped); returns the run summary."""
    t, info = cfg.train, D.init_distributed(cfg.train.device, cfg.dist.backend)
    out = Path(t.out_dir)
    with contextlib.ExitStack() as held:
        if info.is_main:
            check_out_dir(out)
            held.enter_context(RunLock(out))  # one run per out_dir; released on any exit
            remove_staging_dirs(out)  # what killed saves left behind
        return _train(cfg, t, info, out)


def _train(cfg: RecipeConfig, t, info: D.DistInfo, out: Path) -> dict[str, Any]:
    from stoker.data.loader import BatchStream, TokenWindows, loader_settings
    from stoker.data.prepare import prepare
    from stoker.data.shards import check_vocab, load_meta
    from stoker.reproducibility import configure

    deterministic = t.deterministic if t.deterministic != "auto" else info.device.type == "cpu"
    repro = configure(deterministic, info.device.type)  # before any tensor math
    prep_stats: dict[str, float] = {}  # tokens/s, if this run tokenized the corpus itself
    if info.is_main:
        (out / "config.yaml").write_text(dump_config(cfg))
        print(f"stoker: training {cfg.recipe} on {info.device} × {info.world}, "
              f"writing {out}\n{dump_config(cfg)}", flush=True)
        meta = prepare(cfg, prep_stats)
    D.barrier(info)
    if not info.is_main:
        meta = load_meta(cfg.data.dir)
    check_vocab(meta, cfg.model.vocab_size)
    seq_len = t.seq_len or cfg.model.max_seq_len
    n_micro = accumulation_steps(t.batch_size, t.micro_batch_size, info.world)
    precision = resolve_precision(t.precision, info.device)
    amp = autocast_context(precision, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "fp16")

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    ckpt = find_resume(t.resume, out, info)
    if ckpt is None:
        raw = build_model(cfg.model, mor=cfg.mor).to(info.device)
    else:  # shapes on meta, then uninitialized memory the checkpoint fills: no random init
        raw = materialize(build_model(cfg.model, "meta", mor=cfg.mor), info.device)
    aux_loss, telemetry = getattr(raw, "auxiliary_loss", None), getattr(raw, "telemetry", None)
    if t.activation_checkpointing:
        apply_activation_checkpointing(raw)
    model = D.parallelize(raw, cfg.dist.strategy, info)
    opt = build_optimizer(model, cfg.optim, info.device.type, cfg.dist.strategy == "zero1"
                          and info.enabled)
    train_data = TokenWindows(cfg.data.dir, "train", seq_len, t.batch_size, t.seed)
    val_data = TokenWindows(cfg.data.dir, "val", seq_len, t.batch_size, t.seed + 1)
    torch.manual_seed(t.seed + 1000 + info.rank)  # dropout streams differ per rank

    step, best_val, bad_evals = 0, math.inf, 0
    if ckpt is not None:
        state = load_training_state(ckpt, model, opt, cfg, info, train_data)
        step, best_val, bad_evals = state["step"], state["best_val"], state["bad_evals"]
        if info.is_main:
            dropped = trim_metrics(out, step)  # rows logged after that checkpoint
            print(f"stoker: resuming from step {step} ({ckpt})" + (
                f"; dropped {dropped} metrics row(s) logged after it" if dropped else ""),
                flush=True)
    fwd = torch.compile(model) if t.compile else model

    loading = loader_settings(info.device.type, cfg.data.num_workers, cfg.data.pin_memory,
                              cfg.data.prefetch_factor, info.local_world)
    batches = BatchStream(train_data, step, t.max_steps, info.rank, info.world, n_micro,
                          **loading)
    # non-finite steps are skipped on the device; the host looks every step only on a CPU
    guard = NonFiniteGuard(opt, info.device, enabled=precision != "fp16")
    sync = info.device.type == "cuda"
    tracker = _make_tracker(cfg, info)
    meter = Throughput(cfg, seq_len, info, precision)
    bar = progress_bar(step, t.max_steps, info.is_main)
    stopped, last_val, loss_mean = None, None, None
    live_advice = AdviceOnce()  # advice printed at the start, then when a rule first fires
    if info.is_main:  # config-level advice (nothing measured yet)
        print(f"stoker: deterministic: {repro}", flush=True)
        print(f"stoker: data loading: {loading['num_workers']} worker(s), pin_memory "
              f"{loading['pin_memory']}" + (f", prefetch {loading['prefetch_factor']} per worker"
                                            if loading["num_workers"] else ""), flush=True)
        print_advice(live_advice.new(advise(signals_for_run(cfg, info.device, precision,
                                                            info.world))))

    def save(step: int) -> None:
        train_data.next_step = step  # batches are built ahead (workers); the saved position
        save_training_state(out, step, model, opt, cfg, info, train_data,
                            {"best_val": best_val, "bad_evals": bad_evals}, cfg.data.dir)

    model.train()
    with StopFlag() as flag, batches, start_monitor(out, t.monitor_interval, info.is_main,
                                                   info.device.index or 0) as monitor, \
            erase_on_error(bar):
        while step < t.max_steps:
            lr = lr_at(step, t.max_steps, cfg.optim)
            for group in opt.param_groups:
                group["lr"] = lr
            meter.start_step()
            loss_sum = torch.zeros((), device=info.device)
            for micro in range(n_micro):
                meter.wait_for_data()
                x, y = next(batches)
                x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
                meter.data_ready()
                with D.grad_sync(model, micro == n_micro - 1), amp:
                    lm = lm_loss(fwd(x), y) / n_micro
                    loss = lm + aux_loss() / n_micro if aux_loss else lm  # e.g. MoR routers'
                scaler.scale(loss).backward()
                loss_sum += lm.detach()
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       t.grad_clip if t.grad_clip > 0 else 1e30)
            loss_mean = D.all_reduce_mean(loss_sum, info)
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
            meter.end_step(t.batch_size * seq_len)
            monitor.step = step
            if not sync or log_now or eval_now or save_now:  # host reads: free on a CPU
                bad = guard.poll()
                if bad and t.nan_policy == "skip":
                    print(f"stoker: non-finite loss or gradients at {bad.count} step(s) "
                          f"from step {bad.first}; those steps skipped", flush=True)
                elif bad:
                    save(step)
                    raise StokerError(
                        f"loss or gradients became non-finite at step {bad.first}; saved the "
                        f"last good state (step {step}, that step not applied) to {out}; "
                        "lower optim.lr, raise optim.warmup_steps or use train.nan_policy=skip")

            if log_now:
                extra = telemetry() if telemetry else {}  # the model's own, e.g. MoR routing
                row = {"step": step, "loss": float(loss_mean), "lr": lr,
                       "grad_norm": float(grad_norm), **meter.report(), **memory_gb(info), **extra}
                tracker.log(row)
                bar.set_postfix_str(meter.postfix(row) + "".join(f" {k} {v:.3g}" for k, v in
                                        extra.items()) + monitor.postfix(row), refresh=False)
                if info.is_main and step > t.log_interval:  # the first window includes warm-up
                    print_advice(live_advice.new(advise(signals_for_run(
                        cfg, info.device, precision, info.world,
                        {"data_wait": row["data_wait"], "num_workers": loading["num_workers"]}))),
                        bar.write)
            bar.update(1)

            if eval_now:
                last_val = evaluate(fwd, val_data, t.eval_steps, info, amp, n_micro)
                meter.exclude_since_last_step()
                tracker.log({"step": step, "val_loss": last_val,
                             "val_perplexity": math.exp(min(last_val, 50))})
                if last_val < best_val - 1e-4:
                    best_val, bad_evals = last_val, 0
                else:
                    bad_evals += 1
                if t.early_stopping_metric and bad_evals >= t.early_stopping_patience:
                    stopped = f"early stopping: val_loss has not improved for {bad_evals} evals"
            if D.broadcast_flag(flag.set, info):
                stopped = stopped or f"stopped by signal at step {step}"
            if stopped or save_now:
                save(step)
                meter.exclude_since_last_step()
            if stopped:
                break
    bar.close()
    summary = {**meter.summary(step), "final_loss": float(loss_mean) if loss_mean is not None else None,
               "final_val_loss": last_val, "stopped": stopped, "out_dir": str(out),
               # share of the run's time the system monitor cost (sampler CPU + bar line)
               "monitor_overhead": monitor.cost_seconds / max(meter.elapsed(), 1e-9)}
    summary["advice"] = advise(signals_for_run(cfg, info.device, precision, info.world, {
        "data_wait": monitor.data_wait, "tokens_per_second": summary["tokens_per_second"],
        "tokenize_tokens_per_second": prep_stats.get("tokens_per_second"),
        "num_workers": loading["num_workers"]}))
    if info.is_main:
        print_advice(summary["advice"])
    tracker.summary(summary)
    tracker.close()
    if info.is_main:
        print(f"stoker: {stopped or 'done'} — {meter.summary_line(summary)}", flush=True)
    D.cleanup(info)
    return summary


def _make_tracker(cfg: RecipeConfig, info: D.DistInfo):
    from stoker.train.tracking import NullTracker, Tracker

    if not info.is_main:
        return NullTracker()
    return Tracker(cfg.train.out_dir, cfg.track, cfg.model_dump(mode="json"))


def train_command(args) -> int:
    """`stoker train RECIPE [--section.key=value ...]`"""
    from stoker.config import load_config

    train(load_config(args.recipe, args.overrides))
    return 0
