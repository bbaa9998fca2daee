"""Supervised fine-tuning samples: JSONL / parquet records in the common shapes, validated.

A source (an entry of `prepare_sft(sources=...)`) is a `.jsonl` or `.parquet` file, a
directory or glob of them (sorted), or a built-in set:
  `python-stdlib-docstrings`  the running Python's standard library: a public function or
                              method signature -> the first line of its docstring (offline,
                              zero install; `stdlib_docstrings` writes it as JSONL).
Each JSONL line (parquet row, same column names) is one sample in one of these shapes:
  {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}, ...],
   "tools": [...]?, "documents": [...]?}    chat; an assistant message may carry
                                            `tool_calls` instead of content
  {"conversations": [{"from": "system"|"human"|"gpt"|"tool", "value": str}, ...]}  ShareGPT
  {"prompt": str, "response": str, "system": str?}     ("completion" may replace "response")
  {"instruction": str, "input": str?, "output": str, "system": str?}               Alpaca
Every sample needs at least one assistant turn. Blank lines are skipped. A line that is not
a JSON object, has none of these shapes, or has a wrong type is a one-line StokerError that
names `file:line` (`file row N` for parquet), so a bad record is found and fixed, not skipped.
Prompt/response and Alpaca samples also carry their plain form (prompt text, response) for
tokenizers without a chat template (chat_template.plain_text); with a template they are a
user turn (the instruction, a blank line, the input) and an assistant turn.

Also here: `encode_samples` (rendered text -> ids + a target mask from the tokenizer's offset
mappings) and the row layouts `SFTBatches` draws on, `bucket_rows` (runs of B samples sorted
by length inside windows of BUCKET_BATCHES·B) and `pack_rows` (best-fit decreasing into rows
of T positions inside windows of PACK_WINDOW samples), both shuffling their output per window.
"""

from __future__ import annotations

import ast
import bisect
import glob
import itertools
import json
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from stoker.data.chat_template import ChatTemplate, alpaca_prompt, assistant_spans, plain_text
from stoker.data.corpora import stdlib_files
from stoker.data.rng import hash_keys, splitmix64
from stoker.data.tokenizer import Tokenizer
from stoker.errors import StokerError, file_error, file_errors

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
}
SUFFIXES = (".jsonl", ".parquet")
STDLIB_DOCSTRINGS = "python-stdlib-docstrings"
BUILTIN = (STDLIB_DOCSTRINGS,)
STDLIB_PROMPT = "Describe in one line what this Python standard library function does:\n"
SHAPES = ("messages", "conversations", "prompt + response", "instruction + output")
FIX = "fix or remove that record"
ENCODE_BATCH = 256  # samples per encode_batch call
BUCKET_BATCHES = 32  # bucket_rows: batches per window of samples sorted by length
PACK_WINDOW = 4096  # pack_rows: samples per window packed together


@dataclass(frozen=True)
class SFTSource:
    """One input: a file (kind jsonl | parquet) or a built-in set (kind builtin, path None)."""

    name: str
    kind: str
    path: Path | None = None

    def describe(self) -> list:
        """What the prepared data depends on: path, size and mtime, or the Python's version."""
        if self.path is None:
            return [self.name, sys.version, sysconfig.get_paths()["stdlib"]]
        st = self.path.stat()
        return [str(self.path.resolve()), self.kind, st.st_size, st.st_mtime_ns]

    def where(self, n: int) -> str:
        return {"jsonl": f"{self.path}:{n}", "parquet": f"{self.path} row {n}"}.get(
            self.kind, f"{self.name} record {n}"
        )


@dataclass(frozen=True)
class Sample:
    """One validated sample: the conversation, and (prompt, response) when it has a plain form."""

    where: str
    messages: list[dict[str, Any]]
    tools: list[Any] | None = None
    documents: list[Any] | None = None
    plain: tuple[str, str] | None = None


def resolve_sft_sources(sources: list[str]) -> list[SFTSource]:
    """The files and built-in sets of `sources`, in order (directories and globs sorted)."""
    out: list[SFTSource] = []
    for source in sources:
        if source in BUILTIN:
            out.append(SFTSource(source, "builtin"))
            continue
        p = Path(source).expanduser()
        if any(c in source for c in "*?["):
            paths = [Path(m) for m in sorted(glob.glob(str(p), recursive=True))]
        elif p.is_dir():
            paths = sorted(p.rglob("*"))
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise StokerError(f"SFT source {p}: expected a .jsonl or .parquet file")
            paths = [p]
        else:
            raise StokerError(
                f"SFT source {source!r}: no such file, directory or built-in set "
                f"(built-in: {', '.join(BUILTIN)})"
            )
        found = [
            SFTSource(str(m), m.suffix[1:], m)
            for m in paths
            if m.is_file() and m.suffix in SUFFIXES
        ]
        if not found:
            raise StokerError(f"SFT source {source!r} holds no .jsonl or .parquet files")
        out += found
    return out


def _bad(where: str, what: str) -> StokerError:
    return file_error(where, what, FIX)


def _text(row: dict, key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "missing" if value is None else type(value).__name__
        raise _bad(where, f"field {key!r} must be a string (it is {got})")
    return value


def _messages(raw: Any, where: str, sharegpt: bool = False) -> list[dict[str, Any]]:
    key = "conversations" if sharegpt else "messages"
    if not isinstance(raw, list) or not raw:
        raise _bad(where, f"{key!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _bad(where, f"message {i} is {type(m).__name__}, not an object")
        if sharegpt:
            role = SHAREGPT_ROLES.get(m.get("from"))
            if role is None:
                raise _bad(
                    where,
                    f"message {i} has 'from': {m.get('from')!r}; expected one "
                    f"of {', '.join(SHAREGPT_ROLES)}",
                )
            m = {"role": role, "content": m.get("value")}
        role = m.get("role")
        if role not in ROLES:
            raise _bad(where, f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if not (isinstance(content, str) or (content is None and m.get("tool_calls"))):
            got = "missing" if content is None else type(content).__name__
            raise _bad(where, f"message {i} ({role}) needs a string 'content' (it is {got})")
        out.append(m)
    if not any(m["role"] == "assistant" for m in out):
        raise file_error(
            where,
            "has no assistant turn, so nothing to train on",
            "add the assistant's reply or remove the record",
        )
    return out


def _system(row: dict, where: str) -> list[dict[str, Any]]:
    system = _text(row, "system", where, required=False)
    return [{"role": "system", "content": system}] if system else []


def parse_record(row: Any, where: str) -> Sample:
    """A Sample from one decoded record; StokerError naming `where` when it is malformed."""
    if not isinstance(row, dict):
        raise _bad(where, f"is {type(row).__name__}, not a JSON object")
    optional = {}
    for key in ("tools", "documents"):
        if row.get(key) is not None and not isinstance(row[key], list):
            raise _bad(where, f"{key!r} must be a list")
        optional[key] = row.get(key)
    if "messages" in row or "conversations" in row:
        sharegpt = "messages" not in row
        raw = row["conversations" if sharegpt else "messages"]
        return Sample(where, _messages(raw, where, sharegpt), **optional)
    if "prompt" in row:
        response_key = "completion" if "completion" in row and "response" not in row else "response"
        prompt, response = _text(row, "prompt", where), _text(row, response_key, where)
        user = prompt
        plain = (alpaca_prompt(prompt), response)
    elif "instruction" in row:
        instruction, response = _text(row, "instruction", where), _text(row, "output", where)
        extra = _text(row, "input", where, required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        plain = (alpaca_prompt(instruction, extra), response)
    else:
        keys = ", ".join(map(str, row)) or "none"
        raise _bad(where, f"has none of the sample shapes {' | '.join(SHAPES)} (keys: {keys})")
    messages = [
        *_system(row, where),
        {"role": "user", "content": user},
        {"role": "assistant", "content": response},
    ]
    return Sample(where, messages, plain=plain, **optional)


def _jsonl_records(src: SFTSource) -> Iterator[tuple[int, Any]]:
    with file_errors(src.path, "cannot read the SFT source", "fix its permissions"):
        fh = open(src.path, "rb")  # noqa: SIM115 (closed below)
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            with file_errors(src.where(n), "is not valid JSON", FIX):
                yield n, json.loads(line)


def _parquet_records(src: SFTSource) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise StokerError(f"reading {src.path} needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(src.path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid/OSError types
        raise file_error(
            src.path,
            "is not a readable parquet file",
            "rewrite it or remove it from the sources",
            str(e),
        ) from None
    n = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def iter_samples(
    sources: list[SFTSource], max_samples: int | None = None
) -> Iterator[tuple[int, int, Sample]]:
    """(source index, record number, validated sample) of every source in order, at most
    `max_samples`; `sources[i].where(n)` names the record."""
    count = 0
    for i, src in enumerate(sources):
        if src.kind == "jsonl":
            records = _jsonl_records(src)
        elif src.kind == "parquet":
            records = _parquet_records(src)
        else:
            records = enumerate(stdlib_docstring_records(), 1)
        for n, row in records:
            if max_samples is not None and count >= max_samples:
                return
            count += 1
            yield i, n, parse_record(row, src.where(n))


# ---------------------------------------------------------------------------- built-in set
def _module_name(root: Path, path: Path) -> str | None:
    """`email.mime.text` for `email/mime/text.py`; None for private modules (`_x`, `x/_y`)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or any(p.startswith("_") or not p.isidentifier() for p in parts):
        return None
    return ".".join(parts)


def _first_line(node: ast.AST) -> str | None:
    """The docstring's first line when it reads as a description (≥ 3 words, not a signature)."""
    doc = ast.get_docstring(node)
    line = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
    name = getattr(node, "name", "")
    if len(line.split()) < 3 or line.startswith(f"{name}("):
        return None
    return line


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    ret = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"({ast.unparse(node.args)}){ret}"


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.AST]]:
    """(qualified name, node) of the public top-level functions and public methods of public
    top-level classes, in source order."""
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, funcs) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, funcs) and not item.name.startswith("_"):
                    yield f"{node.name}.{item.name}", item


def stdlib_docstring_records(n: int | None = None) -> Iterator[dict[str, str]]:
    """`{"prompt": STDLIB_PROMPT + "json.dumps(obj, *, ...)", "response": first docstring
    line}` for the stdlib's public functions and methods (sorted files, source order, each
    prompt once), at most `n`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for f in stdlib_files():
        module = _module_name(root, f.path)
        if module is None:
            continue
        try:
            tree = ast.parse(f.path.read_bytes(), filename=str(f.path))
        except (SyntaxError, ValueError, OSError):  # e.g. lib2to3 test data, unreadable files
            continue
        for qualname, node in _functions(tree):
            line = _first_line(node)
            prompt = f"{STDLIB_PROMPT}{module}.{qualname}{_signature(node)}"
            if line is None or prompt in seen:
                continue
            seen.add(prompt)
            yield {"prompt": prompt, "response": line}
            if n is not None and len(seen) >= n:
                return


def stdlib_docstrings(path: str | Path, n: int | None = None) -> int:
    """Write `stdlib_docstring_records(n)` to `path` as JSONL; how many were written."""
    path = Path(path)
    count = 0
    fix = "choose a writable path"
    with file_errors(path, "cannot write", fix), open(path, "w", encoding="utf-8") as fh:
        for rec in stdlib_docstring_records(n):
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            count += 1
    return count


# ---------------------------------------------------------------------------- tokenize
def render_sample(
    sample: Sample, template: ChatTemplate | None, eos_token: str, tok_dir: Path
) -> tuple[str, list[tuple[int, int]]]:
    """(text, target character spans) of one sample; StokerError naming its record."""
    if template is None:
        if sample.plain is None:
            raise file_error(
                sample.where,
                f"is a chat sample but the tokenizer {tok_dir} has no chat template",
                "use prompt/response or Alpaca data (they get the plain format), "
                "or add a template (chat_template.jinja in the tokenizer dir, or template=PATH)",
            )
        return plain_text(*sample.plain, eos_token)
    try:
        return assistant_spans(template, sample.messages, sample.tools, sample.documents)
    except jinja2.TemplateError as e:
        raise file_error(
            sample.where,
            f"is refused by the chat template ({template.origin})",
            "fix the record, or use a template that accepts it",
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        ) from None
    except ValueError as e:
        raise file_error(
            sample.where,
            "has assistant text the template does not render verbatim",
            "fix the record or the template",
            str(e),
        ) from None


def target_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """uint8 per token: 1 where the token's characters overlap a span."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(off), dtype=bool)
    for s, e in spans:
        mask |= (off[:, 1] > s) & (off[:, 0] < e)
    return mask.astype(np.uint8)


def encode_samples(
    samples: list[Sample], tok: Tokenizer, template: ChatTemplate | None, tok_dir: Path
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, target mask) per sample; StokerError for a sample without a target token."""
    rendered = [render_sample(s, template, tok.eos_token, tok_dir) for s in samples]
    encodings = tok.tok.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    out = []
    for sample, (_, spans), enc in zip(samples, rendered, encodings, strict=True):
        mask = target_mask(enc.offsets, spans)
        if not mask[1:].any():  # token 0 has no context to be predicted from
            raise file_error(
                sample.where,
                "renders no assistant token to train on",
                "give it a non-empty assistant reply",
            )
        out.append((np.asarray(enc.ids, dtype=np.int64), mask))
    return out


def tokenize_samples(
    srcs: list[SFTSource],
    max_samples: int | None,
    is_val: np.ndarray,
    tok: Tokenizer,
    chat: ChatTemplate | None,
    tok_dir: Path,
) -> tuple[dict, dict]:
    """Per split ("val" where `is_val[i]`): the (ids, target mask) of its samples, and their
    (source index, record number)."""
    kept: dict[str, list] = {"train": [], "val": []}
    origin: dict[str, list] = {"train": [], "val": []}
    items, done = iter_samples(srcs, max_samples), 0
    while chunk := list(itertools.islice(items, ENCODE_BATCH)):
        pieces = encode_samples([sample for _, _, sample in chunk], tok, chat, tok_dir)
        for (src, rec, _), piece in zip(chunk, pieces, strict=True):
            split = "val" if is_val[done] else "train"
            kept[split].append(piece)
            origin[split].append((src, rec))
            done += 1
    return kept, origin


# ---------------------------------------------------------------------------- rows
def permutation(base: np.uint64 | int, n: int) -> np.ndarray:
    """A permutation of range(n), a pure function of (base, n)."""
    keys = splitmix64(splitmix64(np.arange(n, dtype=np.uint64) + np.uint64(base)))
    return np.argsort(keys, kind="stable")


def _shuffled(groups: list, base: np.uint64 | None, window: int) -> list:
    return (
        groups
        if base is None
        else [groups[k] for k in permutation(hash_keys(int(base), window + 1), len(groups))]
    )


def bucket_rows(
    order: np.ndarray, lengths: np.ndarray, B: int, base: np.uint64 | None
) -> np.ndarray:
    """Windows of BUCKET_BATCHES·B samples, each sorted by length and cut into runs of B rows
    whose order is shuffled."""
    out, win = [], B * BUCKET_BATCHES
    for c, start in enumerate(range(0, len(order), win)):
        chunk = order[start : start + win]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        out += _shuffled([chunk[i : i + B] for i in range(0, len(chunk), B)], base, c)
    return np.concatenate(out)


def pack_rows(
    order: np.ndarray, lengths: np.ndarray, T: int, base: np.uint64 | None
) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing into rows of T positions inside windows of PACK_WINDOW samples;
    (sample ids, row pointers) with the rows of each window shuffled."""
    rows: list[list[int]] = []
    lens = lengths.tolist()
    for c, start in enumerate(range(0, len(order), PACK_WINDOW)):
        chunk = order[start : start + PACK_WINDOW]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")].tolist()
        bins: list[list[int]] = []
        free: list[tuple[int, int]] = []  # sorted (room left, bin)
        for i in chunk:
            k = bisect.bisect_left(free, (lens[i], -1))  # the fullest bin it fits in
            if k == len(free):
                bins.append([i])
                room, b = T - lens[i], len(bins) - 1
            else:
                room, b = free.pop(k)
                bins[b].append(i)
                room -= lens[i]
            if room > 0:
                bisect.insort(free, (room, b))
        rows += _shuffled(bins, base, c)
    ptr = np.cumsum([0, *map(len, rows)]).astype(np.int64)
    return np.asarray([i for r in rows for i in r], dtype=np.int64), ptr
