"""The server's token protects the explorer too: a request carries it as a bearer header
(scripts) or in a cookie that the login form sets (browsers). Pages without it go to the
login form; endpoints answer 401 with the RPCs' UNAUTHENTICATED reason."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from fastapi import Request, Response
from fastapi.responses import JSONResponse, RedirectResponse

from vitscope_server.core.runtime.errors import Reason

COOKIE = "vitscope_token"
OPEN_PATHS = ("/login", "/static/")


def presented(request: Request) -> str:
    """The token the request carries: the bearer header first, else the cookie."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return value
    return request.cookies.get(COOKIE, "")


def accepts(token: str, candidate: str) -> bool:
    return hmac.compare_digest(candidate.encode(), token.encode())


def refusal(request: Request) -> Response:
    if request.url.path.startswith("/api/") or request.url.path == "/openapi.json":
        body = {
            "code": "UNAUTHENTICATED",
            "reason": Reason.TOKEN_INVALID.value,
            "field": "",
            "message": "missing or invalid token: send 'Authorization: Bearer TOKEN' "
            f"or log in at /login (cookie {COOKIE})",
        }
        return JSONResponse({"error": body}, status_code=401)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)


Handler = Callable[[Request], Awaitable[Response]]


def token_guard(token: str | None) -> Callable[[Request, Handler], Awaitable[Response]]:
    """HTTP middleware: every path but the login form and static files needs the token."""

    async def guard(request: Request, call_next: Handler) -> Response:
        if token is None or request.url.path.startswith(OPEN_PATHS):
            return await call_next(request)
        if accepts(token, presented(request)):
            return await call_next(request)
        return refusal(request)

    return guard
