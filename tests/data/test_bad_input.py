"""Every documented data error is one line on stderr and exit code 2, through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from stoker.data import checksums, shards
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


# ------------------------------------------------------------------ shard contents (checksums)
def _token_max(path: Path) -> int:
    return int(np.fromfile(path, dtype="<u2").max())


def test_random_bytes_shard_of_the_right_size_is_refused(run_cli, prepared):
    args, out = prepared
    shard = out / "train-00000.bin"
    shard.write_bytes(np.random.default_rng(0).bytes(shard.stat().st_size))  # sizes still agree
    err = assert_one_line_error(run_cli(*args), f"{shard}: contents changed", "sha256", "prepare")
    assert "Traceback" not in err
    with pytest.raises(StokerError, match="train-00000.bin: contents changed"):
        TokenWindows(out, "train", 8, 2, seed=0)


def test_one_token_changed_in_place_is_refused_even_after_a_stamped_check(prepared):
    _, out = prepared
    shard = out / "val-00000.bin"
    past = shard.stat().st_mtime_ns - 3600 * 10**9  # prepared an hour ago: results are kept
    for f in out.glob("*.bin"):
        os.utime(f, ns=(past, past))
    load_meta(out)
    stamp = json.loads((out / checksums.STAMP_FILE).read_text())["shards"]
    assert set(stamp) == {"train-00000.bin", "val-00000.bin"}
    with open(shard, "r+b") as fh:  # same size, one id replaced by another valid id
        first = fh.read(2)
        fh.seek(0)
        fh.write(b"\x00\x00" if first != b"\x00\x00" else b"\x01\x00")
    with pytest.raises(StokerError, match=r"val-00000.bin: contents changed .*sha256"):
        load_meta(out)


def test_unchanged_shards_are_not_read_again_until_verified_json_is_deleted(prepared, monkeypatch):
    """The stamp is trusted for an unchanged (size, mtime_ns); deleting it forces a full read.
    Restoring the old mtime after editing the bytes is the one change that hides from it."""
    _, out = prepared
    shard = out / "train-00000.bin"
    past = shard.stat().st_mtime_ns - 3600 * 10**9
    for f in out.glob("*.bin"):
        os.utime(f, ns=(past, past))
    load_meta(out)
    shard.write_bytes(shard.read_bytes()[::-1])  # the same ids in another order
    os.utime(shard, ns=(past, past))
    monkeypatch.setattr(checksums, "_FACTS", {})  # as a new process
    load_meta(out)  # trusted from verified.json: not read
    (out / checksums.STAMP_FILE).unlink()
    with pytest.raises(StokerError, match="train-00000.bin: contents changed"):
        load_meta(out)


def test_meta_vocab_size_below_the_ids_in_a_shard_is_refused(run_cli, prepared):
    args, out = prepared
    top = _token_max(out / "train-00000.bin")
    meta = json.loads((out / "meta.json").read_text())
    meta["vocab_size"] = top  # id `top` is now out of range; the hashes still match
    (out / "meta.json").write_text(json.dumps(meta))
    assert_one_line_error(
        run_cli(*args),
        f"{out / 'train-00000.bin'}: holds token id {top}",
        f"vocab_size {top}",
    )
    with pytest.raises(StokerError, match=f"holds token id {top}"):
        TokenWindows(out, "val", 8, 2, seed=0)


def test_old_meta_without_checksums_loads_with_a_warning_and_ids_are_still_checked(
    run_cli, prepared
):
    args, out = prepared
    meta = json.loads((out / "meta.json").read_text())
    for split in meta["splits"].values():
        for shard in split["shards"]:
            del shard["sha256"]
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="records no shard checksums"):
        assert TokenWindows(out, "train", 8, 2, seed=0).vocab_size == meta["vocab_size"]
    shard = out / "train-00000.bin"
    shard.write_bytes(np.random.default_rng(1).bytes(shard.stat().st_size))
    err = assert_one_line_error(run_cli(*args), f"{shard}: holds token id", "vocab_size")
    assert str(_token_max(shard)) in err


# --------------------------------------------------------------------------- data.dir writes
def test_data_dir_that_is_a_file_fails_before_tokenizing(run_cli, recipe, texts, tmp_path):
    f = tmp_path / "afile"
    f.write_text("not a dir")
    for d, words in ((f, "is a file, not a directory"), (f / "sub", "cannot be created")):
        rc, out, err = run_cli("prepare", recipe, f"--data.sources={texts}", f"--data.dir={d}")
        assert_one_line_error((rc, out, err), str(d), words)
        assert "training" not in out  # refused before the BPE was trained
    assert f.read_text() == "not a dir"


@pytest.fixture
def make_read_only():
    """make(dir): a directory this process cannot write: chmod, or for root (which ignores the
    mode) the immutable attribute; the test is skipped where neither holds."""
    made: list[Path] = []

    def make(path: Path) -> Path:
        made.append(path)
        path.chmod(0o555)
        if os.access(path, os.W_OK) and shutil.which("chattr"):
            subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
        if os.access(path, os.W_OK):
            pytest.skip("cannot make a directory read-only for this user on this file system")
        return path

    yield make
    for path in made:
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)
        path.chmod(0o755)


def test_read_only_data_dir_fails_before_tokenizing(
    run_cli, recipe, texts, tmp_path, make_read_only
):
    d = tmp_path / "ro"
    d.mkdir()
    make_read_only(d)
    for target in (d, d / "sub"):
        rc, out, err = run_cli(
            "prepare", recipe, f"--data.sources={texts}", f"--data.dir={target}", *TINY
        )
        assert_one_line_error(
            (rc, out, err), f"{d}: data.dir is not writable", "writable directory"
        )
        assert "training" not in out


def test_read_only_up_to_date_data_dir_is_only_read(run_cli, prepared, make_read_only):
    args, out = prepared
    for f in out.glob("*.bin"):  # old enough for verified.json, were the dir writable
        past = f.stat().st_mtime_ns - 3600 * 10**9
        os.utime(f, ns=(past, past))
    make_read_only(out)
    rc, stdout, err = run_cli(*args)
    assert rc == 0 and "up to date" in stdout, err
    assert TokenWindows(out, "train", 8, 2, seed=0).tokens > 0
    assert not (out / checksums.STAMP_FILE).exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_full_disk_while_writing_shards_is_one_line_and_keeps_the_old_data(
    run_cli, prepared, monkeypatch
):
    """Shards written to /dev/full (every write fails with ENOSPC, as on a full disk)."""
    args, out = prepared
    before = (out / "meta.json").read_text()
    real_open = open
    monkeypatch.setattr(
        shards, "open", lambda path, mode: real_open("/dev/full", mode), raising=False
    )
    rc, stdout, err = run_cli(*args, "--data.seed=7")  # a changed setting: prepared again
    err = err[err.find("stoker: error:") :]  # less the tokenize progress bar before it
    assert_one_line_error(
        (rc, stdout, err),
        "train-00000.bin: cannot write the shard (No space left on device)",
        "data.dir",
    )
    monkeypatch.undo()
    assert (out / "meta.json").read_text() == before
    assert not list(out.glob(".prepare-*"))
    assert TokenWindows(out, "train", 8, 2, seed=0).tokens > 0


def test_prepare_removes_staging_dirs_of_dead_prepares(tmp_path):
    import sys

    from stoker.config import load_config
    from stoker.data.prepare import prepare

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    data = tmp_path / "data"
    stale = data / f".prepare-{dead.stdout.strip()}"
    live = data / f".prepare-{os.getppid()}"  # a running process: another prepare, kept
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / "train-00000.bin").write_bytes(b"\0" * 64)
    src = tmp_path / "a.txt"
    src.write_text("def f(x):\n    return x + 1\n" * 50)
    prepare(
        load_config(
            None,
            [
                f"--data.dir={data}",
                f"--data.sources={src}",
                "--data.tokenizer.vocab_size=300",
                "--data.val_fraction=0",
            ],
        )
    )
    assert not stale.exists() and live.exists()
