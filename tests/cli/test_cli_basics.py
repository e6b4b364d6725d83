"""Every command explains itself, and `doctor` reports each backend truthfully."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from maskconver_deploy.cli import app

COMMANDS = ["info", "predict", "train", "eval", "export", "compile", "list", "parity", "bench", "report",
            "pipeline", "doctor", "data synth", "calib make"]


def test_top_level_help_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name.split()[0] in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str) -> None:
    result = CliRunner().invoke(app, [*command.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert "Not built yet" not in result.output


def test_doctor_json_reports_onnxruntime_available() -> None:
    result = CliRunner().invoke(app, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    by_name = {row["backend"]: row for row in report["backends"]}
    assert by_name["ort"]["available"] is True
    assert by_name["torch"]["available"] is True
    if not by_name["tensorrt"]["available"]:
        assert by_name["tensorrt"]["reason"] and by_name["tensorrt"]["hint"]


def test_console_script_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "maskconver_deploy", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "maskconver" in out.stdout


def test_unknown_backend_is_one_line_exit_2() -> None:
    from maskconver_deploy.backends import parse_backend
    from maskconver_deploy.errors import UserError

    with pytest.raises(UserError, match="unknown backend 'ort-int4'"):
        parse_backend("ort-int4")
    assert str(parse_backend("ort-int8-static")) == "ort-int8-static"
    assert str(parse_backend("tflite")) == "tflite"
    assert parse_backend("ort-mobile-int8-dynamic").family == "ort-mobile"
