"""The text `stoker count` and `stoker plan` print: tables over the JSON-able results of
report.py (`count_result`, `plan_result`), one function per section, no arithmetic beyond
unit conversion.
"""

from __future__ import annotations

from stoker.config import ModelConfig
from stoker.scaling import flops

GIB = 2**30


def print_count(r: dict, m: ModelConfig) -> None:
    """The `stoker count` tables: parameters, FLOPs/token, memory per strategy."""
    p = r["params"]
    tied = "tied" if m.tie_embeddings else "untied"
    print(
        f"{r['model']}: {m.arch}, {m.n_layer} layers, d {m.d_model}, {m.n_head} heads / "
        f"{m.kv_heads} kv, head dim {m.dim_head}, d_ff {m.ffn_dim}, vocab {m.vocab_size}, "
        f"{tied}"
    )
    print("parameters (exact)")
    rows = [
        ("total", r["params_total"], ""),
        ("non-embedding", r["params_non_embedding"], "Kaplan: no embedding/position/untied head"),
        ("trainable", r["params_trainable"], ""),
        ("embedding", p["embedding"], "tied with lm_head" if m.tie_embeddings else ""),
        ("position", p["position"], ""),
        ("lm_head", p["lm_head"], ""),
        (
            "per layer",
            p["per_layer"],
            f"attention {p['attention_per_layer']:,}, mlp "
            f"{p['mlp_per_layer']:,}, norms {p['norms_per_layer']:,}; × {p['n_layer']}",
        ),
    ]
    if r.get("mor"):
        rows[-1] = (*rows[-1][:2], rows[-1][2] + f" unique ({m.n_layer} applied)")
        rows.append(("routers", r["mor"]["router_params"], r["mor"]["router"]))
    for name, value, note in rows:
        print(f"  {name:<14}{value:>15,}  {note}")
    if mo := r.get("mor"):
        ratio = ", ".join(f"{c} {v:.3f}" for c, v in mo["flops_ratio_to_vanilla"].items())
        print(
            f"Mixture-of-Recursions: R={mo['recursions']} {mo['sharing']}, router {mo['router']}, "
            f"KV cache {mo['kv_cache']}; tokens per recursion at T = {r['seq_len']}: "
            f"{mo['tokens_per_recursion']}\n  non-embedding {r['params_non_embedding'] / 1e6:.2f}M "
            f"vs vanilla {mo['vanilla_params_non_embedding'] / 1e6:.2f}M; FLOPs/token: {ratio}"
        )
    print(f"training FLOPs per token at T = {r['seq_len']} (forward + backward)")
    for c, v in r["flops_per_token"].items():
        print(f"  {c:<11}{v / 1e9:9.3f} GF  {r['flops_conventions'][c]}")
    _print_count_memory(r)


def _print_count_memory(r: dict) -> None:
    mem = r["memory"]
    print(
        f"memory per GPU (GiB), micro-batch {mem['micro_batch_size']} × {r['seq_len']}, "
        f"{mem['precision']}, {mem['num_gpus']} GPUs (--num-gpus); AdamW, fp32 master weights"
    )
    print(
        f"  {'strategy':<9}{'weights':>8}{'grads':>8}{'optim':>8}{'copies':>8}{'activ':>8}"
        f"{'total':>8}   with activation checkpointing"
    )
    for s, e in mem["per_strategy"].items():
        cols = [
            e[k] / GIB
            for k in ("weights", "grads", "optimizer", "weight_copies", "activations", "total")
        ]
        ckpt, ckpt_act = e["total_checkpointed"] / GIB, e["activations_checkpointed"] / GIB
        print(
            f"  {s:<9}"
            + "".join(f"{c:8.2f}" for c in cols)
            + f"   {ckpt:.2f} (activations {ckpt_act:.2f})"
        )
    print(
        "  (estimate; not counted: CUDA context, allocator fragmentation, communication "
        "buckets; see docs/scaling.md)"
    )


def _fmt(x: float, unit: str = "") -> str:
    for scale, s in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{s}{unit}"
    return f"{x:.4g}{unit}"


def _print_hardware(r: dict) -> None:
    if r["gpu"] is None:
        print("time and cost: pass --gpu NAME (and --num-gpus, --mfu)")
        return
    print(
        f"hardware: {r['num_gpus']} × {r['gpu_name']} at {r['peak_flops'] / 1e12:g} TFLOPS "
        f"dense {r['dtype']} (docs/scaling.md §4), MFU {r['mfu']:g} (assumed, --mfu)"
    )
    print(
        f"throughput: {r['tokens_per_second']:,.0f} tokens/s "
        f"({r['tokens_per_second_per_gpu']:,.0f} per GPU) = GPUs × peak × MFU ÷ FLOPs/token"
    )
    cost = (
        f"; cost {r['cost']:,.0f} at {r['price_per_gpu_hour']:g} per GPU-hour"
        if r["cost"] is not None
        else "; cost: pass --price-per-gpu-hour"
    )
    print(
        f"time: {r['hours']:,.1f} h ({r['hours'] / 24:,.1f} days), "
        f"{r['gpu_hours']:,.0f} GPU-hours{cost}"
    )


def _print_memory(r: dict) -> None:
    mem, cap = r["memory_per_gpu"], r.get("device_memory_gib")
    print(
        f"memory per GPU ({mem['strategy']}, micro-batch {mem['micro_batch_size']}): "
        f"~{mem['bytes'] / GIB:.1f} GiB, {mem['bytes_checkpointed'] / GIB:.1f} GiB with "
        f"activation checkpointing" + (f" (the GPU has {cap:g} GiB)" if cap else "")
    )
    if cap and mem["bytes_checkpointed"] > cap * GIB:
        print(
            "  warning: does not fit even with activation checkpointing; lower "
            "--micro-batch-size or shard more (zero1, fsdp2)"
        )
    elif cap and mem["bytes"] > cap * GIB:
        print("  note: fits only with train.activation_checkpointing (or a smaller micro-batch)")


def _print_laws(r: dict) -> None:
    print(f"predicted loss, Chinchilla L = E + A/N^α + B/D^β ({r['law_caveat']}):")
    for name, law in r["laws"].items():
        print(f"  {name:<10} {r[f'loss_{name}']:.4f}   ({law['source']})")
    if not r["law_in_fitted_range"]:
        print(
            "  note: N or D lies outside the 70M-16B params, 5B-500B tokens the published "
            "laws were fitted on: extrapolation"
        )
    print(f"compute-optimal for the same C = {r['budget_flops']:.3g} FLOPs:")
    for name, opt in r["compute_optimal"].items():
        print(
            f"  {name:<10} N {_fmt(opt['params'])}, D {_fmt(opt['tokens'])} "
            f"({opt['tokens_per_param']:.1f} tokens/param), loss {opt['loss']:.4f}"
        )
    target = r.get("target_loss") or {}
    for name, need in target.items():
        if name != "loss":
            when = "unreachable at this N" if need["tokens"] is None else _fmt(need["tokens"])
            hrs = f", {need['hours']:,.0f} h" if need["hours"] else ""
            print(f"  to reach loss {target['loss']:g} ({name}): {when}{hrs}")


def print_plan(r: dict) -> None:
    """The `stoker plan` report: model, tokens, hardware, memory, scaling-law losses."""
    print(
        f"{r['model']}: {r['params_total']:,} params; {r['flops_per_token'] / 1e9:.3f} GF/token "
        f"({r['flops_convention']}: {flops.CONVENTIONS[r['flops_convention']]}; T {r['seq_len']})"
    )
    print(
        f"tokens: {_fmt(r['tokens'])} ({r['tokens_basis']}), {r['tokens_per_param']:.1f} per "
        f"param; budget C = 6ND = {r['budget_flops']:.3g} FLOPs "
        f"(training F·D = {r['training_flops']:.3g})"
    )
    _print_hardware(r)
    _print_memory(r)
    _print_laws(r)
