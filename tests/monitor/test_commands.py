"""`stoker monitor` through the CLI entry point."""

import json

from stoker.cli import main


def test_monitor_once_json_has_plausible_readings_and_checks(capsys):
    assert main(["monitor", "--once", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    system, checks = out["system"], out["checks"]
    assert 0 <= system["cpu_percent"] <= 100
    assert system["ram_total_gb"] > 0 and 0 < system["ram_percent"] <= 100
    import torch

    assert checks["cuda_available"] == torch.cuda.is_available()
    assert checks["gloo_available"] == torch.distributed.is_gloo_available()
    assert isinstance(out["advice"], list)
    if not checks["cuda_available"]:
        assert any("no CUDA GPU" in a for a in out["advice"])


def test_monitor_once_prints_checks_and_a_system_line(capsys):
    assert main(["monitor", "--once"]) == 0
    out = capsys.readouterr().out
    assert "CUDA visible:" in out and "gloo:" in out
    assert "CPU " in out.splitlines()[-1] and "RAM " in out.splitlines()[-1]


def test_monitor_rejects_non_positive_interval(capsys):
    assert main(["monitor", "--interval", "0"]) == 2
    assert "--interval" in capsys.readouterr().err
