"""Internal: what the HTTP API's requests share: the bearer scheme, the app's running
state, long-poll wake-ups, and the check that refuses unknown query parameters."""

import asyncio
import threading
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBearer

from wasmbox.service.dispatcher import Dispatcher

_bearer = HTTPBearer(auto_error=False, description="a token from the service config")
# The largest ``wait`` a request may ask for (seconds; the service waits at most max_wait).
MAX_WAIT_PARAM = 3600


class _Waiters:
    """Long-poll wake-ups: worker threads signal, the event loop wakes the waiting requests.

    Signals are gathered until the loop takes them: the results of one journal batch, all
    signalled before the loop gets the GIL back, cost the loop one wake-up, not one each.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._events: dict[str, set[asyncio.Event]] = {}
        self._lock = threading.Lock()  # guards `_ended` and `_scheduled`
        self._ended: list[str] = []
        self._scheduled = False

    def notify(self, task_id: str) -> None:
        with self._lock:
            self._ended.append(task_id)
            if self._scheduled:
                return  # the loop's pending wake-up takes this one too
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._wake)
        except BaseException:  # (a closed loop) the next signal tries again
            with self._lock:
                self._scheduled = False
            raise

    def _wake(self) -> None:
        with self._lock:
            ended, self._ended = self._ended, []
            self._scheduled = False
        for task_id in ended:
            for event in self._events.pop(task_id, set()):
                event.set()

    def register(self, task_id: str) -> asyncio.Event:
        event = asyncio.Event()
        self._events.setdefault(task_id, set()).add(event)
        return event

    def discard(self, task_id: str, event: asyncio.Event) -> None:
        events = self._events.get(task_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._events[task_id]


@dataclass
class _State:
    dispatcher: Dispatcher
    waiters: _Waiters


# Dependencies are coroutines: FastAPI runs a plain function in the thread pool, a hop
# to another thread and back for each of them on every request.
async def state(request: Request) -> _State:
    found: _State = request.app.state.wasmbox
    return found


def only_query(*names: str) -> Any:
    """A dependency refusing query parameters other than `names` (a typo such as
    ``?wiat=10`` is a 422, not silently a request without it)."""
    async def check(request: Request) -> None:
        unknown = sorted(set(request.query_params) - set(names))
        if unknown:
            raise RequestValidationError([{
                "type": "extra_forbidden", "loc": ("query", unknown[0]),
                "msg": f"unknown query parameter (known: {', '.join(names) or 'none'})",
                "input": request.query_params.get(unknown[0]),
            }])
    return Depends(check)


St = Annotated[_State, Depends(state)]
