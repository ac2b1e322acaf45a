"""The worker entry points as real processes on real SQLite files: jobs, signals, supervisor."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral import JobInfo, JobState, QueueService, QueueSettings, Retry

from conftest import PYTHON, python_env

pytestmark = pytest.mark.timeout(120)


class Queue:
    """The test's own view of the SQLite queue that the worker processes use."""

    def __init__(self, db: Path, name: str = "default") -> None:
        self.db = db
        self.name = name

    def _run(self, call: Callable[[QueueService], Any]) -> Any:
        async def go() -> Any:
            settings = QueueSettings(sqlite_path=str(self.db), name=self.name)
            async with QueueService(settings) as service:
                return await call(service)

        return asyncio.run(go())

    def enqueue(self, name: str, data: Any = None, **options: Any) -> str:
        job_id: str = self._run(lambda s: s.enqueue(name, data, **options))
        return job_id

    def job(self, job_id: str) -> JobInfo:
        info: JobInfo | None = self._run(lambda s: s.get_job(job_id))
        assert info is not None, f"job {job_id} is gone"
        return info

    def counts(self) -> dict[JobState, int]:
        counts: dict[JobState, int] = self._run(lambda s: s.counts())
        return counts


class Proc:
    """A process whose stdout and stderr go to a file the test can read while it runs."""

    def __init__(self, args: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.log_path = log
        with open(log, "wb") as sink:
            self.popen = subprocess.Popen(
                args, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, *, count: int = 1, timeout_s: float = 20.0) -> list[str]:
        """Wait until ``pattern`` (a regex) matches ``count`` times; return the matches."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = re.findall(pattern, self.log())
            if len(found) >= count:
                return found
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{pattern!r} not seen {count} time(s) "
                    f"(exit code {self.popen.returncode}); output:\n{self.log()}"
                )
            time.sleep(0.05)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"process still running after {timeout_s}s; output:\n{self.log()}"
            ) from None

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


@pytest.fixture
def queue(db: Path) -> Queue:
    return Queue(db)


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """The trace file the handlers of tasks_worker write to."""
    return tmp_path / "trace.txt"


@pytest.fixture
def spawn(tmp_path: Path, db: Path) -> Iterator[Callable[..., Proc]]:
    """Start ``python ARGS`` on the test's queue file; every process is killed at the end."""
    procs: list[Proc] = []

    def start(*args: str, log_name: str | None = None, **env: str) -> Proc:
        environment = python_env(
            QUEUE_SQLITE_PATH=str(db), QUEUE_LOG_LEVEL="info", QUEUE_BACKOFF_DELAY_S="0", **env
        )
        name = log_name or f"proc-{len(procs)}.log"
        proc = Proc([PYTHON, *args], env=environment, cwd=tmp_path, log=tmp_path / name)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def wait_until(condition: Callable[[], bool], *, timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)


def starts(trace: Path, job_id: str) -> int:
    """How many times the job ``job_id`` started, per the handlers' trace file."""
    if not trace.exists():
        return 0
    lines = trace.read_text().splitlines()
    return sum(1 for line in lines if line.split()[:2] == ["start", job_id])


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


# -- processing ---------------------------------------------------------------------------------


def test_python_m_worker_reads_QUEUE_TASKS_and_drains_in_burst(
    queue: Queue, out: Path, spawn: Callable[..., Proc]
) -> None:
    ids = [queue.enqueue("echo", {"out": str(out), "value": i}) for i in range(5)]
    flaky = queue.enqueue("flaky", {"out": str(out)}, attempts=3, backoff=Retry.fixed(0))

    worker = spawn("-m", "corral.worker", "--burst", QUEUE_TASKS="tasks_worker")

    assert worker.wait(60) == 0, worker.log()
    assert queue.counts()[JobState.COMPLETED] == 6
    assert [queue.job(job_id).result for job_id in ids] == [0, 1, 2, 3, 4]
    retried = queue.job(flaky)
    assert (retried.state, retried.result, retried.attempts_made) == (JobState.COMPLETED, 2, 2)
    assert "attempt 1/3 failed" in worker.log()


def test_job_without_handler_fails_with_a_clear_error(
    queue: Queue, out: Path, spawn: Callable[..., Proc]
) -> None:
    unknown = queue.enqueue("no_such_task", {"x": 1}, attempts=5)
    known = queue.enqueue("echo", {"out": str(out), "value": "ok"})

    worker = spawn("-m", "corral.cli", "worker", "tasks_worker", "--burst")

    assert worker.wait(60) == 0, worker.log()
    failed = queue.job(unknown)
    assert failed.state is JobState.FAILED
    assert failed.error == "no handler registered for 'no_such_task'"
    assert failed.attempts_made == 1  # not retried: another attempt cannot find one either
    assert queue.job(known).state is JobState.COMPLETED


def test_module_attr_form_and_module_from_working_directory(
    tmp_path: Path, queue: Queue, spawn: Callable[..., Proc]
) -> None:
    (tmp_path / "my_tasks.py").write_text(
        textwrap.dedent(
            """
            from corral import QueueService

            jobs = QueueService()

            @jobs.handler("double")
            def double(message):
                return message.data * 2
            """
        )
    )
    job_id = queue.enqueue("double", 21)

    worker = spawn("-m", "corral.cli", "worker", "my_tasks:jobs", "--burst")

    assert worker.wait(60) == 0, worker.log()
    assert queue.job(job_id).result == 42


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["no_such_module_xyz"], {}, "task module 'no_such_module_xyz' was not found"),
        (["string"], {}, "task module 'string' defines no QueueService"),
        (["tasks_worker:nothing"], {}, "task module 'tasks_worker' has no attribute 'nothing'"),
        (["tasks_worker:trace"], {}, "tasks_worker:trace is function, not a QueueService"),
        ([], {}, "no task modules to load"),
        (["tasks_worker"], {"QUEUE_CONCURRENCY": "0"}, "invalid queue settings: QUEUE_CONCURRENCY"),
        (
            ["tasks_worker", "--processes", "2"],
            {"QUEUE_BACKEND": "nope"},
            "invalid queue settings: QUEUE_BACKEND",
        ),
    ],
)
def test_bad_worker_setup_is_one_clear_line_and_exit_2(
    args: list[str], env: dict[str, str], message: str, spawn: Callable[..., Proc]
) -> None:
    worker = spawn("-m", "corral.worker", *args, **env)

    assert worker.wait(30) == 2
    output = worker.log()
    assert f"error: {message}" in output
    assert "Traceback" not in output


def test_task_module_that_raises_on_import_shows_its_traceback(
    tmp_path: Path, spawn: Callable[..., Proc]
) -> None:
    (tmp_path / "broken_tasks.py").write_text("import json\nundefined_name + 1\n")

    worker = spawn("-m", "corral.worker", "broken_tasks")

    assert worker.wait(30) == 2
    output = worker.log()
    assert "error: importing task module 'broken_tasks' failed: NameError" in output
    assert 'broken_tasks.py", line 2' in output  # the module's own frame, to find the bug


# -- signals ------------------------------------------------------------------------------------


def test_sigterm_claims_nothing_new_and_lets_the_running_job_finish(
    queue: Queue, out: Path, spawn: Callable[..., Proc]
) -> None:
    running = queue.enqueue("sleep", {"out": str(out), "seconds": 2})
    worker = spawn(
        "-m",
        "corral.worker",
        "tasks_worker",
        "--concurrency",
        "2",
        QUEUE_SHUTDOWN_GRACE_S="20",
    )
    wait_until(lambda: starts(out, running) == 1, what="the first job to start")
    # Due while the first job still runs, with a slot free: only the stop keeps it unclaimed.
    later = queue.enqueue("echo", {"out": str(out), "value": 1}, delay_s=0.5)

    worker.signal(signal.SIGTERM)

    assert worker.wait(20) == 0, worker.log()
    finished = queue.job(running)
    assert (finished.state, finished.result) == (JobState.COMPLETED, "slept")
    assert starts(out, later) == 0
    assert queue.job(later).state in (JobState.DELAYED, JobState.WAITING)
    assert "SIGTERM received" in worker.log()


@pytest.mark.parametrize("handler", ["sleep", "sync_sleep"])
def test_job_longer_than_grace_is_released_and_runs_again(
    handler: str, queue: Queue, out: Path, spawn: Callable[..., Proc]
) -> None:
    job_id = queue.enqueue(handler, {"out": str(out), "seconds": 120, "once": True})
    worker = spawn("-m", "corral.worker", "tasks_worker", QUEUE_SHUTDOWN_GRACE_S="0.5")
    wait_until(lambda: starts(out, job_id) == 1, what="the job to start")

    worker.signal(signal.SIGTERM)

    # Long before the handler's 120 s: the grace period, then cancel and release.
    assert worker.wait(30) == 0, worker.log()
    released = queue.job(job_id)
    assert released.state is JobState.WAITING
    assert released.attempts_made == 0  # a release does not use up an attempt

    again = spawn("-m", "corral.worker", "tasks_worker", "--burst")
    assert again.wait(60) == 0, again.log()
    done = queue.job(job_id)
    assert (done.state, done.result) == (JobState.COMPLETED, "quick")
    assert starts(out, job_id) == 2


def test_signal_that_arrives_during_startup_still_stops_gracefully(
    tmp_path: Path, db: Path
) -> None:
    # The signal is pending before the worker can handle it, as when a supervisor forwards one
    # to a child that is still starting: it must not be lost.
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [PYTHON, "-m", "corral.worker", "tasks_worker"],
            env=python_env(QUEUE_SQLITE_PATH=str(db)),
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}),
        )
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(30)
        finally:
            worker.kill()
    output = (tmp_path / "worker.log").read_text()
    assert code == 0, output
    assert "SIGTERM received: claiming no more jobs" in output


def test_second_signal_exits_at_once_and_releases_the_job(
    queue: Queue, out: Path, spawn: Callable[..., Proc]
) -> None:
    job_id = queue.enqueue("sleep", {"out": str(out), "seconds": 120})
    worker = spawn("-m", "corral.worker", "tasks_worker", QUEUE_SHUTDOWN_GRACE_S="120")
    wait_until(lambda: starts(out, job_id) == 1, what="the job to start")

    worker.signal(signal.SIGINT)
    worker.wait_for_log("SIGINT received")
    time.sleep(0.3)
    assert worker.popen.poll() is None  # the first signal waits for the job (120 s of grace)
    worker.signal(signal.SIGINT)

    assert worker.wait(15) == 128 + signal.SIGINT
    assert queue.job(job_id).state is JobState.WAITING
    assert "received again: exiting now" in worker.log()


# -- several processes --------------------------------------------------------------------------

STARTED = r"worker process (\d)/2 started \(pid (\d+)\)"


def test_supervisor_restarts_a_killed_child_and_stops_on_sigterm(
    queue: Queue, out: Path, spawn: Callable[..., Proc]
) -> None:
    supervisor = spawn("-m", "corral.cli", "worker", "tasks_worker", "--processes", "2")
    first = dict(supervisor.wait_for_log(STARTED, count=2))
    assert len(set(first.values())) == 2
    supervisor.wait_for_log(r"worker started: queue='default'", count=2)

    victim = int(first["1"])
    os.kill(victim, signal.SIGKILL)

    supervisor.wait_for_log(rf"\(pid {victim}\) was killed by SIGKILL; restarting it")
    restarted = supervisor.wait_for_log(STARTED, count=3)[2]
    assert restarted[0] == "1" and int(restarted[1]) != victim
    children = {int(restarted[1]), int(first["2"])}
    supervisor.wait_for_log(r"worker started: queue='default'", count=3)
    assert all(alive(pid) for pid in children)

    ids = [queue.enqueue("echo", {"out": str(out), "value": i}) for i in range(6)]
    wait_until(lambda: queue.counts()[JobState.COMPLETED] == 6, what="6 jobs completed")
    pids = {int(line.split()[3]) for line in out.read_text().splitlines()}
    assert pids <= children
    assert [queue.job(job_id).result for job_id in ids] == list(range(6))

    supervisor.signal(signal.SIGTERM)

    assert supervisor.wait(30) == 0, supervisor.log()
    wait_until(lambda: not any(alive(pid) for pid in children), what="children to exit")
    assert "SIGTERM received: stopping the worker processes" in supervisor.log()


def test_children_stop_when_the_supervisor_is_killed(spawn: Callable[..., Proc]) -> None:
    supervisor = spawn("-m", "corral.worker", "tasks_worker", "--processes", "2")
    children = [int(pid) for _, pid in supervisor.wait_for_log(STARTED, count=2)]
    supervisor.wait_for_log(r"worker started: queue='default'", count=2)

    supervisor.signal(signal.SIGKILL)

    wait_until(lambda: not any(alive(pid) for pid in children), what="orphaned children to stop")
    assert "supervisor" in supervisor.log() and "is gone; stopping" in supervisor.log()


def test_crash_looping_child_is_restarted_with_growing_delays(
    spawn: Callable[..., Proc],
) -> None:
    script = textwrap.dedent(
        """
        import sys
        from corral.logs import configure_logging
        from corral.supervisor import Supervisor

        configure_logging("info")
        crash = [sys.executable, "-c", "raise SystemExit(3)"]
        supervisor = Supervisor(crash, processes=1, restart_delay_s=0.05, max_restart_delay_s=0.4)
        sys.exit(supervisor.run())
        """
    )
    supervisor = spawn("-c", script)
    delays = supervisor.wait_for_log(r"exited with code 3; restarting it in ([\d.]+)s", count=6)

    supervisor.signal(signal.SIGTERM)

    assert [float(d) for d in delays[:6]] == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
    assert supervisor.wait(15) == 1  # its last child did not exit cleanly


def test_second_signal_to_the_supervisor_ends_everything_at_once(
    queue: Queue, out: Path, spawn: Callable[..., Proc]
) -> None:
    job_id = queue.enqueue("sleep", {"out": str(out), "seconds": 120})
    supervisor = spawn(
        "-m", "corral.worker", "tasks_worker", "--processes", "2", QUEUE_SHUTDOWN_GRACE_S="120"
    )
    children = [int(pid) for _, pid in supervisor.wait_for_log(STARTED, count=2)]
    wait_until(lambda: starts(out, job_id) == 1, what="the job to start")

    supervisor.signal(signal.SIGTERM)
    supervisor.wait_for_log(r"SIGTERM received: claiming no more jobs", count=2)
    supervisor.signal(signal.SIGTERM)

    assert supervisor.wait(20) == 128 + signal.SIGTERM, supervisor.log()
    assert not any(alive(pid) for pid in children)
    assert queue.job(job_id).state is JobState.WAITING


def test_supervised_burst_workers_use_the_global_options(
    tmp_path: Path, out: Path, spawn: Callable[..., Proc]
) -> None:
    emails = Queue(tmp_path / "other.db", name="emails")
    ids = [emails.enqueue("echo", {"out": str(out), "value": value}) for value in range(8)]

    supervisor = spawn(
        "-m",
        "corral.cli",
        "--sqlite-path",
        str(emails.db),
        "--queue",
        "emails",
        "worker",
        "tasks_worker",
        "--processes",
        "2",
        "--burst",
    )

    assert supervisor.wait(60) == 0, supervisor.log()
    assert supervisor.log().count("drained the queue") == 2
    assert [emails.job(job_id).result for job_id in ids] == list(range(8))


ATEXIT_TASKS = """
import atexit, os
from corral import QueueService
service = QueueService()

@atexit.register
def flushed():
    with open(os.environ["ATEXIT_FILE"], "a") as out:
        out.write(f"{os.getpid()}\\n")
"""


def test_an_idle_supervised_worker_stops_cleanly_and_runs_exit_hooks(
    tmp_path: Path, spawn: Callable[..., Proc]
) -> None:
    (tmp_path / "atexit_tasks.py").write_text(ATEXIT_TASKS)
    hooks = tmp_path / "atexit.txt"
    supervisor = spawn(
        "-m", "corral.cli", "worker", "atexit_tasks", "--processes", "4", ATEXIT_FILE=str(hooks)
    )
    children = [
        int(pid)
        for _, pid in supervisor.wait_for_log(
            r"worker process (\d)/4 started \(pid (\d+)\)", count=4
        )
    ]
    supervisor.wait_for_log(r"worker started: queue='default'", count=4)
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait(30) == 0, supervisor.log()
    assert "still running" not in supervisor.log()
    ran = {int(line) for line in hooks.read_text().split()}
    assert set(children) <= ran  # every child's atexit hooks ran: a normal exit
    assert supervisor.pid in ran


TWO_SERVICES = """
from corral import QueueMessage, QueueService, QueueSettings

emails = QueueService(QueueSettings(name="emails", sqlite_path="jobs.db"))
reports = QueueService(QueueSettings(name="reports", sqlite_path="jobs.db"))

@emails.handler("welcome")
async def welcome(message: QueueMessage) -> str:
    # Chaining by hand: the follow-up goes to the queue this job came from.
    follow_up = await message.enqueue("log_sent", {"to": message.data["to"]})
    return follow_up

@emails.handler("log_sent")
async def log_sent(message: QueueMessage) -> str:
    return f"sent to {message.data['to']}"

@reports.handler("build")
def build(message: QueueMessage) -> int:
    return sum(message.data)
"""


def test_a_worker_serves_its_task_modules_services_with_their_settings(
    tmp_path: Path, spawn: Callable[..., Proc]
) -> None:
    """`corral worker tasks --burst` with services on jobs.db: not a new corral.db, both
    queues in one process, and a job enqueued from a handler lands in its own queue."""
    (tmp_path / "two_services.py").write_text(TWO_SERVICES)
    jobs = tmp_path / "jobs.db"
    emails, reports = Queue(jobs, "emails"), Queue(jobs, "reports")
    welcome = emails.enqueue("welcome", {"to": "ada"})
    build = reports.enqueue("build", [1, 2, 3])
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUE_")}
    worker = subprocess.run(
        [PYTHON, "-m", "corral.cli", "worker", "two_services", "--burst"],
        env={**python_env(), **{k: v for k, v in env.items() if k == "PATH"}},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 0, worker.stderr
    assert not (tmp_path / "corral.db").exists()
    follow_up = emails.job(welcome).result
    assert emails.job(follow_up).result == "sent to ada"
    assert reports.job(build).result == 6
    assert emails.counts()[JobState.COMPLETED] == 2
    assert "queue='emails'" in worker.stderr and "queue='reports'" in worker.stderr


def test_the_command_line_may_not_contradict_a_service_s_own_settings(tmp_path: Path) -> None:
    (tmp_path / "two_services.py").write_text(TWO_SERVICES)
    done = subprocess.run(
        [PYTHON, "-m", "corral.cli", "--sqlite-path", "other.db", "worker", "two_services"],
        env=python_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "sqlite_path='jobs.db'" in done.stderr and "'other.db'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_one_worker_serves_several_queues_with_their_own_concurrency(
    tmp_path: Path, spawn: Callable[..., Proc], out: Path
) -> None:
    db = tmp_path / "queue.db"
    first, second = Queue(db, "first"), Queue(db, "second")
    ids = [first.enqueue("echo", {"out": str(out), "value": i}) for i in range(3)]
    ids += [second.enqueue("echo", {"out": str(out), "value": i}) for i in range(3)]
    first.enqueue("x")  # paused below: not run
    Queue(db, "first")._run(lambda s: s.pause())
    worker = spawn(
        "-m", "corral.worker", "tasks_worker", "--queue", "first:2", "--queue", "second", "--burst"
    )
    assert worker.wait(60) == 0, worker.log()
    assert "queue='first' concurrency=2" in worker.log()
    assert first.counts()[JobState.WAITING] == 4  # a paused queue delivers nothing
    assert second.counts()[JobState.COMPLETED] == 3
