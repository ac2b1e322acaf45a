"""The Redis side of the BullMQ backend: clients, script execution, errors as corral's.

A :class:`RedisStore` is one Redis server (or Cluster) and key prefix, shared by every queue a
process uses there. It runs :class:`~corral.backends.bullmq.protocol.ScriptCall` objects: alone,
several in one round trip, or gathered over one event-loop turn (ioredis's auto-pipelining, which
Node's workers get for free). Its connections belong to the event loop that made them; used from
another loop (``asyncio.run`` twice, pytest's per-test loops) it makes new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry as RedisRetry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.crc import key_slot

from corral.backends.bullmq.protocol import (
    LIB_VERSION,
    SCRIPT_FILES,
    Protocol,
    ScriptCall,
    script_source,
)
from corral.backends.bullmq.wire import Wire, bulk, pack_command
from corral.errors import BackendAuthError, BackendConnectionError, BackendError
from corral.settings import SENTINEL_SCHEME, QueueSettings, parse_sentinel_url

logger = logging.getLogger("corral.bullmq")

CLOSE_TIMEOUT_S = 2.0
_FLUSH_AT = 16
"""Calls gathered before they are written without waiting for the end of the loop turn: Redis
starts on the first while the worker still finishes the jobs of the others."""

Client = aioredis.Redis | RedisCluster
"""A client of one Redis server, or of a Redis Cluster (``QUEUE_REDIS_CLUSTER``)."""

_warned_eviction: set[str] = set()


class RedisStore:
    """One Redis (or Cluster) and prefix: the pooled client, the pipelined wire, the scripts."""

    def __init__(self, settings: QueueSettings) -> None:
        self.settings = settings
        self.where = settings.redis_url_redacted
        self.protocol = Protocol(settings.prefix)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Client | None = None
        self._wire: Wire | None = None  # the script calls' connection (not on a cluster)
        self._pipeline: AutoPipeline | None = None
        self._prepared: set[str] = set()
        self._packed_keys: dict[str, bytes] = {}  # queue key names, RESP-encoded once
        self._scripts: dict[str, Any] = {}  # name -> redis-py Script (its text and sha)
        self._evalsha_heads: dict[str, bytes] = {}

    @property
    def cluster(self) -> bool:
        return self.settings.redis_cluster

    @property
    def sentinel(self) -> bool:
        """Whether the primary is found through Redis Sentinel (a ``redis+sentinel://`` URL)."""
        return self.settings.redis_url.startswith(SENTINEL_SCHEME + "://")

    # -- connections -----------------------------------------------------------------------

    def client(self) -> Client:
        """The pooled client of the running event loop (created on first use; no I/O yet)."""
        loop = asyncio.get_running_loop()
        if self._client is not None and self._loop is loop:
            return self._client
        # First use, or another loop: connections of a loop cannot be used from another one.
        self._forget()
        client = client_from_url(
            self.settings,
            # Bytes that are not UTF-8 (a foreign job) must not fail a whole reply: they come
            # back as lone surrogates, which a claim rejects and writes restore.
            encoding_errors="surrogateescape",
            socket_connect_timeout=5.0,
            socket_timeout=30.0,
            health_check_interval=30,
            # One quick retry for a dropped pooled connection; longer outages are paced by
            # the consumer loop, and a producer should get an error, not a minute of retries.
            retry=RedisRetry(
                ExponentialBackoff(cap=0.5, base=0.05), 1, (redis_errors.ConnectionError,)
            ),
        )
        self._scripts = {name: client.register_script(script_source(name)) for name in SCRIPT_FILES}
        self._evalsha_heads = {
            name: b"$7\r\nEVALSHA\r\n" + bulk(script.sha) for name, script in self._scripts.items()
        }
        if isinstance(client, aioredis.Redis):
            self._wire = Wire(client)
        self._pipeline = AutoPipeline(self)
        self._client = client
        self._loop = loop
        return client

    def _forget(self) -> None:
        """Drop the connections of a loop that is gone or not running (nothing to await)."""
        self._client = None
        self._wire = None
        self._pipeline = None
        self._prepared.clear()

    async def ready(self, *queues: str) -> Client:
        """The client, with ``meta.version`` written once for each queue written to."""
        client = self.client()
        for queue in queues:
            if queue not in self._prepared:
                keys = self.protocol.keys.of(queue)
                if self._wire is not None:  # one connection, however many callers start at once
                    (reply,) = await self._wire.execute(
                        [pack_command("HSET", keys["meta"], "version", LIB_VERSION)]
                    )
                    if isinstance(reply, BaseException):
                        raise reply
                else:
                    await client.hset(keys["meta"], "version", LIB_VERSION)
                for key in keys.values():
                    self._packed_keys[key] = bulk(key)
                self._prepared.add(queue)
        return client

    async def check_eviction_policy(self) -> None:
        """Warn (once per process and server) if Redis may evict keys: jobs and locks with them."""
        if self.where in _warned_eviction:
            return
        client = self.client()
        try:
            info = await client.info("memory")
        except redis_errors.ResponseError:  # INFO disabled on some managed services
            logger.debug("cannot read Redis's maxmemory-policy", exc_info=True)
            return
        _warned_eviction.add(self.where)
        policy = info.get("maxmemory_policy")
        if policy is not None and policy != "noeviction":
            logger.warning(
                "Redis at %s has maxmemory-policy=%s; BullMQ needs 'noeviction' or Redis may "
                "silently delete jobs and locks under memory pressure "
                "(CONFIG SET maxmemory-policy noeviction)",
                self.where,
                policy,
            )

    async def close(self) -> None:
        client, wire, loop = self._client, self._wire, self._loop
        self._forget()
        self._loop = None
        if loop is not asyncio.get_running_loop():
            return  # made on another loop: its sockets close with it
        if wire is not None:
            await wire.aclose()
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), CLOSE_TIMEOUT_S)

    def errors(self, doing: str) -> _DriverErrors:
        """Raise Redis driver errors as corral's, naming the server without its password."""
        return _DriverErrors(self, doing)

    def translate(self, exc: Exception, doing: str) -> None:
        """Raise ``exc``, if it is a Redis driver error, as corral's (a BackendError); return
        for any other error (the caller's ``with`` then lets it through)."""
        where = self.where
        credentials = (
            f"Redis at {where} refused the credentials while {doing} ({exc}); "
            "check the user and password in QUEUE_REDIS_URL"
        )
        if isinstance(exc, redis_errors.AuthenticationError):
            raise BackendAuthError(credentials) from exc
        if isinstance(exc, redis_errors.ConnectionError | redis_errors.TimeoutError | OSError):
            refused = _certificate_error(exc)
            if refused is not None:
                raise BackendConnectionError(
                    f"TLS certificate verification failed for Redis at {where} while "
                    f"{doing} ({refused.verify_message}); check that the server's certificate "
                    "names the host in QUEUE_REDIS_URL and give the CA that signed it in the "
                    "URL: rediss://...?ssl_ca_certs=/path/to/ca.pem"
                ) from exc
            raise BackendConnectionError(
                f"cannot reach Redis at {where} while {doing} ({exc}); check "
                "QUEUE_REDIS_URL and that Redis is running"
            ) from exc
        if isinstance(exc, redis_errors.ResponseError):
            if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                raise BackendAuthError(credentials) from exc
            if "CROSSSLOT" in str(exc):
                raise BackendError(
                    f"Redis Cluster refused keys of several slots in one call while {doing} "
                    f"({exc}); every queue used together (a flow's, a dead-letter queue) must "
                    "share one hash-tagged prefix, e.g. QUEUE_PREFIX={bull}"
                ) from exc
        if isinstance(exc, redis_errors.RedisError):
            raise BackendError(f"Redis error while {doing}: {exc}") from exc

    # -- running scripts -------------------------------------------------------------------

    async def run(self, call: ScriptCall) -> Any:
        """Run one script call; its error reply is raised."""
        (result,) = await self.run_many([call])
        if isinstance(result, BaseException):
            raise result
        return result

    async def call(self, call: ScriptCall) -> Any:
        """Run one script call, sent with the others of this loop turn (see AutoPipeline)."""
        self.client()
        assert self._pipeline is not None
        return await self._pipeline.call(call)

    async def run_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run script calls in one round trip, each its own atomic script (no MULTI); a call's
        error is returned in its place. Scripts Redis lost (a restart, SCRIPT FLUSH) are loaded
        and those calls sent again: a NOSCRIPT call did not run."""
        client = self.client()
        results = await self._send(client, calls)
        retry = [i for i, r in enumerate(results) if isinstance(r, redis_errors.NoScriptError)]
        if retry:
            for name in {calls[i].script for i in retry}:
                await client.script_load(self._scripts[name].script)
            again = await self._send(client, [calls[i] for i in retry])
            for index, result in zip(retry, again, strict=True):
                results[index] = result
        return results

    async def run_atomically(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run ``calls`` in one MULTI/EXEC: nothing is applied unless every call reaches Redis.
        An error reply of any call is raised (the others may have been applied)."""
        client = self.client()
        if self._wire is not None:
            # One round trip; the scripts are loaded in the same write (cheap when Redis has
            # them): inside MULTI a missing script would fail its own call alone.
            commands = [
                pack_command("SCRIPT", "LOAD", self._scripts[name].script)
                for name in sorted({call.script for call in calls})
            ]
            commands.append(pack_command("MULTI"))
            commands += [self.pack_evalsha(call) for call in calls]
            commands.append(pack_command("EXEC"))
            replies = await self._wire.execute(commands)
            for reply in replies[: -len(calls) - 1]:
                if isinstance(reply, BaseException):
                    raise reply
            results = replies[-1]
            if isinstance(results, BaseException):
                raise results  # EXECABORT: a call was refused when queued; nothing was applied
        else:
            await self.load_scripts(client, *{call.script for call in calls})
            async with client.pipeline(transaction=True) as pipe:
                for call in calls:
                    self.queue_script(pipe, call)
                results = await pipe.execute()
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def run_watched(
        self,
        watch: Sequence[str],
        plan: Callable[[Client], Awaitable[Sequence[ScriptCall] | None]],
        *,
        tries: int = 5,
    ) -> list[Any] | None:
        """Run the calls ``plan`` returns in one MULTI/EXEC guarded by WATCH on ``watch``.

        ``plan`` reads what the calls depend on through the client it gets, once the keys are
        watched; if a watched key changes before EXEC, nothing is applied and ``plan`` runs
        again (at most ``tries`` times). ``plan`` returning ``None`` writes nothing (``None``).
        An error reply of any call is raised.
        """
        client = self.client()
        pipe: Any
        async with client.pipeline(transaction=True) as pipe:
            for _ in range(tries):
                try:
                    await pipe.watch(*watch)
                    calls = await plan(client)
                    if calls is None:
                        await pipe.reset()
                        return None
                    await self.load_scripts(client, *{call.script for call in calls})
                    pipe.multi()
                    for call in calls:
                        self.queue_script(pipe, call)
                    results: list[Any] = await pipe.execute()
                    return results
                except redis_errors.WatchError:
                    continue  # written meanwhile: read again
        raise BackendError(
            f"the keys read before a transaction kept changing during {tries} tries; try again"
        )

    @staticmethod
    def slots(keys: Sequence[str]) -> set[int]:
        """The Redis Cluster slots of ``keys``."""
        return {key_slot(key.encode("utf-8", "surrogateescape")) for key in keys}

    def pack_evalsha(self, call: ScriptCall) -> bytes:
        """One EVALSHA in RESP, as redis-py would send it; queue key names are encoded once
        (:meth:`ready`), so a call packs only its job's keys and its arguments."""
        known = self._packed_keys
        keys, args = call.keys, call.args
        parts = [b"*%d\r\n" % (3 + len(keys) + len(args)), self._evalsha_heads[call.script]]
        parts.append(b"$%d\r\n%d\r\n" % (len(str(len(keys))), len(keys)))
        for key in keys:
            parts.append(known.get(key) or bulk(key))
        for arg in args:
            parts.append(bulk(arg))
        return b"".join(parts)

    async def _send(self, client: Client, calls: Sequence[ScriptCall]) -> list[Any]:
        if self._wire is not None:
            return await self._wire.execute([self.pack_evalsha(call) for call in calls])
        # A cluster: redis-py routes each command to the node of its keys.
        async with client.pipeline(transaction=False) as pipe:
            for call in calls:
                self.queue_script(pipe, call)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    def queue_script(self, pipe: Any, call: ScriptCall) -> None:
        """Queue one script call on ``pipe`` as EVALSHA. redis-py's cluster pipelines refuse
        its ``evalsha()`` method, not the command; a plain pipeline loads missing scripts
        before it runs, a cluster one needs :meth:`load_scripts` first."""
        script = self._scripts[call.script]
        if isinstance(pipe, aioredis.client.Pipeline):
            pipe.scripts.add(script)
        pipe.execute_command("EVALSHA", script.sha, len(call.keys), *call.keys, *call.args)

    async def load_scripts(self, client: Client, *names: str) -> None:
        """On a cluster, load the scripts a primary lacks (after a restart or a failover)
        before a pipeline runs them: inside MULTI a NOSCRIPT fails that call alone."""
        if not isinstance(client, RedisCluster):
            return
        scripts = [self._scripts[name] for name in names]
        present = await client.script_exists(*(script.sha for script in scripts))
        for script, loaded in zip(scripts, present, strict=True):
            if not loaded:
                await client.script_load(script.script)


class _DriverErrors:
    """The context of :meth:`RedisStore.errors` (a class: it wraps every call on hot paths)."""

    __slots__ = ("doing", "store")

    def __init__(self, store: RedisStore, doing: str) -> None:
        self.store = store
        self.doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: Any) -> None:
        if exc is not None and isinstance(exc, Exception):
            self.store.translate(exc, self.doing)


class AutoPipeline:
    """Send the script calls made during one event-loop turn together (what ioredis's
    auto-pipelining does for Node's workers): many slots finishing at once cost one write.

    Each call is still its own atomic script; only the transport is shared.
    """

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._pending: list[tuple[ScriptCall, asyncio.Future[Any]]] = []
        self._flushing: set[asyncio.Task[None]] = set()

    async def call(self, call: ScriptCall) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        pending = self._pending
        pending.append((call, future))
        if len(pending) == 1:
            loop.call_soon(self._flush)
        elif len(pending) >= _FLUSH_AT:
            self._flush()
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        store = self.store
        wire = store._wire
        sent = None
        if wire is not None:
            sent = wire.submit([store.pack_evalsha(call) for call, _ in batch])
        if sent is None:
            self._resend(batch)
        else:
            sent.add_done_callback(functools.partial(self._deliver, batch))

    def _deliver(
        self, batch: list[tuple[ScriptCall, asyncio.Future[Any]]], sent: asyncio.Future[list[Any]]
    ) -> None:
        if sent.cancelled() or sent.exception() is not None:
            self._resend(batch)  # on a new connection, with redis-py's single retry
            return
        again = []
        for item, result in zip(batch, sent.result(), strict=True):
            future = item[1]
            if future.done():
                continue
            if isinstance(result, redis_errors.NoScriptError):
                again.append(item)
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        if again:
            self._resend(again)

    def _resend(self, batch: list[tuple[ScriptCall, asyncio.Future[Any]]]) -> None:
        task = asyncio.ensure_future(self._send(batch))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _send(self, batch: list[tuple[ScriptCall, asyncio.Future[Any]]]) -> None:
        try:
            results = await self.store.run_many([call for call, _ in batch])
        except BaseException as exc:  # handed to the callers, who wrap it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


def client_from_url(settings: QueueSettings, **options: Any) -> Client:
    """A pooled client for ``settings.redis_url``; with ``redis_cluster``, a cluster client,
    which follows the slots (and MOVED replies) to the right node; for a ``redis+sentinel://``
    URL, a client of the primary the sentinels name now (see :func:`dedicated_client`)."""
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, decode_responses=True, **options)
    return dedicated_client(settings.redis_url, single=False, **options)


def dedicated_client(url: str, *, single: bool = True, **options: Any) -> aioredis.Redis:
    """A client of one server (``single``: on one connection of its own, for blocking calls).

    Through Sentinel every new connection asks the sentinels for the primary's address, and a
    connection to a primary that was demoted fails with ConnectionError on its first write
    (redis-py's SentinelManagedConnection): after a failover the next attempt reaches the new
    primary with no restart.
    """
    if not url.startswith(SENTINEL_SCHEME + "://"):
        return aioredis.Redis.from_url(
            url, decode_responses=True, single_connection_client=single, **options
        )
    target = parse_sentinel_url(url)
    # Sentinels answer at once or are down: short timeouts, so a dead one is skipped quickly.
    manager = Sentinel(  # type: ignore[no-untyped-call]
        target.sentinels, sentinel_kwargs={"socket_timeout": 1.0, "socket_connect_timeout": 1.0}
    )
    pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
        target.service,
        manager,
        db=target.db,
        username=target.username,
        password=target.password,
        decode_responses=True,
        **options,
    )
    client = _SentinelClient(connection_pool=pool, single_connection_client=single)
    client.manager = manager
    client.auto_close_connection_pool = True
    return client


class _SentinelClient(aioredis.Redis):
    """A client of a Sentinel-monitored primary that closes its sentinel connections too."""

    manager: Sentinel

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        await self.manager.aclose()


def node_url(url: str, host: str, port: int) -> str:
    """``url`` (credentials, TLS options and all) pointed at one node of a cluster."""
    parts = urlsplit(url)
    credentials, at, _ = parts.netloc.rpartition("@")
    address = f"[{host}]" if ":" in host else host
    return urlunsplit(parts._replace(netloc=f"{credentials}{at}{address}:{port}"))


def _certificate_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate check that failed under a driver error (redis-py re-raises it as a
    ConnectionError), if one did."""
    seen: BaseException | None = exc
    for _ in range(10):  # a chain, not a cycle
        if seen is None or isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
