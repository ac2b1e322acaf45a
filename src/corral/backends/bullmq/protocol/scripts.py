"""The pinned ``bullmq`` package's Lua scripts: which ones corral runs, their text, how many KEYS
each declares, and how their arguments are packed.

A :class:`ScriptCall` is one invocation, built by :mod:`~corral.backends.bullmq.protocol.calls`
and sent by :mod:`corral.backends.bullmq.connection`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from typing import Any, NamedTuple

import bullmq
import msgpack  # type: ignore[import-untyped]
from bullmq.redis_connection import SCRIPT_DEFINITIONS, loadScript

LIB_VERSION = f"bullmq:{bullmq.__version__}"
"""What corral records in the queue's ``meta`` hash (``version``), in the ``<lib>:<version>`` form
Node's ``Queue`` writes: the package whose scripts write corral's jobs."""

# The package's scripts, and those it ships without registering them.
SCRIPT_FILES: dict[str, str] = {
    **SCRIPT_DEFINITIONS,
    "moveJobFromActiveToWait": "moveJobFromActiveToWait-9.lua",
    "addLog": "addLog-2.lua",
}

ADD_SCRIPTS = ("addStandardJob", "addDelayedJob", "addPrioritizedJob", "addParentJob")


class ScriptCall(NamedTuple):
    """One script invocation: the script's name, its KEYS and its ARGV."""

    script: str
    keys: list[str]
    args: list[Any]


@cache
def script_source(name: str) -> str:
    """The Lua text of the script ``name``."""
    source: str = loadScript(SCRIPT_FILES[name])
    return source


def declared_key_count(name: str) -> int:
    """How many KEYS the script ``name`` takes (the ``-N`` of its file name)."""
    match = re.search(r"-(\d+)\.lua$", SCRIPT_FILES[name])
    assert match is not None
    return int(match.group(1))


def pack(value: Any) -> bytes:
    """An argument the scripts unpack with ``cmsgpack.unpack``."""
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def flat_fields(fields: Mapping[str, str]) -> bytes:
    """Fields to set on a job hash, as the ``fieldsToUpdate`` argument: a packed flat array."""
    flat: list[str] = []
    for key, value in fields.items():
        flat += (key, value)
    return pack(flat)
