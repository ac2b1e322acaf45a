"""The BullMQ protocol module against the package it was checked with: every call corral builds
has the KEYS its script declares, and where the package builds the same call, the same KEYS
and ARGV. A bullmq upgrade that moves a key or an argument fails here first."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import bullmq
import msgpack  # type: ignore[import-untyped]
import pytest
import redis.asyncio as aioredis
from bullmq.redis_connection import RedisConnection
from bullmq.scripts import Scripts

import corral
from corral.backends.bullmq.protocol import (
    LIB_VERSION,
    SCRIPT_FILES,
    ParentLink,
    Protocol,
    ScriptCall,
    declared_key_count,
    parse_next_job,
    script_source,
)
from corral.message import ChildPolicy, NewJob
from corral.retry import Retry

CHECKED_WITH = "3.4.4"
PREFIX, QUEUE = "{bull}", "q"


def test_the_package_is_the_one_this_module_was_checked_with() -> None:
    assert bullmq.__version__ == CHECKED_WITH
    assert f"bullmq:{CHECKED_WITH}" == LIB_VERSION


def test_every_script_corral_names_ships_with_the_package() -> None:
    for name in SCRIPT_FILES:
        assert script_source(name).strip(), name


def calls() -> list[ScriptCall]:
    protocol = Protocol(PREFIX)
    job = NewJob("n", "{}", job_id="a", attempts=2, backoff=Retry.fixed(1))
    opts = protocol.job_opts(job, keep_completed=10, keep_failed=None)
    fields = {"failedReason": "x", "stacktrace": "[]"}
    finish: dict[str, Any] = {
        "value": "1",
        "now": 1,
        "job_opts": opts,
        "keep": {"count": 1},
        "limiter": None,
        "lock_ms": 30_000,
        "fetch_next": True,
    }
    child = ParentLink(QUEUE, "root", ChildPolicy.FAIL)
    return [
        protocol.add_job(QUEUE, job, opts, 1),
        protocol.add_job(QUEUE, job, opts, 1, job_id="root", waiting_children=True),
        protocol.add_job(QUEUE, job, protocol.child_opts(opts, child), 1, parent=child),
        protocol.add_job(QUEUE, NewJob("n", "{}", delay_ms=5), {}, 1),
        protocol.add_job(QUEUE, NewJob("n", "{}", priority=3), {}, 1),
        protocol.move_to_active(QUEUE, "t", 1, 30_000, None),
        protocol.move_to_finished(QUEUE, "a", "t", target="completed", **finish),
        protocol.move_to_finished(QUEUE, "a", "t", target="failed", fields=fields, **finish),
        protocol.move_to_delayed(QUEUE, "a", "t", now=1, delay_ms=5, fields=fields),
        protocol.retry_job(QUEUE, "a", "t", now=1, lifo=False, fields=fields),
        protocol.release(QUEUE, "a", "t"),
        protocol.extend_locks(QUEUE, ["a"], ["t"], 30_000),
        protocol.move_stalled(QUEUE, 1, 30_000, 1),
        protocol.update_progress(QUEUE, "a", "50"),
        protocol.add_log(QUEUE, "a", "line", None),
        protocol.get_state(QUEUE, "a"),
        protocol.get_counts(QUEUE),
        protocol.reprocess_failed(QUEUE, "a"),
        protocol.remove_job(QUEUE, "a"),
        protocol.promote(QUEUE, "a"),
        protocol.pause(QUEUE, True),
        protocol.pause(QUEUE, False),
        protocol.clean_set(QUEUE, "completed", 1),
        protocol.add_job_scheduler(
            QUEUE, "s", next_ms=1, scheduler={}, data_json="{}", template={}, first_job={}, now=1
        ),
        protocol.update_job_scheduler(
            QUEUE, "s", next_ms=1, data_json="{}", next_job={}, now=1, producer_id="repeat:s:1"
        ),
        protocol.remove_job_scheduler(QUEUE, "s"),
    ]


@pytest.mark.parametrize("call", calls(), ids=lambda call: call.script)
def test_each_call_has_the_keys_its_script_declares(call: ScriptCall) -> None:
    assert len(call.keys) == declared_key_count(call.script)
    assert all(key.startswith(f"{PREFIX}:{QUEUE}:") for key in call.keys)


def test_every_builder_is_covered() -> None:
    builders = {
        name
        for name, member in inspect.getmembers(Protocol, inspect.isfunction)
        if not name.startswith("_")
        and name not in ("job_opts", "child_opts", "dependency_keys", "metrics_keys")
    }
    covered = {
        "add_job", "move_to_active", "move_to_finished", "move_to_delayed", "retry_job",
        "release", "extend_locks", "move_stalled", "update_progress", "add_log", "get_state",
        "get_counts", "reprocess_failed", "remove_job", "promote", "pause", "clean_set",
        "add_job_scheduler", "update_job_scheduler", "remove_job_scheduler",
    }  # fmt: skip
    assert builders == covered, "a new builder needs a case in calls()"


@pytest.fixture
def package_scripts() -> Scripts:
    """The package's own argument builders (no connection is made)."""
    return Scripts(PREFIX, QUEUE, RedisConnection(aioredis.Redis()))


def test_retry_and_delay_match_the_package(package_scripts: Scripts) -> None:
    protocol = Protocol(PREFIX)
    fields = {"failedReason": "boom", "stacktrace": '["t"]'}
    ours = protocol.retry_job(QUEUE, "7", "tok", now=123, lifo=True, fields=fields)
    keys, args = package_scripts.retryJobArgs("7", True, "tok", {"fieldsToUpdate": fields})
    assert ours.keys == keys
    assert [ours.args[0], *ours.args[2:]] == [args[0], *args[2:]]  # args[1]: the clock

    ours = protocol.move_to_delayed(QUEUE, "7", "tok", now=123, delay_ms=500, fields=fields)
    keys, args = package_scripts.moveToDelayedArgs("7", 123, "tok", 500, {"fieldsToUpdate": fields})
    assert (ours.keys, ours.args) == (keys, args)


def test_finishing_matches_the_package(package_scripts: Scripts) -> None:
    protocol = Protocol(PREFIX)
    # What moveToFinishedArgs reads of a job and its queue.
    job = SimpleNamespace(
        id="7",
        attempts=3,
        attemptsMade=0,
        opts={"attempts": 3},
        queue=SimpleNamespace(opts={"lockDuration": 30_000, "limiter": None}),
    )
    keys, args = package_scripts.moveToFinishedArgs(
        job, "1", "returnvalue", 5, "completed", "tok", fetchNext=True
    )
    ours = protocol.move_to_finished(
        QUEUE,
        "7",
        "tok",
        target="completed",
        value='"1"',
        now=args[1],
        job_opts={"attempts": 3},
        keep={"count": 5},
        limiter=None,
        lock_ms=30_000,
        fetch_next=True,
    )
    assert ours.keys == keys
    assert ours.args[:3] == args[:3] and ours.args[3:5] == [args[3], args[4]]
    assert ours.args[6] == args[6]
    theirs = msgpack.unpackb(args[7])
    mine = msgpack.unpackb(ours.args[7])
    for name in ("token", "keepJobs", "limiter", "lockDuration", "attempts", "maxMetricsSize"):
        assert mine[name] == theirs[name], name

    # A worker that records metrics (Node's and the package's option metrics: {maxDataPoints}).
    job.queue.opts["metrics"] = {"maxDataPoints": 20_160}
    keys, args = package_scripts.moveToFinishedArgs(job, "x", "failedReason", 5, "failed", "tok")
    ours = protocol.move_to_finished(
        QUEUE, "7", "tok", target="failed", value="x", now=args[1], job_opts={"attempts": 3},
        keep={"count": 5}, limiter=None, lock_ms=30_000, fetch_next=True, metrics_points=20_160,
    )  # fmt: skip
    assert ours.keys == keys and ours.keys[12] == protocol.metrics_keys(QUEUE, "failed")[0]
    assert msgpack.unpackb(ours.args[7])["maxMetricsSize"] == 20_160
    assert msgpack.unpackb(args[7])["maxMetricsSize"] == 20_160


async def test_schedulers_match_the_package(package_scripts: Scripts) -> None:
    sent: list[tuple[list[Any], list[Any]]] = []

    async def record(keys: list[Any], args: list[Any]) -> Any:
        sent.append((keys, args))
        return ["repeat:s:5", 0]

    package_scripts.commands = dict.fromkeys(
        ("addJobScheduler", "updateJobScheduler", "removeJobScheduler"), record
    )
    protocol = Protocol(PREFIX)
    scheduler = {"name": "n", "every": 300}
    first = {"repeat": {"every": 300, "count": 1}, "jobId": "repeat:s:5"}
    await package_scripts.addJobScheduler("s", 5, '{"a":1}', {"attempts": 2}, scheduler, first)
    ours = protocol.add_job_scheduler(
        QUEUE, "s", next_ms=5, scheduler=scheduler, data_json='{"a":1}',
        template={"attempts": 2}, first_job=first, now=sent[0][1][6],
    )  # fmt: skip
    assert (ours.keys, ours.args) == sent[0]

    following = {"repeat": {"every": 300, "count": 2}, "repeatJobKey": "s"}
    await package_scripts.updateJobSchedulerNextMillis("s", 7, "{}", following, "repeat:s:5")
    ours = protocol.update_job_scheduler(
        QUEUE, "s", next_ms=7, data_json="{}", next_job=following, now=sent[1][1][4],
        producer_id="repeat:s:5",
    )  # fmt: skip
    assert (ours.keys, ours.args) == sent[1]

    await package_scripts.removeJobScheduler("s")
    ours = protocol.remove_job_scheduler(QUEUE, "s")
    assert (ours.keys, ours.args) == sent[2]


@pytest.mark.parametrize("policy", list(ChildPolicy))
def test_a_flow_child_is_added_as_the_package_adds_it(
    package_scripts: Scripts, policy: ChildPolicy
) -> None:
    """The parent fields of a child (``parentKey``, the dependencies key, ``parent`` with the
    policy flag) and its encoded opts (``parent``, the short flag), as the package's Job and
    FlowProducer build them; a parent goes through addParentJob with the package's keys."""
    protocol = Protocol(PREFIX)
    long_names = {
        ChildPolicy.FAIL: "failParentOnFailure",
        ChildPolicy.CONTINUE: "continueParentOnFailure",
        ChildPolicy.IGNORE: "ignoreDependencyOnFailure",
        ChildPolicy.REMOVE: "removeDependencyOnFailure",
    }
    parent = {"id": "root", "queue": f"{PREFIX}:p"}
    queue = SimpleNamespace(backend=None, qualifiedName=f"{PREFIX}:{QUEUE}")
    theirs = bullmq.Job(
        queue, "n", {}, {"jobId": "c", "timestamp": 1, "parent": parent, long_names[policy]: True}
    )
    their_args = package_scripts.addJobArgs(theirs)
    ours = protocol.add_job(
        QUEUE,
        NewJob("n", "{}", job_id="c"),
        protocol.child_opts({}, ParentLink("p", "root", policy)),
        1,
        parent=ParentLink("p", "root", policy),
    )
    assert msgpack.unpackb(ours.args[0])[:7] == msgpack.unpackb(their_args[0])[:7]
    their_opts, our_opts = msgpack.unpackb(their_args[2]), msgpack.unpackb(ours.args[2])
    for key in ("parent", "fpof", "cpof", "idof", "rdof"):
        assert our_opts.get(key) == their_opts.get(key), key

    keys = package_scripts.getKeys(
        ["meta", "id", "delayed", "waiting-children", "completed", "events"]
    )
    ours = protocol.add_job(QUEUE, NewJob("n", "{}"), {}, 1, job_id="root", waiting_children=True)
    assert (ours.script, ours.keys) == ("addParentJob", keys)


def test_next_job_replies_are_read_as_the_package_reads_them() -> None:
    reply = [["name", "n", "data", "{}"], "7", 0, 0]
    found = parse_next_job(reply)
    assert (found.raw, found.job_id, found.limit_ms, found.delay_until_ms) == (
        {"name": "n", "data": "{}"},
        "7",
        0,
        0,
    )
    assert parse_next_job([0, 0, 250, 0]).limit_ms == 250
    assert parse_next_job([0, 0, 0, "1700000000123"]).delay_until_ms == 1700000000123


def test_only_the_protocol_package_imports_the_bullmq_package() -> None:
    src = Path(corral.__file__).parent
    fence = src / "backends" / "bullmq" / "protocol"
    importers: set[str] = set()
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            if any(module.partition(".")[0] == "bullmq" for module in modules):
                importers.add(path.relative_to(src).as_posix())
    assert importers, "the protocol package no longer imports bullmq: is this test still right?"
    outside = sorted(name for name in importers if not (src / name).is_relative_to(fence))
    assert outside == [], f"only corral/backends/bullmq/protocol/ may import bullmq: {outside}"
