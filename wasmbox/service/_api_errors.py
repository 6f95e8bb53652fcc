"""Internal: how the HTTP API answers errors: JSON any client text can be rendered in."""

import json
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from wasmbox.errors import InputRejected, ModuleRejected, PolicyViolation
from wasmbox.service.metrics import ServiceMetrics
from wasmbox.service.schemas import Problem

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem, "description": text}
    for code, text in [(400, "bad request"), (401, "no or unknown bearer token"),
                       (403, "the policy forbids it"), (404, "no such task or file"),
                       (413, "request body too large"), (429, "over a quota")]
}


def install_error_handlers(app: FastAPI, metrics: ServiceMetrics) -> None:
    """Answer refused input (400/403), invalid requests (422) and 405s on `app`."""

    # Wherever a request handler meets bad input or a forbidden request, the client hears it
    # as such (never a 500), whichever check raised it.
    async def refused(request: Request, exc: Exception) -> Response:
        code = 403 if isinstance(exc, PolicyViolation) else 400
        metrics.refused.labels(code=str(code)).inc()
        return _ascii_json(code, {"detail": f"{type(exc).__name__}: {exc}"})

    async def invalid(request: Request, exc: Exception) -> Response:
        # FastAPI's own handler echoes the offending input, and a lone surrogate in it made
        # rendering the 422 itself fail with a 500.
        assert isinstance(exc, RequestValidationError)
        try:
            return _ascii_json(422, {"detail": jsonable_encoder(exc.errors())})
        except ValueError:  # an input that is not JSON-able text (bytes, NaN): leave it out
            errors = [{k: v for k, v in e.items() if k not in ("input", "ctx")}
                      for e in exc.errors()]
            return _ascii_json(422, {"detail": jsonable_encoder(errors)})

    async def not_allowed(request: Request, exc: Exception) -> Response:
        # Starlette's 405 names only the methods of the first route that matched the path;
        # /v1/tasks has two (GET lists, POST submits). Routes of the same path template as
        # that first one are the path's operations in the OpenAPI spec.
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code != 405:
            return await http_exception_handler(request, exc)
        routes = [r for r in app.router.routes if isinstance(r, Route)
                  and r.matches({**request.scope, "method": "\0"})[0] is Match.PARTIAL]
        first = routes[0].path if routes else None
        methods = {m for r in routes if r.path == first for m in r.methods or ()}
        return _ascii_json(405, {"detail": exc.detail}, {"Allow": ", ".join(sorted(methods))})

    app.add_exception_handler(StarletteHTTPException, not_allowed)
    for error in (InputRejected, ModuleRejected, PolicyViolation):
        app.add_exception_handler(error, refused)
    app.add_exception_handler(RequestValidationError, invalid)


def _ascii_json(status: int, content: Any, headers: dict[str, str] | None = None) -> Response:
    """A JSON response that renders whatever text a client sent (lone surrogates escaped)."""
    body = json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json", headers=headers)

