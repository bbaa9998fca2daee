"""The architecture stays visible in the tree: file sizes, and what may import what."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "stoker"
FILES = sorted(SRC.rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_source_files_stay_readable_in_one_sitting(path):
    limit = 400 if path.parent.name == "models" else 500
    n = len(path.read_text().splitlines())
    assert n <= limit, f"{path.relative_to(SRC)} has {n} lines (limit {limit}): split it"


def test_models_import_nothing_from_train_data_monitor_or_api():
    for path in (SRC / "models").glob("*.py"):
        bad = {
            m
            for m in imported_modules(path)
            if m.startswith(
                ("stoker.train", "stoker.data", "stoker.monitor", "stoker.api", "torch.distributed")
            )
        }
        assert not bad, f"models/{path.name} imports {sorted(bad)}"


def test_only_the_benchmark_peer_imports_transformers():
    users = {
        p.relative_to(SRC).as_posix()
        for p in FILES
        if any(m.split(".")[0] in ("transformers", "peft") for m in imported_modules(p))
    }
    assert users <= {"bench_workers.py"}, users
