"""The README's "Python API" section runs as written: its ```python blocks, in order, in one namespace, from a
copy of the repository's layout (the shipped checkpoint under models/) in a temporary folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO, require_runtime

SECTION = "## Python API"


def readme_python_blocks(text: str) -> list[str]:
    """The ```python blocks of the README's Python API section (up to the next level-2 heading)."""
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else None]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_section_has_code_for_every_function() -> None:
    code = "\n".join(readme_python_blocks((REPO / "README.md").read_text()))
    for call in ("maskconver_deploy.load(", "api.export(", "api.compile(", "api.parity(", "api.evaluate(",
                 "api.bench(", ".predict("):  # fmt: skip
        assert call in code, call


def test_readme_python_api_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    require_runtime("onnxruntime", "ONNX Runtime", 'pip install -e ".[dev]"')
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "shapes-256.pt").symlink_to(REPO / "models" / "shapes-256.pt")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    blocks = readme_python_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 3
    for index, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out
    assert "(256, 256)" in printed and "mask AP" in printed
    checks = namespace["checks"]
    verdicts = {c["backend"]: c["verdict"] for c in checks["candidates"]}
    assert verdicts["ort"] == "pass", checks["candidates"]
    assert namespace["scores"]["mask_ap"]["n_gt"] > 0
    assert any(e.ok for e in namespace["timing"].entries)
