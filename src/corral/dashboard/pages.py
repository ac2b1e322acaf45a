"""The pages (GET): every queue of the storage, one queue's jobs by state, one job."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from corral import prometheus
from corral.dashboard.render import Renderer, Urls
from corral.dashboard.storage import Storage, next_job_id, states
from corral.errors import MissingDependencyError
from corral.message import JobInfo, JobState
from corral.schedules import ScheduleInfo

PAGE_SIZE = 50
SEARCH_WINDOW = 10_000
"""Job names one search step reads (see ``QueueBackend.search_jobs``)."""
MAX_PAGE = 1_000_000


@dataclass(frozen=True, slots=True)
class Pager:
    """Where a page of a job list is in its state."""

    page: int
    size: int
    total: int

    @property
    def first(self) -> int:
        return (self.page - 1) * self.size + 1

    @property
    def last(self) -> int:
        return min(self.total, self.page * self.size)

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    """A schedule on the schedules page, with its queue and its pending job."""

    queue: str
    schedule: ScheduleInfo
    pending_job_id: str | None


class Pages:
    """The GET handlers; each reads through :class:`Storage` and renders one template."""

    def __init__(self, storage: Storage, renderer: Renderer) -> None:
        self.storage = storage
        self.renderer = renderer

    async def overview(self, request: Request) -> Response:
        summaries = await self.storage.summaries()
        totals = {state: sum(s.counts.get(state, 0) for s in summaries) for state in states()}
        return self.renderer.page(
            request,
            "overview.html",
            {
                "summaries": summaries,
                "totals": totals,
                "states": states(),
                "show_workers": any(s.workers is not None for s in summaries),
                "show_throughput": any(s.throughput is not None for s in summaries),
            },
        )

    async def queue(self, request: Request) -> Response:
        queue = request.path_params["queue"]
        state = _state_param(request.query_params.get("state"))
        query = request.query_params.get("q", "").strip()[:200]
        page = _int_param(request.query_params.get("page"), 1, 1, MAX_PAGE)
        summary = await self.storage.summary(queue)
        schedules = await self.storage.schedules(queue)
        backend = self.storage.backend(queue)
        search_from = _int_param(request.query_params.get("from"), 0, 0, 2**62)
        jobs: list[JobInfo]
        next_from: int | None = None
        if query:
            exact = await backend.get_job(query)
            if exact is not None and not request.query_params.get("from"):
                return RedirectResponse(Urls(request).job(queue, exact.id), status_code=303)
            found = await backend.search_jobs(
                state, name=query, offset=search_from, limit=PAGE_SIZE, window=SEARCH_WINDOW
            )
            jobs, next_from = found.jobs, found.next_offset
        else:
            jobs = await backend.list_jobs(state, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        return self.renderer.page(
            request,
            "queue.html",
            {
                "queue": queue,
                "summary": summary,
                "state": state,
                "states": states(),
                "jobs": jobs,
                "query": query,
                "search_from": search_from,
                "next_from": next_from,
                "window": SEARCH_WINDOW,
                "pager": Pager(page, PAGE_SIZE, summary.counts.get(state, 0)),
                "schedules": schedules,
            },
        )

    async def schedules(self, request: Request) -> Response:
        """Every queue's schedules (or one queue's, ``?queue=``), the next to run first."""
        only = request.query_params.get("queue")
        queues = [only] if only else await self.storage.queues()
        rows = [
            ScheduleRow(queue, schedule, next_job_id(schedule))
            for queue in queues
            for schedule in await self.storage.schedules(queue)
        ]
        far = datetime.max.replace(tzinfo=UTC)
        rows.sort(key=lambda row: (row.schedule.next_run_at or far, row.queue, row.schedule.id))
        return self.renderer.page(request, "schedules.html", {"rows": rows, "only": only})

    async def workers(self, request: Request) -> Response:
        """The live workers of every queue (or of one, ``?queue=``)."""
        only = request.query_params.get("queue")
        found = await self.storage.all_workers()
        if only:
            found = [worker for worker in found if only in worker.queues]
        return self.renderer.page(request, "workers.html", {"workers": found, "only": only})

    async def metrics(self, request: Request) -> Response:
        """Prometheus metrics of every queue: jobs per state, live workers (the text format)."""
        queues = await self.storage.queues()
        gauges = await prometheus.read_gauges(queues, self.storage.counts, self.storage.all_workers)
        try:
            body, content_type = prometheus.exposition(lambda: prometheus.families(None, gauges))
        except MissingDependencyError as exc:
            return Response(str(exc), status_code=503, media_type="text/plain")
        return Response(body, media_type=content_type)

    async def job(self, request: Request) -> Response:
        queue = request.path_params["queue"]
        job_id = request.path_params["job_id"]
        job = await self.storage.backend(queue).get_job(job_id)
        if job is None:
            return self.renderer.page(
                request,
                "missing.html",
                {"queue": queue, "what": f"No job with id {job_id} in queue {queue}."},
                status=404,
            )
        return self.renderer.page(
            request,
            "job.html",
            {
                "queue": queue,
                "job": job,
                "progress_percent": _percent(job.progress),
                "related": await self.storage.related(job),
            },
        )


def _state_param(value: str | None) -> JobState:
    try:
        return JobState(value) if value else JobState.WAITING
    except ValueError:
        return JobState.WAITING


def _int_param(value: str | None, default: int, low: int, high: int) -> int:
    if value is None or not value.isdigit() or len(value) > 19:
        return default
    return min(high, max(low, int(value)))


def _percent(progress: object) -> float | None:
    """A numeric progress between 0 and 100 (a bar is drawn); anything else is shown as JSON."""
    if isinstance(progress, bool) or not isinstance(progress, int | float):
        return None
    return float(progress) if 0 <= progress <= 100 else None
