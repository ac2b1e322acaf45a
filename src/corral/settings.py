"""QueueSettings: every knob, from arguments, ``QUEUE_*`` environment variables or ``.env``."""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import (
    Field,
    PrivateAttr,
    SerializationInfo,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from corral.errors import ConfigError
from corral.retry import Retry

QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")
SENTINEL_SCHEME = "redis+sentinel"
_REDIS_SCHEMES = ("redis", "rediss", "unix", SENTINEL_SCHEME)
_SECRET_FIELDS = frozenset({"redis_url", "outbox_url"})
_HIDDEN_FIELDS = frozenset({"dashboard_password", "dashboard_secret"})
"""Secrets that are not URLs: shown as ``***`` whole."""
_PASSWORD_PARAM = re.compile(r"((?:^|&)password=)[^&]*", re.IGNORECASE)
MAX_KEPT_JOBS = 1_000_000_000  # the counts must fit SQLite's integers and Lua's exact numbers
MAX_METRICS_MINUTES = 527_040  # a (leap) year of per-minute points


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: the one after the user, a lone user token,
    and a ``password=`` query parameter (redis-py reads that one too)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    query = _PASSWORD_PARAM.sub(r"\1***", parts.query)
    if parts.password is None and not parts.username and query == parts.query:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        host = netloc.rpartition("@")[2]  # as written: a bad port must not make this raise
        if parts.password is not None:
            user = f"{parts.username}:***" if parts.username else ":***"
        else:
            user = "***"  # redis://TOKEN@host carries the password in the user slot
        netloc = f"{user}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names: the sentinels, the monitored primary's name (the
    ``service``), its database and credentials (for the primary; sentinels are asked without)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``; the
    port defaults to 26379. Raises ValueError with a message that does not repeat the URL."""
    usage = "use redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]"
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"is not a {SENTINEL_SCHEME}:// URL; {usage}")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        item = item.strip()
        host, colon, port = item.rpartition(":")
        if not colon or (":" in host and not host.endswith("]")):
            host, port = item, "26379"  # no port, or a bare IPv6 address
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"has a sentinel address that is not host:port; {usage}")
        sentinels.append((host, int(port)))
    path = [segment for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2:
        raise ValueError(f"must name the monitored primary (the service name); {usage}")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"has a database part that is not a number; {usage}")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    return SentinelTarget(
        tuple(sentinels),
        unquote(path[0]),
        int(path[1]) if len(path) == 2 else 0,
        username,
        password,
    )


class QueueSettings(BaseSettings):
    """Settings of a queue and its workers.

    Every field reads the environment variable ``QUEUE_<FIELD>`` (``QUEUE_BACKEND``,
    ``QUEUE_REDIS_URL``, ...) and a ``.env`` file in the working directory; keyword arguments win.
    A value corral cannot use raises :class:`~corral.errors.ConfigError` naming the variable.
    """

    model_config = SettingsConfigDict(
        env_prefix="QUEUE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        env_parse_none_str="none",
        validate_default=True,
    )

    backend: Literal["sqlite", "bullmq"] = "sqlite"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    sqlite_path: str = "corral.db"
    name: str = "default"
    prefix: str = "bull"
    concurrency: int = Field(default=10, ge=1, le=10_000)
    tasks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    attempts: int = Field(default=3, ge=1, le=1_000_000)
    backoff_type: Literal["fixed", "exponential"] = "exponential"
    backoff_delay_s: float = Field(default=1.0, ge=0, le=365 * 86400)
    backoff_jitter: float = Field(default=0.0, ge=0, le=1)
    lease_s: float = Field(default=30.0, gt=0, le=86400)
    max_stalls: int = Field(default=1, ge=0, le=1000)
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=86400)
    dead_letter: str | None = None
    max_payload_bytes: int = Field(default=1_048_576, ge=64, le=512 * 1024 * 1024)
    keep_completed: int | None = Field(default=1000, ge=0, le=MAX_KEPT_JOBS)
    keep_failed: int | None = Field(default=None, ge=0, le=MAX_KEPT_JOBS)
    rate_limit_max: int | None = Field(default=None, ge=1)
    rate_limit_duration_s: float = Field(default=1.0, gt=0, le=86400)
    poll_interval_s: float = Field(default=0.02, gt=0, le=60)
    events_max_len: int = Field(default=10_000, ge=100, le=10_000_000)
    sqlite_synchronous: Literal["normal", "full"] = "normal"
    allow_unsafe_integers: bool = False
    isolate_sync: bool = False
    max_flow_jobs: int = Field(default=10_000, ge=1, le=1_000_000)
    metrics_minutes: int = Field(default=20_160, ge=0, le=MAX_METRICS_MINUTES)
    names: Annotated[list[str], NoDecode] = Field(default_factory=list)
    outbox_url: str | None = None
    outbox_table: str = "corral_outbox"
    dashboard_user: str | None = None
    dashboard_password: str | None = None
    dashboard_secret: str | None = None

    _explicit: frozenset[str] = PrivateAttr(default=frozenset())
    _identity: str = PrivateAttr(default="")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            # `from None`: pydantic's own message echoes raw input, which may hold a password.
            raise ConfigError(_describe(exc)) from None
        self._explicit = frozenset(values)
        self._identity = secrets.token_hex(8)

    @property
    def identity(self) -> str:
        """Unique to these settings and their copies: names a private ``:memory:`` database."""
        return self._identity

    def __eq__(self, other: object) -> bool:
        # The same values are the same settings, however they were given.
        if not isinstance(other, QueueSettings):
            return NotImplemented
        reveal = {"reveal_secrets": True}
        return self.model_dump(context=reveal) == other.model_dump(context=reveal)

    __hash__ = None  # type: ignore[assignment]

    @property
    def explicit(self) -> frozenset[str]:
        """The fields given as arguments (not read from the environment or defaulted)."""
        return self._explicit

    def with_name(self, name: str) -> QueueSettings:
        """These settings for the queue ``name`` (same storage, same limits).

        Raises:
            ConfigError: ``name`` is not a usable queue name.
        """
        try:
            check_queue_name(name)
        except ValueError as exc:
            raise ConfigError(f"queue name {name!r} {exc}") from None
        return self.model_copy(update={"name": name})

    def storage(self) -> tuple[str, ...]:
        """What identifies the storage these settings point at (queues on it share it)."""
        if self.backend == "sqlite":
            return ("sqlite", self.sqlite_path)
        return ("bullmq", self.redis_url, str(self.redis_cluster), self.prefix)

    @field_serializer("redis_url", "outbox_url")
    def _serialize_secret(self, value: str | None, info: SerializationInfo) -> str | None:
        # Frameworks log settings with model_dump(); the password shows only when asked for:
        # model_dump(context={"reveal_secrets": True}).
        context = info.context
        if value is None or (isinstance(context, dict) and context.get("reveal_secrets")):
            return value
        return redact_url(value)

    @field_serializer("dashboard_password", "dashboard_secret")
    def _serialize_hidden(self, value: str | None, info: SerializationInfo) -> str | None:
        context = info.context
        if value is None or (isinstance(context, dict) and context.get("reveal_secrets")):
            return value
        return "***"

    @field_validator("tasks", "names", mode="before")
    @classmethod
    def _split_tasks(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("names")
    @classmethod
    def _check_names(cls, value: list[str]) -> list[str]:
        for spec in value:
            parse_queue_spec(spec, error=ValueError)
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if value.startswith(SENTINEL_SCHEME + "://"):
            parse_sentinel_url(value)
            return value
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018  (raises ValueError on a bad port)
        except ValueError:
            raise ValueError(
                "is not a valid URL; use redis://[user:password@]host:port/db"
            ) from None
        if parts.scheme not in _REDIS_SCHEMES:
            raise ValueError(
                f"must start with one of {', '.join(s + '://' for s in _REDIS_SCHEMES)}"
            )
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("has no host; use redis://[user:password@]host:port/db")
        db = parts.path.lstrip("/")
        if parts.scheme != "unix" and db and not db.isdigit():
            raise ValueError("has a database part that is not a number; use .../0")
        return value

    @field_validator("outbox_url", mode="before")
    @classmethod
    def _check_outbox_url(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        if isinstance(value, str):
            from corral.outbox import parse_outbox_url

            parse_outbox_url(value.strip())  # raises ValueError, without echoing the URL
            return value.strip()
        return value

    @field_validator("outbox_table")
    @classmethod
    def _check_outbox_table(cls, value: str) -> str:
        from corral.outbox import check_table_name

        return check_table_name(value)

    @field_validator("sqlite_path")
    @classmethod
    def _check_sqlite_path(cls, value: str) -> str:
        # SQLite gives an empty name a private temporary database per connection: jobs would
        # vanish between the producer's connection and the worker's.
        if not value.strip():
            raise ValueError("is empty; name a database file, e.g. corral.db")
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_queue_name(value)

    @field_validator("dead_letter", mode="before")
    @classmethod
    def _check_dead_letter(cls, value: Any) -> Any:
        if value is None or (
            isinstance(value, str) and value.strip().lower() in ("", "off", "none")
        ):
            return None
        if isinstance(value, str):
            return check_queue_name(value.strip())
        return value

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value or len(value) > 100 or any(ch.isspace() for ch in value):
            raise ValueError("must be 1-100 characters without spaces, e.g. 'bull'")
        return value

    @field_validator("dashboard_user", mode="before")
    @classmethod
    def _check_dashboard_user(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip() or None
            if value is not None and ":" in value:
                raise ValueError(
                    "may not contain ':' (HTTP basic auth separates user and password with it)"
                )
        return value

    @field_validator("dashboard_password", "dashboard_secret", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value else value

    @model_validator(mode="after")
    def _check_combination(self) -> QueueSettings:
        if (self.dashboard_user is None) != (self.dashboard_password is None):
            raise ValueError(
                "QUEUE_DASHBOARD_USER and QUEUE_DASHBOARD_PASSWORD go together: set both to "
                "protect the dashboard with a password, or neither"
            )
        if self.dead_letter is not None and self.dead_letter == self.name:
            raise ValueError(
                "QUEUE_DEAD_LETTER names the queue itself; choose another queue name or 'off'"
            )
        if self.backend == "bullmq" and self.redis_cluster:
            _check_cluster(self.redis_url, self.prefix)
        return self

    @property
    def backoff(self) -> Retry:
        """The default backoff policy built from ``backoff_type``/``backoff_delay_s``/``jitter``."""
        return Retry(self.backoff_type, round(self.backoff_delay_s * 1000), self.backoff_jitter)

    @property
    def outbox_url_redacted(self) -> str | None:
        """``outbox_url`` safe to print: the password is replaced by ``***``."""
        return redact_url(self.outbox_url) if self.outbox_url is not None else None

    @property
    def redis_url_redacted(self) -> str:
        """``redis_url`` safe to print: the password is replaced by ``***``."""
        return redact_url(self.redis_url)

    def __repr_args__(self) -> Any:
        for key, value in super().__repr_args__():
            if key in _SECRET_FIELDS and isinstance(value, str):
                yield key, redact_url(value)
            elif key in _HIDDEN_FIELDS and value is not None:
                yield key, "***"
            else:
                yield key, value


def has_hash_tag(key: str) -> bool:
    """Whether Redis Cluster hashes ``key`` by a tag: text between its first ``{`` and the
    first ``}`` after it, not empty."""
    start = key.find("{")
    return start >= 0 and key.find("}", start + 1) > start + 1


def _check_cluster(redis_url: str, prefix: str) -> None:
    if not has_hash_tag(prefix):
        # Every key of a queue starts with the prefix: a tag there puts all of them, and those
        # of the dead-letter queue, in one slot, as BullMQ's Lua scripts and MULTI need.
        raise ValueError(
            f"QUEUE_PREFIX {prefix!r} has no hash tag, and QUEUE_REDIS_CLUSTER=true needs one so "
            "that every key of a queue lives in one cluster slot; use a prefix in braces such "
            "as '{bull}' (Node.js applications sharing the queue must use the same prefix)"
        )
    parts = urlsplit(redis_url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("QUEUE_REDIS_CLUSTER=true needs a redis:// or rediss:// QUEUE_REDIS_URL")
    if parts.path.lstrip("/") not in ("", "0"):
        raise ValueError(
            "QUEUE_REDIS_URL names a database other than 0, which Redis Cluster does not have"
        )


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` names a host on this machine (127.0.0.0/8, ::1 or localhost)."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    return is_loopback_host(host)


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine: 127.0.0.0/8, ::1 or localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_queue_spec(spec: str, *, error: type[Exception] = ConfigError) -> tuple[str, int | None]:
    """``name`` or ``name:concurrency`` (how ``--queue`` and ``QUEUE_NAMES`` name a queue)."""
    name, colon, count = spec.strip().partition(":")
    try:
        check_queue_name(name)
    except ValueError as exc:
        raise error(f"queue {spec!r}: the name {exc}") from None
    if not colon:
        return name, None
    if not count.isdigit() or not 1 <= int(count) <= 10_000:
        raise error(f"queue {spec!r}: the concurrency after ':' must be a whole number 1-10000")
    return name, int(count)


def check_queue_name(value: str) -> str:
    """Return ``value`` if it is a usable queue name, else raise ``ValueError``."""
    if not isinstance(value, str) or not QUEUE_NAME_RE.match(value):
        raise ValueError(
            "must be 1-200 characters of letters, digits, '_', '.' or '-' (no ':' or spaces)"
        )
    return value


_ALLOWED_HINTS: dict[str, str] = {
    "backend": "'sqlite' or 'bullmq'",
    "backoff_type": "'fixed' or 'exponential'",
}


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = error.get("loc") or ()
        field = str(loc[0]) if loc else ""
        env = f"QUEUE_{field.upper()}" if field else "QueueSettings"
        msg = str(error.get("msg", "invalid value"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if field in _ALLOWED_HINTS:
            msg = f"must be {_ALLOWED_HINTS[field]}"
        lines.append(f"{env} (setting '{field}'): {msg}" if field else msg)
    return "invalid queue settings: " + "; ".join(lines)
