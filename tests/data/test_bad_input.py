"""Every documented data error is one line on stderr and exit code 2, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stoker.data.loader import TokenWindows
from stoker.data.shards import check_vocab, load_meta
from stoker.errors import StokerError

TINY = ["--data.tokenizer.vocab_size=300", "--data.val_fraction=0.25"]


def assert_one_line_error(result: tuple[int, str, str], *needles: str) -> str:
    rc, _, err = result
    assert rc == 2, err
    assert err.startswith("stoker: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def texts(tmp_path) -> Path:
    root = tmp_path / "texts"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 20)
    return root


@pytest.fixture
def prepared(run_cli, recipe, texts, tmp_path) -> tuple[list, Path]:
    out = tmp_path / "shards"
    args = ["prepare", recipe, f"--data.sources={texts}", f"--data.dir={out}", *TINY]
    assert run_cli(*args)[0] == 0
    return args, out


def test_empty_corpus(run_cli, recipe, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text("  \n\n ")
    assert_one_line_error(
        run_cli(
            "prepare",
            recipe,
            f"--data.sources={tmp_path / 'empty'}",
            f"--data.dir={tmp_path / 'd'}",
        ),
        "hold no documents",
    )
    assert not (tmp_path / "d").exists()


def test_missing_path(run_cli, recipe, tmp_path):
    assert_one_line_error(
        run_cli(
            "prepare", recipe, "--data.sources=[/no/such/file.txt]", f"--data.dir={tmp_path / 'd'}"
        ),
        "/no/such/file.txt",
        "no such file",
    )
    assert_one_line_error(
        run_cli(
            "prepare", recipe, f"--data.sources={tmp_path}/*.jsonl", f"--data.dir={tmp_path / 'd'}"
        ),
        "match",
    )
    assert_one_line_error(
        run_cli(
            "prepare",
            recipe,
            "--data.sources=python-stdlib",
            "--data.tokenizer.path=/no/tokenizer.json",
            f"--data.dir={tmp_path / 'd'}",
        ),
        "/no/tokenizer.json",
    )


def test_jsonl_line_without_text_field_names_file_and_line(run_cli, recipe, tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "a b c"}\n\n{"text": "d e"}\n{"body": "no text here"}\n')
    assert_one_line_error(
        run_cli("prepare", recipe, f"--data.sources={f}", f"--data.dir={tmp_path / 'd'}"),
        f"{f} line 4",
        "'text'",
        "data.text_field",
    )
    f.write_text('{"text": "a"}\n{"text": "b",\n')
    assert_one_line_error(
        run_cli("prepare", recipe, f"--data.sources={f}", f"--data.dir={tmp_path / 'd'}"),
        f"{f} line 2",
        "JSON",
    )


def test_parquet_without_text_column(run_cli, recipe, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x y z"]}), tmp_path / "t.parquet")
    assert_one_line_error(
        run_cli(
            "prepare",
            recipe,
            f"--data.sources={tmp_path / 't.parquet'}",
            f"--data.dir={tmp_path / 'd'}",
        ),
        "no column 'text'",
        "body",
    )


def test_vocab_too_large_for_forced_uint16(run_cli, recipe, texts, tmp_path):
    assert_one_line_error(
        run_cli(
            "prepare",
            recipe,
            f"--data.sources={texts}",
            "--data.tokenizer.vocab_size=70000",
            "--data.dtype=uint16",
            f"--data.dir={tmp_path / 'd'}",
        ),
        "does not fit data.dtype=uint16",
    )


def test_truncated_shard(run_cli, prepared):
    args, out = prepared
    shard = out / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    assert_one_line_error(run_cli(*args), "train-00000.bin is truncated", "stoker prepare")
    with pytest.raises(StokerError, match="truncated"):
        TokenWindows(out, "train", 8, 2, seed=0)


def test_meta_that_does_not_match_the_shards(run_cli, prepared):
    args, out = prepared
    meta = json.loads((out / "meta.json").read_text())
    meta["splits"]["val"]["tokens"] += 10
    (out / "meta.json").write_text(json.dumps(meta))
    assert_one_line_error(run_cli(*args), "split 'val' has", "its shards hold")
    meta["splits"]["val"]["tokens"] -= 10
    meta["dtype"] = "uint32"  # sizes now disagree with tokens × itemsize
    (out / "meta.json").write_text(json.dumps(meta))
    assert_one_line_error(run_cli(*args), "truncated")
    (out / "meta.json").write_text("{not json")
    with pytest.raises(StokerError, match="unreadable meta.json"):
        load_meta(out)


def test_model_vocab_smaller_than_the_shards(run_cli, recipe, prepared, tmp_path):
    _, out = prepared
    meta = load_meta(out)
    need = meta["vocab_size"]  # the BPE stops short of 300 on this tiny corpus
    check_vocab(meta, need)
    with pytest.raises(StokerError, match=rf"model.vocab_size={need - 1} is smaller .* \({need}\)"):
        check_vocab(meta, need - 1)
    # and so does `stoker train` before it builds anything
    assert_one_line_error(
        run_cli(
            "train",
            recipe,
            f"--data.dir={out}",
            f"--data.sources={out.parent / 'texts'}",
            *TINY,
            "--model.vocab_size=256",
            f"--train.out_dir={tmp_path / 'r'}",
        ),
        "model.vocab_size=256",
    )
