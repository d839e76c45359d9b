"""The explorer's FastAPI application: pages, static files, JSON endpoints, errors as the
RPCs report them, and the token guard."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from vitscope_server.core.runtime import errors
from vitscope_server.ui import auth
from vitscope_server.ui.explorer import Explorer
from vitscope_server.ui.jobs import error_body
from vitscope_server.ui.routes_api import api_router
from vitscope_server.ui.routes_sae import sae_router

STATIC = Path(__file__).parent / "static"

# gRPC status -> HTTP status for the same error.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "CANCELLED": 409,
    "FAILED_PRECONDITION": 412,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

# Each page is the shared page shell with its own scripts (the last one runs deferred).
PAGES: dict[str, tuple[str, ...]] = {
    "/": ("server.js",),
    "/models/{model}": ("model.js",),
    "/models/{model}/units/{site}/{channel}": ("interventions.js", "unit.js"),
    "/models/{model}/images/{image}": ("interventions.js", "image.js"),
    "/models/{model}/saes/{sae}": ("sae.js",),
}


def page_html(scripts: tuple[str, ...]) -> str:
    """The page shell with the page's scripts; its own script, the last, runs deferred."""
    *helpers, own = scripts
    tags = [f'<script src="/static/{name}"></script>' for name in helpers]
    tags.append(f'<script src="/static/{own}" defer></script>')
    return (STATIC / "page.html").read_text().replace("<!-- page scripts -->", "\n".join(tags))


def _page(scripts: tuple[str, ...]) -> Callable[[], Awaitable[HTMLResponse]]:
    html = page_html(scripts)

    async def page() -> HTMLResponse:
        return HTMLResponse(html)

    return page


async def _login_page() -> FileResponse:
    return FileResponse(STATIC / "login.html", media_type="text/html")


def _add_login(app: FastAPI, token: str | None) -> None:
    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode(errors="replace"))
        candidate = form.get("token", [""])[0]
        target = form.get("next", ["/"])[0]
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        if token is not None and not auth.accepts(token, candidate):
            return RedirectResponse(f"/login?failed=1&next={quote(target, safe='')}", 303)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(auth.COOKIE, candidate, httponly=True, samesite="strict")
        return response


async def _reported(request: Request, exc: Exception) -> JSONResponse:
    """The error as the RPC reports it: status code name, reason, field, message."""
    body = error_body(exc)
    return JSONResponse({"error": body}, status_code=HTTP_STATUS.get(body["code"], 500))


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    """A path or query parameter of the wrong type, as INVALID_ARGUMENT naming it."""
    first = exc.errors()[0] if isinstance(exc, RequestValidationError) and exc.errors() else {}
    field = ".".join(str(part) for part in first.get("loc", ())[1:])
    error = errors.InvalidArgument(field, str(first.get("msg", "invalid")))
    return await _reported(request, error)


def create_app(explorer: Explorer, token: str | None) -> FastAPI:
    app = FastAPI(
        title="vitscope explorer",
        version="1",
        description="The web explorer's JSON endpoints; they call the gRPC service's methods "
        "in process, under the same admission, budgets and batching.",
        docs_url=None,
        redoc_url=None,
    )

    app.exception_handler(errors.VitscopeError)(_reported)
    app.exception_handler(Exception)(_reported)
    app.exception_handler(RequestValidationError)(_invalid)

    app.middleware("http")(auth.token_guard(token))
    app.include_router(api_router(explorer))
    app.include_router(sae_router(explorer))
    for path, scripts in PAGES.items():
        app.add_api_route(path, _page(scripts), methods=["GET"], include_in_schema=False)
    app.add_api_route("/login", _login_page, methods=["GET"], include_in_schema=False)
    _add_login(app, token)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
