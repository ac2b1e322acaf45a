"""Moving jobs between queues and backends.

BullMQ has no script that writes a job in a given state with its attempts and error, so a moved
job is added by the package's own add scripts (waiting, prioritized, delayed: they keep markers,
counters and paused queues right) and its history set on its hash in the same MULTI; a failed
job is written as moveToFinished leaves one (its hash, and its id in the ``failed`` set scored by
``finishedOn``). The small scripts here are corral's own and only read, or raise a counter.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

READ_JOBS_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    local v = redis.call('HMGET', key, 'name', 'data')
    out[i] = {1, v[1] or '', v[2] or ''}
  else
    out[i] = {0, '', ''}
  end
end
return out
"""
"""For each job key: ``[exists, name, data]``."""

EXPORT_JOBS_LUA = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = {redis.call('HGETALL', key), redis.call('LRANGE', key .. ':logs', 0, -1)}
end
return out
"""
"""For each job key: ``[flat hash fields, log lines]`` (one round trip for a batch)."""

IN_STATE_LUA = """
local out = {}
local n = 0
for i = 2, #ARGV, 2 do
  local id, state = ARGV[i], ARGV[i + 1]
  local there = 0
  if redis.call('EXISTS', ARGV[1] .. id .. ':lock') == 0 then
    if state == 'waiting' then
      if redis.call('ZSCORE', KEYS[3], id) or redis.call('LPOS', KEYS[1], id, 'RANK', -1)
          or redis.call('LPOS', KEYS[2], id, 'RANK', -1) then
        there = 1
      end
    elseif state == 'delayed' then
      if redis.call('ZSCORE', KEYS[4], id) then there = 1 end
    elseif state == 'failed' then
      if redis.call('ZSCORE', KEYS[5], id) then there = 1 end
    end
  end
  n = n + 1
  out[n] = there
end
return out
"""
"""KEYS: wait, paused, prioritized, delayed, failed; ARGV: the job key prefix, then pairs of job
id and corral state. For each pair 1 if the job is unlocked and in that state, else 0. A moved
job is searched from the tail of the wait list, where the oldest (the first exported) are."""

RAISE_ID_LUA = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return current
"""
"""Raise the queue's ``id`` counter to at least ARGV[1]: the add scripts do not check that a
generated id is free, so a moved job keeping a queue-assigned number must stay below it."""

MOVABLE_SETS = ("wait", "paused", "prioritized", "delayed", "failed")


def history_fields(
    *,
    attempts_made: int,
    error: str | None,
    tracebacks: Sequence[str],
    progress_json: str | None,
) -> dict[str, str]:
    """The fields a job's past attempts leave on its hash (set on a moved job after its add)."""
    fields: dict[str, str] = {}
    if attempts_made:
        fields["atm"] = str(attempts_made)
        fields["ats"] = str(attempts_made)
    if error is not None:
        fields["failedReason"] = error
    if tracebacks:
        fields["stacktrace"] = json.dumps(list(tracebacks), ensure_ascii=False)
    if progress_json is not None:
        fields["progress"] = progress_json
    return fields


def failed_job_fields(
    *,
    name: str,
    data_json: str,
    opts: Mapping[str, Any],
    timestamp: int,
    priority: int,
    finished_at: int,
) -> dict[str, str]:
    """The hash of a failed job as moveToFinished leaves it (without its history fields)."""
    return {
        "name": name,
        "data": data_json,
        "opts": json.dumps(dict(opts), separators=(",", ":")),
        "timestamp": str(timestamp),
        "delay": "0",
        "priority": str(priority),
        "processedOn": str(finished_at),
        "finishedOn": str(finished_at),
    }


def is_generated_id(job_id: str) -> bool:
    """Whether ``job_id`` is one the queue assigns itself (a decimal integer)."""
    return job_id.isascii() and job_id.isdigit() and str(int(job_id)) == job_id
