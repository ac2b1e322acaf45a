"""The private event loop behind the ``*_sync`` calls of synchronous code (Django, Flask).

One loop in one daemon thread per service, with its own backend, made on the first call under a
lock (threaded web servers call from many threads at once) and released by ``close()``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from corral.backends.base import QueueBackend

logger = logging.getLogger("corral")

T = TypeVar("T")


class SyncRunner:
    """Runs coroutines for synchronous callers on a loop of its own, with a backend of its own."""

    def __init__(self, make_backend: Callable[[], QueueBackend]) -> None:
        self._make_backend = make_backend
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._backend: QueueBackend | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def _start(self) -> tuple[asyncio.AbstractEventLoop, QueueBackend]:
        with self._lock:
            if self._loop is None or self._backend is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="corral-sync", daemon=True)
                thread.start()
                self._backend = self._make_backend()
                self._loop, self._thread = loop, thread
                # A service dropped without close() still stops its thread.
                self._finalizer = weakref.finalize(self, _stop_loop, loop, thread)
            return self._loop, self._backend

    def run(self, call: Callable[[QueueBackend], Awaitable[T]]) -> T:
        loop, backend = self._start()

        async def invoke() -> T:
            return await call(backend)

        return asyncio.run_coroutine_threadsafe(invoke(), loop).result()

    def close(self) -> None:
        with self._lock:
            loop, backend, thread = self._loop, self._backend, self._thread
            self._loop = self._backend = self._thread = None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
        if loop is None or thread is None:
            return
        if backend is not None and not loop.is_closed():
            try:
                closing = asyncio.wait_for(backend.close(), 5.0)
                asyncio.run_coroutine_threadsafe(closing, loop).result(6.0)
            except Exception:  # closing is best effort
                logger.debug("closing the sync backend failed", exc_info=True)
        _stop_loop(loop, thread)


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if loop.is_closed():
        return

    async def finish() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.get_running_loop().stop()

    try:
        asyncio.run_coroutine_threadsafe(finish(), loop)
    except RuntimeError:
        return
    thread.join(5.0)
    if not thread.is_alive():
        loop.close()
