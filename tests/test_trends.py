"""The trends page of a labelling output, on runs written by hand: runs from before recorded
stats, a model promotion, links to the runs' own pages. (Ten phantom nights rendered in
Chromium: tests/test_drift.py.)"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from fpc_ray.cli import app
from fpc_ray.config import DriftConfig, StorageConfig
from fpc_ray.label.schema import LABEL_SCHEMA
from fpc_ray.report import build_report
from fpc_ray.storage import resolve
from tests.test_drift import commit_rows, write_old_run


def _new_run(labels: Path, run_id: str, version: str, brain: int, other: int) -> None:
    base = {n: None for n in LABEL_SCHEMA.names} | {"frame": 0, "run_id": run_id, "model_version": version,
                                                    "input_kind": "png", "width": 800, "height": 600}
    rows = [base | {"source_uri": f"s3://archive/{run_id}/{i}.png", "label": label, "confidence": 0.95,
                    "top2_confidence": 0.05, "probabilities": [0.95, 0.05] if label == "Fetal brain" else [0.05, 0.95]}
            for i, label in enumerate(["Fetal brain"] * brain + ["Other"] * other)]
    commit_rows(resolve(str(labels)), run_id, pa.Table.from_pylist(rows, schema=LABEL_SCHEMA),
                {"version": version, "class_names": ["Fetal brain", "Other"]})


@pytest.fixture
def labels(tmp_path) -> Path:
    """r0 from before stats (model m0), then r1 and r2 by a promoted model m1; r2's mix moved.
    r1's folder holds its own report."""
    out = tmp_path / "labels"
    write_old_run(out, "r0", ["Fetal brain"] * 250 + ["Other"] * 250, committed_at="2026-11-01T03:00:00+00:00")
    _new_run(out, "r1", "m1", 260, 240)
    _new_run(out, "r2", "m1", 450, 50)
    (out / "run=r1" / "report.html").write_text("<html>r1</html>")
    return out


def test_trends_page_marks_the_promotion_links_run_pages_and_computes_old_stats(labels, tmp_path):
    pages = tmp_path / "pages"
    pages.mkdir()
    kind, page = build_report(str(labels), StorageConfig(), output=pages / "trends.html")
    assert kind == "trends"
    assert '<a href="../labels/run=r1/report.html">r1</a>' in page  # relative to where the page goes
    assert 'href="../labels/run=r2' not in page and "<td>r2</td>" in page  # no page, no link
    assert "<td>m1 (new)</td>" in page and "model changed m0 -&gt; m1 at this run: compared across models" in page
    assert "<td>computed</td>" in page and "<td>recorded</td>" in page  # r0 predates recorded stats
    assert "ALERT" in page and "drift: run r2 alert: class-mix PSI" in page
    assert "<tr><td>r2</td><td>alert</td>" in page and "<tr><td>r1</td><td>alert</td>" not in page
    assert str(labels) in page
    # The page published beside the runs links them from there; a shared page hides the prefix.
    _, beside = build_report(str(labels), StorageConfig(), output=labels / "trends.html")
    assert '<a href="run=r1/report.html">r1</a>' in beside
    _, hidden = build_report(str(labels), StorageConfig(), hide_sources=True)
    assert str(labels) not in hidden and "a labelling output (not shown)" in hidden


def test_trends_thresholds_come_from_the_config(labels, tmp_path):
    _, page = build_report(str(labels), StorageConfig(), drift=DriftConfig(psi_warn=5.0, psi_alert=10.0,
                                                                          chi2_p_alert=1e-300))
    assert "ALERT" not in page and "No run reached the warn level." in page
    out = tmp_path / "trends.html"
    done = CliRunner().invoke(app, ["report", str(labels), "--output", str(out), "--set", "drift.psi_alert=10",
                                    "--set", "drift.psi_warn=5", "--set", "drift.chi2_p_alert=1e-300"])
    assert done.exit_code == 0 and "wrote the trends report" in done.output, done.output
    assert "No run reached the warn level." in out.read_text()


def test_a_prefix_without_committed_runs_is_not_a_trends_target(tmp_path):
    (tmp_path / "run=x").mkdir()  # a run cut short: no _SUCCESS.json
    done = CliRunner().invoke(app, ["report", str(tmp_path), "--output", str(tmp_path / "t.html")])
    assert done.exit_code == 2 and done.output.count("\n") == 1 and "labelling output holding committed runs" \
        in done.output
    bad = CliRunner().invoke(app, ["report", str(tmp_path), "--output", str(tmp_path / "t.html"),
                                   "--set", "drift.psi_warn=0.5", "--set", "drift.psi_alert=0.3"])
    assert bad.exit_code == 2 and "psi_warn (0.5) must not exceed psi_alert (0.3)" in bad.output


def test_run_folders_with_odd_names_still_render(tmp_path):
    """Run ids are checked now (tests/test_cli.py), but folders committed by older versions or by
    hand keep theirs: matplotlib must not read ``$...$`` in them as math, links must be quoted,
    and the drift table must not pass a terminal escape through."""
    out = tmp_path / "labels"
    write_old_run(out, "r0", ["Fetal brain"] * 250 + ["Other"] * 250, committed_at="2026-11-01T03:00:00+00:00")
    odd, escape = "night$\\frac$", "r2\x1b[31m"
    _new_run(out, odd, "m$\\frac$", 260, 240)  # a promotion: its model version is drawn as well
    _new_run(out, escape, "m$\\frac$", 450, 50)
    (out / f"run={odd}" / "report.html").write_text("<html>night</html>")
    kind, page = build_report(str(out), StorageConfig(), output=out / "trends.html")
    assert kind == "trends" and page.count("data:image/png;base64,") == 4
    assert '<a href="run=night%24%5Cfrac%24/report.html">night$\\frac$</a>' in page
    done = CliRunner().invoke(app, ["drift", str(out), "--fail-on-drift"])
    assert done.exit_code == 3, done.output
    assert "\x1b" not in done.output and "r2\\x1b[31m" in done.output
