"""A per-example mixture of LoRA adapters in a BERT-style encoder, stoker
(`models.lora_mixture`: E adapters in one low-rank product, one-hot gates per example) against
transformers `BertModel` + PEFT holding the same adapters, one sub-batch per task.

    .venv/bin/python benchmarks/bench_dynamo.py [--quick] [--json PATH] [--device auto|cpu|cuda]
        [--shape all-MiniLM-L6-v2|tiny] [--tasks 5] [--batch-size 40] [--seq-len 128]
        [--warmup 2] [--steps 5] [--repeats 1] [--threads N] [--dtypes fp32,bf16]
        [--wait-idle SECONDS]

The encoder (`build_encoder`, seed 0) has the shape of all-MiniLM-L6-v2 (6 layers, d 384,
12 heads, d_ff 1536, vocab 30522, 512 positions), randomly initialized (no download; speed does
not depend on the values); `--quick` a tiny one (2 layers, d 64; B=10, T=16, 1 + 1 steps).
`--tasks` adapters (LoRA r=8, alpha=16, dropout 0) sit on every linear of every block (q, k, v,
o, up, down), B drawn N(0, 0.02) (seed 1), not LoRA's zeros, so that adapters differ. The
batch: B × T random token ids (fixed seed), all of length T (padding-free, no attention mask,
for simplicity), tasks balanced and shuffled (B=40: 8 per task).

Rows per dtype: `stoker mixture`, the mixed batch in one forward, one-hot gates (B, E) set by
`set_gates`; `stoker single adapter`, one adapter (`apply_lora`, the mixture's adapter 0) on the
same batch, for the mixture's overhead; `peft set_adapter/task`, `BertModel` (sdpa attention,
our weights via `encoder_state_dict_to_hf`) with PEFT LoRA on query, key, value,
attention.output.dense, intermediate.dense, output.dense (our q/k/v/o/up/down), adapter e =
our `LoRAMixtureLinear.adapter(e)`, run as PEFT normally runs several tasks: one sub-batch per
task after `set_adapter(task)` (split before timing); `peft adapter_names`, PEFT's mixed-batch
inference (forward only: PEFT refuses it in training mode).

A training step is forward + loss + backward + AdamW (lr 2e-4, no weight decay; stoker:
`train.optim.build_optimizer`, peer: `torch.optim.AdamW(fused=True)`) on the adapter factors.
The loss mean(h · u), last hidden states h on a fixed random u (C,), stands in for task heads
at no cost (not mean(h²): post-LN states have a near-constant norm); the peer back-propagates
each sub-batch's share and steps once. Inference: a forward under `torch.inference_mode`.
fp32, and bf16 as `torch.autocast(device, dtype=torch.bfloat16)` over fp32 weights.

First a check cell (fp32) compares per-example last hidden states of the mixture with PEFT's
sub-batches and `adapter_names`, the single adapter with the mixture gated onto adapter 0, and
one step's adapter gradients with PEFT's (relative to the largest entry): the run fails, before
any timing, when a max |diff| exceeds 1e-4. Each (impl, dtype) cell runs in its own subprocess
with the same torch thread count (default all cores; on a shared machine `--threads 1`) and,
with `--repeats` > 1, in alternating order, medians shown. tokens/s is B·T over the median
timed step; `per CPU-s` is tokens per CPU-second of the cell's process (steadier under other
load at one thread). Ratios: mixture / peft (target >= 1.5x) and the mixture's overhead over
one adapter, single / mixture - 1 (target <= 15 %). A benchmark, never a test assertion.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stoker.bench import resolve_device, run_worker, wait_idle
from stoker.config import EncoderConfig, LoRAConfig, OptimConfig
from stoker.models.encoder import build_encoder
from stoker.models.hf_encoder import encoder_state_dict_to_hf, hf_config_from_encoder
from stoker.models.lora import apply_lora, lora_layers
from stoker.models.lora_mixture import apply_lora_mixture, mixture_layers, set_gates
from stoker.monitor.system import cpu_cores, cpu_name
from stoker.train import optim

IMPLS = ("mixture", "single", "peft")
DTYPES = ("fp32", "bf16")
TOL = 1e-4  # max |diff| of the check, fp32 (gradients: relative to the largest entry)
TARGET_RATIO, TARGET_OVERHEAD = 1.5, 15.0  # mixture / peft set_adapter; mixture vs single, %
LORA = dict(r=8, alpha=16.0, dropout=0.0)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
PEFT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense"]
PEFT_TARGETS += ["output.dense"]  # matches attention.output.dense too
PEFT_LORA = dict(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"])
OPTIM = dict(lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
MINILM = dict(n_layer=6, n_head=12, d_model=384, d_ff=1536, vocab_size=30522, max_seq_len=512)
TINY = dict(n_layer=2, n_head=4, d_model=64, d_ff=256, vocab_size=512, max_seq_len=128)
SHAPES = {"all-MiniLM-L6-v2": MINILM, "tiny": TINY}
DEFAULTS = dict(shape="all-MiniLM-L6-v2", tasks=5, batch_size=40, seq_len=128, warmup=2, steps=5)
QUICK = dict(shape="tiny", tasks=5, batch_size=10, seq_len=16, warmup=1, steps=1)
METRICS = ("train", "train_cpu", "infer", "infer_cpu")  # the table's columns
ROWS = {  # label: (impl, train mode, inference mode)
    "stoker mixture": ("mixture", "train", "infer"),
    "stoker single adapter": ("single", "train", "infer"),
    "peft set_adapter/task": ("peft", "train", "infer"),
    "peft adapter_names": ("peft", None, "mixed"),
}


# ------------------------------------------------------------------------------ worker
def build_mixture(spec: dict[str, Any]) -> Any:
    """Our encoder (seed 0) with `tasks` adapters on every linear, B_e ~ N(0, 0.02) (seed 1)."""
    torch.manual_seed(0)
    model = build_encoder(EncoderConfig(**SHAPES[spec["shape"]]))
    apply_lora_mixture(model, [LORA["r"]] * spec["tasks"], LoRAConfig(**LORA, targets=TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in mixture_layers(model).values():
            m.lora_B.normal_(0.0, 0.02, generator=gen)
    return model


def build_single(mix: Any) -> Any:
    """The same encoder (seed 0) with one adapter (`apply_lora`): adapter 0 of `mix`."""
    torch.manual_seed(0)
    model = build_encoder(mix.config)
    apply_lora(model, LoRAConfig(**LORA, targets=TARGETS))
    mixed = mixture_layers(mix)
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            A, B = mixed[name].adapter(0)
            m.lora_A.copy_(A)
            m.lora_B.copy_(B)
    return model


def hf_module(name: str) -> str:
    """Our linear's name -> BertModel's (`layers.0.mlp.up_proj` -> `encoder.layer.0.
    intermediate.dense`), by the weight converter itself."""
    (key,) = encoder_state_dict_to_hf({f"{name}.weight": torch.empty(0)})
    return key.removesuffix(".weight")


def build_peft(mix: Any) -> Any:
    """`BertModel` (sdpa) with `mix`'s base weights and PEFT adapters task0 … task{E-1}
    holding `mix`'s adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModel

    fields = hf_config_from_encoder(mix.config)
    fields.pop("architectures")
    hf_cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf = AutoModel.from_config(hf_cfg, attn_implementation="sdpa", add_pooling_layer=False)
    base = {k: t for k, t in mix.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}
    keys = hf.load_state_dict(encoder_state_dict_to_hf(base), strict=False)
    if keys.missing_keys or keys.unexpected_keys:
        raise RuntimeError(f"base weights do not match the transformers model: {keys}")
    cfg = LoraConfig(**PEFT_LORA, target_modules=PEFT_TARGETS, bias="none")
    layers = mixture_layers(mix)
    E = layers[next(iter(layers))].n_adapters
    model = get_peft_model(hf, cfg, adapter_name="task0")
    for e in range(1, E):
        model.add_adapter(f"task{e}", cfg)
    adapted = [n for n, m in model.named_modules() if hasattr(m, "lora_A")]
    if len(adapted) != len(layers):
        raise RuntimeError(f"PEFT adapted {len(adapted)} layers, stoker {len(layers)}")
    with torch.no_grad():
        for name, m in layers.items():
            peer = model.base_model.model.get_submodule(hf_module(name))
            for e in range(E):
                A, B = m.adapter(e)
                peer.lora_A[f"task{e}"].weight.copy_(A)
                peer.lora_B[f"task{e}"].weight.copy_(B)
    return model


def lora_params(model: Any) -> list[Any]:
    """Every adapter factor (PEFT's inactive adapters too)."""
    return [p for n, p in model.named_parameters() if "lora_" in n]


def make_batch(spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    """ids (B, T) random, task (B,) balanced and shuffled, probe u (C,); fixed seeds."""
    B, T, E, shape = spec["batch_size"], spec["seq_len"], spec["tasks"], SHAPES[spec["shape"]]
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, shape["vocab_size"], (B, T), generator=gen)
    task = (torch.arange(B) % E)[torch.randperm(B, generator=gen)]
    u = torch.randn(shape["d_model"], generator=gen) / shape["d_model"] ** 0.5
    return ids, task, u  # the loss is mean(h · u)


def peft_hidden(model: Any, ids: Any, task: Any, u: Any = None) -> Any:
    """Last hidden states (B, T, C) from one sub-batch per task, in batch order; with the
    probe `u`, each sub-batch's share of mean(h · u) is back-propagated on the way."""
    out = None
    for t in task.unique().tolist():
        rows = (task == t).nonzero().squeeze(1)
        model.set_adapter(f"task{t}")
        h = model(input_ids=ids[rows]).last_hidden_state  # (b_t, T, C)
        if u is not None:
            ((h @ u).sum() / ids.numel()).backward()
        out = h.new_empty((len(ids), *h.shape[1:])) if out is None else out
        out[rows] = h.detach()
    return out


def check(spec: dict[str, Any]) -> dict[str, Any]:
    """fp32: max |diff| of last hidden states (mixture vs PEFT sub-batches, vs PEFT
    adapter_names; single vs mixture gated onto adapter 0) and of one step's adapter gradients
    (mixture vs PEFT sub-batches, relative to the largest entry)."""
    device, E = spec["device"], spec["tasks"]
    mix = build_mixture(spec)
    single, peer, mix = build_single(mix).to(device), build_peft(mix).to(device), mix.to(device)
    ids, task, u = (t.to(device) for t in make_batch(spec))
    gates, diffs = F.one_hot(task, E).float(), {}  # (B, E)
    with torch.no_grad():
        for m in (mix, single, peer):
            m.eval()
        set_gates(mix, gates)
        ours = mix(ids)  # (B, T, C)
        per_example = (ours - peft_hidden(peer, ids, task)).abs().amax(dim=(1, 2)).tolist()
        diffs["peft_subbatch"] = max(per_example)
        try:
            names = [f"task{t}" for t in task.tolist()]
            mixed = peer(input_ids=ids, adapter_names=names).last_hidden_state
            diffs["peft_adapter_names"] = (ours - mixed).abs().max().item()
        except Exception as err:  # an older PEFT, or not for this model: no such row
            diffs["peft_adapter_names_error"] = f"{type(err).__name__}: {err}"
        set_gates(mix, F.one_hot(torch.zeros_like(task), E).float())
        diffs["single_vs_gate0"] = (single(ids) - mix(ids)).abs().max().item()
    mix.train()
    peer.train()
    set_gates(mix, gates)
    (mix(ids) @ u).mean().backward()
    peft_hidden(peer, ids, task, u)
    worst = largest = 0.0
    for name, m in mixture_layers(mix).items():
        p = peer.base_model.model.get_submodule(hf_module(name))
        for e in range(E):
            rows = slice(e * LORA["r"], (e + 1) * LORA["r"])  # adapter e's rank rows
            pairs = (m.lora_A.grad[rows], p.lora_A), (m.lora_B.grad[:, rows], p.lora_B)
            for ours_g, theirs in pairs:
                g = theirs[f"task{e}"].weight.grad  # None: no example of task e
                g = torch.zeros_like(ours_g) if g is None else g
                worst = max(worst, (ours_g - g).abs().max().item())
                largest = max(largest, ours_g.abs().max().item())
    diffs["grad_relative"] = worst / largest if largest else float("inf")
    sizes = {"mixture": lora_params(mix), "peft": lora_params(peer)}
    sizes = {k: sum(p.numel() for p in ps) for k, ps in sizes.items()}
    ok = all(v <= TOL for k, v in diffs.items() if not k.endswith("_error"))
    ok = ok and sizes["mixture"] == sizes["peft"]
    return {"diffs": diffs, "per_example": per_example, "trainable": sizes, "passed": ok}


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """One (impl, dtype) cell: build, then per mode `warmup` + `steps` timed steps."""
    device, impl, E = spec["device"], spec["impl"], spec["tasks"]
    ids, task, u = make_batch(spec)
    mix = build_mixture(spec)
    model = mix if impl == "mixture" else (build_single if impl == "single" else build_peft)(mix)
    model = model.to(device)
    params = lora_params(model)
    for p in params:  # PEFT's added adapters start frozen; set_adapter toggles them anyway
        p.requires_grad_(True)
    if impl == "peft":
        kwargs = {k: v for k, v in OPTIM.items() if k != "weight_decay"}
        fused = optim.fused_adamw_available(device)
        opt = torch.optim.AdamW(params, weight_decay=OPTIM["weight_decay"], fused=fused, **kwargs)
    else:
        opt = optim.build_optimizer(model, OptimConfig(**OPTIM), device)
    ids, u, n = ids.to(device), u.to(device), ids.numel()
    bf16 = spec["dtype"] == "bf16"
    amp = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def step(losses: list[Any]) -> None:  # forward + loss per (sub-)batch, backward, AdamW
        for loss_fn in losses:
            with amp():
                loss = loss_fn()
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if impl == "peft":
        subs = [(f"task{t}", ids[(task == t).to(device)]) for t in task.unique().tolist()]
        names = [f"task{t}" for t in task.tolist()]

        def sub_loss(name: str, sub: Any) -> Any:
            model.set_adapter(name)
            return (model(input_ids=sub).last_hidden_state.float() @ u).sum() / n

        def infer() -> None:
            for name, sub in subs:
                model.set_adapter(name)
                with amp():
                    model(input_ids=sub)

        def mixed() -> None:
            with amp():
                model(input_ids=ids, adapter_names=names)

        train = lambda: step([lambda s=s: sub_loss(*s) for s in subs])  # noqa: E731
        modes = {"train": (True, train), "infer": (False, infer)}
        if spec["adapter_names"]:  # the check found PEFT's mixed batches work here
            modes["mixed"] = (False, mixed)
    else:
        if impl == "mixture":
            set_gates(model, F.one_hot(task, E).float().to(device))  # (B, E), one-hot

        def forward() -> None:
            with amp():
                model(ids)

        train = lambda: step([lambda: (model(ids).float() @ u).mean()])  # noqa: E731
        modes = {"train": (True, train), "infer": (False, forward)}
    results = {}
    for mode, (training, fn) in modes.items():
        model.train(training)
        times, cpu = [], 0.0
        for i in range(spec["warmup"] + spec["steps"]):
            if i == spec["warmup"]:
                cpu = time.process_time()
            sync()
            t0 = time.perf_counter()
            with contextlib.nullcontext() if training else torch.inference_mode():
                fn()
            sync()
            times.append(time.perf_counter() - t0)
        step_s = statistics.median(times[spec["warmup"] :])
        cpu_s = time.process_time() - cpu
        results[mode] = {
            "tokens_per_s": n / step_s,
            "step_times": times[spec["warmup"] :],
            "tokens_per_cpu_s": n * spec["steps"] / cpu_s,
        }
    return {"modes": results, "trainable": sum(p.numel() for p in params)}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    result = check(spec) if spec["impl"] == "check" else run_cell(spec)
    versions = {"torch": torch.__version__}
    if spec["impl"] in ("check", "peft"):  # the stoker cells never import them
        import peft
        import transformers

        versions |= {"transformers": transformers.__version__, "peft": peft.__version__}
    name = torch.cuda.get_device_name() if spec["device"] == "cuda" else cpu_name()
    return {**spec, **result, **versions, "device_name": name, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------ parent
def spawn(spec: dict[str, Any], wait: float = 0.0) -> dict[str, Any]:
    """Run one cell in a fresh interpreter (after waiting up to `wait` s for the machine to go
    quiet); its result plus `other_cores` (the CPU other processes used meanwhile, in cores)."""
    if wait:
        wait_idle(wait)
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    return run_worker(cmd, env, f"{spec['impl']:7s} {spec['dtype']}", "bench_dynamo: the")


def metrics(cell: dict[str, Any], train: str | None, infer: str) -> dict[str, float | None]:
    """A table row: tokens/s and tokens per CPU-s (METRICS) of two of the cell's modes."""
    get = lambda mode, key: cell["modes"].get(mode, {}).get(key) if mode else None  # noqa: E731
    modes = (("train", train), ("infer", infer))
    keys = (("", "tokens_per_s"), ("_cpu", "tokens_per_cpu_s"))
    return {col + end: get(mode, key) for col, mode in modes for end, key in keys}


def summarize(
    runs: dict[str, list[dict[str, Any]]], args: dict[str, Any], check_result: dict[str, Any]
) -> dict[str, Any]:
    """Medians per cell and mode, the table's rows and ratios per dtype. `runs` maps
    `impl/dtype` to that cell's worker results (one per repeat)."""
    cells, med = {}, lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    for key, results in runs.items():
        modes = {}
        for mode in results[0]["modes"]:
            rs = [r["modes"][mode] for r in results]
            modes[mode] = {k: med(rs, k) for k in ("tokens_per_s", "tokens_per_cpu_s")}
            modes[mode]["tokens_per_s_runs"] = [r["tokens_per_s"] for r in rs]
        other = max(r.get("other_cores", 0.0) for r in results)
        cells[key] = {**results[0], "modes": modes, "other_cores": other}
    ratio = lambda a, b: {k: a[k] / b[k] if a[k] and b[k] else None for k in METRICS}  # noqa: E731
    rows = []
    for dtype in args["dtypes"]:
        c = {impl: cells[f"{impl}/{dtype}"] for impl in IMPLS}
        tps = {label: metrics(c[impl], *modes) for label, (impl, *modes) in ROWS.items()}
        mix, single = tps["stoker mixture"], tps["stoker single adapter"]
        over = {k: None if v is None else 100 * (v - 1) for k, v in ratio(single, mix).items()}
        rows.append(dict(dtype=dtype, tokens_per_s=tps, overhead_pct=over,
                         mixture_vs_peft=ratio(mix, tps["peft set_adapter/task"]),
                         mixture_vs_adapter_names=ratio(mix, tps["peft adapter_names"]),
                         other_cores=max(cell["other_cores"] for cell in c.values())))  # fmt: skip
    passed = check_result["passed"]
    return dict(args=args, check=check_result, rows=rows, cells=cells, check_passed=passed)


def print_check(c: dict[str, Any]) -> None:
    d = c["diffs"]
    named = d.get("peft_adapter_names")
    named = f"{named:.1e}" if named is not None else f"n/a ({d.get('peft_adapter_names_error')})"
    print(
        f"check fp32: {'PASSED' if c['passed'] else 'FAILED'} (tolerance {TOL:.0e}): last "
        f"hidden states max |diff| stoker mixture vs peft sub-batches {d['peft_subbatch']:.1e} "
        f"(worst of {len(c['per_example'])} examples), vs peft adapter_names {named}; single "
        f"adapter vs mixture gated onto adapter 0 {d['single_vs_gate0']:.1e}; adapter "
        f"gradients, relative {d['grad_relative']:.1e}; trainable {c['trainable']['mixture']:,}"
        f" (stoker) / {c['trainable']['peft']:,} (peft)"
    )


def print_table(summary: dict[str, Any]) -> None:
    a, s = summary["args"], SHAPES[summary["args"]["shape"]]
    c = summary["cells"][f"peft/{a['dtypes'][0]}"]
    print(
        f"\nLoRA mixture, {a['shape']} shape ({s['n_layer']} layers, d {s['d_model']}, "
        f"{s['n_head']} heads, d_ff {s['d_ff']}), {a['tasks']} adapters r={LORA['r']} "
        f"alpha={LORA['alpha']:g} on q,k,v,o,up,down; B={a['batch_size']} (tasks mixed) "
        f"T={a['seq_len']}, {a['warmup']} warmup + {a['steps']} timed steps, median of "
        f"{a['repeats']} run(s)\n{c['device_name']} ({a['device']}), {c['threads']} threads, "
        f"torch {c['torch']}, transformers {c['transformers']}, peft {c['peft']}"
    )
    print(
        f"{'':34}{'train (fwd+bwd+AdamW)':^22}{'inference (fwd)':^22}\n{'dtype':6}{'row':28}"
        f"{'tok/s':>11}{'per CPU-s':>11}{'tok/s':>11}{'per CPU-s':>11}"
    )
    cell = lambda v, f: f"{'-' if v is None else format(v, f):>11}"  # noqa: E731
    for r in summary["rows"]:
        lines = [(k, v, ",.0f", "") for k, v in r["tokens_per_s"].items()]
        lines += [
            ("mixture / peft set_adapter", r["mixture_vs_peft"], ".2f", "x"),
            ("mixture / peft adapter_names", r["mixture_vs_adapter_names"], ".2f", "x"),
            ("mixture overhead vs single", r["overhead_pct"], "+.1f", " %"),
        ]
        for label, values, f, unit in lines:
            text = "".join(cell(values[k], f) for k in METRICS)
            print(f"{r['dtype']:6}{label:28}{text}{unit}")
        print(
            f"{r['dtype']:6}targets: mixture / peft set_adapter >= {TARGET_RATIO:g}x, overhead"
            f" <= {TARGET_OVERHEAD:g} %; other load up to {r['other_cores']:.2f} cores"
        )
    print_check(summary["check"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"smoke-test shape ({QUICK})")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--shape", choices=tuple(SHAPES), help=f"default {DEFAULTS['shape']}")
    for k in ("tasks", "batch_size", "seq_len", "warmup", "steps"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, help=f"default {DEFAULTS[k]}")
    ap.add_argument("--repeats", type=int, default=1, help="runs per cell, order alternating")
    ap.add_argument("--threads", type=int, default=cpu_cores(), help="torch threads per cell")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="fp32,bf16 or one of them")
    idle = "before each cell, wait up to SECONDS for other processes to go quiet"
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS", help=idle)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULTS).items():  # explicit options still win
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    dtypes = [d for d in args.dtypes.split(",") if d]
    if not dtypes or set(dtypes) - set(DTYPES) or min(args.steps, args.repeats, args.tasks) < 1:
        raise SystemExit("bench_dynamo: --dtypes from fp32,bf16; --steps, --repeats, --tasks >= 1")
    params = {k: getattr(args, k) for k in (*DEFAULTS, "threads")}
    params |= {"device": resolve_device(args.device)}
    check_result = spawn({**params, "impl": "check", "dtype": "fp32"})
    if not check_result["passed"]:  # models that disagree are not timed
        if args.json:
            Path(args.json).write_text(json.dumps({"check": check_result, "rows": []}) + "\n")
        print_check(check_result)
        return 1
    params["adapter_names"] = "peft_adapter_names" in check_result["diffs"]
    runs: dict[str, list[dict[str, Any]]] = {}
    for rep in range(args.repeats):  # alternating order: a busy spell hits every row
        for dtype in dtypes:
            for impl in IMPLS if rep % 2 == 0 else IMPLS[::-1]:
                result = spawn({**params, "impl": impl, "dtype": dtype}, args.wait_idle)
                runs.setdefault(f"{impl}/{dtype}", []).append(result)
    summary = summarize(runs, {**params, "dtypes": dtypes, "repeats": args.repeats}, check_result)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    print_table(summary)
    return 0 if summary["check_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
