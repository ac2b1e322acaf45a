"""What keeps the dashboard safe: who may see it, that actions come from its own pages, and
response headers that keep untrusted job data inert.

- **Auth**: an ``auth`` callable given to :func:`~corral.dashboard.create_app` (an app that
  mounts the dashboard decides with its own sessions), else HTTP basic auth with
  ``QUEUE_DASHBOARD_USER``/``QUEUE_DASHBOARD_PASSWORD``, else none (the command binds to
  127.0.0.1 by default).
- **CSRF**: actions are POSTs carrying a token: an HMAC of a random cookie (``SameSite=Strict``,
  ``HttpOnly``) under the dashboard's secret. Another site can neither read the cookie nor make
  the token; requests from other sites (``Sec-Fetch-Site``) are refused before that.
- **Headers**: a Content-Security-Policy that allows only the dashboard's own script and style
  files (no inline script, no inline style), so even markup that slipped through escaping
  could not run.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import inspect
import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

AuthCheck = Callable[[Request], bool | Awaitable[bool]]
"""An app's own check: given the request, whether it may see the dashboard."""

CSRF_COOKIE = "corral_csrf"
CSRF_FIELD = "csrf"
MAX_FORM_BYTES = 2 * 1024 * 1024 + 64 * 1024
"""Largest action form read: a payload at QUEUE_MAX_PAYLOAD_BYTES' default and its fields."""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'self'"
)


class FormError(Exception):
    """An action form that cannot be read (too large, not a form)."""


class Guard:
    """ASGI middleware in front of the whole dashboard (static files included): auth first,
    then the security headers on every response."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        auth: AuthCheck | None,
        basic: tuple[str, str] | None,
        realm: str = "corral dashboard",
    ) -> None:
        self.app = app
        self.auth = auth
        self.basic = (
            (basic[0].encode("utf-8"), basic[1].encode("utf-8")) if basic is not None else None
        )
        self.realm = realm

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = await self._refusal(Request(scope))
        if refused is not None:
            await _with_headers(refused)(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                _add_headers(MutableHeaders(scope=message))
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _refusal(self, request: Request) -> Response | None:
        if self.auth is not None:
            allowed = self.auth(request)
            if inspect.isawaitable(allowed):
                allowed = await allowed
            return None if allowed else PlainTextResponse("forbidden", status_code=403)
        if self.basic is not None and not self._basic_ok(request):
            return PlainTextResponse(
                "the dashboard needs a user and password",
                status_code=401,
                headers={"WWW-Authenticate": f'Basic realm="{self.realm}", charset="UTF-8"'},
            )
        return None

    def _basic_ok(self, request: Request) -> bool:
        assert self.basic is not None
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, colon, password = decoded.partition(b":")
        # Both compared in full every time, so the timing says nothing about which was wrong.
        user_ok = hmac.compare_digest(user, self.basic[0])
        password_ok = hmac.compare_digest(password, self.basic[1])
        return bool(colon) and user_ok and password_ok


def _add_headers(headers: MutableHeaders) -> None:
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("X-Frame-Options", "SAMEORIGIN")
    headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")


def _with_headers(response: Response) -> Response:
    _add_headers(response.headers)
    return response


class Csrf:
    """Tokens for the dashboard's forms: ``HMAC(secret, cookie)``."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    @staticmethod
    def new_cookie() -> str:
        return secrets.token_urlsafe(32)

    def token(self, cookie: str) -> str:
        digest = hmac.new(self.secret, cookie.encode("ascii", "replace"), hashlib.sha256)
        return digest.hexdigest()

    def cookie_of(self, request: Request) -> str | None:
        value = request.cookies.get(CSRF_COOKIE)
        return value if value and len(value) <= 100 else None

    def check(self, request: Request, form: dict[str, str]) -> str | None:
        """Why ``request`` may not act (a message), or ``None`` if it may."""
        # Browsers say where a request comes from; the token below stops those that do not.
        # (Origin is not compared with Host: behind a proxy that rewrites Host they differ.)
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return "requests from other sites may not act on the dashboard"
        cookie = self.cookie_of(request)
        sent = form.get(CSRF_FIELD, "")
        if cookie is None or not hmac.compare_digest(sent, self.token(cookie)):
            return (
                "the form's security token is missing or expired (the dashboard may have "
                "restarted); reload the page and try again"
            )
        return None

    @staticmethod
    def set_cookie(response: Response, request: Request, value: str) -> None:
        response.set_cookie(
            CSRF_COOKIE,
            value,
            path=cookie_path(request),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )


def cookie_path(request: Request) -> str:
    """The dashboard's cookies belong to its own paths, wherever it is mounted."""
    root = str(request.scope.get("root_path", "")).rstrip("/")
    return root + "/" if root else "/"


async def read_form(request: Request, max_bytes: int = MAX_FORM_BYTES) -> dict[str, str]:
    """The fields of a URL-encoded form (the dashboard's forms are all of that kind), reading
    at most ``max_bytes``."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise FormError("actions take a URL-encoded form")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise FormError(f"the form is over {max_bytes} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise FormError("the form is not UTF-8") from None
    try:
        return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=50))
    except ValueError:
        raise FormError("the form has too many fields") from None
