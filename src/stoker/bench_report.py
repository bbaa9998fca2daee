"""`stoker bench`'s table: settings, one row per mode, the checks and notes under it (the
measurements and their methods: stoker/bench.py)."""

from __future__ import annotations

from typing import Any

from stoker.bench_workers import COMPILED, MATMUL_N, train_variant

TRAIN_MODES = ("fp32", "fp32" + COMPILED, "bf16", "bf16" + COMPILED)
DECODE_MODES = ("decode", "decode-auto")
LABELS = {m: f"train {m.replace('-', ' ')}" for m in TRAIN_MODES}
LABELS |= {"decode": "decode fp32", "decode-auto": "decode auto dtype", "data": "data loader"}
PEER_NAMES = {"transformers": "transformers", "nanogpt": "nanoGPT get_batch"}

HEADER = (  # columns: 19 13 13 9 10 8 7
    "                         stoker         peer    ratio    stoker    peer  other\n"
    "mode                      tok/s        tok/s      s/p      mm %    mm %  cores  peer"
)


def _cells(row: dict[str, Any]) -> str:
    """The table's number columns of one row; `-` where there is no number."""

    def num(key: str, width: int, fmt: str) -> str:
        value = row.get(key)
        return f"{'-':>{width}}" if value is None else f"{value:{width}{fmt}}"

    return (
        num("stoker_tokens_per_s", 13, ",.1f")
        + num("peer_tokens_per_s", 13, ",.1f")
        + num("ratio", 8, ".2f")
        + (" " if row["ratio"] is None else "x")
        + num("stoker_mm_frac", 10, ".0%")
        + num("peer_mm_frac", 8, ".0%")
        + f"{row['other_cores']:7.2f}"
    )


def print_table(s: dict[str, Any]) -> None:
    """The human-readable result: settings, one row per mode, the checks, loader headroom."""
    st, mm, v, gpu = s["settings"], s["matmul_flops_per_s"], s["versions"], s["device"] == "cuda"
    where = " ".join(filter(None, (s["device"], s["device_name"])))
    where += f" (host {s['host']})" if gpu and s["host"] else ""
    print(
        f"\nstoker bench: {where}, preset {s['preset']}, threads {st['threads']}"
        f"{' (host ops only)' if gpu else ''}, torch {v['torch']}, "
        f"transformers {v['transformers'] or 'not installed'}; {st['repeats']} process(es) "
        f"per cell, {'quick' if st['quick'] else 'full'}"
    )
    modes = [r["mode"] for r in s["rows"]]
    setup = []
    if mm:
        setup.append(
            f"train batch {st['batch']} x T {st['seq_len']}, {s['flops_per_token'] / 1e6:.2f} "
            f"MFLOP/token; {matmul_line(s)}"
        )
    if any(m in modes for m in DECODE_MODES):
        setup.append(f"decode batch 1, prompt {st['prompt']} + {st['new_tokens']} new")
    if "data" in modes:
        setup.append(
            f"data batch {st['batch']} x T {st['seq_len']} from {st['data_tokens']:,} tokens"
        )
    print("\n".join(setup))
    print(HEADER)
    for r in s["rows"]:
        print(f"{LABELS[r['mode']]:19s}{_cells(r)}  {r['peer_missing'] or PEER_NAMES[r['peer']]}")
    print_notes(s)


def matmul_line(s: dict[str, Any]) -> str:
    """`matmul 2048^3 GFLOP/s: fp32 120, bf16 95` on CPU; on CUDA in TFLOP/s with the TF32
    setting of fp32 and the datasheet peak of each dtype the hardware table has."""
    mm, n = s["matmul_flops_per_s"], MATMUL_N[s["device"]]
    if s["device"] != "cuda":
        return f"matmul {n}^3 GFLOP/s: " + ", ".join(f"{d} {mm[d] / 1e9:.0f}" for d in mm)
    rates = []
    for d in mm:
        tf32 = f" (TF32 {'on' if s['matmul_tf32'] else 'off'})" if d == "fp32" else ""
        peak = s["peak_flops_per_s"].get(d)
        known = f" / datasheet {peak / 1e12:.0f}" if peak else ""
        rates.append(f"{d} {mm[d] / 1e12:.1f}{tf32}{known}")
    return f"matmul {n}^3 TFLOP/s: " + ", ".join(rates)


def print_notes(s: dict[str, Any]) -> None:
    """The lines under the table: checks, compiled vs eager, warnings, loader headroom."""
    checks = s["checks"]
    dtype = next((r["stoker_dtype"] for r in s["rows"] if r["mode"] == "decode-auto"), None)
    for key, (a, b) in checks.items():
        if "tokens" in key:
            same = sum(x == y for x, y in zip(a, b, strict=True))
            what = {
                "tokens_decode": "fp32 vs transformers fp32",
                "tokens_decode-auto": f"{dtype} vs transformers fp32",
                "fp32_tokens_decode-auto": f"{dtype} vs stoker fp32",
            }[key]
            print(f"check: greedy tokens equal in {same}/{len(a)} positions (stoker {what})")
            continue
        mode = key.removeprefix("loss0_")
        eager = checks.get(f"loss0_{train_variant(mode)[0]}") if mode.endswith(COMPILED) else None
        also = "" if eager is None else f" (eager {eager[0]:.6f} vs {eager[1]:.6f})"
        print(f"check: first-step {mode} loss {a:.6f} vs {b:.6f}{also}")
    for r in s["rows"]:
        if r["mode"].endswith(COMPILED):
            print(compile_line(r))
    if any((r.get(f"{side}_mm_frac") or 0) > 1 for r in s["rows"] for side in ("stoker", "peer")):
        print(
            "note: mm % above 100%: the machine ran slower while the matmul rate was measured "
            "(best of the runs); rerun, or use --repeats / --wait-idle"
        )
    for r in s["rows"]:
        if r.get("timed_graphs"):
            print(
                f"note: {r['mode']}: {r['timed_graphs']} graph(s) compiled during the timed "
                "steps (recompilation); raise --warmup"
            )
        if r.get("train_multiple") is not None:
            print(
                f"data: TokenWindows.batch delivers {r['train_multiple']:,.0f}x the stoker "
                f"train {r['train_mode']} rate{' on the GPU' if s['device'] == 'cuda' else ''} "
                "(a loader under ~10x the training rate would slow training)"
            )


def compile_line(r: dict[str, Any]) -> str:
    """`compile fp32: stoker 1.32x eager, ...; warm-up ... stoker 41.2 s, ...` for one row."""
    dtype, peer = train_variant(r["mode"])[0], PEER_NAMES[r["peer"]]
    sides = (("stoker", "stoker"), ("peer", peer))
    fmt = lambda v, f: "-" if v is None else format(v, f)
    line = f"compile {dtype}: "
    if r.get("stoker_vs_eager") is not None:  # the eager mode of this dtype ran too
        line += ", ".join(f"{n} {fmt(r[f'{k}_vs_eager'], '.2f')}x eager" for k, n in sides) + "; "
    times = ", ".join(f"{n} {fmt(r[f'{k}_warmup_s'], '.1f')} s" for k, n in sides)
    return line + f"warm-up ({r['warmup_steps']} step(s), compiling included) {times}"
