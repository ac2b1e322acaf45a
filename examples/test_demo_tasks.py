"""Testing handlers with corral.testing: the demo's task module, run in-process.

Run with ``pytest examples`` (``make test`` runs it too). The send_email handler fails its first
attempt and is retried after 0.3 s; the runner fast-forwards the wait.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import demo_tasks
import pytest

from corral import JobState
from corral.testing import JobRunner, isolated


@pytest.fixture
async def jobs() -> AsyncIterator[JobRunner]:
    async with isolated(demo_tasks.service) as runner:
        yield runner


async def test_a_flaky_email_is_sent_on_its_second_attempt(jobs: JobRunner) -> None:
    job_id = await demo_tasks.service.enqueue("send_email", {"to": "ada@example.com"})
    done = await jobs.run()
    assert done[job_id].state is JobState.COMPLETED
    assert done[job_id].result == {"delivered_to": "ada@example.com", "attempt": 2}


async def test_a_negative_charge_fails_without_retries(jobs: JobRunner) -> None:
    job_id = await demo_tasks.service.enqueue("charge_card", {"cents": -5})
    done = await jobs.run()
    assert done[job_id].state is JobState.FAILED
    assert done[job_id].attempts_made == 1  # UnrecoverableError: no second attempt
    assert "cannot charge -5 cents" in (done[job_id].error or "")
