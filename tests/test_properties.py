"""Property-based tests: every payload, job option and setting is either accepted and comes back
exactly as given, or refused with PayloadError / ConfigError having written nothing.

Real SQLite files; example counts are kept modest so the whole module runs in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral import (
    ConfigError,
    JobState,
    PayloadError,
    QueueMessage,
    QueueService,
    QueueSettings,
    Retry,
    UnrecoverableError,
)
from corral.backends.sqlite import SQLiteBackend
from corral.jobs import MAX_ATTEMPTS, MAX_DELAY_S, PRIORITY_LIMIT
from corral.payload import MAX_NESTING, decode_json, encode_payload
from corral.tools.chaos import settings_env

T = TypeVar("T")

EXAMPLES = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture
def run() -> Iterator[Callable[[Awaitable[T]], T]]:
    """Run a coroutine on one event loop shared by the examples of a test."""
    with asyncio.Runner() as runner:
        yield runner.run  # type: ignore[misc]


def sqlite_settings(path: Path, **values: Any) -> QueueSettings:
    return QueueSettings(
        _env_file=None,  # type: ignore[call-arg]
        backend="sqlite",
        sqlite_path=str(path),
        name=f"p-{uuid.uuid4().hex[:10]}",
        **values,
    )


def same_json(a: Any, b: Any) -> bool:
    """Deep equality that also tells bool/int/float, -0.0/0.0 and list/tuple apart."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, float):
            if not (x == y and math.copysign(1, x) == math.copysign(1, y)):
                return False
        elif isinstance(x, list):
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y, strict=True))
        elif isinstance(x, dict):
            if x.keys() != y.keys():
                return False
            stack.extend((x[k], y[k]) for k in x)
        elif x != y:
            return False
    return True


# -- payloads --------------------------------------------------------------------------------

any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
lone_surrogates = st.sampled_from(["\ud800", "a\udfffb", "\udc80"])
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**200),
    st.sampled_from([10**4299, -(10**4299), 2**64]),
    st.floats(),  # NaN, infinities, -0.0, subnormals
    any_text,
    lone_surrogates,
    st.binary(max_size=4),
    st.complex_numbers(max_magnitude=10),
)
hashable = st.one_of(st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False), any_text)


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(any_text, children, max_size=4),
        st.dictionaries(hashable, children, max_size=3),  # non-str keys
        st.lists(children, max_size=3).map(tuple),
        st.frozensets(hashable, max_size=3),
        st.sets(hashable, max_size=3),
    )


def nested(depth: int, kind: str) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


payloads = st.one_of(
    st.recursive(leaves, containers, max_leaves=25),
    st.builds(nested, st.integers(1, 1200), st.sampled_from(["list", "dict"])),
)


async def check_payload(path: Path, data: Any) -> None:
    async with QueueService(sqlite_settings(path, max_payload_bytes=1 << 16)) as service:
        try:
            job_id = await service.enqueue("p", data)
        except PayloadError:
            assert sum((await service.counts()).values()) == 0
            return
        job = await service.get_job(job_id)
        assert job is not None
        assert same_json(job.data, data), (job.data, data)
        # The handler gets it exactly as well.
        got: list[Any] = []

        @service.handler("p")
        async def handler(message: QueueMessage) -> None:
            got.append(message.data)

        await service.start_worker(concurrency=1, burst=True)
        assert len(got) == 1 and same_json(got[0], data)
        assert (await service.counts())[JobState.COMPLETED] == 1


def test_payloads_round_trip_or_are_refused(
    tmp_path: Path, run: Callable[[Awaitable[None]], None]
) -> None:
    @EXAMPLES
    @given(payloads)
    def check(data: Any) -> None:
        run(check_payload(tmp_path / "q.db", data))

    check()


def test_nesting_limit_is_the_same_for_enqueue_and_for_every_reader(
    tmp_path: Path, run: Callable[[Awaitable[None]], None]
) -> None:
    """A payload accepted at a shallow stack must decode in a worker's deeper one."""
    run(check_payload(tmp_path / "q.db", nested(MAX_NESTING, "list")))
    with pytest.raises(PayloadError, match="more than 500 levels deep"):
        encode_payload(nested(MAX_NESTING + 1, "dict"), max_bytes=1 << 20)
    # A string full of brackets is not nesting.
    assert decode_json(encode_payload("[" * 5000, max_bytes=1 << 20)) == "[" * 5000


@EXAMPLES
@given(st.one_of(payloads, st.just(float("nan"))))
def test_encoded_payloads_decode_to_equal_values(data: Any) -> None:
    try:
        text = encode_payload(data, max_bytes=1 << 16)
    except PayloadError:
        return
    assert same_json(decode_json(text), data)


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"a": -Infinity}', "[" * 5000 + "]" * 5000])
def test_decode_refuses_what_is_not_json(text: str) -> None:
    with pytest.raises(ValueError):
        decode_json(text)


def test_enqueue_many_with_one_bad_job_writes_nothing(
    tmp_path: Path, run: Callable[[Awaitable[None]], None]
) -> None:
    async def go(items: list[dict[str, Any]]) -> None:
        async with QueueService(sqlite_settings(tmp_path / "q.db")) as service:
            try:
                ids = await service.enqueue_many(items)
            except PayloadError:
                assert sum((await service.counts()).values()) == 0
                return
            assert len(ids) == len(items)
            for item, job_id in zip(items, ids, strict=True):
                job = await service.get_job(job_id)
                assert job is not None and same_json(job.data, item["data"])

    @EXAMPLES
    @given(st.lists(payloads.map(lambda d: {"name": "p", "data": d}), min_size=1, max_size=5))
    def check(items: list[dict[str, Any]]) -> None:
        run(go(items))

    check()


# -- job options -----------------------------------------------------------------------------

numbers = st.one_of(
    st.integers(min_value=-5, max_value=10),
    st.integers(),
    st.floats(),
    st.sampled_from([0, 0.0004, 0.0005, 1e-300, MAX_DELAY_S, MAX_DELAY_S + 1, 1e300, 10**30]),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)
job_ids = st.one_of(
    st.none(),
    any_text,
    st.from_regex(r"[a-z]{1,3}-[0-9]{1,3}", fullmatch=True),
    st.sampled_from(
        ["007", "7", "-7", "-0", "0", "٣", "²", "1e3", " 1", "a b", "a:b", "\ud800", "x" * 257]
    ),
    st.integers(min_value=0, max_value=10**20).map(str),
)
backoffs = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(["fixed", "exponential"]), numbers, st.one_of(st.floats(), numbers)),
    st.sampled_from([5, "exponential", {"type": "fixed", "delay": 1}]),
)


def build_backoff(spec: Any) -> Any:
    """A Retry from ``(kind, delay_s, jitter)``, or the raw value; PayloadError if refused."""
    if not isinstance(spec, tuple):
        return spec
    kind, delay_s, jitter = spec
    maker = Retry.fixed if kind == "fixed" else Retry.exponential
    return maker(delay_s, jitter)


async def check_options(path: Path, options: dict[str, Any]) -> None:
    async with QueueService(sqlite_settings(path)) as service:
        try:
            options = {**options, "backoff": build_backoff(options["backoff"])}
            job_id = await service.enqueue("p", {"v": 1}, **options)
        except PayloadError:
            assert sum((await service.counts()).values()) == 0
            return
        expected_id = options["job_id"]
        if expected_id is not None:
            assert job_id == expected_id
        job = await service.get_job(job_id)
        assert job is not None and job.id == job_id
        assert job.priority == options["priority"]
        assert job.max_attempts == (options["attempts"] or service.settings.attempts)
        delayed = round(options["delay_s"] * 1000) > 0
        assert job.state is (JobState.DELAYED if delayed else JobState.WAITING)
        assert (await service.list_jobs(job.state))[0].id == job_id
        if delayed:
            return
        backend = service.backend
        assert isinstance(backend, SQLiteBackend)
        (claim,) = await backend.open_source(stop=asyncio.Event(), burst=False).claim(5)
        assert claim.message is not None, claim.unreadable
        expected_backoff = options["backoff"] or service.settings.backoff
        assert claim.message.backoff == expected_backoff
        assert claim.message.id == job_id and claim.message.attempt == 1


def test_job_options_round_trip_or_are_refused(
    tmp_path: Path, run: Callable[[Awaitable[None]], None]
) -> None:
    @EXAMPLES
    @given(
        delay_s=numbers,
        priority=st.one_of(numbers, st.integers(PRIORITY_LIMIT - 2, PRIORITY_LIMIT + 2)),
        attempts=st.one_of(numbers, st.integers(MAX_ATTEMPTS - 1, MAX_ATTEMPTS + 1)),
        job_id=job_ids,
        backoff=backoffs,
    )
    def check(delay_s: Any, priority: Any, attempts: Any, job_id: Any, backoff: Any) -> None:
        options = {
            "delay_s": delay_s,
            "priority": priority,
            "attempts": attempts,
            "job_id": job_id,
            "backoff": backoff,
        }
        with contextlib.suppress(PayloadError):  # Retry refused the backoff: nothing written
            run(check_options(tmp_path / "q.db", options))

    check()


def test_custom_ids_that_look_like_numbers_find_their_own_job(
    tmp_path: Path, run: Callable[[Awaitable[None]], None]
) -> None:
    async def go() -> None:
        async with QueueService(sqlite_settings(tmp_path / "q.db")) as service:
            for _ in range(7):
                await service.enqueue("p", "numbered")
            for custom in ("007", "٣", "-0", "99999999999999999999x"):
                assert await service.enqueue("p", custom, job_id=custom) == custom
                job = await service.get_job(custom)
                assert job is not None and (job.id, job.data) == (custom, custom)
            assert await service.get_job("99999999999999999999") is None
            seven = await service.get_job("7")
            assert seven is not None and seven.data == "numbered"

    run(go())


# -- settings --------------------------------------------------------------------------------

FIELDS = sorted(QueueSettings.model_fields)
env_text = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00", exclude_categories=("Cs",)),
    max_size=30,
)
plausible = st.one_of(
    st.integers(-2, 20).map(str),
    st.integers().map(str),
    st.sampled_from(
        [
            "0",
            "1",
            "1.5",
            "1e3",
            "-0",
            "nan",
            "inf",
            "-inf",
            "none",
            "None",
            "off",
            "",
            " 3 ",
            "1_000",
            "0x10",
            "true",
            "false",
            "sqlite",
            "bullmq",
            "fixed",
            "exponential",
            "default",
            "q.name-1",
            "a,b, ,c",
            "bull",
            "a:b",
            "a b",
            "redis://127.0.0.1:6379/0",
            "redis://:pw@127.0.0.1/1",
            "redis://h:99999",
            "unix:///tmp/r.sock",
            "http://h",
            "redis://[::1]:6379",
            "redis://[::1",
            str(2**63),
            str(10**30),
            "1e400",
            "86400",
            "86401",
            str(365 * 86400),
        ]
    ),
)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: value for key, value in os.environ.items() if key.startswith("QUEUE_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        for key in values:
            os.environ.pop(key, None)
        os.environ.update(saved)


def settings_from_env(values: dict[str, str]) -> QueueSettings:
    with environment(values):
        return QueueSettings(_env_file=None)  # type: ignore[call-arg]


@EXAMPLES
@given(st.dictionaries(st.sampled_from(FIELDS), st.one_of(env_text, plausible), max_size=3))
def test_settings_from_env_are_valid_or_refused(values: dict[str, str]) -> None:
    env = {f"QUEUE_{field.upper()}": text for field, text in values.items()}
    try:
        accepted = settings_from_env(env)
    except ConfigError as exc:
        assert str(exc).startswith("invalid queue settings: ")
        assert any(f"QUEUE_{field.upper()}" in str(exc) for field in values), str(exc)
        return
    # What was accepted survives the trip to a worker process (every field as QUEUE_* text)
    # and to keyword arguments, unchanged.
    assert settings_from_env(settings_env(accepted)) == accepted
    revealed = accepted.model_dump(context={"reveal_secrets": True})
    assert QueueSettings(_env_file=None, **revealed) == accepted  # type: ignore[call-arg]
    for name in ("lease_s", "backoff_delay_s", "shutdown_grace_s", "poll_interval_s"):
        assert math.isfinite(getattr(accepted, name))
    assert accepted.backoff.delay_ms >= 0


def counts(*edges: int) -> st.SearchStrategy[int]:
    """Small numbers, the given edges and their neighbours, and huge ones."""
    near = [n + d for n in edges for d in (-1, 0, 1)]
    return st.one_of(st.integers(-1, 4), st.sampled_from([*near, 2**63, 10**20]))


USAGE_FIELDS = {
    "attempts": counts(1_000_000),
    "max_stalls": counts(1000),
    "keep_completed": st.one_of(st.none(), counts(2**31)),
    "keep_failed": st.one_of(st.none(), counts(2**31)),
    "max_payload_bytes": counts(64, 512 * 1024 * 1024),
    "concurrency": counts(10_000),
    "backoff_delay_s": st.one_of(st.floats(), st.sampled_from([0.0, 365 * 86400.0])),
}


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def check_usable(path: Path, values: dict[str, Any]) -> None:
    try:
        config = sqlite_settings(path, **values)
    except ConfigError:
        return
    async with QueueService(config) as service:

        @service.handler("ok")
        async def ok(message: QueueMessage) -> str:
            return "fine"

        @service.handler("bad")
        async def bad(message: QueueMessage) -> None:
            raise UnrecoverableError("no")

        for _ in range(2):
            await service.enqueue("ok", 1)
            await service.enqueue("bad", 2)
        errors = _Errors()
        worker_log = logging.getLogger("corral.worker")
        worker_log.addHandler(errors)
        try:
            await asyncio.wait_for(service.start_worker(concurrency=2, burst=True), 20)
        finally:
            worker_log.removeHandler(errors)
        # The failing handler's own error is expected; a storage error is not.
        assert [m for m in errors.messages if "UnrecoverableError" not in m] == []
        counts = await service.counts()
        assert counts[JobState.ACTIVE] == counts[JobState.WAITING] == 0
        # Every job ended; retention may already have trimmed some (completed ones lazily).
        keep_ok = 2 if config.keep_completed is None else min(2, config.keep_completed)
        keep_bad = 2 if config.keep_failed is None else min(2, config.keep_failed)
        assert keep_ok <= counts[JobState.COMPLETED] <= 2 or config.keep_completed == 0
        assert counts[JobState.FAILED] == keep_bad


def test_accepted_settings_run_jobs(tmp_path: Path, run: Callable[[Awaitable[None]], None]) -> None:
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.fixed_dictionaries({}, optional=USAGE_FIELDS))
    def check(values: dict[str, Any]) -> None:
        run(check_usable(tmp_path / "q.db", values))

    check()


@pytest.mark.parametrize("path", ["", "   "])
def test_blank_sqlite_path_is_refused(path: str) -> None:
    # An empty name gives every SQLite connection its own private temporary database.
    with pytest.raises(ConfigError, match="QUEUE_SQLITE_PATH"):
        settings_from_env({"QUEUE_SQLITE_PATH": path})
