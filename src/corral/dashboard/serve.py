"""``corral dashboard``: the dashboard on its own, served by uvicorn (imported when the
command runs, as ``corral bench`` is)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from corral._cliutil import cli_state, corral_errors
from corral.dashboard import DASHBOARD_EXTRA_HINT, create_app
from corral.errors import MissingDependencyError
from corral.settings import QueueSettings, is_loopback_host

logger = logging.getLogger("corral.dashboard")


def serve_dashboard(
    settings: QueueSettings,
    *,
    host: str,
    port: int,
    read_only: bool,
    refresh_s: float = 5.0,
    log_level: str | None = None,
) -> int:
    """Serve until interrupted; return the exit code."""
    app = create_app(settings, read_only=read_only, refresh_s=refresh_s)
    try:
        import uvicorn
    except ImportError as exc:
        raise MissingDependencyError(
            f"the dashboard needs its extra (uvicorn is not installed); install it with: "
            f"{DASHBOARD_EXTRA_HINT}"
        ) from exc
    protected = settings.dashboard_user is not None
    if not is_loopback_host(host) and not protected:
        logger.warning(
            "the dashboard listens on %s without a password: anyone who reaches it can see "
            "every job%s; set QUEUE_DASHBOARD_USER and QUEUE_DASHBOARD_PASSWORD",
            host,
            "" if read_only else " and change the queues",
        )
    where = settings.sqlite_path if settings.backend == "sqlite" else settings.redis_url_redacted
    shown = f"[{host}]" if ":" in host else host
    print(  # the one line a person starting it looks for
        f"corral dashboard of {settings.backend} at {where} on http://{shown}:{port}/"
        f"{' (read-only)' if read_only else ''}",
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=(log_level or "warning").lower(),
        access_log=False,
        server_header=False,
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


def dashboard_command(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 exposes it to the network")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on")] = 8000,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Show everything, change nothing")
    ] = False,
    refresh_s: Annotated[
        float, typer.Option("--refresh-s", min=0, help="Open pages refresh this often; 0 = off")
    ] = 5.0,
) -> None:
    """Serve the web dashboard of every queue on the storage (needs corral[dashboard])."""
    state = cli_state(ctx)
    with corral_errors():
        code = serve_dashboard(
            state.settings(),
            host=host,
            port=port,
            read_only=read_only,
            refresh_s=refresh_s,
            log_level=state.log_level,
        )
    raise typer.Exit(code)
