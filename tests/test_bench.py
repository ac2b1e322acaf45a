"""`corral bench --quick` and `python bench/compare.py --quick` as smoke tests: they run and report
every figure. They assert no speed.

The comparison runs only the peers: corral's systems are the same code in both, measured once.
Locally a peer that is not installed (``make bench`` installs them) is reported, not measured;
with CI=true every system must run.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from corral.errors import ConfigError
from corral.tools.bench import CORRAL, SCHEMA, Memory, Pickup, SystemResult, percentile

from conftest import IN_CI, PYTHON, ROOT, python_env

COMPARE_SCRIPT = ROOT / "bench" / "compare.py"
CORRAL_SYSTEMS = ["corral-sqlite", "corral-bullmq"]
PEERS = ["bullmq-py", "bullmq-node", "huey-sqlite"]


def run_command(command: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, env=python_env(), cwd=ROOT, timeout=timeout_s
    )


def run_corral(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return run_command([PYTHON, "-m", "corral", *args], timeout_s)


def run_compare(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return run_command([PYTHON, str(COMPARE_SCRIPT), *args], timeout_s)


@pytest.fixture(scope="module")
def compare() -> Iterator[ModuleType]:
    """bench/compare.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("compare", COMPARE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["compare"]


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
    corral = name in CORRAL_SYSTEMS
    # corral's systems also enqueue under load and run flows.
    assert len(result["phase_s"]) == 4 + len(plan["processed"]) + 2 * int(corral), name
    if corral:  # the phase that enqueues while a worker drains
        assert result["enqueue_under_load_per_s"] > 0, name
        lag = result["loop_lag"]
        assert lag["samples"] > 0 and 0 <= lag["p50_ms"] <= lag["p99_ms"] <= lag["max_ms"], name
        assert result["flow_enqueue_per_s"] > 0 and result["flow_children_per_s"] > 0, name
        release = result["flow_release"]
        assert release["samples"] == plan["flows"], name
        assert 0 < release["p50_ms"] <= release["max_ms"], name
    else:
        assert result["flow_release"] is None, name


def assert_report(report: dict[str, Any], systems: list[str]) -> None:
    """A quick report of ``systems``: every available one has every figure, the others say why
    not (and in CI every one is available)."""
    assert report["schema"] == SCHEMA
    assert report["mode"] == "quick"
    assert report["corral"]["version"]
    assert report["duration_s"] > 0
    assert report["machine"]["cpus"] >= 1
    assert list(report["systems"]) == systems
    for name, result in report["systems"].items():
        assert result["system"] == name
        if result["available"]:
            assert_figures(result, report["plan"])
        else:
            assert result["reason"], name
            if IN_CI:
                pytest.fail(f"required in CI: {name}: {result['reason']}")
    for check in report["checks"]:
        assert set(check) == {"check", "measured", "target", "met", "values"}
        assert all(value > 0 for value in check["values"].values()), check


@pytest.mark.timeout(180)
def test_quick_run_reports_every_figure_of_both_backends(tmp_path: Path) -> None:
    report_path = tmp_path / "bench" / "quick.json"
    markdown_path = tmp_path / "bench" / "quick.md"
    done = run_corral(
        "bench", "--quick", "--json", str(report_path), "--markdown", str(markdown_path)
    )
    assert done.returncode == 0, done.stderr + done.stdout

    report = json.loads(report_path.read_text())
    assert_report(report, CORRAL_SYSTEMS)
    assert report["systems"]["corral-sqlite"]["available"], report["systems"]["corral-sqlite"]
    assert set(report["machine"]["packages"]) == {"redis", "hiredis", "bullmq"}

    # The machine's limits, measured in the same run.
    limits = report["limits"]
    assert report["limit_errors"] == []
    expected = {"sqlite_insert_autocommit_per_s", "sqlite_insert_batched_per_s"}
    if report["systems"]["corral-bullmq"]["available"]:
        expected |= {
            "redis_round_trips_per_s",
            "redis_pipelined_per_s",
            "redis_lua_one_per_s",
            "redis_lua_pipelined_per_s",
        }
    assert set(limits) == expected
    assert all(value > 0 for value in limits.values()), limits
    assert limits["sqlite_insert_batched_per_s"] > limits["sqlite_insert_autocommit_per_s"]

    # The checks are corral's own targets and its shares of those limits; no ratios to peers.
    checks = {check["check"]: check for check in report["checks"]}
    share = checks["corral-sqlite enqueue one by one / raw SQLite inserts, one per transaction"]
    sqlite = report["systems"]["corral-sqlite"]
    assert share["values"][""] == pytest.approx(
        sqlite["enqueue_one_per_s"] / limits["sqlite_insert_autocommit_per_s"], rel=0.01
    )
    assert share["target"] == ">= 0.3x"
    if report["systems"]["corral-bullmq"]["available"]:
        assert any(name.startswith("corral-bullmq idle pickup") for name in checks)
        assert any(name.endswith("/ Redis no-op Lua calls, pipelined") for name in checks)
    assert not any(peer in name for name in checks for peer in PEERS), list(checks)

    assert "corral-sqlite" in done.stdout
    assert "targets and ratios" in done.stdout
    assert "the machine's limits" in done.stdout
    markdown = markdown_path.read_text()
    assert "| SQLite inserts/s, one per transaction |" in markdown
    assert "| | corral-sqlite | corral-bullmq |" in markdown
    assert "| enqueue 1 by 1 /s |" in markdown
    assert "| flow parent release p50 ms |" in markdown


@pytest.mark.timeout(180)
def test_quick_comparison_reports_every_figure_of_the_peers(tmp_path: Path) -> None:
    report_path = tmp_path / "compare.json"
    done = run_compare("--quick", "--systems", ",".join(PEERS), "--json", str(report_path))
    assert done.returncode == 0, done.stderr + done.stdout

    report = json.loads(report_path.read_text())
    assert_report(report, PEERS)
    assert set(report["machine"]["packages"]) == {"redis", "hiredis", "bullmq", "huey"}
    systems = report["systems"]
    if systems["bullmq-node"]["available"]:
        assert report["machine"]["node"], report["machine"]
        assert systems["bullmq-node"]["version"].startswith("bullmq 6.7.0, Node ")
    if systems["bullmq-py"]["available"] and systems["bullmq-node"]["available"]:
        names = [check["check"] for check in report["checks"]]
        assert names == ["bullmq-py / bullmq-node processed"]
    for name in PEERS:
        assert name in done.stdout


def result(system: str, **figures: Any) -> SystemResult:
    return SystemResult(
        system,
        system,
        True,
        version="1",
        pickup={"cross_process": Pickup(8, 1.0, 2.0, 3.0)},
        rss=Memory(1000, 1, 1, 1, 1),
        **figures,
    )


def test_comparison_checks_corral_against_its_peers(compare: ModuleType) -> None:
    results = {
        "corral-sqlite": result("corral-sqlite", enqueue_one_per_s=20_000.0),
        "corral-bullmq": result(
            "corral-bullmq",
            enqueue_one_per_s=5_000.0,
            enqueue_bulk_per_s=30_000.0,
            processed_per_s={"1": 3_000.0, "10": 9_000.0},
        ),
        "bullmq-py": result("bullmq-py", processed_per_s={"1": 1_000.0, "10": 4_000.0}),
        "bullmq-node": result(
            "bullmq-node",
            enqueue_one_per_s=5_000.0,
            enqueue_bulk_per_s=20_000.0,
            processed_per_s={"1": 3_000.0, "10": 12_000.0},
        ),
        "huey-sqlite": result("huey-sqlite", enqueue_one_per_s=4_000.0),
    }
    limits = {"sqlite_insert_autocommit_per_s": 40_000.0, "redis_lua_one_per_s": 10_000.0}
    checks = {check.check: check for check in compare.all_checks(results, limits)}

    # corral's own targets and shares of the machine's limits first, as `corral bench` has them
    # (a share whose limit or figure is missing is left out).
    assert list(checks)[:4] == [
        "corral-sqlite enqueue one by one / raw SQLite inserts, one per transaction",
        "corral-sqlite idle pickup p99, across processes",
        "corral-bullmq enqueue one by one / Redis no-op Lua calls, one at a time",
        "corral-bullmq idle pickup p99, across processes",
    ]
    first = checks["corral-sqlite enqueue one by one / raw SQLite inserts, one per transaction"]
    assert (first.values, first.met) == ({"": 0.5}, True)
    assert checks["corral-sqlite / huey-sqlite enqueue one by one"].values == {"": 5.0}
    assert checks["corral-sqlite / huey-sqlite enqueue one by one"].met is None
    assert "corral-sqlite / huey-sqlite processed" not in checks  # no figures on either side
    by_py = checks["corral-bullmq / bullmq-py processed"]
    assert (by_py.values, by_py.target, by_py.met) == ({"1": 3.0, "10": 2.25}, ">= 2.5x", False)
    by_node = checks["corral-bullmq / bullmq-node processed"]
    assert (by_node.values, by_node.target, by_node.met) == (
        {"1": 1.0, "10": 0.75},
        ">= 1x",
        False,
    )
    assert checks["corral-bullmq / bullmq-node enqueue one by one"].measured == "1.00x"
    assert checks["corral-bullmq / bullmq-node enqueue in bulk"].values == {"": 1.5}
    assert checks["bullmq-py / bullmq-node processed"].target == "reference"

    # With several worker processes, c=10 and c=50 against one Node process, a higher target.
    two = {check.check: check for check in compare.all_checks(results, limits, 2)}
    by_node = two["corral-bullmq / bullmq-node processed"]
    assert (by_node.values, by_node.target) == ({"10": 0.75}, ">= 1.2x")

    # Without the peers, only corral's targets remain.
    assert compare.peer_checks({"corral-bullmq": results["corral-bullmq"]}) == []


def test_systems_can_be_chosen_and_unknown_ones_are_refused(compare: ModuleType) -> None:
    assert CORRAL.parse_systems(["corral-bullmq,corral-sqlite"]) == CORRAL_SYSTEMS
    assert CORRAL.parse_systems(None) == CORRAL_SYSTEMS
    assert compare.COMPARE.parse_systems(["huey-sqlite,corral-sqlite"]) == [
        "corral-sqlite",
        "huey-sqlite",
    ]
    assert compare.COMPARE.parse_systems(["bullmq-py", "corral-bullmq"]) == [
        "corral-bullmq",
        "bullmq-py",
    ]
    assert compare.COMPARE.parse_systems(None) == CORRAL_SYSTEMS + PEERS
    with pytest.raises(ConfigError, match="unknown system"):
        CORRAL.parse_systems(["corral-sqlite,huey-sqlite"])

    done = run_corral("bench", "--quick", "--systems", "bullmq-py")
    assert done.returncode == 2
    assert "unknown system(s) bullmq-py; choose from corral-sqlite, corral-bullmq" in done.stderr
    done = run_compare("--quick", "--systems", "celery")
    assert done.returncode == 2
    assert "unknown system(s) celery" in done.stderr


def test_a_redis_elsewhere_is_refused() -> None:
    far = ("--redis-url", "redis://:pw@10.1.2.3:6379/0")
    for done in (
        run_corral("bench", "--quick", "--systems", "corral-bullmq", *far),
        run_compare("--quick", "--systems", "bullmq-py", *far),
    ):
        assert done.returncode == 2, done.stderr
        assert "only uses a Redis on this machine" in done.stderr
        assert "pw" not in done.stderr


def test_percentile_interpolates_between_samples() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert percentile([10.0, 20.0], 0.99) == pytest.approx(19.9)
    assert percentile([7.0], 0.99) == 7.0
