"""Files around the package: the CI workflow runs the README's commands, the Dockerfile and
the cloud guide exist and are linked."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def workflow_steps() -> list[dict]:
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    return [step for job in jobs.values() for step in job["steps"]]


def test_ci_runs_lint_and_the_readme_test_command_on_python_311():
    flow = yaml.safe_load(WORKFLOW.read_text())
    triggers = flow.get("on", flow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert {"push", "pull_request"} <= set(triggers)
    runs = [s.get("run", "").strip() for s in workflow_steps()]
    assert "make test" in runs and "make lint" in runs, runs
    assert "make test" in (ROOT / "README.md").read_text()
    uses = {s["uses"].split("@")[0]: s for s in workflow_steps() if "uses" in s}
    assert str(uses["actions/setup-python"]["with"]["python-version"]) == "3.11"
    cache = uses["actions/cache"]["with"]
    assert cache["path"] == "~/.cache/pip" and "hashFiles('pyproject.toml')" in cache["key"]


@pytest.mark.skipif(shutil.which("actionlint") is None, reason="actionlint is not on PATH")
def test_ci_workflow_passes_actionlint():
    r = subprocess.run(["actionlint", str(WORKFLOW)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_docker_image_and_cloud_guide():
    docker = (ROOT / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:" in docker and "WORKDIR" in docker
    assert ".[gpu,track]" in docker and 'CMD ["stoker", "--help"]' in docker
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"runs/", "data/", ".venv/"} <= set(ignored)
    assert "docs/cloud.md" in (ROOT / "README.md").read_text()
    assert (ROOT / "docs" / "cloud.md").is_file()
