"""The ``corral`` command as a real subprocess on a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corral import FlowJob, FlowNode, JobInfo, JobState, QueueService, QueueSettings, cli
from corral.tools.bench import bench_command
from corral.tools.chaos import chaos_command

from conftest import PYTHON, python_env, unique_queue_name

pytestmark = pytest.mark.timeout(120)

Result = subprocess.CompletedProcess[str]


class Corral:
    """Runs ``python -m corral ARGS`` against one SQLite file, from an empty directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.cwd = tmp_path
        self.db = tmp_path / "queue.db"

    def __call__(self, *args: str, stdin: str | None = None, **env: str) -> Result:
        environment = python_env(QUEUE_SQLITE_PATH=str(self.db), COLUMNS="160", **env)
        return subprocess.run(
            [PYTHON, "-m", "corral", *args],
            env=environment,
            cwd=self.cwd,
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            timeout=90,
        )

    def ok(self, *args: str, **env: str) -> str:
        result = self(*args, **env)
        assert result.returncode == 0, f"corral {' '.join(args)}: {result.stderr}"
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    # The test's own view of the file, through the library rather than the CLI.
    def _run(self, call: Callable[[QueueService], Any]) -> Any:
        async def go() -> Any:
            async with QueueService(QueueSettings(sqlite_path=str(self.db))) as service:
                return await call(service)

        return asyncio.run(go())

    def counts(self) -> dict[JobState, int]:
        counts: dict[JobState, int] = self._run(lambda s: s.counts())
        return counts

    def job(self, job_id: str) -> JobInfo | None:
        info: JobInfo | None = self._run(lambda s: s.get_job(job_id))
        return info


@pytest.fixture
def corral(tmp_path: Path) -> Corral:
    return Corral(tmp_path)


def one_line_error(result: Result, *, code: int = 1) -> str:
    """Assert ``result`` failed with one clear line and no traceback; return that line."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# -- enqueue ------------------------------------------------------------------------------------


def test_enqueue_prints_the_id_and_stores_the_payload_exactly(corral: Corral) -> None:
    data = {"to": "ada@example.com", "tags": ["a", "[b]"], "n": 1.5, "ok": True, "none": None}

    job_id = corral.ok("enqueue", "send_email", json.dumps(data)).strip()

    info = corral.job(job_id)
    assert info is not None
    assert (info.name, info.data, info.state) == ("send_email", data, JobState.WAITING)
    assert corral.json("job", job_id)["data"] == data


def test_enqueue_options(corral: Corral) -> None:
    delayed = corral.ok("enqueue", "a", "1", "--delay-s", "60").strip()
    urgent = corral.ok("enqueue", "b", "2", "--priority", "7", "--attempts", "9").strip()

    assert corral.job(delayed).state is JobState.DELAYED  # type: ignore[union-attr]
    info = corral.job(urgent)
    assert info is not None and (info.priority, info.max_attempts) == (7, 9)


def test_enqueue_without_json_sends_null(corral: Corral) -> None:
    job_id = corral.ok("enqueue", "tick").strip()
    assert corral.json("job", job_id)["data"] is None


def test_job_id_deduplicates(corral: Corral) -> None:
    first = corral.ok("enqueue", "charge", '{"cents": 100}', "--job-id", "order-42").strip()
    second = corral.ok("enqueue", "charge", '{"cents": 999}', "--job-id", "order-42").strip()

    assert first == second == "order-42"
    assert sum(corral.counts().values()) == 1
    assert corral.json("job", "order-42")["data"] == {"cents": 100}  # the first one stays


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x", "{bad json"], "error: the JSON argument is not valid JSON"),
        (["x", "1", "--job-id", "a:b"], "error: job_id may not contain ':'"),
        (["x", "1", "--job-id", "17"], "error: job_id may not be an integer"),
        (["x", "1", "--priority", "-1"], "error: priority must be a whole number"),
        (["x", "1", "--attempts", "0"], "error: attempts must be a whole number >= 1"),
        (["x", "1", "--delay-s", "nan"], "error: delay_s must be a finite number"),
    ],
)
def test_bad_enqueue_is_refused_with_one_line(
    corral: Corral, args: list[str], message: str
) -> None:
    line = one_line_error(corral("enqueue", *args))

    assert line.startswith(message)
    assert sum(corral.counts().values()) == 0


def test_payload_over_the_size_limit_is_refused(corral: Corral) -> None:
    big = json.dumps("x" * 200)
    line = one_line_error(corral("enqueue", "x", big, QUEUE_MAX_PAYLOAD_BYTES="100"))
    assert "QUEUE_MAX_PAYLOAD_BYTES" in line


# -- settings -----------------------------------------------------------------------------------


def test_bad_setting_names_the_variable_and_exits_2(corral: Corral) -> None:
    line = one_line_error(corral("stats", QUEUE_ATTEMPTS="zero"), code=2)
    assert "QUEUE_ATTEMPTS" in line


def test_bad_backend_option_is_a_usage_error(corral: Corral) -> None:
    result = corral("--backend", "mysql", "stats")
    assert result.returncode == 2
    assert "--backend" in result.stderr and "Traceback" not in result.stderr


def test_global_options_win_over_the_environment(corral: Corral, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    corral.ok("--sqlite-path", str(other), "--queue", "emails", "enqueue", "a", "1")

    assert sum(corral.counts().values()) == 0  # not in QUEUE_SQLITE_PATH's file
    moved = corral.json("--sqlite-path", str(other), "--queue", "emails", "stats")
    assert moved["queue"] == "emails" and moved["counts"]["waiting"] == 1
    default_queue = corral.json("--sqlite-path", str(other), "stats")
    assert default_queue["counts"]["waiting"] == 0  # queues in one file are separate


def test_a_password_in_the_redis_url_is_never_printed(corral: Corral) -> None:
    result = corral(
        "--backend", "bullmq", "--redis-url", "redis://user:s3cret@127.0.0.1:1/0", "stats"
    )
    line = one_line_error(result)
    assert "s3cret" not in result.stdout + result.stderr
    assert "redis://user:***@127.0.0.1:1/0" in line


def test_cli_and_worker_on_bullmq(corral: Corral, redis_url: str) -> None:
    queue = unique_queue_name("cli")
    on_redis = ("--backend", "bullmq", "--redis-url", redis_url, "--queue", queue)
    try:
        done = corral.ok(*on_redis, "enqueue", "echo", '{"out": "trace.txt", "value": 7}')
        broken = corral.ok(*on_redis, "enqueue", "boom", "{}", "--attempts", "1")
        corral.ok(*on_redis, "worker", "tasks_worker", "--burst")

        assert corral.json(*on_redis, "job", done.strip())["result"] == 7
        assert corral.json(*on_redis, "stats")["counts"] == {
            "active": 0,
            "waiting": 0,
            "waiting-children": 0,
            "delayed": 0,
            "failed": 1,
            "completed": 1,
        }
        assert [j["id"] for j in corral.json(*on_redis, "jobs", "--state", "failed")] == [
            broken.strip()
        ]
        assert "ok: queue" in corral.ok(*on_redis, "check")
    finally:
        import redis

        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"bull:{queue}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def test_bad_log_level(corral: Corral) -> None:
    line = one_line_error(corral("--log-level", "loud", "stats"), code=2)
    assert "--log-level must be one of" in line


# -- inspecting ---------------------------------------------------------------------------------


def test_stats_table_and_json(corral: Corral) -> None:
    for n in range(3):
        corral.ok("enqueue", "a", str(n))
    corral.ok("enqueue", "a", "9", "--delay-s", "300")

    table = corral.ok("stats")
    assert re.search(r"waiting\s*│\s*3\s*│", table), table
    assert re.search(r"delayed\s*│\s*1\s*│", table), table
    assert re.search(r"total\s*│\s*4\s*│", table), table
    assert "paused: no" in table
    assert corral.json("stats") == {
        "queue": "default",
        "backend": "sqlite",
        "paused": False,
        "counts": {
            "active": 0,
            "waiting": 3,
            "waiting-children": 0,
            "delayed": 1,
            "failed": 0,
            "completed": 0,
        },
    }


def test_a_flow_in_stats_jobs_and_job(corral: Corral) -> None:
    async def add(service: QueueService) -> FlowNode:
        return await service.enqueue_flow(
            FlowJob("report", job_id="report-7", children=[FlowJob("part", 1), FlowJob("part", 2)])
        )

    flow: FlowNode = corral._run(add)
    first, second = flow.children
    assert re.search(r"waiting-children\s*│\s*1\s*│", corral.ok("stats"))
    assert corral.json("stats")["counts"]["waiting-children"] == 1
    assert [j["id"] for j in corral.json("jobs", "--state", "waiting-children")] == ["report-7"]
    assert "report-7" in corral.ok("jobs")  # every state is listed by default

    parent = corral.json("job", "report-7")
    assert parent["state"] == "waiting-children" and parent["parent"] is None
    assert [(c["id"], c["status"]) for c in parent["children"]] == [
        (first.id, "pending"),
        (second.id, "pending"),
    ]
    shown = corral.ok("job", "report-7")
    assert re.search(r"children\s+2 pending", shown), shown
    assert re.search(rf"{first.id}\s*│\s*default\s*│\s*part\s*│\s*pending", shown), shown
    child = corral.json("job", first.id)
    assert child["parent"] == {"id": "report-7", "queue": "default"}
    assert child["children"] == []
    assert "report-7 (queue default)" in corral.ok("job", first.id)


def test_pause_and_resume(corral: Corral) -> None:
    assert "paused queue 'default'" in corral.ok("pause")
    assert corral.json("stats")["paused"] is True
    assert "paused: yes" in corral.ok("stats")

    corral.ok("resume")
    assert corral.json("stats")["paused"] is False


def test_jobs_lists_by_state_in_delivery_order(corral: Corral) -> None:
    low = corral.ok("enqueue", "a", "1", "--priority", "5").strip()
    high = corral.ok("enqueue", "b", "2").strip()
    later = corral.ok("enqueue", "c", "3", "--delay-s", "300").strip()

    waiting = corral.json("jobs", "--state", "waiting")
    assert [j["id"] for j in waiting] == [high, low]
    assert {j["id"] for j in corral.json("jobs")} == {low, high, later}
    assert len(corral.json("jobs", "--limit", "1")) == 1
    table = corral.ok("jobs", "--state", "delayed")
    assert later in table and "delayed" in table
    assert "no failed jobs" in corral.ok("jobs", "--state", "failed")


def test_jobs_with_an_unknown_state_is_a_usage_error(corral: Corral) -> None:
    result = corral("jobs", "--state", "lost")
    assert result.returncode == 2
    assert "--state" in result.stderr and "Traceback" not in result.stderr


def test_unknown_job_id(corral: Corral) -> None:
    line = one_line_error(corral("job", "nope"))
    assert line.startswith("error: no job with id 'nope' in queue 'default'")
    line = one_line_error(corral("remove", "nope"))
    assert line.startswith("error: no job with id 'nope'")


def test_job_details_after_a_worker_ran(corral: Corral) -> None:
    reported = corral.ok("enqueue", "report", "{}").strip()
    broken = corral.ok("enqueue", "boom", '{"value": 7}', "--attempts", "1").strip()
    corral.ok("worker", "tasks_worker", "--burst")

    shown = corral.ok("job", reported)
    assert re.search(r"state\s+completed", shown) and re.search(r"progress\s+100", shown)
    assert 'result    "reported"' in shown
    assert "logs:\n  halfway there\n  done" in shown
    details = corral.json("job", reported)
    assert (details["progress"], details["logs"]) == (100, ["halfway there", "done"])

    failed = corral.ok("job", broken)
    assert re.search(r"state\s+failed", failed)
    assert "error     ValueError: bad input 7" in failed
    assert "traceback:\nTraceback (most recent call last):" in failed
    assert 'raise ValueError(f"bad input' in failed


# -- managing -----------------------------------------------------------------------------------


def test_retry_moves_failed_jobs_back(corral: Corral) -> None:
    ids = [corral.ok("enqueue", "boom", "{}", "--attempts", "1").strip() for _ in range(3)]
    corral.ok("worker", "tasks_worker", "--burst")
    assert corral.counts()[JobState.FAILED] == 3

    assert "1 failed job(s) moved back to waiting" in corral.ok("retry", "--limit", "1")
    assert "2 failed job(s) moved back to waiting" in corral.ok("retry")
    for job_id in ids:
        info = corral.job(job_id)
        assert info is not None and info.state is JobState.WAITING


def test_remove(corral: Corral) -> None:
    job_id = corral.ok("enqueue", "a", "1").strip()
    keep = corral.ok("enqueue", "a", "2").strip()

    assert f"removed job {job_id}" in corral.ok("remove", job_id)
    assert corral.job(job_id) is None
    assert corral.job(keep) is not None


def test_purge_asks_first(corral: Corral) -> None:
    for n in range(3):
        corral.ok("enqueue", "a", str(n))

    for answer in ("n\n", ""):  # "no", and no answer at all (stdin closed)
        line = one_line_error(corral("purge", stdin=answer))
        assert "purge cancelled; nothing was deleted" in line
        assert sum(corral.counts().values()) == 3

    result = corral("purge", stdin="y\n")
    assert result.returncode == 0 and "deleted 3 job(s)" in result.stdout
    corral.ok("enqueue", "a", "1")
    assert "deleted 1 job(s)" in corral.ok("purge", "--yes")
    assert sum(corral.counts().values()) == 0


# -- schedules ----------------------------------------------------------------------------------


def test_schedule_schedules_and_unschedule(corral: Corral) -> None:
    out = corral.ok(
        "schedule",
        "nightly",
        "build_report",
        '{"kind": "daily"}',
        "--cron",
        "0 3 * * *",
        "--tz",
        "Europe/Lisbon",
        "--attempts",
        "5",
    )
    assert out.startswith("schedule nightly: cron 0 3 * * * (Europe/Lisbon), next run ")
    corral.ok(
        "schedule",
        "warmup",
        "ping",
        "--every-s",
        "5",
        "--limit",
        "10",
        "--priority",
        "2",
        "--start-at",
        "2030-01-01T09:00:00+00:00",
        "--end-at",
        "2030-01-01T10:00:00+01:00",
    )
    listed = {each["id"]: each for each in corral.json("schedules")}
    assert listed["nightly"]["data"] == {"kind": "daily"} and listed["nightly"]["attempts"] == 5
    assert (listed["nightly"]["cron"], listed["nightly"]["tz"]) == ("0 3 * * *", "Europe/Lisbon")
    warmup = listed["warmup"]
    assert (warmup["every_s"], warmup["limit"], warmup["priority"], warmup["runs"]) == (5, 10, 2, 0)
    assert warmup["next_run_at"] == warmup["start_at"] == "2030-01-01T09:00:00+00:00"
    assert warmup["end_at"] == "2030-01-01T09:00:00+00:00"
    table = corral.ok("schedules")
    assert "every 5s" in table and "0/10" in table and "Europe/Lisbon" in table
    assert corral.counts()[JobState.DELAYED] == 2  # each schedule's pending job

    assert "removed schedule warmup" in corral.ok("unschedule", "warmup")
    assert "no schedule with id 'warmup'" in one_line_error(corral("unschedule", "warmup"))
    assert [each["id"] for each in corral.json("schedules")] == ["nightly"]
    assert corral.counts()[JobState.DELAYED] == 1


def test_bad_schedules_are_one_line_and_write_nothing(corral: Corral) -> None:
    refused = [
        (["--cron", "0 3 * * 9"], "field 5 (day of week) '9' is out of range", 2),
        (["--cron", "0 3 * * *", "--tz", "Mars/Olympus"], "not a known time zone", 2),
        (["--cron", "0 3 * * *", "--every-s", "5"], "exactly one of cron", 2),
        (["--every-s", "0"], "every_s must be a number of seconds > 0", 2),
        (["--every-s", "5", "--start-at", "tomorrow"], "is not an ISO 8601 time", 1),
        (["--every-s", "5", "--start-at", "2030-01-01T09:00:00"], "has no UTC offset", 2),
        (
            [
                "--every-s",
                "5",
                "--start-at",
                "2030-01-02T00:00+00:00",
                "--end-at",
                "2030-01-01T00:00Z",
            ],
            "is before start_at",
            2,
        ),
    ]
    for args, message, code in refused:
        line = one_line_error(corral("schedule", "s", "ping", *args), code=code)
        assert message in line, (args, line)
    assert corral.ok("schedules").strip() == "no schedules"
    assert sum(corral.counts().values()) == 0


# -- health check and the console script --------------------------------------------------------


def test_check(corral: Corral, tmp_path: Path) -> None:
    corral.ok("enqueue", "a", "1")
    result = corral("check", "tasks_worker")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: queue 'default' on sqlite at")
    assert "1 waiting" in result.stdout and "handlers: boom, echo" in result.stdout

    assert "was not found" in one_line_error(corral("check", "nope_module"), code=2)
    assert "QUEUE_LEASE_S" in one_line_error(corral("check", QUEUE_LEASE_S="-1"), code=2)
    unreachable = corral("--sqlite-path", str(tmp_path / "no" / "such" / "dir" / "q.db"), "check")
    assert unreachable.returncode == 1
    assert unreachable.stderr.startswith("error: ") and "Traceback" not in unreachable.stderr
    # A mistyped path (or a volume that is not mounted) fails, and nothing is created there.
    mistyped = tmp_path / "qeueu.db"
    missing_db = corral("--sqlite-path", str(mistyped), "check")
    assert missing_db.returncode == 1 and "no SQLite database at" in missing_db.stderr
    assert list(tmp_path.glob("qeueu.db*")) == []


def test_python_m_corral_worker_check(corral: Corral) -> None:
    assert corral("stats").returncode == 0  # the database exists once a command used it
    result = subprocess.run(
        [PYTHON, "-m", "corral.worker", "--check"],
        env=python_env(QUEUE_SQLITE_PATH=str(corral.db)),
        cwd=corral.cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "ok: queue 'default'" in result.stdout


def test_console_script(corral: Corral) -> None:
    script = Path(sys.executable).parent / "corral"
    if not script.exists():
        pytest.skip("the corral console script is not installed next to this Python")
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0 and result.stdout.startswith("corral ")
    helped = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    for command in ("enqueue", "stats", "jobs", "job", "retry", "purge", "worker", "check"):
        assert re.search(rf"^\s+{command}\s", helped.stdout, re.M), command


def test_tool_commands_are_imported_only_when_they_run(corral: Corral) -> None:
    probe = "import sys, corral.cli; print([m for m in sys.modules if 'corral.tools' in m])"
    imported = subprocess.run(
        [PYTHON, "-c", probe],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.stdout.strip() == "[]", imported.stdout + imported.stderr
    # `corral --help` lists each tool with the first line of the tool's own help.
    helped = corral.ok("--help")
    for name, command in (("chaos", chaos_command), ("bench", bench_command)):
        assert getattr(cli, name).__doc__ == command.__doc__, name
        first_words = " ".join((command.__doc__ or "").split()[:4])
        assert re.search(rf"^\s+{name}\s+{first_words}", helped, re.M), (name, helped)
    chaos_help = corral.ok("chaos", "--help")
    assert chaos_help.startswith("Usage: corral chaos [OPTIONS]")
    for option in ("--backend", "--jobs", "--kill-every-s", "--workdir", "--json"):
        assert option in chaos_help, option
    bench_help = corral.ok("bench", "--help")
    assert bench_help.startswith("Usage: corral bench [OPTIONS]")
    for option in ("--quick", "--systems", "--json", "--markdown", "--processes"):
        assert option in bench_help, option
    refused = corral("chaos", "--no-such-option")
    assert refused.returncode == 2 and "No such option: --no-such-option" in refused.stderr


def test_demo_runs_and_drains_its_batch(corral: Corral) -> None:
    demo = Path(__file__).resolve().parent.parent / "examples" / "demo.py"
    result = subprocess.run(
        [PYTHON, str(demo)],
        env=python_env(QUEUE_SQLITE_PATH=str(corral.db)),
        cwd=corral.cwd,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"completed\s*│\s*15\s*│", result.stdout), result.stdout
    assert re.search(r"failed\s*│\s*1\s*│", result.stdout), result.stdout
    assert "retried: 9 send_email completed on attempt 2" in result.stdout
    assert "order-1002 charge_card: UnrecoverableError" in result.stdout


def test_promote_runs_a_delayed_job_now(corral: Corral) -> None:
    job_id = corral.ok("enqueue", "later", "1", "--delay-s", "3600").strip()
    now = corral.ok("enqueue", "now", "2").strip()
    assert "promoted job" in corral.ok("promote", job_id)
    listed = json.loads(corral.ok("jobs", "--state", "waiting", "--json"))
    assert [job["id"] for job in listed] == [now, job_id]
    assert "no delayed job" in one_line_error(corral("promote", job_id))
