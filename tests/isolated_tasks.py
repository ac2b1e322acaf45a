"""Handlers for the isolation tests: a child process imports them by module and name."""

from __future__ import annotations

import ctypes
import os
from typing import Any

from corral import QueueMessage


def spin(message: QueueMessage) -> None:
    while True:  # never returns: only killing its process ends it
        pass


def hard_exit(message: QueueMessage) -> None:
    os._exit(3)


def segfault(message: QueueMessage) -> None:
    ctypes.string_at(0)


def double(message: QueueMessage) -> Any:
    return {"twice": message.data["n"] * 2, "pid": os.getpid(), "attempt": message.attempt}


def refuse(message: QueueMessage) -> None:
    raise ValueError(f"no good: {message.data}")


def unencodable(message: QueueMessage) -> Any:
    return {1, 2}
