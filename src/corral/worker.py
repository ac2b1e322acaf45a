"""The worker process: ``python -m corral.worker`` and ``corral worker``.

A worker builds a :class:`~corral.service.QueueService` from the settings, gathers the handlers of
the task modules it is given (each defines a module-level ``QueueService`` and registers handlers
on it) and runs :meth:`~corral.service.QueueService.start_worker` until it is told to stop.

Signals: the first SIGTERM or SIGINT only asks the worker to stop (no new claims; jobs in flight
get ``shutdown_grace_s`` to finish, then are cancelled and released for a retry) and the process
exits 0. A second signal cancels everything at once and the process exits ``128 + signal``.

With ``--processes N`` a supervisor runs N worker processes, restarts one that dies (waiting
longer after each quick death, so a crash loop does not spin), forwards SIGTERM/SIGINT to them
and exits once they have.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from corral.errors import ConfigError, CorralError, TaskModuleError
from corral.handlers import running_sync_handlers
from corral.logs import LOG_FORMATS, LOG_LEVELS, configure_logging
from corral.message import JobState
from corral.service import QueueService
from corral.settings import QueueSettings, parse_queue_spec

logger = logging.getLogger("corral.worker")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2

_HARD_EXIT_DEADLINE_S = 10.0

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


# -- task modules -------------------------------------------------------------------------------


def load_task_services(spec: str) -> list[QueueService]:
    """The QueueService instances of the task module ``spec``.

    ``spec`` is a module name (``myapp.tasks``: every module-level QueueService in it) or
    ``module:attr`` (that one attribute). The working directory is importable, as with
    ``python -m``.

    Raises:
        TaskModuleError: the module is missing, fails to import or has no QueueService.
    """
    module_name, _, attr = spec.strip().partition(":")
    if not module_name or (":" in spec and not attr):
        raise TaskModuleError(f"task module {spec!r} is not 'package.module' or 'module:attr'")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise TaskModuleError(
                f"task module {module_name!r} was not found; run the worker from the "
                "directory that contains it or add that directory to PYTHONPATH"
            ) from None
        raise TaskModuleError(f"importing task module {module_name!r} failed: {exc}") from exc
    except CorralError:
        raise  # e.g. bad QUEUE_* settings met by the module's own QueueService(): already clear
    except Exception as exc:
        raise TaskModuleError(
            f"importing task module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if attr:
        found = getattr(module, attr, None)
        if not isinstance(found, QueueService):
            raise TaskModuleError(
                f"{module_name}:{attr} is {type(found).__name__}, not a QueueService"
                if found is not None or hasattr(module, attr)
                else f"task module {module_name!r} has no attribute {attr!r}"
            )
        return [found]
    services: list[QueueService] = []
    for value in vars(module).values():
        if isinstance(value, QueueService) and not any(value is s for s in services):
            services.append(value)
    if not services:
        raise TaskModuleError(
            f"task module {module_name!r} defines no QueueService; add "
            "`service = QueueService()` and register handlers with @service.handler(...)"
        )
    return services


@dataclass(slots=True)
class WorkerPlan:
    """What one worker process serves: a service with every handler, and its queues."""

    service: QueueService
    queues: list[QueueSettings]


def build_worker(
    overrides: Mapping[str, Any],
    task_modules: Sequence[str],
    queue_specs: Sequence[str] = (),
    *,
    concurrency: int | None = None,
) -> WorkerPlan:
    """The worker of the QueueServices the task modules define, with their own settings.

    The command line's settings (``overrides``) apply to each module's service where its code
    did not set them; where it did and they differ, that is a ConfigError. Every service must
    use one storage. The queues served are ``queue_specs`` (``name`` or ``name:concurrency``;
    else ``QUEUE_NAMES``), else the ``--queue`` override, else every service's queue.

    Raises:
        ConfigError: no or bad task modules, conflicting settings, several storages.
    """
    if not task_modules:
        raise ConfigError(
            "no task modules to load: name them (corral worker myapp.tasks) "
            "or set QUEUE_TASKS=myapp.tasks"
        )
    services: list[QueueService] = []
    for spec in task_modules:
        for found in load_task_services(spec):
            if not any(found is seen for seen in services):
                services.append(found)
    for service in services:
        _apply_overrides(service, overrides)
    storages = {service.settings.storage() for service in services}
    if len(storages) > 1:
        described = "; ".join(f"{service!r}" for service in services)
        raise ConfigError(
            "the task modules' services use different storages, and one worker serves one: "
            f"{described}. Run one worker per storage (corral worker module:service)"
        )
    primary = services[0].settings
    specs = list(queue_specs) or list(primary.names)
    if not specs:
        specs = [overrides["name"]] if "name" in overrides else []
    if not specs:
        specs = list(dict.fromkeys(service.settings.name for service in services))
    by_name = {service.settings.name: service.settings for service in services}
    queues: list[QueueSettings] = []
    for spec in specs:
        name, own_concurrency = parse_queue_spec(spec)
        settings = by_name.get(name) or primary.with_name(name)
        chosen = own_concurrency or concurrency or settings.concurrency
        queues.append(settings.model_copy(update={"concurrency": chosen}))
    names = [queue.name for queue in queues]
    if len(set(names)) != len(names):
        raise ConfigError(f"a queue is named twice: {', '.join(names)}")
    worker = QueueService(primary)
    for service in services:
        worker.include(service)
    return WorkerPlan(worker, queues)


def _apply_overrides(service: QueueService, overrides: Mapping[str, Any]) -> None:
    """Give ``service`` the command line's settings where its code set none of its own."""
    current = service.settings
    explicit = current.explicit
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if getattr(current, key, value) == value:
            continue
        if key in explicit:
            if key == "name":
                continue  # the queue it enqueues to; the worker serves the queues it is told
            raise ConfigError(
                f"{service!r} sets {key}={getattr(current, key)!r} in its code, and the "
                f"command line asks for {value!r}; remove one of the two"
            )
        changes[key] = value
    if changes:
        values = {key: getattr(current, key) for key in explicit}
        service.use_settings(QueueSettings(**values, **changes))


# -- one worker process -------------------------------------------------------------------------


async def run_worker(
    plan: WorkerPlan,
    *,
    total_concurrency: int | None = None,
    burst: bool = False,
    parent_pid: int | None = None,
) -> int:
    """Run the plan's worker with the signal handling of the entry points; return the exit
    code: 0 after a graceful stop or a drained burst, 1 after the worker stopped on its own
    (stuck handler threads), ``128 + signal`` after a second signal."""
    loop = asyncio.get_running_loop()
    service = plan.service
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
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _catch_early_signals() -> None:
    """Until the worker's event loop handles SIGTERM/SIGINT, remember them instead of dying, so a
    signal that arrives while the task modules import still means a graceful stop."""

    def remember(signum: int, frame: FrameType | None) -> None:
        _early_signals.append(signum)

    for sig in _STOP_SIGNALS:
        signal.signal(sig, remember)
    # A supervisor starts its workers with these signals blocked (see Supervisor._start); what
    # arrived since is delivered now, to the handler above.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _arm_hard_exit(code: int) -> None:
    """After a second signal, end the process even if a handler blocks the event loop."""

    def force() -> None:
        logger.error("still running %gs after the second signal; killing", _HARD_EXIT_DEADLINE_S)
        _flush_and_exit(code)

    timer = threading.Timer(_HARD_EXIT_DEADLINE_S, force)
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


# -- several worker processes -------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None
    done: bool = False


class Supervisor:
    """Run ``processes`` copies of a worker command; restart them, forward signals to them.

    The command starts with SIGTERM and SIGINT blocked and must unblock them once it can
    handle them (``python -m corral.worker`` does).
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        processes: int,
        env: Mapping[str, str] | None = None,
        burst: bool = False,
        restart_delay_s: float = 0.5,
        max_restart_delay_s: float = 30.0,
        healthy_after_s: float = 10.0,
        kill_after_s: float = _HARD_EXIT_DEADLINE_S,
    ) -> None:
        self.command = list(command)
        self.env = dict(env) if env is not None else None
        self.burst = burst
        self.restart_delay_s = restart_delay_s
        self.max_restart_delay_s = max_restart_delay_s
        self.healthy_after_s = healthy_after_s
        self.kill_after_s = kill_after_s
        self.slots = [_Slot(i) for i in range(processes)]
        self._signals: list[int] = []

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)  # the loop acts on it; a handler does nothing else

    def run(self) -> int:
        """Supervise until the children exit after a signal (or, with burst, drain); return the
        exit code: 0 if every child exited 0 at the end, else 1 (``128 + signal`` after a
        second signal)."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        for slot in self.slots:
            self._start(slot)
        signals_seen = 0
        forwarded: set[int] = set()
        hard_signal: int | None = None
        kill_at: float | None = None
        final_codes: dict[int, int] = {}
        while True:
            while self._signals:
                signum = self._signals.pop(0)
                signals_seen += 1
                forwarded.add(signum)
                name = signal.Signals(signum).name
                if signals_seen == 1:
                    logger.info("%s received: stopping the worker processes", name)
                elif signals_seen == 2:
                    logger.warning("%s received again: the worker processes exit at once", name)
                    hard_signal = signum
                    kill_at = time.monotonic() + self.kill_after_s
                for slot in self.slots:
                    if slot.process is not None:
                        with contextlib.suppress(ProcessLookupError):
                            slot.process.send_signal(signum)
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is None:
                    continue
                code = slot.process.poll()
                if code is None:
                    continue
                pid = slot.process.pid
                slot.process = None
                # A child that had not yet installed its handlers dies of the forwarded signal
                # itself; it held no job, so for a stop that is as good as a clean exit.
                final_codes[slot.index] = 0 if -code in forwarded else code
                if signals_seen:
                    logger.info(
                        "worker process %d (pid %d) exited: %s", slot.index + 1, pid, _how(code)
                    )
                elif self.burst and code == 0:
                    slot.done = True
                    logger.info("worker process %d (pid %d) drained the queue", slot.index + 1, pid)
                else:
                    slot.quick_deaths = (
                        0 if now - slot.started_at >= self.healthy_after_s else slot.quick_deaths
                    )
                    delay = min(
                        self.restart_delay_s * 2**slot.quick_deaths, self.max_restart_delay_s
                    )
                    slot.quick_deaths += 1
                    slot.restart_at = now + delay
                    logger.warning(
                        "worker process %d (pid %d) %s; restarting it in %.2fs",
                        slot.index + 1,
                        pid,
                        _how(code),
                        delay,
                    )
            alive = [s for s in self.slots if s.process is not None]
            if signals_seen and not alive:
                break
            if self.burst and not signals_seen and all(s.done for s in self.slots):
                break
            if not signals_seen:
                for slot in self.slots:
                    if slot.restart_at is not None and now >= slot.restart_at:
                        self._start(slot)
            if kill_at is not None and now >= kill_at:
                for slot in alive:
                    logger.error(
                        "worker process %d (pid %d) still running; killing it",
                        slot.index + 1,
                        slot.process.pid if slot.process else -1,
                    )
                    if slot.process is not None:
                        slot.process.kill()
                kill_at = None
            time.sleep(0.05)
        if hard_signal is not None:
            return 128 + hard_signal
        return EXIT_OK if all(code == 0 for code in final_codes.values()) else EXIT_ERROR

    def _start(self, slot: _Slot) -> None:
        slot.restart_at = None
        # A process group of its own: a terminal's Ctrl-C reaches only the supervisor, which
        # forwards it once; otherwise every child would see it twice and exit at once.
        # The child inherits a mask that blocks SIGTERM/SIGINT, so a signal forwarded while it
        # starts up waits until its worker can handle it instead of killing it half-started.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            slot.process = subprocess.Popen(self.command, env=self.env, process_group=0)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        slot.started_at = time.monotonic()
        logger.info(
            "worker process %d/%d started (pid %d)",
            slot.index + 1,
            len(self.slots),
            slot.process.pid,
        )


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


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
        return Supervisor(
            child_command(options, modules),
            processes=options.processes,
            env=child_env(options.overrides),
            burst=options.burst,
        ).run()
    logger.info(
        "queues %s on %s at %s; task modules: %s",
        queues,
        primary.backend,
        where,
        ", ".join(modules),
    )
    try:
        return asyncio.run(
            run_worker(
                plan,
                total_concurrency=options.total_concurrency,
                burst=options.burst,
                parent_pid=options.parent_pid,
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
                parent_pid=args.parent_pid,
            )
        )
    except KeyboardInterrupt:  # Ctrl-C before the worker's own handlers were installed
        code = 128 + signal.SIGINT
    exit_process(code)


if __name__ == "__main__":
    main()
