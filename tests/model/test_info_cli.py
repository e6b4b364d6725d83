"""`maskconver info` through the command line."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from maskconver_deploy.cli import app


def test_info_json() -> None:
    result = CliRunner().invoke(app, ["info", "--preset", "coco-256", "--proposals", "10", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num_proposals"] == 10
    assert set(data) >= {"params", "macs", "paper"}
    assert data["params"]["total"] == data["params"]["network"] + data["params"]["postprocess"]
    assert data["macs"]["total"] == data["macs"]["network"]["total"] + data["macs"]["postprocess"]["total"]
    assert data["macs"]["postprocess"]["mlp"] == 10 * 2 * 256 * 256
    assert data["paper"]["macs"] == 1.53e9


def test_info_table() -> None:
    result = CliRunner().invoke(app, ["info", "--preset", "coco-640"])
    assert result.exit_code == 0, result.output
    for text in ("backbone", "network total", "post-processing total", "paper", "3.407M"):
        assert text in result.stdout


def test_info_bad_input_exits_2() -> None:
    result = CliRunner().invoke(app, ["info", "--preset", "nope"])
    assert result.exit_code == 2
    assert "unknown preset" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["info", "--preset", "shapes-256", "--proposals", "5000"])
    assert result.exit_code == 2
