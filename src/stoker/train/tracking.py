"""Run tracking: `out_dir/metrics.jsonl` always, optional MLflow / TensorBoard / W&B sinks.

Every sink receives the same rows through one interface (`log(row)`, `close()`). Only rank 0
creates a `Tracker`; other ranks get a `NullTracker`, so a multi-process run is one MLflow
run. MLflow defaults to a SQLite store in the run dir, so nothing needs a server.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from stoker.config import TrackConfig
from stoker.errors import StokerError


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _numeric(row: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and k != "step"
        and math.isfinite(float(v))
    }


class MlflowSink:
    def __init__(self, cfg: TrackConfig, out_dir: Path, config: dict[str, Any]):
        try:
            import mlflow
        except ImportError:
            raise StokerError(
                "track.mlflow is on but mlflow is not installed; "
                "pip install 'stoker[track]' or set --track.mlflow=false"
            ) from None
        self.mlflow = mlflow
        uri = cfg.mlflow_uri or f"sqlite:///{(out_dir / 'mlflow.db').resolve()}"
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(cfg.experiment)
        self.run = mlflow.start_run(run_name=out_dir.name)
        params = {k: str(v)[:500] for k, v in _flatten(config).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            mlflow.log_params(dict(items[i : i + 100]))

    def log(self, row: dict[str, Any]) -> None:
        metrics = _numeric(row)
        if metrics:
            self.mlflow.log_metrics(metrics, step=int(row.get("step", 0)))

    def close(self) -> None:
        self.mlflow.end_run()


class TensorBoardSink:
    def __init__(self, out_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise StokerError(
                "track.tensorboard is on but tensorboard is not installed; pip install tensorboard"
            ) from None
        self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        for k, v in _numeric(row).items():
            self.writer.add_scalar(k, v, int(row.get("step", 0)))

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, cfg: TrackConfig, out_dir: Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise StokerError(
                "track.wandb is on but wandb is not installed; pip install wandb"
            ) from None
        self.run = wandb.init(
            project=cfg.experiment,
            dir=str(out_dir),
            mode="offline",
            config=config,
            name=out_dir.name,
        )

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(_numeric(row), step=int(row.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """Appends each row to metrics.jsonl and forwards it to the configured sinks."""

    def __init__(self, out_dir: str | Path, cfg: TrackConfig, config: dict[str, Any]):
        self.out_dir = Path(out_dir)
        self.file = open(self.out_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        self.sinks: list[Any] = []
        if cfg.mlflow:
            self.sinks.append(MlflowSink(cfg, self.out_dir, config))
        if cfg.tensorboard:
            self.sinks.append(TensorBoardSink(self.out_dir))
        if cfg.wandb:
            self.sinks.append(WandbSink(cfg, self.out_dir, config))

    def log(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        for sink in self.sinks:
            sink.log(row)

    def summary(self, summary: dict[str, Any]) -> None:
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.log({"event": "summary", **summary})

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.file.close()


class NullTracker:
    def log(self, row: dict[str, Any]) -> None:
        pass

    def summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    from stoker.jsonl import read_jsonl

    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        raise StokerError(f"no metrics.jsonl in {out_dir}")
    return read_jsonl(path)[0]  # a partial last line (a killed run) is skipped
