"""Where one training step's time goes: torch.profiler over stoker's step on a preset, as
`stoker bench` times it (batch 8 × T, forward, `lm_loss`, backward, fused AdamW).

    .venv/bin/python benchmarks/profile_step.py [--preset bench-llama] [--precision bf16]
        [--steps 3] [--warmup 2] [--threads N] [--rows 20] [--compile]

`--precision`: fp32 or bf16 (autocast over fp32 weights, `train.precision=bf16`); `--compile`
compiles the forward as `train.compile=true` does.

Prints two tables over the profiled steps:
- by component: every ATen op's self CPU time, summed into what it belongs to. Forward ops
  are attributed by the module running them (record_function ranges opened by forward
  hooks: norm, attention projections, RoPE + SDPA, MLP, LM head), backward ops by their
  autograd node's name (MmBackward → GEMM, ...), with casts (`copy_`/`_to_copy`) and the
  optimizer counted apart. Percentages are of the profiled wall time.
- by op: the `rows` ATen ops with the most self CPU time.
A profiler adds ~5-10 % per op; compare runs of this script with each other, not with
`stoker bench`. Results: docs/log.md.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from stoker.config import ModelConfig, OptimConfig
from stoker.models.gpt import build_model, lm_loss
from stoker.train.optim import build_optimizer
from stoker.train.precision import autocast_context

BATCH = 8
GEMM = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv")
CASTS = ("aten::copy_", "aten::_to_copy", "aten::to")
ATTENTION = "_scaled_dot_product"
OPTIMIZER = ("aten::_fused_adamw_", "Optimizer.step", "aten::_foreach")
LOSS = ("aten::_log_softmax", "aten::nll_loss", "aten::cross_entropy")


def module_range(name: str):
    """Forward pre/post hooks that open and close a record_function range `name`."""
    ranges: list = []

    def pre(_module, _args):
        ranges.append(torch.profiler.record_function(f"fwd::{name}"))
        ranges[-1].__enter__()

    def post(_module, _args, _out):
        ranges.pop().__exit__(None, None, None)

    return pre, post


def label_modules(model: torch.nn.Module) -> None:
    """fwd::<component> ranges around the modules whose own ops make up a forward."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        component = {
            "input_layernorm": "norm",
            "post_attention_layernorm": "norm",
            "norm": "norm",
            "q_proj": "attn proj",
            "k_proj": "attn proj",
            "v_proj": "attn proj",
            "o_proj": "attn proj",
            "self_attn": "rope + sdpa",
            "mlp": "mlp",
            "lm_head": "lm head",
            "embed_tokens": "embedding",
        }.get(leaf)
        if component:
            pre, post = module_range(component)
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)


def component_of(name: str, where: str) -> str:
    """The component an op `name`'s self time belongs to, `where`: its innermost labelled
    range (see the module docstring)."""
    if name.startswith(OPTIMIZER) or where == "optimizer":
        return "optimizer"
    if name in CASTS:
        return "casts (copy_/_to_copy)"
    if ATTENTION in name:
        return "sdpa (flash) " + ("bwd" if "backward" in name else "fwd")
    if where.startswith("bwd::"):
        node = where.removeprefix("bwd::")
        if node.startswith(("Mm", "Addmm", "Bmm", "Mv")):
            return "GEMM bwd"
        if "LogSoftmax" in node or "NllLoss" in node:
            return "loss bwd"
        return f"elementwise bwd ({node.removesuffix('Backward0')})"
    if where.startswith("fwd::"):
        component = where.removeprefix("fwd::")
        if name in GEMM:
            return "GEMM fwd" + (" (lm head)" if component == "lm head" else "")
        return f"{component} fwd"
    if name.startswith(LOSS):
        return "loss fwd"
    return f"other ({name})"


def attribute(prof) -> dict[str, float]:
    """Self CPU microseconds by component, walking each op up to its innermost labelled
    range (a fwd:: record_function, a backward node, the optimizer step)."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: (e.time_range.start, -e.time_range.end))
    totals: collections.Counter = collections.Counter()
    stack: list[tuple[int, str]] = []  # (end, label) of the open labelled ranges
    for e in events:
        while stack and stack[-1][0] <= e.time_range.start:
            stack.pop()
        label = stack[-1][1] if stack else ""
        if e.name.startswith("fwd::"):
            stack.append((e.time_range.end, e.name))
        elif e.name.startswith("autograd::engine::evaluate_function: "):
            node = e.name.split(": ", 1)[1]
            stack.append((e.time_range.end, "bwd::" + node))
        elif e.name.startswith("Optimizer.step"):
            stack.append((e.time_range.end, "optimizer"))
        if e.name.startswith("aten::") and e.self_cpu_time_total > 0:
            totals[component_of(e.name, label)] += e.self_cpu_time_total
    return dict(totals)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="bench-llama")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--compile", action="store_true", help="torch.compile the forward")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(preset=args.preset)
    torch.manual_seed(0)
    model = build_model(cfg)
    label_modules(model)
    forward = torch.compile(model) if args.compile else model
    opt = build_optimizer(model, OptimConfig(lr=3e-4, betas=(0.9, 0.95)), "cpu")
    T, gen = cfg.max_seq_len, torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (BATCH, T + 1), generator=gen)
    ids, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    device = torch.device("cpu")

    def step():
        with autocast_context(args.precision, device):
            loss = lm_loss(forward(ids), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = time.perf_counter() - t0
    per_step = wall / args.steps
    tok_s = BATCH * T / per_step
    print(
        f"{args.preset} {args.precision}{' compiled' if args.compile else ''}, "
        f"{args.threads} thread(s): {per_step * 1e3:.0f} ms/step under the profiler "
        f"({tok_s:,.0f} tok/s)"
    )
    totals = attribute(prof)
    print(f"\n{'component':40s} {'ms/step':>9s} {'% of step':>10s}")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1])[: args.rows + 10]:
        print(f"{name:40s} {us / 1e3 / args.steps:9.1f} {us / (wall * 1e6):10.1%}")
    accounted = sum(totals.values()) / (wall * 1e6)
    print(f"{'(all ATen ops)':40s} {'':9s} {accounted:10.1%}")
    print()
    table = prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=48
    )
    print(table)


if __name__ == "__main__":
    main()
