"""The worker process: ``python -m corral.worker`` and ``corral worker``.

A worker serves the QueueServices of the task modules it is given, with their settings
(:mod:`corral.tasks`), and runs :meth:`~corral.service.QueueService.start_worker` until it is
told to stop.

Signals: the first SIGTERM or SIGINT only asks the worker to stop (no new claims; jobs in flight
get ``shutdown_grace_s`` to finish, then are cancelled and released for a retry) and the process
exits 0. A second signal cancels everything at once and the process exits ``128 + signal``.

With ``--processes N`` a supervisor (:mod:`corral.supervisor`) runs N worker processes.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from corral.errors import ConfigError, CorralError, TaskModuleError
from corral.handlers import running_sync_handlers
from corral.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from corral.message import JobState
from corral.prometheus import METRICS_DIR_ENV, WorkerMetrics, read_snapshots, serve_http
from corral.prometheus import require as require_metrics
from corral.service import QueueService
from corral.settings import QueueSettings
from corral.supervisor import (
    EXIT_ERROR,
    EXIT_OK,
    HARD_EXIT_DEADLINE_S,
    STOP_SIGNALS,
    Supervisor,
)
from corral.tasks import WorkerPlan, build_worker, load_task_services

logger = logging.getLogger("corral.worker")

EXIT_CONFIG = 2

__all__ = [
    "EXIT_CONFIG",
    "EXIT_ERROR",
    "EXIT_OK",
    "LOG_LEVELS",
    "Supervisor",
    "WorkerOptions",
    "build_worker",
    "check",
    "configure_logging",
    "exit_process",
    "load_task_services",
    "main",
    "serve",
]


# -- one worker process -------------------------------------------------------------------------


async def run_worker(
    plan: WorkerPlan,
    *,
    total_concurrency: int | None = None,
    burst: bool = False,
    parent_pid: int | None = None,
    metrics: WorkerMetrics | None = None,
) -> int:
    """Run the plan's worker with the signal handling of the entry points; return the exit
    code: 0 after a graceful stop or a drained burst, 1 after the worker stopped on its own
    (stuck handler threads), ``128 + signal`` after a second signal."""
    loop = asyncio.get_running_loop()
    service = plan.service
    if metrics is not None:
        metrics.start(service, [queue.name for queue in plan.queues])
    worker = asyncio.create_task(
        service.start_worker(burst=burst, queues=plan.queues, total_concurrency=total_concurrency),
        name="corral-worker",
    )
    relay_stop = asyncio.Event()
    relay = _start_relay(service, relay_stop)
    hard_signal: int | None = None
    received = 0

    def on_signal(signum: int) -> None:
        nonlocal hard_signal, received
        received += 1
        name = signal.Signals(signum).name
        if received == 1:
            logger.info(
                "%s received: claiming no more jobs; jobs in flight get %gs to finish "
                "(send it again to exit at once)",
                name,
                service.settings.shutdown_grace_s,
            )
            service.stop()
            return
        if hard_signal is None:
            hard_signal = signum
            logger.warning(
                "%s received again: exiting now; unfinished jobs are released for a retry", name
            )
            worker.cancel()
            _arm_hard_exit(128 + signum)

    handled = (signal.SIGTERM, signal.SIGINT)
    for sig in handled:
        loop.add_signal_handler(sig, on_signal, sig)
    await asyncio.sleep(0)  # let the worker start, so a stop is not lost before it runs
    while _early_signals:
        on_signal(_early_signals.pop(0))
    watchdog = (
        asyncio.create_task(_watch_parent(parent_pid, service), name="corral-parent-watch")
        if parent_pid is not None
        else None
    )
    try:
        await worker
    except asyncio.CancelledError:
        if hard_signal is None:
            raise
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if relay is not None:
            relay_stop.set()
            if hard_signal is not None:
                relay.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(relay, 10.0)
        if metrics is not None:
            await metrics.stop()
        try:
            await asyncio.wait_for(service.close(), 10.0)
        except Exception:  # closing is best effort; the jobs' leases cover the rest
            logger.warning("closing the queue backend failed", exc_info=True)
        for sig in handled:
            loop.remove_signal_handler(sig)
    if hard_signal is not None:
        return 128 + hard_signal
    return EXIT_ERROR if service.stuck else EXIT_OK


def _start_relay(service: QueueService, stop: asyncio.Event) -> asyncio.Task[None] | None:
    """The outbox relay of ``QUEUE_OUTBOX_URL``, beside the worker (None if it is not set)."""
    if service.settings.outbox_url is None:
        return None
    from corral.relay import Relay

    relay = Relay(service.settings, service.backend)

    async def run() -> None:
        try:
            await relay.run(stop)
        except CorralError as exc:  # bad outbox settings: the worker goes on, loudly
            logger.error("the outbox relay stopped: %s", exc)

    return asyncio.create_task(run(), name="corral-relay")


_early_signals: list[int] = []


def _catch_early_signals() -> None:
    """Until the worker's event loop handles SIGTERM/SIGINT, remember them instead of dying, so a
    signal that arrives while the task modules import still means a graceful stop."""

    def remember(signum: int, frame: FrameType | None) -> None:
        _early_signals.append(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, remember)
    # A supervisor starts its workers with these signals blocked (see Supervisor._start); what
    # arrived since is delivered now, to the handler above.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _arm_hard_exit(code: int) -> None:
    """After a second signal, end the process even if a handler blocks the event loop."""

    def force() -> None:
        logger.error("still running %gs after the second signal; killing", HARD_EXIT_DEADLINE_S)
        _flush_and_exit(code)

    timer = threading.Timer(HARD_EXIT_DEADLINE_S, force)
    timer.daemon = True
    timer.start()


async def _watch_parent(parent_pid: int, service: QueueService) -> None:
    # A supervised worker whose supervisor was killed outright stops by itself.
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent_pid:
            logger.warning("supervisor (pid %d) is gone; stopping", parent_pid)
            service.stop()
            return


def exit_process(code: int) -> None:
    """Exit with ``code``; without waiting for synchronous handlers still running a job.

    A thread cannot be cancelled; its job was already released, so waiting for it would only
    hold the shutdown past its deadline. With none running, the exit is a normal one.
    """
    running = running_sync_handlers()
    if running:
        logger.warning(
            "%d synchronous handler(s) still running after shutdown; exiting without them "
            "(their jobs were released and will run again)",
            running,
        )
        atexit._run_exitfuncs()  # what a normal exit runs (error reporters flush their queues)
        _flush_and_exit(code)
    sys.exit(code)


def _flush_and_exit(code: int) -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# -- entry points -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """What ``corral worker`` and ``python -m corral.worker`` were asked to run."""

    modules: tuple[str, ...] = ()
    """Task modules; empty means ``QUEUE_TASKS``."""
    queues: tuple[str, ...] = ()
    """Queues to serve (``name`` or ``name:concurrency``); empty means ``QUEUE_NAMES``, else
    the task modules' queues."""
    concurrency: int | None = None
    total_concurrency: int | None = None
    burst: bool = False
    processes: int = 1
    log_level: str | None = None
    log_format: str | None = None
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (one endpoint for all ``processes``)."""
    metrics_host: str = "127.0.0.1"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    """QueueSettings keyword arguments that win over the environment (the CLI's options)."""
    parent_pid: int | None = None


def serve(options: WorkerOptions) -> int:
    """Run a worker (or, with ``processes > 1``, a supervisor); return the exit code.

    Settings and task modules are checked first, so a mistake is one line on stderr and exit
    code 2 rather than a crash loop.
    """
    try:
        configure_logging(options.log_level, fmt=options.log_format)
        if options.processes == 1:
            _catch_early_signals()
        for value, flag in (
            (options.processes, "--processes"),
            (options.concurrency, "--concurrency"),
            (options.total_concurrency, "--total-concurrency"),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if options.metrics_port is not None:
            if not 1 <= options.metrics_port <= 65535:
                raise ConfigError(f"--metrics-port must be 1-65535, got {options.metrics_port}")
            require_metrics()
        settings = QueueSettings(**options.overrides)
        modules = options.modules or tuple(settings.tasks)
        plan = build_worker(
            options.overrides, modules, options.queues, concurrency=options.concurrency
        )
        plan.service.backend  # noqa: B018  (imports the backend's driver: a missing extra shows now)
    except CorralError as exc:
        report_error(exc)
        return EXIT_CONFIG
    primary = plan.service.settings
    where = primary.sqlite_path if primary.backend == "sqlite" else primary.redis_url_redacted
    queues = ", ".join(f"{queue.name}:{queue.concurrency}" for queue in plan.queues)
    if options.processes > 1:
        logger.info(
            "supervisor: %d worker processes for queues %s (%s at %s), tasks %s",
            options.processes,
            queues,
            primary.backend,
            where,
            ", ".join(modules),
        )
        env = child_env(options.overrides)
        server, directory = None, None
        if options.metrics_port is not None:
            # One endpoint for every child: each writes its numbers to a file here.
            directory = Path(tempfile.mkdtemp(prefix="corral-metrics-"))
            env[METRICS_DIR_ENV] = str(directory)
            try:
                server = serve_http(
                    options.metrics_port,
                    options.metrics_host,
                    lambda: read_snapshots(directory),
                    primary,
                    [queue.name for queue in plan.queues],
                )
            except CorralError as exc:
                report_error(exc)
                shutil.rmtree(directory, ignore_errors=True)
                return EXIT_CONFIG
        try:
            return Supervisor(
                child_command(options, modules),
                processes=options.processes,
                env=env,
                burst=options.burst,
            ).run()
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
    logger.info(
        "queues %s on %s at %s; task modules: %s",
        queues,
        primary.backend,
        where,
        ", ".join(modules),
    )
    metrics = None
    if options.metrics_port is not None:
        metrics = WorkerMetrics(port=options.metrics_port, host=options.metrics_host)
    elif os.environ.get(METRICS_DIR_ENV):  # a child of a supervisor that serves metrics
        metrics = WorkerMetrics(directory=Path(os.environ[METRICS_DIR_ENV]))
    try:
        return asyncio.run(
            run_worker(
                plan,
                total_concurrency=options.total_concurrency,
                burst=options.burst,
                parent_pid=options.parent_pid,
                metrics=metrics,
            )
        )
    except CorralError as exc:
        report_error(exc)
        return EXIT_ERROR


def child_command(options: WorkerOptions, modules: Sequence[str]) -> list[str]:
    """The command line of one supervised worker process."""
    command = [sys.executable, "-m", "corral.worker", *modules, "--parent-pid", str(os.getpid())]
    for queue in options.queues:
        command += ["--queue", queue]
    if options.concurrency is not None:
        command += ["--concurrency", str(options.concurrency)]
    if options.total_concurrency is not None:
        command += ["--total-concurrency", str(options.total_concurrency)]
    if options.burst:
        command.append("--burst")
    if options.log_level:
        command += ["--log-level", options.log_level]
    if options.log_format:
        command += ["--log-format", options.log_format]
    return command


def child_env(overrides: Mapping[str, Any]) -> dict[str, str]:
    """This process's environment plus the CLI's setting overrides as ``QUEUE_*`` variables."""
    env = dict(os.environ)
    for key, value in overrides.items():
        env[f"QUEUE_{key.upper()}"] = ",".join(value) if isinstance(value, list) else str(value)
    return env


def report_error(exc: BaseException) -> None:
    """Print ``exc`` as one line on stderr; for a task module that raised while being
    imported, the module's own traceback follows (it is a bug in that module)."""
    print(f"error: {exc}", file=sys.stderr)
    cause = exc.__cause__
    if isinstance(exc, TaskModuleError) and cause is not None:
        sys.stderr.write("".join(traceback.format_exception(cause)))
    sys.stderr.flush()


async def probe(
    settings: QueueSettings, *, timeout_s: float = 10.0
) -> tuple[dict[JobState, int], bool]:
    """Reach the backend of ``settings`` and return its counts and paused flag.

    Raises:
        BackendError: the storage could not be reached or read.
        TimeoutError: it did not answer within ``timeout_s``.
    """
    service = QueueService(settings)
    try:

        async def ask() -> tuple[dict[JobState, int], bool]:
            return await service.counts(), await service.is_paused()

        return await asyncio.wait_for(ask(), timeout_s)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(service.close(), 5.0)


def check(
    overrides: Mapping[str, Any] | None = None,
    modules: Sequence[str] = (),
    *,
    timeout_s: float = 10.0,
) -> int:
    """Health check: valid settings, importable task modules, a backend that answers.

    Prints one line (``ok: ...`` on stdout or ``error: ...`` on stderr) and returns the exit
    code: 0 healthy, 1 backend unreachable, 2 bad settings or task modules.
    """
    try:
        settings = QueueSettings(**(overrides or {}))
        tasks = tuple(modules) or tuple(settings.tasks)
        handlers: list[str] = []
        if tasks:
            plan = build_worker(overrides or {}, tasks)
            handlers = sorted(plan.service.handlers)
            settings = plan.service.settings
    except CorralError as exc:
        report_error(exc)
        return EXIT_CONFIG
    where = settings.sqlite_path if settings.backend == "sqlite" else settings.redis_url_redacted
    if (
        settings.backend == "sqlite"
        and settings.sqlite_path != ":memory:"
        and not os.path.isfile(settings.sqlite_path)
    ):
        # A check creates nothing: a mistyped path or an unmounted volume must not pass.
        print(
            f"error: no SQLite database at {settings.sqlite_path!r} (QUEUE_SQLITE_PATH); "
            "a worker or producer creates it on first use",
            file=sys.stderr,
        )
        return EXIT_ERROR
    try:
        counts, paused = asyncio.run(probe(settings, timeout_s=timeout_s))
    except TimeoutError:
        print(
            f"error: the {settings.backend} backend at {where} did not answer "
            f"within {timeout_s:g}s",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except CorralError as exc:
        report_error(exc)
        return EXIT_ERROR
    summary = ", ".join(f"{counts.get(state, 0)} {state.value}" for state in JobState)
    extra = f"; handlers: {', '.join(handlers)}" if tasks else ""
    print(
        f"ok: queue {settings.name!r} on {settings.backend} at {where} answers: {summary}"
        f"{'; PAUSED' if paused else ''}{extra}"
    )
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m corral.worker",
        description="Run a corral worker. Settings come from QUEUE_* environment variables "
        "and .env; task modules from the arguments or QUEUE_TASKS.",
    )
    parser.add_argument("modules", nargs="*", metavar="MODULE", help="task module (or module:attr)")
    parser.add_argument(
        "--queue",
        "-q",
        action="append",
        default=[],
        metavar="NAME[:N]",
        help="a queue to serve, with its concurrency (repeat for several); default: QUEUE_NAMES, "
        "else the task modules' queues",
    )
    parser.add_argument("--concurrency", "-c", type=int, help="jobs run at once per queue")
    parser.add_argument(
        "--total-concurrency", type=int, help="jobs run at once over all queues of a process"
    )
    parser.add_argument("--burst", action="store_true", help="exit once the queue is drained")
    parser.add_argument("--processes", "-p", type=int, default=1, help="worker processes")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="default: QUEUE_LOG_LEVEL or info")
    parser.add_argument(
        "--log-format", choices=LOG_FORMATS, help="text or json; default: QUEUE_LOG_FORMAT or text"
    )
    parser.add_argument(
        "--check", action="store_true", help="health check: exit 0 if the backend answers"
    )
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this port (corral[metrics])"
    )
    parser.add_argument(
        "--metrics-host", default="127.0.0.1", help="address of --metrics-port (default 127.0.0.1)"
    )
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m corral.worker``."""
    args = _parser().parse_args(argv)
    if args.check:
        sys.exit(check(modules=tuple(args.modules)))
    try:
        code = serve(
            WorkerOptions(
                modules=tuple(args.modules),
                queues=tuple(args.queue),
                concurrency=args.concurrency,
                total_concurrency=args.total_concurrency,
                burst=args.burst,
                processes=args.processes,
                log_level=args.log_level,
                log_format=args.log_format,
                metrics_port=args.metrics_port,
                metrics_host=args.metrics_host,
                parent_pid=args.parent_pid,
            )
        )
    except KeyboardInterrupt:  # Ctrl-C before the worker's own handlers were installed
        code = 128 + signal.SIGINT
    exit_process(code)


if __name__ == "__main__":
    main()
