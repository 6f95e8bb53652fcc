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

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import TypeAdapter
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wasmbox.service._api_deps import MAX_WAIT_PARAM, _State
from wasmbox.service.limits import BodyTooLarge, judge_declared
from wasmbox.service.schemas import AnyTaskRequest, TaskRequest, view_json
from wasmbox.service.store import Record

# What the lean routes run: the FastAPI routes' own functions.
Submit = Callable[[_State, str, AnyTaskRequest, float], Awaitable[tuple[Record, int]]]
Poll = Callable[[_State, str, str, float], Awaitable[Record]]

# A query the lean path reads itself: nothing but a plain ``wait`` (as bytes, undecoded: a
# percent-escape or a second parameter is left to FastAPI's parsing and validation).
_WAIT_QUERY = re.compile(rb"wait=([0-9]{1,4}(?:\.[0-9]{1,6})?)")
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
        leans.append(lean(fallback, authenticate, submit, poll, max_body_bytes))
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
    submission must declare one: the stack counts the bytes of any other). Standing before
    `BodyLimit`, the lean path counts the bytes it reads itself: the limit, not the declared
    length, bounds them."""

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
        try:
            answer = await lean.answer(scope, receive)
        except Exception as exc:  # nothing was sent: the stack answers it (handlers, its 500)
            scope[_RAISE] = exc
            return await self._stack(scope, receive, send)
        if isinstance(answer, _Declined):
            scope[_DECLINED] = True
            return await self._stack(scope, receive if answer.body is None
                                     else _replay(answer.body, receive), send)
        await answer.send(send)


@dataclass(frozen=True, slots=True)
class _Declined:
    body: bytes | None  # None: not read


@dataclass(frozen=True, slots=True)
class _Answer:
    """A JSON answer, sent as Starlette's `Response` sends one (its headers, their order)."""

    status: int
    body: bytes

    async def send(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": [
            (b"content-length", b"%d" % len(self.body)),
            (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": self.body})


class _Lean:
    def __init__(
        self, fallback: APIRoute, authenticate: Callable[[str], str | None], submit: Submit,
        poll: Poll, max_body: int,
    ) -> None:
        self._fallback = fallback
        self._authenticate = authenticate
        self._submit = submit
        self._poll = poll
        self._max_body = max_body

    def _caller(self, scope: Scope) -> tuple[str, float, bytes] | None:
        """The token's name, the ``wait`` and the content type (b"": none) of a request the
        lean path can take, or None."""
        wait = _wait(scope.get("query_string", b""))
        if wait is None:
            return None
        # Header names are lower case in ASGI; the first of each counts (as in Starlette).
        authorization = content_type = None
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:
                authorization = value
            elif name == b"content-type" and content_type is None:
                content_type = value
        if authorization is None:
            return None
        scheme, _, secret = authorization.decode("latin-1").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            return None
        name = self._authenticate(secret)
        return None if name is None else (name, wait, content_type or b"")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """As a route inside the middleware stack."""
        if (error := scope.pop(_RAISE, None)) is not None:
            raise error
        if scope.pop(_DECLINED, False):
            return await self.fall_back(scope, receive, send)
        answer = await self.answer(scope, receive)
        if isinstance(answer, _Declined):
            await self.fall_back(scope, receive, send, answer.body)
        else:
            await answer.send(send)

    async def answer(self, scope: Scope, receive: Receive) -> _Answer | _Declined:
        """The answer to the request, or declined (for FastAPI's route) with the body read."""
        raise NotImplementedError

    async def fall_back(
        self, scope: Scope, receive: Receive, send: Send, body: bytes | None = None
    ) -> None:
        """Hand the request to the FastAPI route (with the `body` already read, if any)."""
        if body is not None:
            receive = _replay(body, receive)
        scope.update(self._fallback.matches(scope)[1])
        await self._fallback.handle(scope, receive, send)


class _Submit(_Lean):
    async def answer(self, scope: Scope, receive: Receive) -> _Answer | _Declined:
        caller = self._caller(scope)
        if caller is None:
            return _Declined(None)
        name, wait, content_type = caller
        if content_type.partition(b";")[0].strip().lower() != b"application/json":
            return _Declined(None)
        body = await _body(receive, self._max_body)
        if body is None:  # the client went away: FastAPI's answer
            return _Declined(None)
        try:
            request = _REQUEST.validate_python(json.loads(body))
        except Exception:  # not JSON, too deep, not a task: FastAPI's 422 (or 400)
            return _Declined(body)
        record, status = await self._submit(scope["app"].state.wasmbox, name, request, wait)
        return _Answer(status, view_json(record))


class _Poll(_Lean):
    async def answer(self, scope: Scope, receive: Receive) -> _Answer | _Declined:
        caller = self._caller(scope)
        if caller is None:
            return _Declined(None)
        name, wait, _ = caller
        task_id = scope["path_params"]["task_id"]
        record = await self._poll(scope["app"].state.wasmbox, name, task_id, wait)
        return _Answer(200, view_json(record))


def _wait(query: bytes) -> float | None:
    """The seconds of a query that is nothing but a plain ``wait`` within bounds (0: none)."""
    if not query:
        return 0.0
    match = _WAIT_QUERY.fullmatch(query)
    if match is None:
        return None
    wait = float(match[1])
    return wait if wait <= MAX_WAIT_PARAM else None


async def _body(receive: Receive, limit: int) -> bytes | None:
    """The request body (at most `limit` bytes, else `BodyTooLarge`), or None if the client
    went away first."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` as if the body had not been read yet."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
