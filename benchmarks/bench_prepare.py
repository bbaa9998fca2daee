"""Throughput of `stoker prepare` against a plain single-process `tokenizers` encode loop.

Both tokenize the full `python-stdlib` corpus with the same byte-level BPE (trained once by
`stoker prepare` itself, timed separately). `stoker prepare` is timed end to end (resolve and
fingerprint the sources, count and split the documents, read, tokenize on all cores, write
uint16 shards and meta.json) into a fresh directory; the peer is `Tokenizer.encode(doc)` over
documents already in memory, one at a time, which is what a naive prepare script does. Best of
`--repeats` interleaved runs each.

    .venv/bin/python benchmarks/bench_prepare.py [--vocab-size 8192] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from stoker.config import load_config
from stoker.data.corpora import iter_documents, resolve_sources
from stoker.data.prepare import prepare


def run_prepare(overrides: list[str]) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds (all threads) and meta of one quiet `prepare`."""
    cfg = load_config(None, overrides)
    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        meta = prepare(cfg)
    return time.perf_counter() - start, time.process_time() - cpu, meta


def encode_loop(tokenizer_file: Path, docs: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and tokens (+1 EOS per document) of a single-process
    encode loop."""
    tok = HFTokenizer.from_file(str(tokenizer_file))
    start, cpu = time.perf_counter(), time.process_time()
    n = 0
    for doc in docs:
        n += len(tok.encode(doc, add_special_tokens=False).ids) + 1
    return time.perf_counter() - start, time.process_time() - cpu, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base = ["--data.sources=python-stdlib", f"--data.tokenizer.vocab_size={args.vocab_size}"]
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        root = Path(tmp)
        train_s, _, meta = run_prepare([*base, f"--data.dir={root / 'trained'}"])
        tok_dir = root / "trained" / "tokenizer"
        tokens = sum(s["tokens"] for s in meta["splits"].values())
        docs_n = sum(s["documents"] for s in meta["splits"].values())
        print(
            f"python-stdlib: {docs_n} documents, {tokens:,} tokens with a trained BPE of "
            f"{meta['vocab_size']} (prepare incl. BPE training: {train_s:.2f} s)"
        )
        docs = list(iter_documents(resolve_sources(["python-stdlib"])))
        ours, peer = [], []
        for i in range(args.repeats):  # interleaved, so both see the same machine load
            out = root / f"run{i}"
            secs, cpu, m = run_prepare(
                [*base, f"--data.tokenizer.path={tok_dir}", f"--data.dir={out}"]
            )
            assert sum(s["tokens"] for s in m["splits"].values()) == tokens
            ours.append((secs, cpu))
            shutil.rmtree(out)
            secs, cpu, n = encode_loop(tok_dir / "tokenizer.json", docs)
            assert n == tokens, (n, tokens)  # same tokens, so the rates are comparable
            peer.append((secs, cpu))
    (wall_ours, cpu_ours), (wall_peer, cpu_peer) = min(ours), min(peer)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, load average {load:.2f}"
    )
    for name, wall, cpu in (
        ("stoker prepare (end to end)", wall_ours, cpu_ours),
        ("tokenizers encode loop (1 proc)", wall_peer, cpu_peer),
    ):
        print(f"{name:<32} {tokens / wall:>10,.0f} tokens/s  ({wall:.2f} s wall, {cpu:.2f} s CPU)")
    print(
        f"ratio stoker/peer: {wall_peer / wall_ours:.2f}x (wall), "
        f"{cpu_peer / cpu_ours:.2f}x (tokens per CPU-second)"
    )


if __name__ == "__main__":
    main()
