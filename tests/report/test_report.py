"""`maskconver report` from a real results folder: files, self-contained HTML, consistency with the JSON."""

from __future__ import annotations

import base64
import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maskconver_deploy.cli import app
from maskconver_deploy.errors import UserError
from maskconver_deploy.report import check_targets, write_report
from maskconver_deploy.report.plots import pareto_front
from maskconver_deploy.results import BenchResult, EvalRun, load_parity, load_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_dir(results_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reports") / "tiny"
    write_report(results_dir, out)
    return out


def test_writes_markdown_html_and_plots(report_dir: Path) -> None:
    assert (report_dir / "report.md").is_file() and (report_dir / "report.html").is_file()
    names = {p.name for p in (report_dir / "plots").glob("*.png")}
    assert {"pq_vs_latency.png", "proposals.png", "postprocess_share.png", "overlays.png"} <= names
    assert {"overlay-torch.png", "overlay-ort.png"} <= names
    for png in (report_dir / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    markdown = (report_dir / "report.md").read_text()
    for name in names:
        assert f"plots/{name}" in markdown or name == "overlays.png"


def test_html_is_self_contained(report_dir: Path) -> None:
    page = (report_dir / "report.html").read_text()
    assert "<style>" in page
    assert not re.search(r"<(link|script)\b", page)
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    markdown_images = re.findall(r"!\[[^\]]*\]\(plots/[^)]+\.png\)", (report_dir / "report.md").read_text())
    assert len(images) == len(markdown_images) >= 5  # every plot and overlay of the Markdown, inlined
    for data in images:
        assert base64.b64decode(data)[:8] == PNG_MAGIC


def test_tables_match_the_json(report_dir: Path, results_dir: Path) -> None:
    bench = BenchResult.load(results_dir / "bench.json")
    markdown = (report_dir / "report.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    for e in bench.entries:
        if e.ok and e.graph == "panoptic" and e.proposals == 10:
            row = next(r for r in rows if r.startswith(f"| {e.backend} | {e.path_label} | fp32 | 64 |"))
            assert f"| {e.median_ms:.2f} |" in row
            assert f"| {e.speedup_vs_torch:.2f}x |" in row
            pq = EvalRun.load(results_dir / "eval" / f"{e.backend}.json").pq
            assert f"| {pq:.2f} |" in row
    assert "AMD" in markdown or bench.machine["cpu"] in markdown


def test_paper_numbers_stay_in_their_own_section(report_dir: Path) -> None:
    markdown = (report_dir / "report.md").read_text()
    measured, paper = markdown.split("## Paper reference", 1)
    for number in ("33.49", "46.9", "10.48", "1.54B"):
        assert number not in measured
        assert number in paper


def test_targets_are_checked_from_the_timings(results_dir: Path) -> None:
    bench = BenchResult.load(results_dir / "bench.json")
    lines = check_targets(bench)
    first = [t for t in lines if t.subject == "ort" and "fp32" in t.target]
    assert len(first) == 1
    ort, ref = bench.find("ort", "panoptic", 64, 10, 2), bench.find("torch", "panoptic", 64, 10, 2)
    assert f"{ref.median_ms / ort.median_ms:.2f}x" in first[0].detail
    assert first[0].status == ("met" if ref.median_ms / ort.median_ms >= 2 else "missed")
    # no run at 100 proposals and no int8 variant in these results: said so, not invented
    assert {t.status for t in lines if "post-processing" in t.target} == {"not measured"}
    assert {t.status for t in lines if "int8" in t.target} == {"not measured"}


def test_a_missed_target_says_where_the_time_goes(results_dir: Path) -> None:
    bench = BenchResult.load(results_dir / "bench.json")
    slow = copy.deepcopy(bench)
    ort = slow.find("ort", "panoptic", 64, 10, 2)
    ref = slow.find("torch", "panoptic", 64, 10, 2)
    ort.latency_ms.median = ref.latency_ms.median  # speed-up 1.0: a miss
    line = next(t for t in check_targets(slow) if t.subject == "ort" and "fp32" in t.target)
    assert line.status == "missed" and "missed by 1.00x" in line.detail
    assert any("ONNX Runtime profile" in w for w in line.where)
    assert any(w.startswith("Conv:") for w in line.where)


def test_refuses_to_overwrite_without_force(report_dir: Path, results_dir: Path) -> None:
    before = (report_dir / "report.md").read_text()
    with pytest.raises(UserError, match="already exists"):
        write_report(results_dir, report_dir)
    assert (report_dir / "report.md").read_text() == before
    written = write_report(results_dir, report_dir, force=True)
    assert written["html"].is_file()


def test_bench_only_results_and_cli(results_dir: Path, tmp_path: Path) -> None:
    only = tmp_path / "only"
    only.mkdir()
    shutil.copyfile(results_dir / "bench.json", only / "bench.json")
    runner = CliRunner()
    done = runner.invoke(app, ["report", "--results", str(only), "--out", str(tmp_path / "r")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "r" / "report.html").is_file()
    assert not (tmp_path / "r" / "plots" / "pq_vs_latency.png").exists()  # no PQ without evaluation files
    missing = runner.invoke(app, ["report", "--results", str(tmp_path / "none"), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "no such results folder" in missing.output
    empty = tmp_path / "empty"
    empty.mkdir()
    nobench = runner.invoke(app, ["report", "--results", str(empty), "--out", str(tmp_path / "y")])
    assert nobench.exit_code == 2 and "bench.json" in nobench.output and "Traceback" not in nobench.output


def test_bad_result_files_are_user_errors(tmp_path: Path) -> None:
    bad = tmp_path / "parity.json"
    bad.write_text('{"verdicts": []}')
    with pytest.raises(UserError, match="no 'candidates'"):
        load_parity(bad)
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_parity(bad)
    (tmp_path / "bench.json").write_text('{"format": "maskconver-bench/1", "entries": [{"backend": 3}]}')
    with pytest.raises(UserError, match="malformed"):
        load_results(tmp_path)


def test_pareto_front() -> None:
    points = [("a", 10.0, 30.0), ("b", 5.0, 29.0), ("c", 12.0, 28.0), ("d", 20.0, 31.0), ("e", 5.0, 20.0)]
    assert [p[0] for p in pareto_front(points)] == ["b", "a", "d"]


def test_report_imports_neither_model_nor_backends() -> None:
    code = ("import sys, maskconver_deploy.report, maskconver_deploy.report.html, maskconver_deploy.results; "
            "print(' '.join(sorted(sys.modules)))")  # fmt: skip
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert not loaded & {"torch", "onnxruntime", "matplotlib", "onnx"}
    assert not {m for m in loaded if m.startswith(("maskconver_deploy.model", "maskconver_deploy.backends"))}
