"""Pages from the templates in ``templates/``, every value escaped.

Jinja2 escapes everything a template prints (``autoescape=True`` for every template, whatever its
name), and nothing here marks text as safe: job data, results, errors, tracebacks, logs, names
and ids are untrusted and reach the page as text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from corral import __version__
from corral.dashboard.security import Csrf, cookie_path
from corral.message import JobState
from corral.metrics import Throughput

HERE = Path(__file__).resolve().parent
NOTICE_COOKIE = "corral_notice"


@dataclass(frozen=True, slots=True)
class NavItem:
    """A page in the header's navigation: its path below the dashboard's root and title."""

    path: str
    title: str


class Urls:
    """Paths of the dashboard's pages under wherever it is mounted (``root_path``). Ids and
    queue names are percent-encoded: a Node.js job id may hold ``?``, ``#`` or ``/``."""

    def __init__(self, request: Request) -> None:
        self.root = str(request.scope.get("root_path", "")).rstrip("/")

    def home(self) -> str:
        return self.root + "/"

    def page(self, path: str, **query: Any) -> str:
        return self.root + path + _query(query)

    def static(self, name: str) -> str:
        return f"{self.root}/static/{name}?v={__version__}"

    def queue(self, queue: str, **query: Any) -> str:
        return f"{self.root}/queues/{quote(queue, safe='')}" + _query(query)

    def job(self, queue: str, job_id: str) -> str:
        return f"{self.root}/queues/{quote(queue, safe='')}/jobs/{quote(job_id, safe='')}"

    def action(self, queue: str, action: str) -> str:
        return f"{self.root}/queues/{quote(queue, safe='')}/actions/{action}"

    def is_own(self, path: str) -> bool:
        """Whether ``path`` is a page of this dashboard (where an action may send you back)."""
        return (
            path.startswith(self.root + "/")
            and not path.startswith("//")
            and "\\" not in path
            and all(ch.isprintable() for ch in path)
        )


def _query(values: Mapping[str, Any]) -> str:
    kept = {key: value for key, value in values.items() if value not in (None, "", 0)}
    return "?" + urlencode(kept) if kept else ""


class Renderer:
    """The template environment and what every page gets: URLs, the CSRF token, the notice
    left by the last action, the navigation."""

    def __init__(
        self,
        *,
        csrf: Csrf,
        title: str,
        where: str,
        read_only: bool,
        refresh_s: float,
        nav: Sequence[NavItem],
    ) -> None:
        self.csrf = csrf
        self.globals = {
            "title": title,
            "where": where,
            "read_only": read_only,
            "refresh_s": refresh_s,
            "nav": list(nav),
            "version": __version__,
            "FAILED": JobState.FAILED,
        }
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            ago=ago,
            utc=utc,
            pretty=pretty,
            compact=compact,
            num=num,
            short=short,
            chart=chart,
            seconds=seconds,
        )

    def page(
        self, request: Request, template: str, context: Mapping[str, Any], *, status: int = 200
    ) -> Response:
        cookie = self.csrf.cookie_of(request)
        fresh_cookie = cookie is None
        if cookie is None:
            cookie = self.csrf.new_cookie()
        notice = read_notice(request)
        html = self.env.get_template(template).render(
            **self.globals,
            **context,
            request=request,
            urls=Urls(request),
            here=here(request),
            csrf_token=self.csrf.token(cookie),
            notice=notice,
            now=datetime.now(UTC),
        )
        response = HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})
        if fresh_cookie:
            self.csrf.set_cookie(response, request, cookie)
        if notice is not None:
            response.delete_cookie(NOTICE_COOKIE, path=cookie_path(request))
        return response


# -- the notice an action leaves for the page it sends you to --------------------------------


def set_notice(response: Response, request: Request, kind: str, text: str) -> None:
    response.set_cookie(
        NOTICE_COOKIE,
        quote(f"{kind}:{text[:500]}", safe=""),
        path=cookie_path(request),
        httponly=True,
        samesite="strict",
        max_age=60,
    )


def read_notice(request: Request) -> tuple[str, str] | None:
    raw = request.cookies.get(NOTICE_COOKIE)
    if not raw:
        return None
    kind, _, text = unquote(raw).partition(":")
    return ("error" if kind == "error" else "ok", text)


# -- filters ---------------------------------------------------------------------------------


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """``3 min ago``, ``in 20 s``: how far ``moment`` is from now."""
    if moment is None:
        return "—"
    now = now or datetime.now(UTC)
    seconds = (now - moment).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 1:
        return "just now"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min"), (1, "s")):
        if seconds >= size:
            amount = f"{math.floor(seconds / size)} {unit}"
            return f"in {amount}" if future else f"{amount} ago"
    return "just now"


def utc(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def pretty(value: Any) -> str:
    """A JSON value as indented text (shown in ``<pre>``, escaped like everything else)."""
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)
    except (TypeError, ValueError):
        return repr(value)


def compact(value: Any) -> str:
    """A JSON value on one line."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def here(request: Request) -> str:
    """This page's path and query, as the browser asked for it (where an action sends the
    browser back to)."""
    raw = request.scope.get("raw_path")
    if isinstance(raw, bytes) and raw:
        path = raw.decode("latin-1").split("?")[0]
    else:
        path = quote(str(request.scope.get("path", "/")), safe="/")
    query = request.url.query
    return path + ("?" + query if query else "")


def seconds(value: float | None) -> str:
    """An interval as people say it: ``90 s``, ``5 min``, ``2 h``, ``1 d 6 h``."""
    if value is None:
        return ""
    total = float(value)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if total >= size and total % size == 0:
            return f"{int(total // size)} {unit}"
    if total >= 86400:
        return f"{int(total // 86400)} d {int(total % 86400 // 3600)} h"
    return f"{total:g} s"


def num(value: int) -> str:
    return f"{value:,}"


def short(text: str | None, width: int = 80) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


@dataclass(frozen=True, slots=True)
class Chart:
    """An SVG chart's geometry, computed here so the template only prints numbers."""

    width: int
    height: int
    completed: str
    failed: str
    peak: int
    minutes: int
    total_completed: int
    total_failed: int


def chart(throughput: Throughput, width: int = 600, height: int = 120) -> Chart:
    """Polylines of jobs per minute (completed and failed) scaled to ``width`` by ``height``."""
    points = max(len(throughput.completed), len(throughput.failed), 2)
    peak = max([1, *throughput.completed, *throughput.failed])

    def line(values: list[int]) -> str:
        padded = [0] * (points - len(values)) + list(values)
        step = width / (points - 1)
        return " ".join(
            f"{i * step:.1f},{height - (value / peak) * (height - 4) - 2:.1f}"
            for i, value in enumerate(padded)
        )

    return Chart(
        width=width,
        height=height,
        completed=line(throughput.completed),
        failed=line(throughput.failed),
        peak=peak,
        minutes=points,
        total_completed=sum(throughput.completed),
        total_failed=sum(throughput.failed),
    )
