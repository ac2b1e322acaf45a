"""The BullMQ backend on a Redis Cluster (``QUEUE_REDIS_CLUSTER=true``).

A session-wide cluster of three masters on loopback ports runs the whole contract suite (imported
from test_contract, with this module's ``make_settings``) and the cluster-specific checks below:
one slot per queue, one named worker connection, scripts reloaded after a flush.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from corral import ConfigError, JobState, QueueMessage, QueueService, QueueSettings
from test_contract import *  # noqa: F403  (the contract suite, run here against the cluster)
from test_flows import (  # noqa: F401  (flows across queues: every queue shares the prefix's slot)
    test_a_completed_job_reused_as_a_child_does_not_release_early,
    test_fail_policy_fails_the_parents_without_running_them,
    test_the_same_root_id_twice_writes_nothing_more,
    test_three_levels_across_two_queues,
)

from conftest import REDIS_HOST, SettingsFactory, missing, unique_queue_name

PREFIX = "{bull}"
CLUSTER_BUS_OFFSET = 10_000  # a node's cluster bus listens on its port + 10000


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((REDIS_HOST, port))
        except OSError:
            return False
    return True


def cluster_ports(count: int) -> list[int]:
    """Free ports whose cluster-bus ports are free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20_000, 29_999)
        if port not in ports and _bindable(port) and _bindable(port + CLUSTER_BUS_OFFSET):
            ports.append(port)
    return ports


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((REDIS_HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


def _cluster_ok(port: int) -> bool:
    try:
        with redis.Redis(host=REDIS_HOST, port=port, socket_timeout=1) as node:
            info = node.cluster("info")
    except redis.RedisError:
        return False
    return isinstance(info, dict) and info.get("cluster_state") == "ok"


@pytest.fixture(scope="session")
def cluster_ports_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """Three masters, no replicas, no persistence; stopped at the end of the session."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        missing("redis-server and redis-cli are needed to start a Redis Cluster")
    data = tmp_path_factory.mktemp("cluster")
    ports = cluster_ports(3)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            processes.append(
                subprocess.Popen(
                    [
                        *(str(server), "--port", str(port), "--bind", REDIS_HOST),
                        *("--cluster-enabled", "yes", "--dir", str(data)),
                        *("--cluster-config-file", str(data / f"nodes-{port}.conf")),
                        *("--save", "", "--appendonly", "no"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 10
        for port, process in zip(ports, processes, strict=True):
            while not _answers(port):
                if process.poll() is not None:
                    missing(f"redis-server would not start in cluster mode on port {port}")
                assert time.monotonic() < deadline, "cluster nodes did not start"
                time.sleep(0.02)
        create = subprocess.run(
            [
                *(str(cli), "--cluster", "create", *(f"{REDIS_HOST}:{p}" for p in ports)),
                *("--cluster-replicas", "0", "--cluster-yes"),
            ],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert create.returncode == 0, create.stdout.decode() + create.stderr.decode()
        deadline = time.monotonic() + 20
        while not all(_cluster_ok(port) for port in ports):
            assert time.monotonic() < deadline, "the cluster did not reach cluster_state:ok"
            time.sleep(0.1)
        yield ports
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait(5)


@pytest.fixture(scope="session")
def cluster_url(cluster_ports_up: list[int]) -> str:
    return f"redis://{REDIS_HOST}:{cluster_ports_up[0]}/0"


@pytest.fixture
def backend_kind() -> str:
    """The contract suite runs here once, on the BullMQ backend (the cluster)."""
    return "bullmq"


@pytest.fixture
def make_settings(cluster_url: str) -> SettingsFactory:
    """Settings for a fresh queue on the cluster (the contract suite uses this one)."""
    queue = unique_queue_name()

    def build(**overrides: Any) -> QueueSettings:
        values: dict[str, Any] = {
            "backend": "bullmq",
            "redis_url": cluster_url,
            "redis_cluster": True,
            "prefix": PREFIX,
            "name": queue,
            "shutdown_grace_s": 2.0,
            "attempts": 1,
            "backoff_delay_s": 0.0,
        }
        values.update(overrides)
        return QueueSettings(**values)

    return build


def nodes(ports: list[int]) -> list[redis.Redis]:
    return [redis.Redis(host=REDIS_HOST, port=port, decode_responses=True) for port in ports]


async def run_until(service: QueueService, total: int, timeout_s: float = 15.0) -> None:
    """Run a worker until ``total`` jobs have finished, then stop it."""
    worker = asyncio.create_task(service.start_worker(concurrency=8))
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            counts = await service.counts()
            if counts[JobState.COMPLETED] + counts[JobState.FAILED] >= total:
                return
            assert not worker.done(), worker.result()
            assert time.monotonic() < deadline, counts
            await asyncio.sleep(0.02)
    finally:
        service.stop()
        await asyncio.wait_for(worker, 10)


# -- settings --------------------------------------------------------------------------------


def test_an_untagged_prefix_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUEUE_BACKEND", "bullmq")
    monkeypatch.setenv("QUEUE_REDIS_CLUSTER", "true")
    monkeypatch.setenv("QUEUE_REDIS_URL", "redis://app:cluster-secret-9@127.0.0.1:7000/0")
    with pytest.raises(ConfigError) as info:
        QueueSettings()
    message = str(info.value)
    assert "QUEUE_PREFIX 'bull' has no hash tag" in message and "'{bull}'" in message
    assert "cluster-secret-9" not in message

    monkeypatch.setenv("QUEUE_PREFIX", "{bull}")
    settings = QueueSettings()
    assert (settings.redis_cluster, settings.prefix) == (True, "{bull}")
    assert "cluster-secret-9" not in repr(settings)
    for prefix in ("{}bull", "bull}{", "{bull"):  # an empty or unclosed tag hashes the whole key
        with pytest.raises(ConfigError, match="QUEUE_PREFIX"):
            QueueSettings(prefix=prefix)
    with pytest.raises(ConfigError, match="database other than 0"):
        QueueSettings(redis_url="redis://127.0.0.1:7000/2")
    with pytest.raises(ConfigError, match="redis:// or rediss://"):
        QueueSettings(redis_url="unix:///tmp/redis.sock")
    # Without cluster mode any prefix goes, as before.
    assert QueueSettings(redis_cluster=False, prefix="bull").prefix == "bull"


# -- the cluster -----------------------------------------------------------------------------


async def test_a_queue_and_its_dead_letters_live_in_one_slot(
    make_settings: SettingsFactory, cluster_ports_up: list[int]
) -> None:
    settings = make_settings(dead_letter=unique_queue_name("dead"), attempts=2)
    async with QueueService(settings) as service:

        @service.handler("ok")
        async def ok(message: QueueMessage) -> int:
            return int(message.data) * 2

        @service.handler("bad")
        async def bad(message: QueueMessage) -> None:
            raise ValueError("always")

        await service.enqueue_many([{"name": "ok", "data": i} for i in range(20)])
        await service.enqueue("ok", 100, delay_s=0.1, priority=2)
        failing = await service.enqueue("bad", None)
        await run_until(service, 22)
        counts = await service.counts()
        assert (counts[JobState.COMPLETED], counts[JobState.FAILED]) == (21, 1)
        failed = await service.get_job(failing)
        assert failed is not None and failed.attempts_made == 2

    clients = nodes(cluster_ports_up)
    try:
        holders = {}
        for client in clients:
            keys = [
                *client.scan_iter(match=f"{PREFIX}:{settings.name}:*", count=1000),
                *client.scan_iter(match=f"{PREFIX}:{settings.dead_letter}:*", count=1000),
            ]
            if keys:
                holders[client] = keys
        assert len(holders) == 1, "a queue's keys are spread over several nodes"
        ((holder, keys),) = holders.items()
        assert {holder.cluster("keyslot", key) for key in keys} == {
            holder.cluster("keyslot", PREFIX)
        }
        copy = holder.hgetall(f"{PREFIX}:{settings.dead_letter}:{settings.name}.{failing}")
        assert copy["name"] == "bad"
    finally:
        for client in clients:
            client.close()


async def test_schedules_on_a_cluster(
    make_settings: SettingsFactory, cluster_ports_up: list[int]
) -> None:
    async with QueueService(make_settings()) as service:
        ran: list[str] = []

        @service.handler("tick")
        async def tick(message: QueueMessage) -> None:
            ran.append(message.id)

        await service.schedule("beat", "tick", every_s=0.2, limit=3)
        await service.schedule("later", "tick", cron="0 3 * * *", tz="Asia/Tokyo")
        await run_until(service, 3)
        slots = sorted(int(job_id.rsplit(":", 1)[1]) for job_id in ran)
        # On the 200 ms grid (a slot picked up late is followed by the next one on it).
        assert len(slots) == 3 and all(
            b > a and (b - a) % 200 == 0 for a, b in itertools.pairwise(slots)
        )
        listed = {each.id: each for each in await service.schedules()}
        assert listed["beat"].runs == 3 and listed["later"].next_run_at is not None
        assert await service.unschedule("later") and not await service.unschedule("later")
        assert [each.id for each in await service.schedules()] == ["beat"]
        assert (await service.counts())[JobState.DELAYED] == 0


async def test_a_flow_over_several_slots_is_refused_before_writing(
    make_settings: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corral prefix carries the tag, so its queues always share a slot; were they not to
    (the check guards the MULTI and moveToFinished's cross-queue writes), the error says why."""
    from corral import FlowJob
    from corral.backends.bullmq.connection import RedisStore

    settings = make_settings()
    monkeypatch.setattr(RedisStore, "slots", staticmethod(lambda keys: set(range(len(keys)))))
    async with QueueService(settings) as service:
        with pytest.raises(ConfigError, match=r"share one hash slot.*hash-tagged prefix"):
            await service.enqueue_flow(
                FlowJob("parent", children=[FlowJob("leaf", queue=f"{settings.name}-b")])
            )
        assert sum((await service.counts()).values()) == 0


async def test_the_worker_is_listed_on_one_node(
    make_settings: SettingsFactory, cluster_ports_up: list[int]
) -> None:
    settings = make_settings()
    name_prefix = f"{PREFIX}:{base64.b64encode(settings.name.encode()).decode()}:w:"
    clients = nodes(cluster_ports_up)

    def listed() -> list[int]:
        return [
            sum(1 for c in client.client_list() if c["name"].startswith(name_prefix))
            for client in clients
        ]

    try:
        async with QueueService(settings) as service:
            worker = asyncio.create_task(service.start_worker())
            try:
                deadline = time.monotonic() + 10
                while sorted(listed()) != [0, 0, 1]:
                    assert time.monotonic() < deadline, listed()
                    await asyncio.sleep(0.05)
            finally:
                service.stop()
                await asyncio.wait_for(worker, 10)
        deadline = time.monotonic() + 5
        while listed() != [0, 0, 0]:
            assert time.monotonic() < deadline, listed()
            await asyncio.sleep(0.05)
    finally:
        for client in clients:
            client.close()


async def test_scripts_are_reloaded_after_a_flush(
    make_settings: SettingsFactory, cluster_ports_up: list[int]
) -> None:
    """After SCRIPT FLUSH (a restart or a failover to a fresh node) the worker, batches in MULTI
    and the dead-letter transaction load their scripts again; no batch is half applied."""
    settings = make_settings(dead_letter=unique_queue_name("dead"))
    clients = nodes(cluster_ports_up)
    done: list[int] = []
    try:
        async with QueueService(settings) as service:

            @service.handler("n")
            async def n(message: QueueMessage) -> None:
                if message.data < 0:
                    raise ValueError("negative")
                done.append(message.data)

            worker = asyncio.create_task(service.start_worker(concurrency=8))
            try:
                await service.enqueue_many([{"name": "n", "data": i} for i in range(30)])
                await wait_for_counts(service, completed=30)
                for client in clients:
                    client.script_flush()
                await service.enqueue_many([{"name": "n", "data": i} for i in range(30, 60)])
                await wait_for_counts(service, completed=60)
                for client in clients:
                    client.script_flush()
                failing = await service.enqueue("n", -1)
                await wait_for_counts(service, completed=60, failed=1)
                for client in clients:
                    client.script_flush()
                job = await service.get_job(failing)
                assert job is not None and job.state == JobState.FAILED
                assert await service.retry_failed() == 1
                await wait_for_counts(service, completed=60, failed=1)
                for client in clients:
                    client.script_flush()
                assert await service.purge() == 61
            finally:
                service.stop()
                await asyncio.wait_for(worker, 10)
        assert sorted(done) == list(range(60))
        dead = QueueService(settings.model_copy(update={"name": settings.dead_letter}))
        async with dead:
            copies = await dead.list_jobs(JobState.WAITING)
        assert [copy.id for copy in copies] == [f"{settings.name}.{failing}"]
    finally:
        for client in clients:
            client.close()


async def wait_for_counts(
    service: QueueService, *, completed: int, failed: int = 0, timeout_s: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        counts = await service.counts()
        if (counts[JobState.COMPLETED], counts[JobState.FAILED]) == (completed, failed):
            return
        assert time.monotonic() < deadline, counts
        await asyncio.sleep(0.02)


def command(client: redis.Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def move_slot(clients: list[redis.Redis], slot: int, target: redis.Redis) -> None:
    """Migrate ``slot`` with its keys to ``target``, as ``redis-cli --cluster reshard`` does."""
    ids = {client: str(command(client, "CLUSTER", "MYID")) for client in clients}
    (source,) = [c for c in clients if command(c, "CLUSTER", "COUNTKEYSINSLOT", slot)]
    if source is target:
        return
    port = target.connection_pool.connection_kwargs["port"]
    command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
    command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
    while keys := command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100):
        command(source, "MIGRATE", REDIS_HOST, port, "", 0, 5000, "KEYS", *keys)
    for client in (target, source, *clients):
        command(client, "CLUSTER", "SETSLOT", slot, "NODE", ids[target])


async def test_a_worker_follows_its_queue_to_another_node(
    make_settings: SettingsFactory,
    cluster_ports_up: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Resharding moves the queue's slot while a worker waits on it: the worker finds the new
    node by itself, quietly (a moved slot is no outage), and its named connection moves along."""
    tag = unique_queue_name("move")
    settings = make_settings(prefix=f"{{{tag}}}")
    name_prefix = f"{{{tag}}}:{base64.b64encode(settings.name.encode()).decode()}:w:"
    clients = nodes(cluster_ports_up)
    done: list[int] = []

    def listed() -> list[int]:
        return [
            sum(1 for c in client.client_list() if c["name"].startswith(name_prefix))
            for client in clients
        ]

    try:
        async with QueueService(settings) as service:

            @service.handler("n")
            async def n(message: QueueMessage) -> None:
                done.append(message.data)

            worker = asyncio.create_task(service.start_worker(concurrency=4))
            try:
                await service.enqueue_many([{"name": "n", "data": i} for i in range(10)])
                await wait_for_counts(service, completed=10)
                before = listed()
                slot = int(clients[0].cluster("keyslot", tag))
                target = next(c for c, count in zip(clients, before, strict=True) if not count)
                await asyncio.to_thread(move_slot, clients, slot, target)
                await asyncio.sleep(0.2)  # the worker is idle in its blocking pop meanwhile
                await service.enqueue_many([{"name": "n", "data": i} for i in range(10, 20)])
                await wait_for_counts(service, completed=20)
                deadline = time.monotonic() + 10
                while listed()[clients.index(target)] != 1:
                    assert time.monotonic() < deadline, listed()
                    await asyncio.sleep(0.05)
            finally:
                service.stop()
                await asyncio.wait_for(worker, 10)
        assert sorted(done) == list(range(20))
        assert target.exists(f"{{{tag}}}:{settings.name}:meta") == 1
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    finally:
        for client in clients:
            client.close()
