"""Offline lm-evaluation-harness tasks over Python source, built from the running Python.

Two tasks, each a YAML over a local JSONL (`dataset_path: json` + `dataset_kwargs.data_files`),
so lm-eval never touches a hub:

- `stoker_next_line` (multiple choice, acc / acc_norm): a few lines of a Python file, then
  four candidates for the next line, the true one and three lines drawn from other files,
  re-indented like the true line so indentation alone gives nothing away. Chance is 25 %.
- `stoker_stdlib_ppl` (loglikelihood_rolling, word/byte perplexity and bits per byte, as
  lm-eval's wikitext): whole files, scored over windows of the model's max_seq_len.

The files are the standard library's own tests (`Lib/test/test_*.py`), which the built-in
`python-stdlib` corpus skips (data/corpora.py), so a model trained on that corpus is scored
on code it never saw; a Python without its test suite falls back to the corpus files
(metadata `held_out: false`). Same Python, same seed -> the same bytes: files are sorted and
drawn with `random.Random(seed)`. Numbers are comparable only across the same Python version,
which the metadata records.

`build_tasks(out_dir)` (or `python -m stoker.eval.tasks OUT_DIR`) writes the JSONL files and
the YAMLs, which name the JSONL by absolute path; pass OUT_DIR as lm-eval's include path.
`stoker eval RUN --lm-eval stoker_next_line` builds them on first use in the stoker cache.
"""

from __future__ import annotations

import json
import os
import random
import sys
import sysconfig
from pathlib import Path

import yaml

from stoker.errors import StokerError, file_errors

TASKS = ("stoker_next_line", "stoker_stdlib_ppl")
MIN_LINE = 12  # characters of a stripped candidate line: no `pass`, `else:` or `)`
CONTEXT_LINES = 8
CONTEXT_CHARS = 400
DOC_CHARS = 3000


def source_files() -> tuple[list[Path], bool]:
    """(the Python files the tasks draw from, whether the default corpus skips them)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    tests = sorted((root / "test").glob("test_*.py"))
    if len(tests) >= 20:
        return tests, True
    from stoker.data.corpora import stdlib_files

    return [f.path for f in stdlib_files()], False


def _read(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []  # an unreadable or non-UTF-8 file is simply not drawn from


def _candidate(line: str) -> bool:
    s = line.strip()
    return len(s) >= MIN_LINE and not s.startswith("#") and len(line) <= 120


def next_line_docs(files: list[Path], n: int, seed: int) -> list[dict]:
    """`n` documents {context, choices, label, source}: see the module docstring."""
    rng = random.Random(seed)
    lines = {p: _read(p) for p in files}
    pool = [(p, i) for p in files for i, line in enumerate(lines[p]) if _candidate(line)]
    if len(pool) < 4 * n:
        raise StokerError(f"only {len(pool)} candidate lines in {len(files)} files; lower n")
    docs = []
    for p, i in rng.sample(pool, n):
        ctx = lines[p][max(0, i - CONTEXT_LINES) : i]
        context = "\n".join(ctx)[-CONTEXT_CHARS:] + "\n"
        true = lines[p][i]
        indent = true[: len(true) - len(true.lstrip())]
        others: list[str] = []
        while len(others) < 3:
            q, j = pool[rng.randrange(len(pool))]
            other = indent + lines[q][j].strip()
            if q != p and other != true and other not in others:
                others.append(other)
        choices = [true, *others]
        rng.shuffle(choices)
        rel = p.name if p.parent.name != "test" else f"test/{p.name}"
        docs.append(
            {"context": context, "choices": choices, "label": choices.index(true), "source": rel}
        )
    return docs


def perplexity_docs(files: list[Path], n: int, seed: int) -> list[dict]:
    """`n` documents {text, source}: the first DOC_CHARS characters of drawn files."""
    rng = random.Random(seed + 1)
    readable = [p for p in files if _read(p)]
    return [
        {"text": "\n".join(_read(p))[:DOC_CHARS], "source": p.name}
        for p in sorted(rng.sample(readable, min(n, len(readable))))
    ]


def _task_yaml(name: str, data: Path, meta: dict) -> dict:
    common = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "metadata": {"version": 1.0, **meta},
    }
    if name == "stoker_next_line":
        return {
            **common,
            "output_type": "multiple_choice",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "label",
            "target_delimiter": "",  # the context ends in a newline; a choice is a whole line
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        }
    return {
        **common,
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "word_perplexity"},
            {"metric": "byte_perplexity"},
            {"metric": "bits_per_byte"},
        ],
    }


def build_tasks(out_dir: str | Path, n_choice: int = 200, n_docs: int = 20, seed: int = 0) -> Path:
    """Write `<task>.jsonl` and `<task>.yaml` for both tasks into `out_dir`; returns it."""
    out = Path(out_dir).expanduser().resolve()
    files, held_out = source_files()
    meta = {
        "python": sys.version.split()[0],
        "seed": seed,
        "held_out": held_out,
        "files": len(files),
    }
    docs = {
        "stoker_next_line": next_line_docs(files, n_choice, seed),
        "stoker_stdlib_ppl": perplexity_docs(files, n_docs, seed),
    }
    fix = "choose a writable directory (--lm-eval-include) or free space"
    with file_errors(out, "cannot write the lm-eval tasks", fix):
        out.mkdir(parents=True, exist_ok=True)
        for name, rows in docs.items():
            data = out / f"{name}.jsonl"
            tmp = data.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            os.replace(tmp, data)
            text = yaml.safe_dump(_task_yaml(name, data, meta), sort_keys=False)
            (out / f"{name}.yaml").write_text(text, encoding="utf-8")
    return out


def default_task_dir() -> Path:
    """Where `stoker eval --lm-eval` keeps the built tasks: the stoker cache, per Python."""
    root = os.environ.get("STOKER_CACHE_DIR") or (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stoker"
    )
    version = ".".join(sys.version.split()[0].split(".")[:3])
    return Path(root) / "lm_eval_tasks" / f"py{version}"


def ensure_tasks(out_dir: Path | None = None) -> Path:
    """The built task directory, building it once (seed 0) when its files are missing."""
    out = out_dir or default_task_dir()
    if not all((out / f"{t}.yaml").is_file() for t in TASKS):
        build_tasks(out)
    return out
