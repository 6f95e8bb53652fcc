"""Internal: the HTTP API: submit (and wait), list, poll / long-poll, fetch files, cancel; auth,
quotas, body limits; metrics and offline API docs."""

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Response
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from wasmbox.errors import InputRejected, ModuleRejected, PolicyViolation, SandboxError
from wasmbox.models import Policy
from wasmbox.sandbox import Sandbox
from wasmbox.service._api_deps import MAX_WAIT_PARAM, St, _bearer, _State, _Waiters, only_query
from wasmbox.service._api_errors import _ERRORS, install_error_handlers
from wasmbox.service._api_fast import LeanApp, add_lean_routes
from wasmbox.service._api_meta import add_meta_routes, mount_docs_assets
from wasmbox.service._placement import placed
from wasmbox.service.config import ServiceConfig
from wasmbox.service.dispatcher import Dispatcher, QuotaExceeded, Runner, make_runner
from wasmbox.service.limits import BodyLimit
from wasmbox.service.metrics import ServiceMetrics
from wasmbox.service.schemas import (
    AnyTaskRequest,
    PolicyList,
    ResourcesRequest,
    TaskList,
    TaskRequest,
    TaskView,
    WasmTaskRequest,
)
from wasmbox.service.store import FINAL, Record, State, TaskStore

# Page sizes of GET /v1/tasks.
DEFAULT_PAGE, MAX_PAGE = 20, 100


def create_app(
    config: ServiceConfig,
    *,
    sandbox_factory: Callable[[Policy], Sandbox] = Sandbox,
    runner: Runner | None = None,
) -> FastAPI:
    """The ASGI application; tasks start running when its lifespan starts."""
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # First: the journal's writer, the workers and the runner processes start from here.
        with placed(config.service) as placement:
            store = TaskStore(config.service.db)
            try:
                waiters = _Waiters(asyncio.get_running_loop())
                dispatcher = Dispatcher(
                    config, store, runner or make_runner(
                        config, sandbox_factory,
                        None if placement is None else placement.runners),
                    metrics, on_final=waiters.notify,
                )
            except BaseException:
                store.close()
                raise
            dispatcher.start()
            app.state.wasmbox = _State(dispatcher, waiters)
            try:
                yield
            finally:
                await run_in_threadpool(dispatcher.close)
                store.close()

    app = LeanApp(
        title="wasmbox task service",
        version="1",
        description="Run untrusted tasks in wasmbox sandboxes over HTTP.",
        lifespan=lifespan,
        docs_url=None,  # served below from local assets
        redoc_url=None,  # ReDoc would come from a CDN
    )
    mount_docs_assets(app)
    app.add_middleware(BodyLimit, max_bytes=config.service.max_body_bytes)

    install_error_handlers(app, metrics)

    async def token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> str:
        name = None if credentials is None else config.authenticate(credentials.credentials)
        if name is None:
            raise HTTPException(401, "a valid bearer token is required",
                                headers={"WWW-Authenticate": "Bearer"})
        return name

    Token = Annotated[str, Depends(token)]

    def submit(
        st: _State, name: str, request: AnyTaskRequest, module: bytes | None,
    ) -> TaskView:
        """Admit and journal a task; its view once it is durable."""
        return TaskView.of(admit(st, name, request, module).result())

    def admit(
        st: _State, name: str, request: AnyTaskRequest, module: bytes | None,
    ) -> Future[Record]:
        """Check and admit a task (client errors raise here); the future gives its record
        once it is journaled."""
        allowed = config.tokens[name].policies
        policy = request.policy or allowed[0]
        if policy not in allowed:
            raise HTTPException(403, f"policy {policy!r} is not available to this token")
        digest = None
        if isinstance(request, WasmTaskRequest) and request.module_sha256 is not None:
            digest = request.module_sha256
            module = st.dispatcher.store.module(name, digest)
            if module is None:
                metrics.refused.labels(code="400").inc()
                raise HTTPException(400, "module_sha256 names no module this token submitted "
                                    "recently: send it once as module_b64")
        try:
            return st.dispatcher.submit_future(name, policy, request.to_task(module), digest)
        except QuotaExceeded as exc:
            metrics.refused.labels(code="429").inc()
            raise HTTPException(429, str(exc), headers={
                "Retry-After": str(max(1, math.ceil(exc.retry_after)))}) from exc
        except (InputRejected, ModuleRejected, PolicyViolation):
            raise  # mapped by `refused`, wherever in a request they are raised
        except (SandboxError, ValidationError) as exc:
            metrics.refused.labels(code="400").inc()
            raise HTTPException(400, f"{type(exc).__name__}: {exc}") from exc

    def owned(st: _State, name: str, task_id: str) -> Record:
        record = st.dispatcher.store.get(task_id)
        if record is None or record.token != name:
            raise HTTPException(404, "no such task")
        return record

    async def until_final(st: _State, name: str, task_id: str, wait: float) -> Record:
        """The caller's task's record once it is final, or after `wait` (at most
        ``max_wait``) seconds; 404 for a task that is not the caller's."""
        timeout = min(wait, config.service.max_wait)
        if timeout <= 0:
            return owned(st, name, task_id)
        # Registered before the journal is read: a task that ends after the read wakes this
        # wait, and one that ended before it is final in what the read returns.
        event = st.waiters.register(task_id)
        try:
            # The caller's task that is known not to be final is waited for at once; any
            # other is read first (404 if it is not the caller's).
            live = st.dispatcher.live_token(task_id) == name
            record = None if live else owned(st, name, task_id)
            if record is None or record.state not in FINAL:
                # The event is this request's own: time running out sets it too (cheaper
                # than a cancelling timeout scope on every long-poll).
                alarm = asyncio.get_running_loop().call_later(timeout, event.set)
                try:
                    await event.wait()
                finally:
                    alarm.cancel()
                record = owned(st, name, task_id)
        finally:
            st.waiters.discard(task_id, event)
        return record

    Wait = Annotated[float, Query(
        ge=0, le=MAX_WAIT_PARAM, description="seconds to wait for the final result (at most the "
        "service's max_wait)")]

    async def submit_view(
        st: _State, name: str, body: AnyTaskRequest, wait: float
    ) -> tuple[Record, int]:
        """Submit; the record and status to answer with (200: final within `wait` seconds)."""
        if (isinstance(body, WasmTaskRequest) and body.module_sha256 is not None
                and body.output_schema is None):
            # A module by reference: admission is a few index lookups (its validation is
            # cached), so it runs here and only the commit is waited for, off the loop.
            record = await asyncio.wrap_future(admit(st, name, body, None))
        else:  # decoding and validating a module, or scanning source, can take a while
            record = await run_in_threadpool(lambda: admit(st, name, body, None).result())
        if wait <= 0:
            return record, 202
        record = await until_final(st, name, record.id, wait)
        return record, 200 if record.state in FINAL else 202

    @app.post("/v1/tasks", status_code=202, response_model=TaskView,
              dependencies=[only_query("wait")], responses={
        **_ERRORS, 200: {"model": TaskView, "description": "final within `wait` seconds"},
        202: {"description": "accepted; not final (yet)"}})
    async def submit_json(
        body: TaskRequest, name: Token, st: St, response: Response, wait: Wait = 0,
    ) -> TaskView:
        """Submit a task (a module as base64, Python source, or a command's argv); it is
        journaled before the answer. With `wait`, answer 200 with the final view if it ends
        within that many seconds, else 202 with the view as it is then."""
        record, response.status_code = await submit_view(st, name, body, wait)
        return TaskView.of(record)

    @app.get("/v1/tasks", responses=_ERRORS, response_model=TaskList,
             dependencies=[only_query("state", "limit", "cursor")])
    def list_tasks(
        name: Token,
        st: St,
        state: Annotated[State | None, Query(description="only tasks in this state")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="page size")] = DEFAULT_PAGE,
        cursor: Annotated[int | None, Query(
            ge=1, le=2**63 - 1, description="`next_cursor` of the previous page")] = None,
    ) -> TaskList:
        """The caller's own tasks, newest first, a page at a time."""
        records, next_cursor = st.dispatcher.store.page(name, state, limit, cursor)
        return TaskList(tasks=[TaskView.of(r) for r in records], next_cursor=next_cursor)

    @app.post("/v1/tasks/upload", status_code=202, responses=_ERRORS, response_model=TaskView)
    def submit_upload(
        name: Token,
        st: St,
        module: Annotated[bytes, File(description="the WASI module")],
        input: Annotated[str, Form(description="the task input, as JSON text")] = "null",
        policy: Annotated[str | None, Form(max_length=128, description="empty: default")] = None,
        timeout: Annotated[float | None, Form(gt=0, description="seconds")] = None,
    ) -> TaskView:
        """Submit a WASI module as a multipart upload (``input`` is JSON text)."""
        try:
            payload = json.loads(input)
        except ValueError as exc:
            raise RequestValidationError([{
                "type": "json_invalid", "loc": ("body", "input"), "msg": f"not JSON: {exc}",
                "input": input,
            }]) from exc
        body = WasmTaskRequest(kind="wasm", module_b64="", input=payload, policy=policy or None,
                               resources=ResourcesRequest(timeout=timeout))
        return submit(st, name, body, module)

    @app.get("/v1/tasks/{task_id}", responses=_ERRORS, response_model=TaskView,
             dependencies=[only_query("wait")])
    async def get_task(
        task_id: str,
        name: Token,
        st: St,
        wait: Wait = 0,
    ) -> TaskView:
        """A task's state and result; with `wait`, block until it is final or time is up."""
        return TaskView.of(await until_final(st, name, task_id, wait))

    @app.get(
        "/v1/tasks/{task_id}/files/{file_name:path}",
        responses={**_ERRORS, 200: {"content": {"application/octet-stream": {}}}},
        response_class=Response,
    )
    def get_file(task_id: str, file_name: str, name: Token, st: St) -> Response:
        """One output file of a finished task, by the name its result lists."""
        if not _safe_name(file_name):
            raise HTTPException(400, "file names are relative paths without '.' or '..' parts")
        owned(st, name, task_id)
        data = st.dispatcher.store.file(task_id, file_name)
        if data is None:
            raise HTTPException(404, "no such file")
        return Response(data, media_type="application/octet-stream")

    @app.post("/v1/tasks/{task_id}/cancel", responses=_ERRORS, response_model=TaskView)
    def cancel(task_id: str, name: Token, st: St) -> TaskView:
        """Cancel a task: a queued one now, a running one is marked cancelled when it ends."""
        owned(st, name, task_id)
        record = st.dispatcher.cancel(task_id)
        assert record is not None
        return TaskView.of(record)

    @app.get("/v1/policies", responses=_ERRORS, response_model=PolicyList)
    def policies(name: Token) -> PolicyList:
        """The policies this token may name; the first is its default."""
        return PolicyList(policies=list(config.tokens[name].policies))
    add_meta_routes(app, metrics)
    add_lean_routes(app, config.authenticate, submit_view, until_final,
                    config.service.max_body_bytes)
    return app


def _safe_name(name: str) -> bool:
    if not name or name.startswith("/") or "\\" in name or "\0" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))
