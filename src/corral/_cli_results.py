"""The ``corral wait`` and ``corral cancel`` commands (registered by :mod:`corral.cli`): wait
for a job's result, cancel a job."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer

from corral._cliutil import fail
from corral.errors import JobFailedError, WaitTimeoutError
from corral.service import QueueService

T = TypeVar("T")
Runner = Callable[[typer.Context, Callable[[QueueService], Awaitable[T]]], T]

EXIT_FAILED = 1
EXIT_TIMEOUT = 124
"""As timeout(1) exits when the command ran out of time."""


def register(app: typer.Typer, run: Runner[Any]) -> None:
    """Add ``corral wait`` and ``corral cancel`` to ``app``; ``run`` runs a call on the queue
    (cli.run)."""

    @app.command()
    def cancel(
        ctx: typer.Context,
        job_id: Annotated[str, typer.Argument(metavar="ID", help="The job's id")],
        reason: Annotated[
            str | None, typer.Option("--reason", help="Why; the failed attempt's error says it")
        ] = None,
    ) -> None:
        """Cancel a job: remove it if it has not started, else ask its worker to stop it (the
        attempt fails as cancelled, with no retry)."""

        async def call(service: QueueService) -> bool:
            return await service.cancel(job_id, reason)

        if not run(ctx, call):
            fail(f"job {job_id} is not waiting, delayed or running")
        typer.echo(f"cancelled job {job_id}")

    @app.command()
    def wait(
        ctx: typer.Context,
        job_id: Annotated[str, typer.Argument(metavar="ID", help="The job's id")],
        timeout_s: Annotated[
            float | None,
            typer.Option("--timeout-s", min=0.001, help="Give up after this [default: never]"),
        ] = None,
    ) -> None:
        """Wait for a job to finish; print its result as JSON (exit 0), or why it failed
        (exit 1); exit 124 if it did not finish within --timeout-s."""

        async def call(service: QueueService) -> tuple[int, str]:
            try:
                result = await service.wait_for(job_id, timeout_s=timeout_s)
            except JobFailedError as exc:
                return EXIT_FAILED, exc.reason
            except WaitTimeoutError as exc:
                return EXIT_TIMEOUT, str(exc)
            return 0, json.dumps(result)

        code, text = run(ctx, call)
        typer.echo(text, err=code != 0)
        raise typer.Exit(code)
