"""Multi-stage recipes (DYNAMO's phases, multimodal's aligner then LM): stages run one after
another through the same loop, each in its own directory under the recipe's `train.out_dir`.

A task class that has stages returns them from `stages(cfg)`: each a full recipe config (its
own `train.out_dir`, steps, LR) and a fingerprint of everything its result depends on (its
config, its data files' hashes, the fingerprints of the stages it reads). Each stage dir holds
`stage.json`: the fingerprint and whether the stage finished. On a rerun a stage is

- skipped when it finished with the same fingerprint (and says so);
- resumed exactly (the loop's `train.resume: auto`) when it was interrupted with the same one;
- retrained from scratch when its fingerprint changed (its old directory is removed, and the
  stages after it, whose fingerprints include it, are retrained too).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stoker.config import RecipeConfig

MARKER = "stage.json"


@dataclass
class Stage:
    name: str
    cfg: RecipeConfig
    fingerprint: str
    fresh: bool = False  # retrain even if done (train.resume=never)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)


def fingerprint(*parts: Any) -> str:
    """SHA-256 of JSON-able parts (configs, file hashes, upstream fingerprints)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


_HASHES: dict[tuple, str] = {}

# the loop's settings that a stage sets for itself (per phase) or that do not change its result
VOLATILE = ("out_dir", "resume", "log_interval", "monitor_interval", "device", "save_interval",
            "keep_last", "max_steps", "eval_interval", "early_stopping_metric",
            "early_stopping_patience")  # fmt: skip


def loop_settings(cfg: RecipeConfig) -> dict[str, Any]:
    """The `train` and `optim` settings a stage's result depends on (all but `VOLATILE` and
    the LR, which each stage sets)."""
    train = cfg.train.model_dump(mode="json")
    for key in VOLATILE:
        train.pop(key)
    optim = cfg.optim.model_dump(mode="json")
    optim.pop("lr")
    return {"train": train, "optim": optim}


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes (a directory: of its files' names and hashes), cached per
    (path, size, mtime) for the process."""
    from stoker.train.checkpoint import file_sha256

    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        if path.is_file():
            _HASHES[key] = file_sha256(path)
        else:
            files = sorted(p for p in path.rglob("*") if p.is_file())
            _HASHES[key] = fingerprint([(str(p.relative_to(path)), file_hash(p)) for p in files])
    return _HASHES[key]


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def status(stage: Stage) -> str:
    """done | resume | stale | new."""
    marker = read_marker(stage.out_dir)
    if marker is None:
        if not stage.out_dir.exists() or not any(stage.out_dir.iterdir()):
            return "new"
        if not (stage.out_dir / "config.yaml").is_file():
            from stoker.errors import StokerError

            raise StokerError(f"{stage.out_dir} exists and is not a run of stage {stage.name}; "
                              "move it away or choose another train.out_dir")  # fmt: skip
        return "stale"
    if marker.get("fingerprint") != stage.fingerprint:
        return "stale"
    return "done" if marker.get("done") else "resume"


def write_marker(stage: Stage, done: bool, summary: dict[str, Any] | None = None) -> None:
    stage.out_dir.mkdir(parents=True, exist_ok=True)
    data = {"stage": stage.name, "fingerprint": stage.fingerprint, "done": done,
            "summary": summary}  # fmt: skip
    tmp = stage.out_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(stage.out_dir / MARKER)


def prepare_stage(stage: Stage, say) -> str:
    """Rank 0, before a stage: its status, with a stale directory removed (and said)."""
    s = status(stage)
    if stage.fresh and s != "new":
        say(f"stoker: {stage.name}: train.resume=never; retraining it")
        shutil.rmtree(stage.out_dir)
        return "new"
    if s == "done":
        say(f"stoker: {stage.name}: finished earlier with the same config and data; skipped")
    elif s == "resume":
        say(f"stoker: {stage.name}: resuming")
    elif s == "stale":
        say(f"stoker: {stage.name}: its config, data or an earlier stage changed since "
            f"{stage.out_dir} was trained; retraining it")  # fmt: skip
        shutil.rmtree(stage.out_dir)
    return s


def finished_checkpoint(stage_dir: Path, expected: str | None = None) -> Path | None:
    """The newest intact checkpoint of a stage that finished (with fingerprint `expected`,
    if given), else None."""
    from stoker.train.checkpoint import latest_intact

    marker = read_marker(stage_dir)
    if not marker or not marker.get("done"):
        return None
    if expected is not None and marker.get("fingerprint") != expected:
        return None
    return latest_intact(stage_dir)
