"""corral's web dashboard: every queue of a storage, their jobs, and the actions to manage them.

An ASGI application (Starlette), served by ``corral dashboard`` or mounted in another app::

    from fastapi import FastAPI
    from corral.dashboard import create_app

    app = FastAPI()
    app.mount("/queues", create_app(read_only=True))

It needs the ``dashboard`` extra: ``pip install 'corral[dashboard]'``. Pages are rendered on
the server from templates that escape everything; the style sheet and the small refresh script
ship in the package, so it works offline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from corral.errors import ConfigError, MissingDependencyError
from corral.settings import QueueSettings

if TYPE_CHECKING:
    from corral.dashboard.app import Dashboard
    from corral.dashboard.security import AuthCheck

DASHBOARD_EXTRA_HINT = "pip install 'corral[dashboard]'"

__all__ = ["DASHBOARD_EXTRA_HINT", "create_app"]


def create_app(
    settings: QueueSettings | None = None,
    *,
    read_only: bool = False,
    auth: AuthCheck | None = None,
    secret: str | None = None,
    refresh_s: float = 5.0,
    title: str = "corral",
) -> Dashboard:
    """The dashboard of the storage ``settings`` point at (every queue on it).

    Args:
        settings: where the queues are; by default from ``QUEUE_*`` variables and ``.env``.
        read_only: show everything, change nothing (no action is offered or accepted).
        auth: an app's own check, ``auth(request) -> bool`` (or awaitable): ``False`` answers
            403. Without it, ``QUEUE_DASHBOARD_USER``/``QUEUE_DASHBOARD_PASSWORD`` turn on HTTP
            basic auth; without those the dashboard is open to whoever reaches it.
        secret: the key of the forms' CSRF tokens (else ``QUEUE_DASHBOARD_SECRET``, else a
            random one per process: set one when several processes serve the app).
        refresh_s: how often an open page refreshes itself; 0 turns it off.
        title: shown in the header and the browser tab.

    Raises:
        MissingDependencyError: the ``dashboard`` extra is not installed.
    """
    try:
        from corral.dashboard.app import build_app
    except ImportError as exc:
        raise MissingDependencyError(
            f"the dashboard needs its extra ({exc.name or exc} is not installed); install it "
            f"with: {DASHBOARD_EXTRA_HINT}"
        ) from exc
    if isinstance(refresh_s, bool) or not isinstance(refresh_s, int | float) or refresh_s < 0:
        raise ConfigError(f"refresh_s must be a number of seconds >= 0, got {refresh_s!r}")
    return build_app(
        settings if settings is not None else QueueSettings(),
        read_only=read_only,
        auth=auth,
        secret=secret,
        refresh_s=float(refresh_s),
        title=title,
    )
