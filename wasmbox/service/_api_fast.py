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

The app's middleware stack cost about a third of a lean request's CPU, so `LeanApp` answers
these requests in front of it (`_FrontDoor`) when nothing in the stack would act on them: a
request the lean path declines goes through the whole stack to FastAPI, and one whose
answer is an error is answered by the stack too (its handlers, metrics and telemetry), by
raising that error from the lean route inside it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import TypeAdapter
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wasmbox.service._api_deps import MAX_WAIT_PARAM, _State
from wasmbox.service.limits import judge_declared
from wasmbox.service.schemas import AnyTaskRequest, TaskRequest, TaskView

# What the lean routes run: the FastAPI routes' own functions.
Submit = Callable[[_State, str, AnyTaskRequest, float], Awaitable[tuple[TaskView, int]]]
Poll = Callable[[_State, str, str, float], Awaitable[TaskView]]

# A ``wait`` the lean path reads itself; anything else is left to FastAPI's validation.
_WAIT = re.compile(r"[0-9]{1,4}(?:\.[0-9]{1,6})?")
_REQUEST: TypeAdapter[AnyTaskRequest] = TypeAdapter(TaskRequest)
_TASKS, _TASK = "/v1/tasks", "/v1/tasks/"
# Scope keys from the front door to the lean routes in the stack: answer this request as
# FastAPI does (the lean path declined it), or raise this error (the lean path's answer).
_DECLINED, _RAISE = "wasmbox.lean_declined", "wasmbox.lean_raise"


class LeanApp(FastAPI):
    """The service's FastAPI app: `add_lean_routes` also puts its lean routes in front of
    the middleware stack."""

    front_door: tuple[_Submit, _Poll, int] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.front_door is None else _FrontDoor(stack, *self.front_door)


def add_lean_routes(
    app: LeanApp, authenticate: Callable[[str], str | None], submit: Submit, poll: Poll,
    max_body_bytes: int,
) -> None:
    """Put the lean submit and poll routes just before FastAPI's routes they stand in for,
    and in front of the app's middleware stack (which limits bodies to `max_body_bytes`)."""
    leans = []
    for path, method, lean in ((_TASKS, "POST", _Submit), ("/v1/tasks/{task_id}", "GET",
                                                           _Poll)):
        routes = app.router.routes
        index, fallback = next((i, r) for i, r in enumerate(routes) if isinstance(r, APIRoute)
                               and r.path == path and method in (r.methods or ()))
        leans.append(lean(fallback, authenticate, submit, poll))
        route = Route(path, leans[-1], methods=[method])
        route.methods = {method}  # not HEAD as well, which Starlette adds to GET
        routes.insert(index, route)
    submit_lean, poll_lean = leans
    assert isinstance(submit_lean, _Submit) and isinstance(poll_lean, _Poll)
    app.front_door = (submit_lean, poll_lean, max_body_bytes)


class _FrontDoor:
    """ASGI: the app's middleware stack, with the lean routes' requests answered in front of
    it when the stack would only pass them on: a request at the app's root (no root path), of
    a lean route's path and method, whose declared length the body limit lets through (a
    submission must declare one: the stack counts the bytes of any other)."""

    def __init__(self, stack: ASGIApp, submit: _Submit, poll: _Poll, max_body: int) -> None:
        self._stack = stack
        self._submit = submit
        self._poll = poll
        self._max_body = max_body

    def _lean(self, scope: Scope) -> _Lean | None:
        if scope["type"] != "http" or scope.get("root_path"):
            return None
        path, method, headers = scope["path"], scope["method"], scope["headers"]
        if judge_declared(headers, self._max_body) is not None:
            return None
        if method == "POST" and path == _TASKS:
            declared = any(name.lower() == b"content-length" for name, _ in headers)
            return self._submit if declared else None
        task_id = path[len(_TASK):]
        if method == "GET" and path.startswith(_TASK) and task_id and "/" not in task_id:
            scope["path_params"] = {"task_id": task_id}
            return self._poll
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lean = self._lean(scope)
        if lean is None:
            return await self._stack(scope, receive, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            declined = await lean.answer(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            scope[_RAISE] = exc  # the stack answers it: its handlers, its 500
            return await self._stack(scope, receive, send)
        if declined is not None:
            scope[_DECLINED] = True
            await self._stack(scope, receive if declined.body is None
                              else _replay(declined.body, receive), send)


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """As a route inside the middleware stack."""
        if (error := scope.pop(_RAISE, None)) is not None:
            raise error
        if scope.pop(_DECLINED, False):
            return await self.fall_back(scope, receive, send)
        declined = await self.answer(scope, receive, send)
        if declined is not None:
            await self.fall_back(scope, receive, send, declined.body)

    async def answer(self, scope: Scope, receive: Receive, send: Send) -> _Declined | None:
        """Answer the request, or decline it (for FastAPI's route) with the body read."""
        raise NotImplementedError

    async def fall_back(
        self, scope: Scope, receive: Receive, send: Send, body: bytes | None = None
    ) -> None:
        """Hand the request to the FastAPI route (with the `body` already read, if any)."""
        if body is not None:
            receive = _replay(body, receive)
        scope.update(self._fallback.matches(scope)[1])
        await self._fallback.handle(scope, receive, send)


@dataclass(frozen=True, slots=True)
class _Declined:
    body: bytes | None  # None: not read


class _Submit(_Lean):
    async def answer(self, scope: Scope, receive: Receive, send: Send) -> _Declined | None:
        caller = self._caller(scope)
        content_type = Headers(scope=scope).get("content-type", "")
        if caller is None or content_type.partition(";")[0].strip().lower() != "application/json":
            return _Declined(None)
        try:
            body = await Request(scope, receive).body()
        except HTTPException:  # over the body limit
            raise
        except Exception:  # the client went away: FastAPI's answer
            return _Declined(None)
        try:
            request = _REQUEST.validate_python(json.loads(body))
        except Exception:  # not JSON, too deep, not a task: FastAPI's 422 (or 400)
            return _Declined(body)
        name, wait = caller
        view, status = await self._submit(scope["app"].state.wasmbox, name, request, wait)
        await _json(view, status)(scope, receive, send)
        return None


class _Poll(_Lean):
    async def answer(self, scope: Scope, receive: Receive, send: Send) -> _Declined | None:
        caller = self._caller(scope)
        if caller is None:
            return _Declined(None)
        name, wait = caller
        task_id = scope["path_params"]["task_id"]
        view = await self._poll(scope["app"].state.wasmbox, name, task_id, wait)
        await _json(view, 200)(scope, receive, send)
        return None


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
