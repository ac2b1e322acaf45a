"""The actions (POST, CSRF-checked, refused in read-only mode): each changes the storage through
the seam and sends the browser back with a notice saying what happened."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from corral.dashboard.render import Urls, set_notice
from corral.dashboard.security import Csrf, FormError, read_form
from corral.dashboard.storage import Storage
from corral.errors import CorralError
from corral.message import JobState

Form = dict[str, str]


class Refused(Exception):
    """An action's input was wrong; the message goes to the page as an error notice."""


class Actions:
    """The POST handler and one method per action."""

    def __init__(self, storage: Storage, csrf: Csrf, *, read_only: bool) -> None:
        self.storage = storage
        self.csrf = csrf
        self.read_only = read_only
        self.handlers: dict[str, Callable[[str, Form], Awaitable[tuple[str, str | None]]]] = {
            "pause": self.pause,
            "resume": self.resume,
            "retry-all": self.retry_all,
            "clean": self.clean,
            "enqueue": self.enqueue,
            "retry": self.retry,
            "remove": self.remove,
            "promote": self.promote,
        }

    async def handle(self, request: Request) -> Response:
        if self.read_only:
            return PlainTextResponse("the dashboard is read-only", status_code=403)
        handler = self.handlers.get(request.path_params["action"])
        if handler is None:
            return PlainTextResponse("no such action", status_code=404)
        try:
            form = await read_form(request)
        except FormError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        refusal = self.csrf.check(request, form)
        if refusal is not None:
            return PlainTextResponse(refusal, status_code=403)
        queue = request.path_params["queue"]
        urls = Urls(request)
        back = form.get("next", "")
        target = back if urls.is_own(back) else urls.queue(queue)
        try:
            message, goto = await handler(queue, form)
            kind = "ok"
        except (Refused, CorralError) as exc:
            message, goto, kind = str(exc), None, "error"
        finally:
            self.storage.changed(queue)
        if goto is not None:
            target = urls.job(queue, goto)
        response = RedirectResponse(target, status_code=303)
        set_notice(response, request, kind, message)
        return response

    # -- the queue -------------------------------------------------------------------------

    async def pause(self, queue: str, form: Form) -> tuple[str, str | None]:
        await self.storage.backend(queue).pause()
        self.storage.known(queue)
        return f"Paused queue {queue}: workers start no new jobs.", None

    async def resume(self, queue: str, form: Form) -> tuple[str, str | None]:
        await self.storage.backend(queue).resume()
        return f"Resumed queue {queue}.", None

    async def retry_all(self, queue: str, form: Form) -> tuple[str, str | None]:
        moved = await self.storage.backend(queue).retry_failed()
        return f"Moved {moved:,} failed job(s) back to waiting.", None

    async def clean(self, queue: str, form: Form) -> tuple[str, str | None]:
        state = form.get("state", "")
        if state not in (JobState.COMPLETED.value, JobState.FAILED.value):
            raise Refused("choose completed or failed jobs to clean")
        older_than_min = _number(form.get("older_than_min", "0"), "older than (minutes)")
        keep = int(_number(form.get("keep", "0"), "keep the newest", whole=True))
        deleted = await self.storage.backend(queue).clean(
            JobState(state), older_than_ms=round(older_than_min * 60_000), keep=keep
        )
        return f"Deleted {deleted:,} {state} job(s).", None

    async def enqueue(self, queue: str, form: Form) -> tuple[str, str | None]:
        name = form.get("name", "").strip()
        text = form.get("data", "").strip() or "null"
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise Refused(f"the data is not valid JSON ({exc})") from None
        attempts = form.get("attempts", "").strip()
        job = self.storage.service.build_job(
            name,
            data,
            queue=queue,
            delay_s=_number(form.get("delay_s", "0"), "delay (s)"),
            priority=int(_number(form.get("priority", "0"), "priority", whole=True)),
            attempts=int(_number(attempts, "attempts", whole=True)) if attempts else None,
            job_id=form.get("job_id", "").strip() or None,
        )
        (job_id,) = await self.storage.backend(queue).enqueue([job])
        self.storage.known(queue)
        return f"Enqueued job {job_id} ({name}).", job_id

    # -- one job ---------------------------------------------------------------------------

    async def retry(self, queue: str, form: Form) -> tuple[str, str | None]:
        job_id = _job_id(form)
        if not await self.storage.backend(queue).retry_job(job_id):
            raise Refused(f"job {job_id} is not failed; only failed jobs are retried")
        return f"Job {job_id} is waiting again, with fresh attempts.", None

    async def remove(self, queue: str, form: Form) -> tuple[str, str | None]:
        job_id = _job_id(form)
        if not await self.storage.backend(queue).remove(job_id):
            raise Refused(f"there is no job {job_id}")
        return f"Removed job {job_id}.", None

    async def promote(self, queue: str, form: Form) -> tuple[str, str | None]:
        job_id = _job_id(form)
        if not await self.storage.backend(queue).promote(job_id):
            raise Refused(f"job {job_id} is not delayed")
        return f"Job {job_id} is due now.", None


def _job_id(form: Form) -> str:
    job_id = form.get("job_id", "")
    if not job_id:
        raise Refused("no job id was given")
    return job_id


def _number(text: str, what: str, *, whole: bool = False) -> float:
    text = text.strip() or "0"
    try:
        value = float(text) if not whole else float(int(text))
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise Refused(f"{what} must be {kind} >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise Refused(f"{what} must be >= 0, got {text!r}")
    return value
