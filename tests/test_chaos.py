"""The chaos harness, reduced: about 1,000 jobs and 3 SIGKILLs per backend, via `corral chaos`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from corral.tools.chaos import ChaosReport, Kill, Ledger

from conftest import PYTHON, python_env


def run_chaos_cli(*args: str, timeout_s: float = 90) -> tuple[int, dict[str, Any], str]:
    """Run `corral chaos ... --json`; return the exit code, the report and stderr."""
    proc = subprocess.run(
        [PYTHON, "-m", "corral", "chaos", *args, "--json"],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.stdout, f"no report (exit {proc.returncode}): {proc.stderr}"
    return proc.returncode, json.loads(proc.stdout), proc.stderr


REDUCED = (
    "--jobs", "1000", "--workers", "3", "--concurrency", "16", "--kill-every-s", "1.5",
    "--duration-s", "5", "--job-ms", "300", "--lease-s", "1", "--drain-timeout-s", "30",
)  # fmt: skip


@pytest.mark.slow
def test_sigkilled_workers_lose_no_job(backend_kind: str, request: pytest.FixtureRequest) -> None:
    extra: tuple[str, ...] = ()
    if backend_kind == "bullmq":
        extra = ("--redis-url", request.getfixturevalue("redis_url"))
    code, report, stderr = run_chaos_cli(
        "--backend", backend_kind, *REDUCED, "--seed", "11", *extra
    )
    assert code == 0, (report["violations"], stderr)
    assert report["ok"] and report["violations"] == []
    assert report["kills"] == 3 and len(report["kill_log"]) == 3
    assert report["enqueued"] == report["completed"] == report["executed"] == 1000
    assert report["lost"] == report["stuck_active"] == report["failed"] == 0
    assert report["unexpected"] == report["completed_not_executed"] == 0
    assert report["worker_crashes"] == 0
    assert report["drained"] is True
    # The kills caught jobs at work, and every extra completion is one of theirs.
    assert report["in_flight_at_kills"] > 0
    assert report["extra_completions"] <= report["in_flight_at_kills"]
    assert report["executions"] == 1000 + report["extra_completions"]
    assert 0 <= report["extra_after_kills"] <= report["extra_completions"]
    assert len({kill["pid"] for kill in report["kill_log"]}) == 3  # restarted workers are new


@pytest.mark.slow
def test_the_checker_reports_jobs_lost_to_kills(tmp_path: Path) -> None:
    """With max_stalls 0 every job a kill catches is failed as stalled: the run must fail."""
    code, report, _ = run_chaos_cli(
        "--backend", "sqlite", "--jobs", "300", "--workers", "2", "--kill-every-s", "1",
        "--duration-s", "2.5", "--job-ms", "400", "--lease-s", "0.5", "--max-stalls", "0",
        "--drain-timeout-s", "20", "--seed", "3", "--workdir", str(tmp_path),
    )  # fmt: skip
    assert report["kills"] == 2 and report["in_flight_at_kills"] > 0
    assert code == 1 and not report["ok"]
    assert report["lost"] == report["failed"] > 0
    assert report["lost"] <= report["in_flight_at_kills"]
    assert f"{report['lost']} job(s) lost" in report["violations"]
    assert report["samples"]["lost"]
    # The work directory given with --workdir is kept: ledger, database and worker logs.
    assert {"ledger", "chaos.db", "worker-1.log", "worker-2.log"} <= {
        p.name for p in tmp_path.iterdir()
    }


def test_ledger_follows_partial_lines_and_tracks_running_jobs(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    path.write_bytes(b"start 1 1 100 10\nstart 2 1 100 11\ndone 1 1 100 12\nsta")
    ledger = Ledger(path, recent_window_s=10)
    ledger.poll()
    assert ledger.running(100) == {"2"} and ledger.recently_done(100, 0) == {"1"}
    with path.open("ab") as out:
        out.write(b"rt 3 1 200 13\ngarbage\ndone 2 2 200 14\ndone 1 2 200 15\n")
    ledger.poll()
    assert ledger.running(200) == {"3"}
    assert ledger.starts == {"1": 1, "2": 1, "3": 1}
    assert ledger.dones == {"1": 2, "2": 1}
    assert ledger.malformed == 1
    assert ledger.done_pids({"1", "2", "9"}) == {"1": [100, 200], "2": [200], "9": []}
    ledger.forget(100)
    assert ledger.running(100) == set() and ledger.recently_done(100, 0) == set()


def test_report_verdicts() -> None:
    base: dict[str, Any] = dict(
        backend="sqlite", enqueued=10, completed=10, executed=10, executions=12, lost=0,
        duplicated=2, extra_completions=2, extra_after_kills=2, stuck_active=0, failed=0,
        unexpected=0, completed_not_executed=0, kills=[Kill(1.0, 42, 2)], worker_crashes=0,
        in_flight_at_kills=2, duration_s=1.0, drained=True,
    )  # fmt: skip
    assert ChaosReport(**base).ok
    for change, message in (
        ({"extra_completions": 3}, "3 extra completion(s)"),
        ({"lost": 1}, "1 job(s) lost"),
        ({"stuck_active": 1}, "stuck active"),
        ({"unexpected": 1}, "never enqueued"),
        ({"completed_not_executed": 1}, "never ran"),
        ({"worker_crashes": 1}, "died on their own"),
    ):
        report = ChaosReport(**{**base, **change})
        assert not report.ok and any(message in v for v in report.violations), change
        assert report.to_dict()["ok"] is False and report.to_dict()["kills"] == 1
