"""`corral bench --quick` as a smoke test: it runs and reports every figure. It asserts no speed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from corral.bench import SCHEMA, SYSTEMS, parse_systems, percentile
from corral.errors import ConfigError

from conftest import PYTHON, ROOT, python_env


def run_corral(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "corral", *args],
        capture_output=True,
        text=True,
        env=python_env(),
        cwd=ROOT,
        timeout=timeout_s,
    )


def assert_figures(result: dict[str, Any], plan: dict[str, Any]) -> None:
    """Every figure of an available system is there and positive."""
    name = result["system"]
    assert result["errors"] == [], name
    assert result["version"], name
    assert result["enqueue_one_per_s"] > 0, name
    if name == "huey-sqlite":  # Huey has no bulk API; the note says so
        assert result["enqueue_bulk_per_s"] is None
        assert any("bulk" in note for note in result["notes"])
    else:
        assert result["enqueue_bulk_per_s"] > 0, name
    assert set(result["processed_per_s"]) == set(plan["processed"]), name
    assert all(rate > 0 for rate in result["processed_per_s"].values()), name
    expected_samples = {
        "cross_process": plan["idle_samples"],
        "in_process": plan["idle_in_process_samples"],
    }
    assert set(result["pickup"]) == set(expected_samples), name
    for kind, pickup in result["pickup"].items():
        assert pickup["samples"] == expected_samples[kind], (name, kind)
        assert 0 < pickup["p50_ms"] <= pickup["p99_ms"] <= pickup["max_ms"], (name, kind)
    rss = result["rss"]
    assert rss["jobs"] == plan["processed"][str(plan["rss_concurrency"])], name
    assert min(rss["start_kb"], rss["warm_kb"], rss["end_kb"]) > 0, name
    assert rss["peak_kb"] >= rss["end_kb"], name
    assert len(result["phase_s"]) == 4 + len(plan["processed"]), name


@pytest.mark.timeout(180)
def test_quick_run_reports_every_figure_of_every_available_system(tmp_path: Path) -> None:
    report_path = tmp_path / "bench" / "quick.json"
    markdown_path = tmp_path / "bench" / "quick.md"
    done = run_corral(
        "bench", "--quick", "--json", str(report_path), "--markdown", str(markdown_path)
    )
    assert done.returncode == 0, done.stderr + done.stdout

    report = json.loads(report_path.read_text())
    assert report["schema"] == SCHEMA
    assert report["mode"] == "quick"
    assert report["corral"]["version"]
    assert report["duration_s"] > 0
    assert report["machine"]["cpus"] >= 1
    assert list(report["systems"]) == list(SYSTEMS)
    assert report["systems"]["corral-sqlite"]["available"], report["systems"]["corral-sqlite"]
    for name, result in report["systems"].items():
        assert result["system"] == name
        if result["available"]:
            assert_figures(result, report["plan"])
        else:
            assert result["reason"], name

    # The checks are computed from the same run: at least corral-sqlite's own targets.
    names = [check["check"] for check in report["checks"]]
    assert any(name.startswith("corral-sqlite enqueue one by one") for name in names)
    for check in report["checks"]:
        assert set(check) == {"check", "measured", "target", "met", "values"}
        assert all(value > 0 for value in check["values"].values()), check
    if report["systems"]["corral-bullmq"]["available"]:
        assert any(name.startswith("corral-bullmq idle pickup") for name in names)

    assert "corral-sqlite" in done.stdout
    assert "targets and ratios" in done.stdout
    markdown = markdown_path.read_text()
    assert "| | " + " | ".join(SYSTEMS) + " |" in markdown
    assert "| enqueue 1 by 1 /s |" in markdown


def test_systems_can_be_chosen_and_unknown_ones_are_refused() -> None:
    assert parse_systems(["huey-sqlite,corral-sqlite"]) == ["corral-sqlite", "huey-sqlite"]
    assert parse_systems(["bullmq-py", "corral-bullmq"]) == ["corral-bullmq", "bullmq-py"]
    assert parse_systems(None) == list(SYSTEMS)
    with pytest.raises(ConfigError, match="unknown system"):
        parse_systems(["corral-sqlite,rq"])

    done = run_corral("bench", "--quick", "--systems", "celery")
    assert done.returncode == 2
    assert "unknown system(s) celery" in done.stderr


def test_a_redis_elsewhere_is_refused() -> None:
    done = run_corral(
        "bench", "--quick", "--systems", "bullmq-py", "--redis-url", "redis://:pw@10.1.2.3:6379/0"
    )
    assert done.returncode == 2
    assert "only uses a Redis on this machine" in done.stderr
    assert "pw" not in done.stderr


def test_percentile_interpolates_between_samples() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert percentile([10.0, 20.0], 0.99) == pytest.approx(19.9)
    assert percentile([7.0], 0.99) == 7.0
