"""Tracking sinks: MLflow (SQLite store in the run dir) reads back through MlflowClient."""

import mlflow
import pytest

from stoker.config import load_config
from stoker.train.loop import train
from stoker.train.tracking import read_metrics


def test_mlflow_run_in_sqlite_store_reads_back(make_args, tmp_path):
    train(load_config(None, make_args("--track.mlflow=true", "--train.max_steps=6")))
    out = tmp_path / "run"
    assert (out / "mlflow.db").is_file()
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("stoker")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["model.n_layer"] == "2"
    history = client.get_metric_history(run.info.run_id, "loss")
    logged = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert {m.step: m.value for m in history} == pytest.approx(logged)
    assert client.get_metric_history(run.info.run_id, "val_loss")
