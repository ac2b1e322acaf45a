"""The dashboard as a Starlette application: routes, the guard in front, the storage behind."""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from corral.dashboard.actions import Actions
from corral.dashboard.pages import Pages
from corral.dashboard.render import HERE, NavItem, Renderer
from corral.dashboard.security import AuthCheck, Csrf, Guard
from corral.dashboard.storage import Storage
from corral.errors import BackendError
from corral.settings import QueueSettings

logger = logging.getLogger("corral.dashboard")


class Dashboard(Starlette):
    """The dashboard's ASGI app; ``storage`` is what it reads (close it with :meth:`aclose`
    when the app is mounted in another, whose shutdown does not reach a mounted app)."""

    storage: Storage

    async def aclose(self) -> None:
        """Close the storage's connections."""
        await self.storage.close()


def build_app(
    settings: QueueSettings,
    *,
    read_only: bool,
    auth: AuthCheck | None,
    secret: str | None,
    refresh_s: float,
    title: str,
) -> Dashboard:
    storage = Storage(settings)
    key = secret or settings.dashboard_secret
    csrf = Csrf(key.encode("utf-8") if key else secrets.token_bytes(32))
    # A page per concern; a capability that a later version adds (workers, schedules) is one
    # more entry here and a handler in pages.py.
    nav = [
        NavItem("/", "Queues"),
        NavItem("/schedules", "Schedules"),
        NavItem("/workers", "Workers"),
    ]
    renderer = Renderer(
        csrf=csrf,
        title=title,
        where=storage.where,
        read_only=read_only,
        refresh_s=refresh_s,
        nav=nav,
    )
    pages = Pages(storage, renderer)
    actions = Actions(storage, csrf, read_only=read_only)

    async def failed(request: Request, exc: Exception) -> Response:
        logger.warning("dashboard: %s", exc)
        return renderer.page(
            request,
            "missing.html",
            {"queue": None, "what": f"The queue storage did not answer: {exc}"},
            status=503,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await storage.close()

    app = Dashboard(
        routes=[
            Route("/", pages.overview, name="overview"),
            Route("/schedules", pages.schedules, name="schedules"),
            Route("/workers", pages.workers, name="workers"),
            Route("/metrics", pages.metrics, name="metrics"),
            Route("/queues/{queue}", pages.queue, name="queue"),
            Route("/queues/{queue}/jobs/{job_id:path}", pages.job, name="job"),
            Route(
                "/queues/{queue}/actions/{action}", actions.handle, methods=["POST"], name="action"
            ),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        exception_handlers={BackendError: failed},
        lifespan=lifespan,
    )
    app.storage = storage
    basic = None
    if settings.dashboard_user is not None and settings.dashboard_password is not None:
        basic = (settings.dashboard_user, settings.dashboard_password)
    app.add_middleware(Guard, auth=auth, basic=basic)
    return app
