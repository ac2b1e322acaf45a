"""The systems ``corral bench`` measures (a :class:`System`: whether a queue can run here and
how to start its runners), the :class:`Suite` that lists them, and the Redis they share."""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import shutil
import sqlite3
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from corral import __version__
from corral.errors import ConfigError
from corral.tools.bench.model import BACKEND_LABELS, RUNNER_MODULE, Check, SystemResult


@dataclass(slots=True)
class Environment:
    """The Redis the orchestrator found (or started) for the systems that need one."""

    redis_url: str
    redis_version: str | None
    redis_error: str | None


def redis_client(url: str) -> Any:
    redis: Any = importlib.import_module("redis")
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)


def _redis_version(url: str) -> str:
    client = redis_client(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def _loopback_6379(url: str) -> bool:
    parts = urlsplit(url)
    return parts.hostname in ("127.0.0.1", "localhost") and (parts.port or 6379) == 6379


def ensure_redis(url: str) -> tuple[str | None, str | None, bool]:
    """(version, error, started): start a private redis-server on 127.0.0.1:6379 if the default
    URL does not answer (it is shut down again at the end)."""
    try:
        return _redis_version(url), None, False
    except Exception as exc:
        first_error = f"Redis at {url} does not answer ({type(exc).__name__})"
    server = shutil.which("redis-server")
    if not _loopback_6379(url) or server is None:
        return None, first_error, False
    subprocess.run(
        [server, "--daemonize", "yes", "--port", "6379", "--save", "", "--appendonly", "no"],
        check=False,
        capture_output=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            return _redis_version(url), None, True
        time.sleep(0.1)
    return None, f"{first_error}; redis-server was started but does not answer", False


def package_version(name: str) -> str | None:
    """The installed version of the Python distribution ``name``, or ``None``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


class System(ABC):
    """A queue the benchmark measures: whether it can run here, and how to start its runners."""

    uses_redis: bool = False
    """Its queues live on the run's Redis (else each phase gets a SQLite file)."""
    multi_process: bool = False
    """``--processes N`` applies: N worker processes drain its processed phases together."""
    flows: bool = False
    """It has flows (parents run after their children): the flow phase applies."""

    def __init__(self, name: str, label: str) -> None:
        self.name = name
        self.label = label

    @abstractmethod
    def availability(self, env: Environment) -> tuple[str | None, str | None]:
        """(what runs, with versions; ``None``) if it can run here, else (``None``, why not).
        Only asked when the run's Redis answers or the system does not use Redis."""

    @abstractmethod
    def runner(self, role: str) -> list[str]:
        """The command that starts one of its runner processes in ``role``; the options
        (``--queue``, ``--redis``, ``--count``, ...) are appended."""

    def runtimes(self) -> dict[str, str | None]:
        """Versions of the runtimes it needs besides Python (e.g. ``{"node": "v20.1.0"}``),
        recorded with the machine."""
        return {}


class CorralSystem(System):
    """corral's ``QueueService`` on one backend, run by ``python -m corral.tools.bench``."""

    multi_process = True
    flows = True

    def __init__(self, backend: str) -> None:
        super().__init__(f"corral-{backend}", f"corral, {BACKEND_LABELS[backend]} backend")
        self.backend = backend
        self.uses_redis = backend == "bullmq"

    def availability(self, env: Environment) -> tuple[str | None, str | None]:
        if self.backend == "sqlite":
            return f"corral {__version__}, SQLite {sqlite3.sqlite_version}", None
        if importlib.util.find_spec("corral.backends.bullmq") is None:
            return None, "not installed: this corral has no BullMQ backend module"
        return f"corral {__version__}, Redis {env.redis_version}", None

    def runner(self, role: str) -> list[str]:
        return [sys.executable, "-m", RUNNER_MODULE, self.name, role]


@dataclass(frozen=True, slots=True)
class Suite:
    """What one benchmark command measures: its systems (in the report's order), the checks
    computed from their figures, and the Python packages whose versions the report names."""

    systems: dict[str, System]
    checks: Callable[[dict[str, SystemResult], dict[str, float], int], list[Check]]
    """From the figures of the systems, the machine's limits measured in the same run and the
    worker processes of corral's systems (``--processes``)."""
    packages: tuple[str, ...]

    def parse_systems(self, values: Sequence[str] | None) -> list[str]:
        """``--systems a,b --systems c`` as a list in the suite's order; all when empty."""
        if not values:
            return list(self.systems)
        chosen = {part.strip() for value in values for part in value.split(",") if part.strip()}
        unknown = sorted(chosen - set(self.systems))
        if unknown:
            raise ConfigError(
                f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(self.systems)}"
            )
        return [name for name in self.systems if name in chosen]
