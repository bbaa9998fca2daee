"""`stoker prepare`: counts match an independent count, shards hold exactly the documents,
the split is seeded, re-runs are no-ops, changed inputs re-prepare; sources of every kind."""

from __future__ import annotations

import json
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from stoker.config import load_config
from stoker.data.prepare import prepare, split_mask
from stoker.data.shards import load_meta
from stoker.data.tokenizer import Tokenizer

TINY = ["--data.tokenizer.vocab_size=300", "--data.val_fraction=0.2"]


def corpus_docs() -> list[str]:
    """Real documents: small stdlib modules and paragraphs of the CPython license."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    mods = ["bisect.py", "colorsys.py", "keyword.py", "this.py", "glob.py", "fnmatch.py"]
    docs = [(stdlib / m).read_text(encoding="utf-8") for m in mods]
    license_text = (stdlib / "LICENSE.txt").read_text(encoding="utf-8")
    paras = [p for p in license_text.split("\n\n") if p.strip()]
    return docs + paras[:30]


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    """A dir of .txt files (the modules) and one .jsonl (the paragraphs); the documents."""
    docs = corpus_docs()
    root = tmp_path / "corpus"
    root.mkdir()
    n_txt = 6
    for i, doc in enumerate(docs[:n_txt]):
        (root / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    rows = [json.dumps({"id": i, "text": d}) for i, d in enumerate(docs[n_txt:])]
    (root / "paras.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root, docs


def shard_tokens(data_dir: Path, meta: dict, split: str) -> np.ndarray:
    files = [data_dir / s["file"] for s in meta["splits"][split]["shards"]]
    return np.concatenate([np.fromfile(f, dtype=meta["dtype"]) for f in files])


def split_docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    cuts = np.flatnonzero(tokens == eos)
    assert cuts.size and cuts[-1] == tokens.size - 1  # every document ends with EOS
    return [p.tolist() for p in np.split(tokens, cuts + 1)[:-1]]


def test_meta_counts_equal_an_independent_count(run_cli, recipe, corpus, tmp_path):
    root, docs = corpus
    out = tmp_path / "shards"
    rc, stdout, err = run_cli(
        "prepare", recipe, f"--data.sources={root}", f"--data.dir={out}", *TINY
    )
    assert rc == 0, err
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.load(out / "tokenizer")
    expected = sum(len(tok.encode(d, add_special_tokens=False)) + 1 for d in docs)
    splits = meta["splits"]
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == expected
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(docs)
    assert splits["val"]["documents"] == round(0.2 * len(docs))
    itemsize = np.dtype(meta["dtype"]).itemsize
    for info in splits.values():
        for s in info["shards"]:
            assert (out / s["file"]).stat().st_size == s["tokens"] * itemsize
    # the shards hold exactly the documents, each followed by one EOS
    decoded = Counter()
    for split in ("train", "val"):
        pieces = split_docs(shard_tokens(out, meta, split), meta["eos_id"])
        assert len(pieces) == splits[split]["documents"]
        decoded.update(tok.decode(p[:-1]) for p in pieces)
    assert decoded == Counter(docs)
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    assert meta["tokenizer_file"] == "tokenizer/tokenizer.json"
    assert (out / meta["tokenizer_file"]).is_file()
    assert "tokens/s" in stdout


def test_rerun_is_a_no_op_and_changed_inputs_reprepare(run_cli, recipe, corpus, tmp_path):
    root, _ = corpus
    args = ["prepare", recipe, f"--data.sources={root}", f"--data.dir={tmp_path / 'd'}", *TINY]
    assert run_cli(*args)[0] == 0
    meta_file = tmp_path / "d" / "meta.json"
    first = meta_file.read_text()
    rc, stdout, _ = run_cli(*args)
    assert rc == 0 and "up to date" in stdout and meta_file.read_text() == first
    (root / "doc00.txt").write_text("def changed():\n    return 42\n")
    rc, stdout, _ = run_cli(*args)
    second = json.loads(meta_file.read_text())
    assert rc == 0 and "wrote" in stdout
    assert second["fingerprint"] != json.loads(first)["fingerprint"]
    rc, stdout, _ = run_cli(*args, "--data.seed=7")  # a setting change re-prepares too
    assert rc == 0 and "wrote" in stdout
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "meta.json",
        "tokenizer",
        "train-00000.bin",
        "val-00000.bin",
    ]


def test_split_is_seeded_and_deterministic(corpus, tmp_path):
    root, _ = corpus

    def run(name: str, seed: int) -> bytes:
        cfg = load_config(
            None,
            [
                f"--data.sources={root}",
                f"--data.dir={tmp_path / name}",
                f"--data.seed={seed}",
                *TINY,
            ],
        )
        prepare(cfg)
        return (tmp_path / name / "val-00000.bin").read_bytes()

    assert run("a", 1) == run("b", 1)
    assert run("c", 2) != run("a", 1)
    mask = split_mask(1000, 0.05, seed=3)
    assert mask.sum() == 50 and np.array_equal(mask, split_mask(1000, 0.05, seed=3))
    assert split_mask(2, 0.01, seed=0).sum() == 1  # a val document whenever possible


def test_shards_roll_over_and_stay_consistent(corpus, tmp_path):
    root, _ = corpus
    cfg = load_config(
        None,
        [
            f"--data.sources={root}",
            f"--data.dir={tmp_path / 'd'}",
            "--data.shard_tokens=1000",
            *TINY,
        ],
    )
    meta = prepare(cfg)
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] == 1000 for s in shards[:-1])
    assert load_meta(tmp_path / "d") == meta


def test_large_vocab_uses_uint32(recipe, corpus, tmp_path, run_cli):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    root, docs = corpus
    words = sorted({w for d in docs for w in d.split()})
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    vocab.update({f"filler{i}": len(vocab) + i for i in range(70_000 - len(vocab))})
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    Tokenizer(hf, "</s>").save(tmp_path / "big")
    out = tmp_path / "d"
    rc, _, err = run_cli(
        "prepare",
        recipe,
        f"--data.sources={root}",
        f"--data.dir={out}",
        f"--data.tokenizer.path={tmp_path / 'big'}",
    )
    assert rc == 0, err
    meta = load_meta(out)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_000
    assert meta["eos_id"] == 1
    train = meta["splits"]["train"]
    assert (out / "train-00000.bin").stat().st_size == 4 * train["tokens"]


def test_source_kinds_and_builtin_corpus(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, docs = corpus
    pq.write_table(pa.table({"body": docs[:5], "n": list(range(5))}), tmp_path / "t.parquet")
    cfg = load_config(
        None,
        [
            f"--data.sources=[{tmp_path / 't.parquet'}, python-stdlib]",
            "--data.text_field=body",
            "--data.max_documents=9",
            f"--data.dir={tmp_path / 'd'}",
            *TINY,
        ],
    )
    meta = prepare(cfg)
    assert sum(s["documents"] for s in meta["splits"].values()) == 9
    tok = Tokenizer.load(tmp_path / "d" / "tokenizer")
    pieces = split_docs(
        np.concatenate([shard_tokens(tmp_path / "d", meta, s) for s in ("train", "val")]),
        meta["eos_id"],
    )
    decoded = {tok.decode(p[:-1]) for p in pieces}
    assert set(docs[:5]) <= decoded  # the parquet rows, then 4 stdlib modules


def test_wiki_corpus(wiki_importable, tmp_path):
    cfg = load_config(
        None,
        [
            "--data.sources=wiki-en",
            "--data.max_documents=40",
            f"--data.dir={tmp_path / 'd'}",
            *TINY,
        ],
    )
    meta = prepare(cfg)
    assert meta["splits"]["val"]["documents"] == 8
    tok = Tokenizer.load(tmp_path / "d" / "tokenizer")
    text = tok.decode(shard_tokens(tmp_path / "d", meta, "train").tolist())
    assert "century" in text or "film" in text  # English Wikipedia lead paragraphs


def test_gpt2_and_sentencepiece_shards_match_reference_counts(
    corpus, tmp_path, gpt2_dir, mistral_sp_model
):
    import sentencepiece as spm
    from transformers import GPT2TokenizerFast

    root, docs = corpus
    gpt2 = GPT2TokenizerFast.from_pretrained(gpt2_dir)
    sp = spm.SentencePieceProcessor(model_file=str(mistral_sp_model))
    refs = {
        "gpt2": (gpt2_dir, lambda d: gpt2(d)["input_ids"], 50256, "tokenizer.json"),
        "sp": (mistral_sp_model, sp.encode, 2, "tokenizer.model"),
    }
    for name, (path, encode, eos, main_file) in refs.items():
        out = tmp_path / name
        cfg = load_config(
            None,
            [f"--data.sources={root}", f"--data.dir={out}", f"--data.tokenizer.path={path}", *TINY],
        )
        meta = prepare(cfg)
        assert (meta["eos_id"], meta["dtype"]) == (eos, "uint16")
        assert meta["tokenizer_file"] == f"tokenizer/{main_file}"
        total = sum(s["tokens"] for s in meta["splits"].values())
        assert total == sum(len(encode(d)) + 1 for d in docs)
        pieces = [p for s in ("train", "val") for p in split_docs(shard_tokens(out, meta, s), eos)]
        assert sorted(p[:-1] for p in pieces) == sorted(encode(d) for d in docs)
        assert Tokenizer.load(out / "tokenizer").encode("x = 1", add_special_tokens=False) == (
            encode("x = 1")
        )


def test_stdlib_corpus_is_sorted_and_skips_tests():
    from stoker.data.corpora import stdlib_files

    files = stdlib_files()
    paths = [f.path for f in files]
    assert paths == sorted(paths) and len(paths) > 500
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = {p for f in paths for p in f.relative_to(root).parts[:-1]}
    assert not parts & {"test", "tests", "site-packages"}
    assert root / "argparse.py" in paths
