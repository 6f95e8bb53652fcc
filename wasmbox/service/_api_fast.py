"""Internal: the lean path of the two hot routes, submit (``POST /v1/tasks``) and poll
(``GET /v1/tasks/{task_id}``).

FastAPI's per-request machinery (dependencies, body and response validation) cost more CPU
than the rest of a request for a small task. A lean route sits just before the FastAPI route
of the same path and method and answers the common request itself: a bearer token that
authenticates, at most a plain ``wait``, and (to submit) a JSON body that validates as a
`TaskRequest`. Any other request (no token, an unknown query parameter, a body that does not
validate, ...) goes, body and all, to the FastAPI route, which answers it as it always did.
Admission, quotas and waiting are the FastAPI routes' own functions (passed in here), and what
they raise reaches the app's exception handlers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import TypeAdapter
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from wasmbox.service._api_deps import MAX_WAIT_PARAM, _State
from wasmbox.service.schemas import AnyTaskRequest, TaskRequest, TaskView

# What the lean routes run: the FastAPI routes' own functions.
Submit = Callable[[_State, str, AnyTaskRequest, float], Awaitable[tuple[TaskView, int]]]
Poll = Callable[[_State, str, str, float], Awaitable[TaskView]]

# A ``wait`` the lean path reads itself; anything else is left to FastAPI's validation.
_WAIT = re.compile(r"[0-9]{1,4}(?:\.[0-9]{1,6})?")
_REQUEST: TypeAdapter[AnyTaskRequest] = TypeAdapter(TaskRequest)


def add_lean_routes(
    app: FastAPI, authenticate: Callable[[str], str | None], submit: Submit, poll: Poll
) -> None:
    """Put the lean submit and poll routes just before FastAPI's routes they stand in for."""
    for path, method, lean in (("/v1/tasks", "POST", _Submit), ("/v1/tasks/{task_id}", "GET",
                                                                _Poll)):
        routes = app.router.routes
        index, fallback = next((i, r) for i, r in enumerate(routes) if isinstance(r, APIRoute)
                               and r.path == path and method in (r.methods or ()))
        route = Route(path, lean(fallback, authenticate, submit, poll), methods=[method])
        route.methods = {method}  # not HEAD as well, which Starlette adds to GET
        routes.insert(index, route)


class _Lean:
    def __init__(
        self, fallback: APIRoute, authenticate: Callable[[str], str | None], submit: Submit,
        poll: Poll,
    ) -> None:
        self._fallback = fallback
        self._authenticate = authenticate
        self._submit = submit
        self._poll = poll

    def _caller(self, scope: Scope) -> tuple[str, float] | None:
        """The token's name and the ``wait`` of a request the lean path can take, or None."""
        scheme, _, secret = (Headers(scope=scope).get("authorization") or "").partition(" ")
        wait = _wait(scope.get("query_string", b""))
        if scheme.lower() != "bearer" or not secret.strip() or wait is None:
            return None
        name = self._authenticate(secret.strip())
        return None if name is None else (name, wait)

    async def fall_back(
        self, scope: Scope, receive: Receive, send: Send, body: bytes | None = None
    ) -> None:
        """Hand the request to the FastAPI route (with the `body` already read, if any)."""
        if body is not None:
            receive = _replay(body, receive)
        scope.update(self._fallback.matches(scope)[1])
        await self._fallback.handle(scope, receive, send)


class _Submit(_Lean):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        caller = self._caller(scope)
        content_type = Headers(scope=scope).get("content-type", "")
        if caller is None or content_type.partition(";")[0].strip().lower() != "application/json":
            return await self.fall_back(scope, receive, send)
        try:
            body = await Request(scope, receive).body()
        except HTTPException:  # over the body limit
            raise
        except Exception:  # the client went away: FastAPI's answer
            return await self.fall_back(scope, receive, send)
        try:
            request = _REQUEST.validate_python(json.loads(body))
        except Exception:  # not JSON, too deep, not a task: FastAPI's 422 (or 400)
            return await self.fall_back(scope, receive, send, body)
        name, wait = caller
        view, status = await self._submit(scope["app"].state.wasmbox, name, request, wait)
        await _json(view, status)(scope, receive, send)


class _Poll(_Lean):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        caller = self._caller(scope)
        if caller is None:
            return await self.fall_back(scope, receive, send)
        name, wait = caller
        task_id = scope["path_params"]["task_id"]
        view = await self._poll(scope["app"].state.wasmbox, name, task_id, wait)
        await _json(view, 200)(scope, receive, send)


def _wait(query: bytes) -> float | None:
    """The seconds of a query that is nothing but a plain ``wait`` within bounds (0: none)."""
    if not query:
        return 0.0
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    if len(pairs) != 1 or pairs[0][0] != "wait" or not _WAIT.fullmatch(pairs[0][1]):
        return None
    wait = float(pairs[0][1])
    return wait if wait <= MAX_WAIT_PARAM else None


def _json(view: TaskView, status: int) -> Response:
    """The view as FastAPI serialises a `response_model` (pydantic, by alias)."""
    return Response(view.model_dump_json(by_alias=True), status_code=status,
                    media_type="application/json")


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` as if the body had not been read yet."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
