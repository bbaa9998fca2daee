"""Reading JSON-lines run logs (metrics.jsonl, system.jsonl) that a killed run may have cut.

A run killed mid-write (`kill -9`, a full disk) leaves a partial last line, and a resumed run
appends after it; readers skip such lines and say how many, while a file that is mostly not
JSON objects is an error (it is not a run log).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stoker.errors import file_error, file_errors


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(the JSON-object lines of `path`, how many other non-blank lines were skipped); a file
    with more unparsable lines than rows is a StokerError (see the module docstring)."""
    with file_errors(path, "cannot read", "check the file's permissions"):
        raw = path.read_bytes()
    rows: list[dict[str, Any]] = []
    bad = 0
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad > len(rows):
        raise file_error(
            path,
            "is not a JSON-lines run log",
            "pass a run directory written by `stoker train`",
            f"{bad} of {bad + len(rows)} lines are not JSON objects",
        )
    return rows, bad
