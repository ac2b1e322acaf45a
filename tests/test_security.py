"""Security: the Redis password never leaks; payloads are JSON only, and foreign or corrupt jobs
written straight into the storage are failed with a reason, never run, and the worker goes on."""

from __future__ import annotations

import ast
import asyncio
import logging
import pickle
import signal
import sqlite3
import subprocess
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral import (
    BackendConnectionError,
    ConfigError,
    JobState,
    QueueMessage,
    QueueService,
    QueueSettings,
)
from corral.settings import redact_url

from conftest import PYTHON, ROOT, python_env

PASSWORD = "Sup3rS3cretPw7a1f"
SPECIAL = "Zq@9/x:y%Z"  # needs percent-encoding in a URL
SPECIAL_ENCODED = "Zq%409%2Fx%3Ay%25Z"
SECRETS = (PASSWORD, SPECIAL, SPECIAL_ENCODED, "Sup3rS3cret", "Zq%409", "Zq@9")
DEAD_URL = f"redis://:{PASSWORD}@127.0.0.1:1/0"  # nothing listens on port 1


def assert_no_secret(text: str, where: str = "") -> None:
    for secret in SECRETS:
        assert secret not in text, f"the password leaked in {where or 'the output'}: {text!r}"


def full_text(exc: BaseException) -> str:
    """str, repr and the whole traceback of ``exc`` with every chained exception."""
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


def offline_settings(backend: str = "bullmq", **values: Any) -> QueueSettings:
    return QueueSettings(
        _env_file=None,  # type: ignore[call-arg]
        backend=backend,
        name=f"sec-{uuid.uuid4().hex[:8]}",
        **{"redis_url": DEAD_URL, **values},
    )


# -- the password --------------------------------------------------------------------------


URLS_WITH_SECRETS = [
    f"redis://default:{PASSWORD}@127.0.0.1:6379/0",
    f"redis://:{PASSWORD}@127.0.0.1:6379/0",
    f"rediss://{PASSWORD}@127.0.0.1:6380/1",  # a lone token in the user slot
    f"redis://127.0.0.1:6379/0?password={PASSWORD}",  # redis-py reads this one too
    f"redis://u:{SPECIAL_ENCODED}@[::1]:6379/0",
    f"unix://:{PASSWORD}@/tmp/redis.sock",
]


@pytest.mark.parametrize("url", URLS_WITH_SECRETS)
@pytest.mark.parametrize("backend", ["sqlite", "bullmq"])
def test_reprs_hide_the_password(url: str, backend: str, tmp_path: Path) -> None:
    settings = offline_settings(backend, redis_url=url, sqlite_path=str(tmp_path / "q.db"))
    assert settings.redis_url == url  # the secret is there, only never shown
    service = QueueService(settings)
    shown = [repr(settings), str(settings), settings.redis_url_redacted, repr(service)]
    shown.append(repr(service.backend))  # builds the backend; no I/O yet
    # Frameworks log settings by serializing them.
    shown += [settings.model_dump_json(), str(settings.model_dump()), repr(settings.model_dump())]
    shown.append(str(settings.model_dump(mode="json")))
    for text in shown:
        assert_no_secret(text, "a repr")
    assert "***" in settings.redis_url_redacted
    # Only when asked for explicitly.
    assert settings.model_dump(context={"reveal_secrets": True})["redis_url"] == url


@pytest.mark.parametrize(
    "values",
    [
        {"redis_url": f"redis://:{PASSWORD}@127.0.0.1:99999/0"},
        {"redis_url": f"redis://:{PASSWORD}@127.0.0.1:port/0"},
        {"redis_url": f"http://:{PASSWORD}@127.0.0.1/0"},
        {"redis_url": f"redis://:{PASSWORD}@127.0.0.1/zero"},
        {"redis_url": f"redis://:{PASSWORD}@/0"},
        {"redis_url": f"redis://u:{SPECIAL_ENCODED}@[::1/0"},
        {"redis_url": f"redis://:{PASSWORD}@127.0.0.1/0", "concurrency": 0},
        {"redis_url": f"redis://:{PASSWORD}@127.0.0.1/0", "backend": "postgres"},
    ],
)
def test_config_errors_hide_the_password(
    values: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError) as from_kwargs:
        QueueSettings(_env_file=None, **values)  # type: ignore[call-arg]
    assert_no_secret(full_text(from_kwargs.value), "a ConfigError")
    for key, value in values.items():
        monkeypatch.setenv(f"QUEUE_{key.upper()}", str(value))
    with pytest.raises(ConfigError) as from_env:
        QueueSettings(_env_file=None)  # type: ignore[call-arg]
    assert_no_secret(full_text(from_env.value), "a ConfigError")
    assert "QUEUE_" in str(from_env.value)


@settings(max_examples=200, deadline=None)
@given(
    password=st.text(min_size=6, max_size=20),
    host=st.sampled_from(["127.0.0.1", "[::1]", "redis.internal", "h"]),
    port=st.sampled_from(["", ":6379", ":99999", ":x", ":"]),
    tail=st.sampled_from(["", "/0", "/0?db=1", "/0?socket_timeout=1&password=PW", "#f"]),
)
def test_redact_url_never_raises_and_never_shows_a_password(
    password: str, host: str, port: str, tail: str
) -> None:
    from urllib.parse import quote

    encoded = quote(password, safe="")
    url = f"redis://user:{encoded}@{host}{port}{tail.replace('PW', encoded)}"
    shown = redact_url(url)
    if shown != "<unparseable url>":
        assert encoded not in shown.replace("user:***", "").replace("password=***", "")


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    yield caplog


def logged_text(caplog: pytest.LogCaptureFixture) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)


async def test_unreachable_redis_errors_and_logs_hide_the_password(
    all_logs: pytest.LogCaptureFixture,
) -> None:
    service = QueueService(offline_settings(lease_s=0.3))
    errors: list[BaseException] = []
    for call in (
        lambda: service.enqueue("x", {"a": 1}),
        lambda: service.enqueue_many([{"name": "x"}, {"name": "y"}]),
        service.counts,
        lambda: service.get_job("1"),
        lambda: service.list_jobs("failed"),
        service.pause,
        lambda: service.retry_failed(),
    ):
        with pytest.raises(BackendConnectionError) as caught:
            await asyncio.wait_for(call(), 30)
        errors.append(caught.value)
    with pytest.raises(BackendConnectionError) as caught_sync:
        await asyncio.to_thread(service.enqueue_sync, "x", 1)
    errors.append(caught_sync.value)

    @service.handler("x")
    async def x(message: QueueMessage) -> None:
        raise AssertionError("nothing can be delivered")

    worker = asyncio.create_task(service.start_worker(concurrency=2))
    await asyncio.sleep(1.5)  # a few failed claims, each logged
    service.stop()
    await asyncio.wait_for(worker, 20)
    await service.close()

    for exc in errors:
        assert "redis://:***@127.0.0.1:1/0" in str(exc)  # says where, without the secret
        assert_no_secret(full_text(exc), "an exception")
    logs = logged_text(all_logs)
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in logs
    assert_no_secret(logs, "the logs")


async def test_sqlite_worker_logs_hide_the_redis_password(
    all_logs: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    settings = offline_settings("sqlite", sqlite_path=str(tmp_path / "q.db"))
    async with QueueService(settings) as service:

        @service.handler("x")
        async def x(message: QueueMessage) -> None:
            raise ValueError("handler failure, logged with its traceback")

        await service.enqueue("x", 1)
        await service.start_worker(burst=True)
    logs = logged_text(all_logs)
    assert "worker started" in logs and "handler failure" in logs
    assert_no_secret(logs, "the logs")


def test_cli_output_hides_the_password(tmp_path: Path) -> None:
    dead = {"QUEUE_BACKEND": "bullmq", "QUEUE_REDIS_URL": DEAD_URL}
    bad_port = f"redis://:{PASSWORD}@127.0.0.1:99999/0"
    far = f"redis://:{PASSWORD}@10.11.12.13:6379/0"
    runs: dict[str, tuple[list[str], dict[str, str]]] = {
        "stats": (["--backend", "bullmq", "--redis-url", DEAD_URL, "stats"], {}),
        "stats debug json": (
            ["--log-level", "debug", "--backend", "bullmq", "--redis-url", DEAD_URL, "stats"],
            {},
        ),
        "jobs (env)": (["jobs"], dead),
        "job (env)": (["job", "1"], dead),
        "enqueue (env)": (["enqueue", "x", '{"a": 1}'], dead),
        "retry (env)": (["retry"], dead),
        "check (env)": (["check", "--timeout-s", "5"], dead),
        "check": (["--backend", "bullmq", "--redis-url", DEAD_URL, "check"], {}),
        "bad port": (["--redis-url", bad_port, "stats"], {}),
        "bad port (env)": (["stats"], {"QUEUE_REDIS_URL": bad_port}),
        "chaos, dead redis": (
            ["chaos", "-b", "bullmq", "--redis-url", DEAD_URL, "--jobs", "10"],
            {},
        ),
        "chaos, remote redis": (["chaos", "-b", "bullmq", "--redis-url", far], {}),
    }
    procs = {
        name: subprocess.Popen(
            [PYTHON, "-m", "corral", *args],
            env=python_env(**env),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, env) in runs.items()
    }
    worker = subprocess.Popen(
        [PYTHON, "-m", "corral.worker", "corral.tools._chaos_tasks", "--log-level", "debug"],
        env=python_env(**dead),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    health = subprocess.Popen(
        [PYTHON, "-m", "corral.worker", "--check"],
        env=python_env(**dead),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    outputs = {name: proc.communicate(timeout=60) for name, proc in procs.items()}
    outputs["python -m corral.worker --check"] = health.communicate(timeout=60)
    time.sleep(2.5)  # let the worker fail to claim a few times
    worker.send_signal(signal.SIGTERM)
    outputs["worker"] = worker.communicate(timeout=30)

    for name, (stdout, stderr) in outputs.items():
        assert_no_secret(stdout + stderr, name)
    for name, proc in [*procs.items(), ("python -m corral.worker --check", health)]:
        stdout, stderr = outputs[name]
        assert proc.returncode != 0, (name, stdout, stderr)
        assert "error:" in stderr, (name, stderr)
    assert "***" in outputs["stats"][1] and "***" in outputs["check"][1]
    assert "127.0.0.1" in outputs["chaos, remote redis"][1]
    assert "storage error while claiming jobs" in outputs["worker"][1]


# -- JSON only -----------------------------------------------------------------------------

FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def test_no_pickle_marshal_or_eval_in_the_package() -> None:
    found = []
    for path in sorted((ROOT / "src" / "corral").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            if FORBIDDEN_MODULES.intersection(names):
                found.append(f"{path.name}:{node.lineno} imports {names}")
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                    found.append(f"{path.name}:{node.lineno} calls {func.id}()")
                if (
                    isinstance(func, ast.Attribute)
                    and func.attr in {"load", "loads"}
                    and isinstance(func.value, ast.Name)
                    and func.value.id in FORBIDDEN_MODULES | {"yaml"}
                ):
                    found.append(f"{path.name}:{node.lineno} calls {func.value.id}.{func.attr}")
    assert found == []


# -- foreign and corrupt jobs: SQLite ------------------------------------------------------

SQLITE_CORRUPT = {
    "data is not JSON": ({"data": "{not json"}, "Expecting property name"),
    "data is a pickle blob": ({"data": pickle.dumps({"a": 1})}, "can't decode byte"),
    "data is a text pickle": (
        {"data": pickle.dumps({"a": 1}, protocol=0).decode("latin-1")},
        "Expecting value",
    ),
    "data is NaN": ({"data": "NaN"}, "NaN is not JSON"),
    "data nests too deep": ({"data": "[" * 100_000 + "]" * 100_000}, "nested too deeply"),
    "name is a blob": ({"name": b"\xff\xfe"}, "job name is"),
    "name is empty": ({"name": ""}, "job name is"),
    "max_attempts is text": ({"max_attempts": "many"}, "attempt counters are not integers"),
    "max_attempts is a float": ({"max_attempts": 2.5}, "attempt counters are not integers"),
    "attempts_made is text": ({"attempts_made": "x"}, "attempt counters are not integers"),
    "priority is text": ({"priority": "high"}, "priority or enqueued_at is not an integer"),
    "enqueued_at is text": ({"enqueued_at": "yesterday"}, "priority or enqueued_at"),
    "backoff is not JSON": ({"backoff": "{bad"}, "Expecting property name"),
    "backoff delay is text": ({"backoff": '{"type":"fixed","delay":"soon"}'}, "invalid literal"),
    "backoff delay is infinite": (
        {"backoff": '{"type":"fixed","delay":1e400}'},
        "not a finite number",
    ),
    "backoff delay is NaN": ({"backoff": '{"type":"fixed","delay":NaN}'}, "NaN is not JSON"),
    "backoff is over a year": ({"backoff": "100000000000000000000"}, "(a year)"),
}


def insert_row(db: Path, queue: str, **columns: Any) -> int:
    """Write a job row directly, as a foreign program would; return its seq."""
    now = int(time.time() * 1000)
    row = {
        "queue": queue,
        "name": "ok",
        "data": '"foreign"',
        "state": "waiting",
        "run_at": now,
        "enqueued_at": now,
        **columns,
    }
    conn = sqlite3.connect(db)
    try:
        cursor = conn.execute(
            f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            tuple(row.values()),
        )
        conn.commit()
        assert cursor.lastrowid is not None
        return cursor.lastrowid
    finally:
        conn.close()


async def run_with_corrupt_rows(
    tmp_path: Path, corrupt: list[dict[str, Any]], *, good: int
) -> tuple[QueueService, list[Any], list[str], list[str]]:
    """Enqueue ``good`` jobs around the ``corrupt`` rows, drain the queue with one burst worker
    (all claimed in one batch), return the service, what ran, the good and the corrupt ids."""
    settings = QueueSettings(
        _env_file=None,  # type: ignore[call-arg]
        backend="sqlite",
        sqlite_path=str(tmp_path / "q.db"),
        name="q",
        attempts=1,
        lease_s=1.0,
        max_stalls=0,  # a claim lost with its batch would fail the good jobs as stalled
    )
    service = QueueService(settings)
    ran: list[Any] = []

    @service.handler("ok")
    async def ok(message: QueueMessage) -> None:
        ran.append(message.data)

    good_ids = [await service.enqueue("ok", f"good-{i}") for i in range(good // 2)]
    bad_ids = [str(insert_row(tmp_path / "q.db", "q", **columns)) for columns in corrupt]
    good_ids += [await service.enqueue("ok", f"good-{i}") for i in range(good // 2, good)]
    await asyncio.wait_for(service.start_worker(concurrency=100, burst=True), 30)
    return service, ran, good_ids, bad_ids


@pytest.mark.parametrize("case", sorted(SQLITE_CORRUPT))
async def test_corrupt_sqlite_row_is_failed_and_never_run(case: str, tmp_path: Path) -> None:
    columns, reason = SQLITE_CORRUPT[case]
    service, ran, good_ids, (bad_id,) = await run_with_corrupt_rows(tmp_path, [columns], good=4)
    try:
        assert sorted(ran) == [f"good-{i}" for i in range(4)]
        job = await service.get_job(bad_id)
        assert job is not None and job.state is JobState.FAILED
        assert job.error is not None and job.error.startswith("unreadable job: ")
        assert reason in job.error
        for job_id in good_ids:
            done = await service.get_job(job_id)
            assert done is not None and done.state is JobState.COMPLETED
        assert [j.id for j in await service.list_jobs("failed")] == [bad_id]
    finally:
        await service.close()


async def test_a_batch_of_corrupt_rows_does_not_hold_up_good_jobs(tmp_path: Path) -> None:
    corrupt = [columns for columns, _ in SQLITE_CORRUPT.values()]
    service, ran, _, bad_ids = await run_with_corrupt_rows(tmp_path, corrupt, good=20)
    try:
        assert sorted(ran) == sorted(f"good-{i}" for i in range(20))
        counts = await service.counts()
        assert counts[JobState.COMPLETED] == 20 and counts[JobState.FAILED] == len(bad_ids)
        assert counts[JobState.ACTIVE] == counts[JobState.WAITING] == 0
        for job in await service.list_jobs("failed", limit=100):
            assert job.id in bad_ids and (job.error or "").startswith("unreadable job: ")
    finally:
        await service.close()


@pytest.mark.parametrize("column", ["name", "data", "max_attempts", "run_at"])
async def test_the_schema_refuses_null_in_required_columns(column: str, tmp_path: Path) -> None:
    async with QueueService(
        QueueSettings(_env_file=None, sqlite_path=str(tmp_path / "q.db"), name="q")  # type: ignore[call-arg]
    ) as service:
        await service.counts()  # creates the schema
        with pytest.raises(sqlite3.IntegrityError, match="NOT NULL"):
            insert_row(tmp_path / "q.db", "q", **{column: None})
        assert sum((await service.counts()).values()) == 0


# -- foreign and corrupt jobs: BullMQ on Redis ---------------------------------------------

REDIS_CORRUPT: dict[str, tuple[dict[str, Any], str]] = {
    "data is not JSON": ({"data": "{not json"}, "its data is not JSON"),
    "data is NaN": ({"data": "NaN"}, "NaN is not JSON"),
    "data nests too deep": ({"data": "[" * 100_000 + "]" * 100_000}, "nested too deeply"),
    "name is missing": ({"name": None}, "it has no name"),
    "name is empty": ({"name": ""}, "it has no name"),
    "data is a pickle blob": ({"data": pickle.dumps({"a": 1})}, "not UTF-8 text"),
    "name is not UTF-8": ({"name": b"\xff\xfe"}, "not UTF-8 text"),
    "opts are not JSON": ({"opts": "{oops"}, "its opts are not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(REDIS_CORRUPT))
async def test_corrupt_bullmq_job_is_failed_and_never_run(
    case: str, redis_url: str, tmp_path: Path
) -> None:
    import redis

    fields, reason = REDIS_CORRUPT[case]
    settings = QueueSettings(
        _env_file=None,  # type: ignore[call-arg]
        backend="bullmq",
        redis_url=redis_url,
        name=f"sec-{uuid.uuid4().hex[:10]}",
        attempts=1,
        lease_s=1.0,
        max_stalls=0,
    )
    client = redis.Redis.from_url(redis_url)
    service = QueueService(settings)
    ran: list[Any] = []

    @service.handler("ok")
    async def ok(message: QueueMessage) -> None:
        ran.append(message.data)

    prefix = f"bull:{settings.name}:"
    try:
        first = await service.enqueue("ok", "good-1")
        job: dict[str, Any] = {
            "name": "ok",
            "data": '"foreign"',
            "opts": '{"attempts":1}',
            "timestamp": str(int(time.time() * 1000)),
            "delay": "0",
            "priority": "0",
            **fields,
        }
        client.hset(prefix + "corrupt", mapping={k: v for k, v in job.items() if v is not None})
        client.lpush(prefix + "wait", "corrupt")
        client.zadd(prefix + "marker", {"0": 0})
        last = await service.enqueue("ok", "good-2")
        await asyncio.wait_for(service.start_worker(concurrency=10, burst=True), 30)
        assert ran == ["good-1", "good-2"]
        for job_id in (first, last):
            done = await service.get_job(job_id)
            assert done is not None and done.state is JobState.COMPLETED
        failed = await service.get_job("corrupt")
        assert failed is not None and failed.state is JobState.FAILED
        assert failed.error is not None and failed.error.startswith("unreadable job: ")
        assert reason in failed.error
    finally:
        await service.close()
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
