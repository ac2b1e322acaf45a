"""Logs: one line per event, as text or as JSON (QUEUE_LOG_FORMAT), with the job's fields."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from corral.logs import JsonFormatter, OneLineFormatter

from conftest import PYTHON, python_env

TASKS = """
from corral import QueueService
service = QueueService()

@service.handler("boom")
def boom(message):
    raise ValueError("no good\\nsecond line")

@service.handler("fine")
async def fine(message):
    return 1
"""


def run_worker(tmp_path: Path, fmt: str) -> tuple[list[str], str, str]:
    (tmp_path / "log_tasks.py").write_text(TASKS)
    env = python_env(QUEUE_SQLITE_PATH=str(tmp_path / "q.db"), QUEUE_ATTEMPTS="2")
    env["QUEUE_BACKOFF_DELAY_S"] = "0"
    enqueue = (
        "from corral import QueueService\n"
        "s = QueueService()\n"
        "print(s.enqueue_sync('boom', {'x': 1}), s.enqueue_sync('fine'))\n"
    )
    ids = subprocess.run(
        [PYTHON, "-c", enqueue], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert ids.returncode == 0, ids.stderr
    boom_id, fine_id = ids.stdout.split()
    worker = subprocess.run(
        [PYTHON, "-m", "corral.worker", "log_tasks", "--burst", "--log-format", fmt],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 0, worker.stderr
    return worker.stderr.splitlines(), boom_id, fine_id


def test_json_logs_are_one_object_per_line_with_the_job(tmp_path: Path) -> None:
    lines, boom_id, _ = run_worker(tmp_path, "json")
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert {"worker started", "worker stopped"} <= {e["message"].split(":")[0] for e in entries}
    failures = [e for e in entries if e.get("job_id") == boom_id]
    assert [e["attempt"] for e in failures] == [1, 2]
    assert [e["level"] for e in failures] == ["warning", "error"]
    for entry in failures:
        assert (entry["job_name"], entry["queue"]) == ("boom", "default")
        assert "ValueError: no good" in entry["traceback"]
        assert {"time", "logger", "pid", "message"} <= set(entry)


def test_text_logs_keep_every_event_on_one_line(tmp_path: Path) -> None:
    lines, boom_id, _ = run_worker(tmp_path, "text")
    assert all(line[:4].isdigit() for line in lines), lines  # each line starts a new event
    assert any(f"job {boom_id} 'boom' attempt 2/2 failed for good" in line for line in lines)


def test_a_logged_traceback_stays_on_the_line_of_its_event() -> None:
    try:
        raise RuntimeError("first\nsecond")
    except RuntimeError:
        record = logging.LogRecord("corral", logging.ERROR, __file__, 1, "oops", (), sys.exc_info())
    text = OneLineFormatter().format(record)
    assert "\n" not in text and "RuntimeError: first | second" in text
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "oops" and "RuntimeError: first\nsecond" in entry["traceback"]


def test_a_bad_log_format_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "corral.worker", "log_tasks"],
        env=python_env(QUEUE_LOG_FORMAT="yaml"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: QUEUE_LOG_FORMAT must be one of text, json, got 'yaml'"
