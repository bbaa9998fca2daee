"""notebooks/quickstart.ipynb runs top to bottom, headless, on a CPU: its parameters cell is
replaced by tiny values (as papermill would inject them), every cell must finish in time."""

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def tiny_parameters(work: Path) -> str:
    return "\n".join(
        [
            "MAX_STEPS = 4",
            "MAX_DOCUMENTS = 40",
            "FINETUNE_STEPS = 4",
            "FINETUNE_SAMPLES = 400",
            'DEVICE = "cpu"',
            "FINETUNE_MODEL_DIR = None",
            f"WORKDIR = {str(work)!r}",
        ]
    )


def parameters_cell(nb):
    tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "the notebook needs exactly one cell tagged `parameters`"
    return tagged[0]


def test_parameters_cell_names_what_the_test_injects():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    names = {line.split("=")[0].strip() for line in tiny_parameters(Path("w")).splitlines()}
    source = parameters_cell(nb).source
    assert all(f"{name} = " in source for name in names), source


@pytest.mark.slow
def test_quickstart_notebook_runs_top_to_bottom_on_cpu(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    parameters_cell(nb).source = tiny_parameters(tmp_path / "work")
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell fails
    seconds = time.perf_counter() - start
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "stoker: done" in text and (tmp_path / "work" / "tiny.png").is_file()
    assert (tmp_path / "work" / "lora-tiny" / "metrics.jsonl").is_file()
    assert seconds < 300, f"the notebook took {seconds:.0f} s on this CPU (target < 5 min)"
