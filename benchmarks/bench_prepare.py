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


def run_prepare(overrides: list[str]) -> tuple[float, dict]:
    """Seconds and meta of one quiet `prepare`."""
    cfg = load_config(None, overrides)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        meta = prepare(cfg)
    return time.perf_counter() - start, meta


def encode_loop(tokenizer_file: Path, docs: list[str]) -> tuple[float, int]:
    """Seconds and tokens (+1 EOS per document) of a single-process encode loop."""
    tok = HFTokenizer.from_file(str(tokenizer_file))
    start = time.perf_counter()
    n = 0
    for doc in docs:
        n += len(tok.encode(doc, add_special_tokens=False).ids) + 1
    return time.perf_counter() - start, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    base = ["--data.sources=python-stdlib", f"--data.tokenizer.vocab_size={args.vocab_size}"]
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        root = Path(tmp)
        train_s, meta = run_prepare([*base, f"--data.dir={root / 'trained'}"])
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
            secs, m = run_prepare([*base, f"--data.tokenizer.path={tok_dir}", f"--data.dir={out}"])
            assert sum(s["tokens"] for s in m["splits"].values()) == tokens
            ours.append(secs)
            shutil.rmtree(out)
            secs, n = encode_loop(tok_dir / "tokenizer.json", docs)
            assert n == tokens, (n, tokens)  # same tokens, so the rates are comparable
            peer.append(secs)
    best_ours, best_peer = min(ours), min(peer)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(
        f"stoker prepare (end to end)      {tokens / best_ours:>12,.0f} tokens/s "
        f"({best_ours:.2f} s)"
    )
    print(
        f"tokenizers encode loop (1 proc)  {tokens / best_peer:>12,.0f} tokens/s "
        f"({best_peer:.2f} s)"
    )
    print(f"ratio stoker/peer: {best_peer / best_ours:.2f}x")


if __name__ == "__main__":
    main()
