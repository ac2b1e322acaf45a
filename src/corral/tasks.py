"""Task modules: finding the QueueServices a worker serves, and what it serves of them.

A task module is a module name (every module-level ``QueueService`` in it) or ``module:attr``.
The worker serves those services with their own settings; the command line fills in what their
code did not set (see :func:`build_worker`).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from corral.errors import ConfigError, CorralError, TaskModuleError
from corral.service import QueueService
from corral.settings import QueueSettings, parse_queue_spec


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
