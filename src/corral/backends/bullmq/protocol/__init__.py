"""BullMQ's protocol: key names, Lua scripts, their KEYS/ARGV, and what their replies mean.

The one package that touches the ``bullmq`` package's internals (its Lua scripts and key table) and
packs its arguments, so a ``bullmq`` upgrade changes this package only; ``tests/test_protocol.py``
checks every call built here against the scripts' declared key counts and the package's own
argument builders, and that no other module imports ``bullmq``. Nothing here does I/O: a call is a
:class:`ScriptCall` that :mod:`corral.backends.bullmq.connection` sends.

Redis layout for prefix ``bull`` and queue ``q`` (all BullMQ's): the job hash ``bull:q:<id>``
(``name``, ``data``, ``opts``, ``timestamp``, ``atm`` = attempts made, ``returnvalue``,
``failedReason``, ``stacktrace``, ...), its ``:lock`` and ``:logs``, the lists ``wait``,
``active`` and (legacy) ``paused``, the sorted sets ``prioritized``, ``delayed``, ``completed``,
``failed``, ``marker`` (wakes blocked workers), the ``meta`` hash (``paused``, ``version``, global
rate limit) and the ``events`` stream.

Layers, imported one way, down: :mod:`.calls` (:class:`Protocol`: the script call of each
operation) -> :mod:`.options` (a job's ``opts``, written and read back) -> :mod:`.replies` (reply
codes and the next leased job; lenient field readers); :mod:`.calls` -> :mod:`.keys` (the key
table) and :mod:`.scripts` (the pinned package's scripts, :class:`ScriptCall`, argument packing).
:mod:`.transfer` holds corral's own small scripts and fields for moving jobs between queues.
"""

from __future__ import annotations

from corral.backends.bullmq.protocol.calls import Protocol
from corral.backends.bullmq.protocol.keys import (
    CLEAN_SETS,
    COUNT_TYPES,
    DELAY_SCORE_FACTOR,
    DEPENDENCY_SETS,
    Keys,
)
from corral.backends.bullmq.protocol.options import (
    POLICY_FLAGS,
    JobOptions,
    ParentLink,
    dedup_opts,
    job_options,
    keep_jobs,
    lenient_backoff,
    max_attempts,
    stacktrace,
)
from corral.backends.bullmq.protocol.replies import (
    FINISH_ERRORS,
    FLOW_ERRORS,
    JOB_OF_SCHEDULER,
    SCHEDULER_ERRORS,
    STATES,
    NextJob,
    as_int,
    json_list,
    json_object,
    parse_next_job,
)
from corral.backends.bullmq.protocol.scripts import (
    ADD_SCRIPTS,
    LIB_VERSION,
    SCRIPT_FILES,
    ScriptCall,
    declared_key_count,
    flat_fields,
    pack,
    script_source,
)
from corral.backends.bullmq.protocol.transfer import (
    EXPORT_JOBS_LUA,
    IN_STATE_LUA,
    MOVABLE_SETS,
    RAISE_ID_LUA,
    READ_JOBS_LUA,
    failed_job_fields,
    history_fields,
    is_generated_id,
)

__all__ = [
    "ADD_SCRIPTS",
    "CLEAN_SETS",
    "COUNT_TYPES",
    "DELAY_SCORE_FACTOR",
    "DEPENDENCY_SETS",
    "EXPORT_JOBS_LUA",
    "FINISH_ERRORS",
    "FLOW_ERRORS",
    "IN_STATE_LUA",
    "JOB_OF_SCHEDULER",
    "LIB_VERSION",
    "MOVABLE_SETS",
    "POLICY_FLAGS",
    "RAISE_ID_LUA",
    "READ_JOBS_LUA",
    "SCHEDULER_ERRORS",
    "SCRIPT_FILES",
    "STATES",
    "JobOptions",
    "Keys",
    "NextJob",
    "ParentLink",
    "Protocol",
    "ScriptCall",
    "as_int",
    "declared_key_count",
    "dedup_opts",
    "failed_job_fields",
    "flat_fields",
    "history_fields",
    "is_generated_id",
    "job_options",
    "json_list",
    "json_object",
    "keep_jobs",
    "lenient_backoff",
    "max_attempts",
    "pack",
    "parse_next_job",
    "script_source",
    "stacktrace",
]
